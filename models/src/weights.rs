//! Weights of any `tch::nn::VarStore` model as safetensors bytes, and back.
//!
//! Every network in the zoo keeps its parameters (and buffers such as batch-norm
//! running statistics) in one `VarStore`, named by their path in the module tree. So one
//! writer and one checked reader serve them all: a model builds itself from its config
//! as usual, then [`load_into`] overwrites every variable from the file after checking
//! that the file has exactly the variables the config implies, with the same shapes,
//! in f32, all finite, and (when pinned) the expected sha256. A file trained with
//! another config is refused naming the first tensor that disagrees, never half loaded.
//!
//! Tensors are written sorted by name with no metadata, so equal weights give equal
//! bytes and equal hashes: the model store and hot swaps compare versions by hash.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use sha2::{Digest, Sha256};
use tch::{nn, Tensor};

use crate::error::ModelError;

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The variables of `vs` as safetensors bytes and their sha256.
pub fn to_safetensors(vs: &nn::VarStore) -> Result<(Vec<u8>, String), ModelError> {
    let _no_grad = tch::no_grad_guard();
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut tensors = Vec::with_capacity(variables.len());
    for (name, tensor) in &variables {
        let values =
            Vec::<f32>::try_from(&tensor.f_flatten(0, -1)?.f_to_device(tch::Device::Cpu)?)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        tensors.push((name.as_str(), shape, bytes));
    }
    let serialisation_error = |err: safetensors::SafeTensorError| ModelError::Weights {
        origin: "serialisation".into(),
        reason: err.to_string(),
    };
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|view| (*name, view))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(serialisation_error)?;
    let bytes = safetensors::serialize(views, None).map_err(serialisation_error)?;
    let sha256 = sha256_hex(&bytes);
    Ok((bytes, sha256))
}

/// Overwrites every variable of `vs` from safetensors `bytes`; `origin` names the bytes
/// in errors (a path, or where in-memory bytes came from). Nothing is written unless
/// the whole file checks out.
pub fn load_into(
    vs: &mut nn::VarStore,
    bytes: &[u8],
    expected_sha256: Option<&str>,
    origin: &str,
) -> Result<(), ModelError> {
    let weights_error = |reason: String| ModelError::Weights {
        origin: origin.to_string(),
        reason,
    };
    if let Some(expected) = expected_sha256 {
        let actual = sha256_hex(bytes);
        if !actual.eq_ignore_ascii_case(expected) {
            return Err(ModelError::HashMismatch {
                origin: origin.to_string(),
                expected: expected.to_string(),
                actual,
            });
        }
    }
    let file = SafeTensors::deserialize(bytes)
        .map_err(|err| weights_error(format!("not a safetensors file: {err}")))?;
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut staged = Vec::with_capacity(variables.len());
    for (name, variable) in &variables {
        let view = file.tensor(name).map_err(|_| ModelError::MissingTensor {
            origin: origin.to_string(),
            name: name.clone(),
        })?;
        let expected: Vec<usize> = variable.size().iter().map(|&d| d as usize).collect();
        if view.shape() != expected.as_slice() {
            return Err(ModelError::TensorShape {
                origin: origin.to_string(),
                name: name.clone(),
                expected: format!("{expected:?}"),
                got: format!("{:?}", view.shape()),
            });
        }
        if view.dtype() != Dtype::F32 {
            return Err(weights_error(format!(
                "tensor {name} has dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(weights_error(format!(
                "tensor {name} holds a non-finite value at index {index}"
            )));
        }
        staged.push((name, values));
    }
    if let Some(extra) = file
        .names()
        .into_iter()
        .find(|n| !variables.iter().any(|(name, _)| name == *n))
    {
        return Err(weights_error(format!(
            "unexpected tensor {extra}: the model has no such variable"
        )));
    }
    let _no_grad = tch::no_grad_guard();
    let device = vs.device();
    for ((_, variable), (_, values)) in variables.iter().zip(staged) {
        let source = Tensor::f_from_slice(&values)?
            .f_view(variable.size().as_slice())?
            .f_to_device(device)?;
        let mut target = variable.shallow_clone();
        target.f_copy_(&source)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::Module;
    use tch::Device;

    fn model(seed: i64) -> (nn::VarStore, nn::Linear) {
        tch::manual_seed(seed);
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = nn::linear(vs.root() / "head", 3, 2, Default::default());
        (vs, linear)
    }

    #[test]
    fn round_trip_copies_every_variable_and_is_deterministic() {
        let (a, linear_a) = model(1);
        let (mut b, linear_b) = model(2);
        let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).view([1, 3]);
        let (bytes, sha) = to_safetensors(&a).unwrap();
        assert_eq!(to_safetensors(&a).unwrap().1, sha);
        assert_ne!(to_safetensors(&b).unwrap().1, sha);
        load_into(&mut b, &bytes, Some(&sha.to_uppercase()), "test").unwrap();
        let diff = (linear_a.forward(&x) - linear_b.forward(&x))
            .abs()
            .max()
            .double_value(&[]);
        assert_eq!(diff, 0.0);
        assert_eq!(to_safetensors(&b).unwrap().1, sha);
    }

    #[test]
    fn wrong_hash_shape_missing_and_extra_tensors_are_refused_untouched() {
        let (a, _) = model(1);
        let (bytes, _) = to_safetensors(&a).unwrap();
        let (mut b, _) = model(2);
        let before = to_safetensors(&b).unwrap().1;
        let err = load_into(&mut b, &bytes, Some("00"), "w.safetensors").unwrap_err();
        assert!(matches!(err, ModelError::HashMismatch { .. }), "{err}");

        let vs = nn::VarStore::new(Device::Cpu);
        let _wide = nn::linear(vs.root() / "head", 4, 2, Default::default());
        let (wide, _) = to_safetensors(&vs).unwrap();
        let err = load_into(&mut b, &wide, None, "w.safetensors").unwrap_err();
        assert!(err.to_string().contains("head.weight"), "{err}");

        let vs = nn::VarStore::new(Device::Cpu);
        let _other = nn::linear(vs.root() / "other", 3, 2, Default::default());
        let (other, _) = to_safetensors(&vs).unwrap();
        let err = load_into(&mut b, &other, None, "w.safetensors").unwrap_err();
        assert!(matches!(err, ModelError::MissingTensor { .. }), "{err}");

        let vs = nn::VarStore::new(Device::Cpu);
        let _head = nn::linear(vs.root() / "head", 3, 2, Default::default());
        let _more = nn::linear(vs.root() / "more", 3, 2, Default::default());
        let (more, _) = to_safetensors(&vs).unwrap();
        let err = load_into(&mut b, &more, None, "w.safetensors").unwrap_err();
        assert!(err.to_string().contains("unexpected tensor more"), "{err}");

        assert!(load_into(&mut b, b"not safetensors", None, "w").is_err());
        assert_eq!(to_safetensors(&b).unwrap().1, before);
    }
}
