//! Weights of every network in the zoo as safetensors bytes, and back: the one writer
//! and the one checked reader.
//!
//! Most networks keep their parameters (and buffers such as batch-norm running
//! statistics) in one `VarStore`, named by their path in the module tree. So one writer
//! and one checked reader serve them all: a model builds itself from its config as
//! usual, then [`load_into`] overwrites every variable from the file after checking
//! that the file has exactly the variables the config implies, with the same shapes,
//! in f32, all finite, and (when pinned) the expected sha256. A file trained with
//! another config is refused naming the first tensor that disagrees, never half loaded.
//! Networks that need the tensors in their own order read through [`WeightFile`], which
//! makes the same checks tensor by tensor: the autoencoder names the first mismatch in
//! forward order, and MiniLM takes plain tensors from a file that also carries tensors
//! it does not use (BERT's pooler).
//!
//! Tensors are written sorted by name with no metadata, so equal weights give equal
//! bytes and equal hashes: the model store and hot swaps compare versions by hash, and
//! [`crate::merge`] writes merged weights through the same writer so that they hash as
//! a network's own would.

use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use safetensors::SafeTensorError;
use sha2::{Digest, Sha256};
use tch::{nn, Device, Tensor};

use crate::error::ModelError;

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    digest_hex(&Sha256::digest(bytes))
}

/// A digest in lowercase hex, as manifests and headers carry it.
pub fn digest_hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Named f32 tensors (`name`, shape, little-endian bytes) as safetensors bytes and
/// their sha256. safetensors sorts the tensors by name whatever order they come in.
pub(crate) fn write_f32<'a>(
    tensors: impl IntoIterator<Item = (&'a str, Vec<usize>, &'a [u8])>,
) -> Result<(Vec<u8>, String), SafeTensorError> {
    let views = tensors
        .into_iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape, bytes).map(|view| (name, view))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None)?;
    let sha256 = sha256_hex(&bytes);
    Ok((bytes, sha256))
}

/// The f32 values in little-endian `bytes`, as safetensors stores them.
pub(crate) fn f32_le(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The variables of `vs` as safetensors bytes and their sha256.
pub fn to_safetensors(vs: &nn::VarStore) -> Result<(Vec<u8>, String), ModelError> {
    let _no_grad = tch::no_grad_guard();
    let mut tensors = Vec::new();
    for (name, tensor) in vs.variables() {
        let values = Vec::<f32>::try_from(&tensor.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        tensors.push((name, shape, bytes));
    }
    write_f32(
        tensors
            .iter()
            .map(|(name, shape, bytes)| (name.as_str(), shape.clone(), bytes.as_slice())),
    )
    .map_err(|err| ModelError::Weights {
        origin: "serialisation".into(),
        reason: err.to_string(),
    })
}

/// The bytes of the weights file at `path`; an `Io` error names the path.
pub fn read_file(path: &Path) -> Result<Vec<u8>, ModelError> {
    std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Overwrites every variable of `vs` from safetensors `bytes`; `origin` names the bytes
/// in errors (a path, or where in-memory bytes came from). Variables are checked in
/// name order, and nothing is written unless the whole file checks out.
pub fn load_into(
    vs: &mut nn::VarStore,
    bytes: &[u8],
    expected_sha256: Option<&str>,
    origin: &str,
) -> Result<(), ModelError> {
    let file = WeightFile::parse(bytes, expected_sha256, origin)?;
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let staged = variables
        .iter()
        .map(|(name, variable)| file.values(name, &variable.size()))
        .collect::<Result<Vec<_>, _>>()?;
    file.refuse_others(
        |name| variables.iter().any(|(known, _)| known == name),
        "the model has no such variable",
    )?;
    let _no_grad = tch::no_grad_guard();
    let device = vs.device();
    for ((_, variable), values) in variables.iter().zip(staged) {
        let source = Tensor::f_from_slice(&values)?
            .f_view(variable.size().as_slice())?
            .f_to_device(device)?;
        let mut target = variable.shallow_clone();
        target.f_copy_(&source)?;
    }
    Ok(())
}

/// A safetensors file whose hash (when pinned) checked out, read tensor by tensor with
/// the checks of [`load_into`]; for networks that need the tensors in their own order
/// or as plain tensors.
pub struct WeightFile<'a> {
    file: SafeTensors<'a>,
    origin: String,
}

impl<'a> WeightFile<'a> {
    /// Checks `bytes` against `expected_sha256` (hex, any case) when given
    /// (`HashMismatch`), then parses them (`Weights` when they are not safetensors).
    /// `origin` names the bytes in every error: a path, or where in-memory bytes came
    /// from.
    pub fn parse(
        bytes: &'a [u8],
        expected_sha256: Option<&str>,
        origin: &str,
    ) -> Result<Self, ModelError> {
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
        let file = SafeTensors::deserialize(bytes).map_err(|err| ModelError::Weights {
            origin: origin.to_string(),
            reason: format!("not a safetensors file: {err}"),
        })?;
        Ok(WeightFile {
            file,
            origin: origin.to_string(),
        })
    }

    /// The shape of tensor `name` (`MissingTensor` when there is none).
    pub fn shape(&self, name: &str) -> Result<Vec<usize>, ModelError> {
        self.file
            .tensor(name)
            .map(|view| view.shape().to_vec())
            .map_err(|_| ModelError::MissingTensor {
                origin: self.origin.clone(),
                name: name.to_string(),
            })
    }

    /// The values of tensor `name`, row-major, after checking that it exists
    /// (`MissingTensor`), has `shape` (`TensorShape`), is f32 and is finite (`Weights`).
    pub fn values(&self, name: &str, shape: &[i64]) -> Result<Vec<f32>, ModelError> {
        let view = self
            .file
            .tensor(name)
            .map_err(|_| ModelError::MissingTensor {
                origin: self.origin.clone(),
                name: name.to_string(),
            })?;
        let expected: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
        if view.shape() != expected.as_slice() {
            return Err(ModelError::TensorShape {
                origin: self.origin.clone(),
                name: name.to_string(),
                expected: format!("{expected:?}"),
                got: format!("{:?}", view.shape()),
            });
        }
        if view.dtype() != Dtype::F32 {
            return Err(self.malformed(format!(
                "tensor {name} has dtype {:?}, expected F32",
                view.dtype()
            )));
        }
        let values: Vec<f32> = f32_le(view.data()).collect();
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.malformed(format!(
                "tensor {name} holds a non-finite value at index {index}"
            )));
        }
        Ok(values)
    }

    /// Tensor `name` on `device`, checked as [`Self::values`] checks it.
    pub fn tensor(&self, name: &str, shape: &[i64], device: Device) -> Result<Tensor, ModelError> {
        let values = self.values(name, shape)?;
        Ok(Tensor::f_from_slice(&values)?
            .f_view(shape)?
            .f_to_device(device)?)
    }

    /// Refuses a file holding a tensor that `known` does not accept, as
    /// `unexpected tensor <name>: <reason>`: a file with a layer the network lacks was
    /// trained for another network, even when every expected tensor is there.
    pub fn refuse_others(
        &self,
        known: impl Fn(&str) -> bool,
        reason: &str,
    ) -> Result<(), ModelError> {
        match self.file.names().into_iter().find(|name| !known(name)) {
            Some(extra) => Err(self.malformed(format!("unexpected tensor {extra}: {reason}"))),
            None => Ok(()),
        }
    }

    fn malformed(&self, reason: String) -> ModelError {
        ModelError::Weights {
            origin: self.origin.clone(),
            reason,
        }
    }
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

    #[test]
    fn a_weight_file_reads_tensors_by_name_and_refuses_others_only_when_asked() {
        let vs = nn::VarStore::new(Device::Cpu);
        let head = nn::linear(vs.root() / "head", 3, 2, Default::default());
        let _pooler = nn::linear(vs.root() / "pooler", 3, 2, Default::default());
        let (bytes, _) = to_safetensors(&vs).unwrap();
        let file = WeightFile::parse(&bytes, None, "w.safetensors").unwrap();

        let weight = file.tensor("head.weight", &[2, 3], Device::Cpu).unwrap();
        assert!(weight.equal(&head.ws));
        match file.values("head.bias", &[3]) {
            Err(ModelError::TensorShape {
                origin,
                name,
                expected,
                got,
            }) => {
                assert_eq!(origin, "w.safetensors");
                assert_eq!(name, "head.bias");
                assert_eq!((expected.as_str(), got.as_str()), ("[3]", "[2]"));
            }
            other => panic!("expected TensorShape, got {other:?}"),
        }
        assert!(matches!(
            file.values("head.gain", &[2]),
            Err(ModelError::MissingTensor { .. })
        ));

        file.refuse_others(|_| true, "unused").unwrap();
        let err = file
            .refuse_others(|name| name.starts_with("head."), "only the head is read")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unexpected tensor pooler.") && err.ends_with("only the head is read"),
            "{err}"
        );
    }
}
