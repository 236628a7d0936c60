//! One model's weights as merging sees them: named f32 tensors sorted by name, back to
//! back in one flat buffer, so that merging compatible models is one loop over aligned
//! slices and a tensor is a range of it.
//!
//! [`Weights`] writes safetensors through [`crate::weights`], the writer every network
//! uses, so merged weights hash as the network's own would. It reads them on its own
//! terms: unlike a network's checked reader, which knows the tensors its config implies,
//! it takes whatever f32 tensors the file holds, because merging needs no architecture;
//! [`check_compatible`] then requires the same names with the same shapes of every
//! model merged.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use super::MergeError;
use crate::weights::{f32_le, write_f32};

/// One tensor of a [`Weights`]: its values are `values[start..end]`, and
/// `end - start` is always the product of `shape`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Entry {
    pub(super) name: String,
    pub(super) shape: Vec<usize>,
    pub(super) start: usize,
    pub(super) end: usize,
}

/// One model's weights: named f32 tensors, sorted by name, stored back to back in one
/// flat buffer so that merging compatible models is one loop over aligned slices.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights {
    pub(super) tensors: Vec<Entry>,
    pub(super) values: Vec<f32>,
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

impl Weights {
    /// Weights from tensors held in memory (`name`, `shape`, row-major values); `origin`
    /// names them in errors. Refuses duplicate names, values that do not fill their
    /// shape, and non-finite values.
    pub fn from_tensors<I>(tensors: I, origin: &str) -> Result<Self, MergeError>
    where
        I: IntoIterator<Item = (String, Vec<usize>, Vec<f32>)>,
    {
        let mut tensors: Vec<_> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(pair) = tensors.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(MergeError::Duplicate {
                origin: origin.to_string(),
                name: pair[0].0.clone(),
            });
        }
        let mut weights = Weights {
            tensors: Vec::with_capacity(tensors.len()),
            values: Vec::with_capacity(tensors.iter().map(|t| t.2.len()).sum()),
        };
        for (name, shape, values) in tensors {
            if element_count(&shape) != Some(values.len()) {
                return Err(MergeError::Length {
                    origin: origin.to_string(),
                    name,
                    shape,
                    values: values.len(),
                });
            }
            weights.push(name, shape, values.into_iter(), origin)?;
        }
        Ok(weights)
    }

    /// Reads safetensors bytes; `origin` names them in errors (a path, a model version).
    /// Every tensor must be F32 and finite.
    pub fn from_safetensors(bytes: &[u8], origin: &str) -> Result<Self, MergeError> {
        let unreadable = |reason: String| MergeError::Unreadable {
            origin: origin.to_string(),
            reason,
        };
        let file = SafeTensors::deserialize(bytes)
            .map_err(|err| unreadable(format!("not a safetensors file: {err}")))?;
        let mut views: Vec<(&str, TensorView<'_>)> = file.iter().collect();
        views.sort_by(|a, b| a.0.cmp(b.0));
        if let Some((name, view)) = views.iter().find(|(_, view)| view.dtype() != Dtype::F32) {
            return Err(MergeError::Dtype {
                origin: origin.to_string(),
                name: name.to_string(),
                dtype: view.dtype().to_string(),
            });
        }
        let mut weights = Weights {
            tensors: Vec::with_capacity(views.len()),
            values: Vec::with_capacity(views.iter().map(|(_, v)| v.data().len() / 4).sum()),
        };
        for (name, view) in views {
            let data = view.data();
            if element_count(view.shape()).and_then(|n| n.checked_mul(4)) != Some(data.len()) {
                return Err(unreadable(format!(
                    "tensor {name} has shape {:?} but {} bytes",
                    view.shape(),
                    data.len()
                )));
            }
            weights.push(
                name.to_string(),
                view.shape().to_vec(),
                f32_le(data),
                origin,
            )?;
        }
        Ok(weights)
    }

    /// Appends one tensor whose values are known to fill `shape`; names arrive sorted.
    fn push(
        &mut self,
        name: String,
        shape: Vec<usize>,
        values: impl Iterator<Item = f32>,
        origin: &str,
    ) -> Result<(), MergeError> {
        let start = self.values.len();
        self.values.extend(values);
        if let Some(index) = self.values[start..].iter().position(|v| !v.is_finite()) {
            return Err(MergeError::NonFinite {
                origin: origin.to_string(),
                name,
                index,
            });
        }
        let end = self.values.len();
        self.tensors.push(Entry {
            name,
            shape,
            start,
            end,
        });
        Ok(())
    }

    /// The weights as safetensors bytes (sorted by name, no metadata) and their sha256.
    pub fn to_safetensors(&self) -> Result<(Vec<u8>, String), MergeError> {
        let bytes: Vec<u8> = self.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        write_f32(self.tensors.iter().map(|t| {
            (
                t.name.as_str(),
                t.shape.clone(),
                &bytes[t.start * 4..t.end * 4],
            )
        }))
        .map_err(|err| MergeError::Serialise(err.to_string()))
    }

    /// The number of f32 parameters over all tensors.
    pub fn parameters(&self) -> usize {
        self.values.len()
    }

    /// Every value, tensor after tensor in name order.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Every value, to change in place (a federated round adding its merged update):
    /// the layout, names and shapes stay as they are.
    pub fn values_mut(&mut self) -> &mut [f32] {
        &mut self.values
    }

    /// `(name, shape, values)` of every tensor, in name order.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
        self.tensors.iter().map(|t| {
            (
                t.name.as_str(),
                t.shape.as_slice(),
                &self.values[t.start..t.end],
            )
        })
    }

    /// The shape and values of the tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<(&[usize], &[f32])> {
        let k = self
            .tensors
            .binary_search_by(|t| t.name.as_str().cmp(name))
            .ok()?;
        let t = &self.tensors[k];
        Some((&t.shape, &self.values[t.start..t.end]))
    }

    /// The index of the tensor holding flat position `at` (skipping empty tensors).
    pub(super) fn tensor_at(&self, at: usize) -> usize {
        self.tensors.partition_point(|t| t.end <= at)
    }
}

/// Checks that all `models` have the same tensor names and shapes; the error names the
/// first tensor (in name order) that differs and the models involved (`model <i>`).
pub fn check_compatible(models: &[&Weights]) -> Result<(), MergeError> {
    let labelled: Vec<(String, &Weights)> = models
        .iter()
        .enumerate()
        .map(|(i, m)| (format!("model {i}"), *m))
        .collect();
    check_labelled(&labelled)
}

pub(super) fn check_labelled(inputs: &[(String, &Weights)]) -> Result<(), MergeError> {
    let Some(((first_label, first), rest)) = inputs.split_first() else {
        return Ok(());
    };
    for (label, other) in rest {
        first_difference(first_label, first, label, other)?;
    }
    Ok(())
}

fn first_difference(
    a_label: &str,
    a: &Weights,
    b_label: &str,
    b: &Weights,
) -> Result<(), MergeError> {
    let missing = |name: &str, missing_in: &str, present_in: &str| MergeError::MissingTensor {
        name: name.to_string(),
        missing_in: missing_in.to_string(),
        present_in: present_in.to_string(),
    };
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        match x.name.cmp(&y.name) {
            std::cmp::Ordering::Less => return Err(missing(&x.name, b_label, a_label)),
            std::cmp::Ordering::Greater => return Err(missing(&y.name, a_label, b_label)),
            std::cmp::Ordering::Equal if x.shape != y.shape => {
                return Err(MergeError::ShapeMismatch {
                    name: x.name.clone(),
                    first: a_label.to_string(),
                    first_shape: x.shape.clone(),
                    second: b_label.to_string(),
                    second_shape: y.shape.clone(),
                });
            }
            std::cmp::Ordering::Equal => {}
        }
    }
    let common = a.tensors.len().min(b.tensors.len());
    if let Some(extra) = a.tensors.get(common) {
        return Err(missing(&extra.name, b_label, a_label));
    }
    if let Some(extra) = b.tensors.get(common) {
        return Err(missing(&extra.name, a_label, b_label));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::fixtures::{family, weights};
    use crate::merge::{merge, MergeMethod};
    use proptest::prelude::*;

    #[test]
    fn incompatible_models_are_refused_naming_the_tensor() {
        let a = weights(&[("x", &[2], &[1.0, 2.0]), ("y", &[1], &[0.0])]);
        let wide = weights(&[("x", &[1, 2], &[1.0, 2.0]), ("y", &[1], &[0.0])]);
        let short = weights(&[("x", &[2], &[1.0, 2.0])]);
        let other = weights(&[
            ("w", &[1], &[1.0]),
            ("x", &[2], &[1.0, 2.0]),
            ("y", &[1], &[0.0]),
        ]);

        let err = check_compatible(&[&a, &a, &wide]).unwrap_err().to_string();
        assert_eq!(
            err,
            "tensor x has shape [2] in model 0 but [1, 2] in model 2"
        );
        let err = check_compatible(&[&a, &short]).unwrap_err().to_string();
        assert_eq!(err, "model 1 lacks tensor y, which model 0 has");
        let err = check_compatible(&[&short, &a]).unwrap_err().to_string();
        assert_eq!(err, "model 0 lacks tensor y, which model 1 has");
        let err = check_compatible(&[&a, &other]).unwrap_err().to_string();
        assert_eq!(err, "model 0 lacks tensor w, which model 1 has");
        check_compatible(&[&a, &a.clone()]).unwrap();

        let method = MergeMethod::TaskArithmetic { scale: 1.0 };
        let err = merge(&method, Some(&short), &[&a]).unwrap_err().to_string();
        assert_eq!(err, "the base lacks tensor y, which model 0 has");
        let average = MergeMethod::WeightedAverage {
            weights: vec![1.0, 1.0],
        };
        assert!(matches!(
            merge(&average, None, &[&a, &wide]),
            Err(MergeError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn safetensors_bytes_match_the_var_store_writer_and_bad_files_are_refused() {
        use tch::nn;
        tch::manual_seed(3);
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let _layer = nn::linear(vs.root() / "head", 3, 2, Default::default());
        let _other = nn::linear(vs.root() / "body", 2, 2, Default::default());
        let (bytes, sha) = crate::weights::to_safetensors(&vs).unwrap();
        let read = Weights::from_safetensors(&bytes, "vs").unwrap();
        assert_eq!(read.parameters(), 3 * 2 + 2 + 2 * 2 + 2);
        assert_eq!(read.to_safetensors().unwrap(), (bytes.clone(), sha));
        // A merge of the store's weights loads back into the network.
        let average = MergeMethod::WeightedAverage {
            weights: vec![1.0, 1.0],
        };
        let merged = merge(&average, None, &[&read, &read]).unwrap();
        let (merged_bytes, merged_sha) = merged.to_safetensors().unwrap();
        crate::weights::load_into(&mut vs, &merged_bytes, Some(&merged_sha), "merged").unwrap();

        let raw = |dtype, values: &[u8]| {
            let view = TensorView::new(dtype, vec![2], values).unwrap();
            safetensors::serialize([("w", view)], None).unwrap()
        };
        let doubles: Vec<u8> = [1.0f64, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let err = Weights::from_safetensors(&raw(Dtype::F64, &doubles), "f.st").unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor w in weights from f.st has dtype F64, merging needs F32"
        );
        let nan: Vec<u8> = [1.0f32, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let err = Weights::from_safetensors(&raw(Dtype::F32, &nan), "f.st").unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor w in weights from f.st holds a non-finite value at index 1"
        );
        assert!(matches!(
            Weights::from_safetensors(b"not safetensors", "f.st"),
            Err(MergeError::Unreadable { .. })
        ));
        assert!(matches!(
            Weights::from_tensors([("w".to_string(), vec![3], vec![1.0])], "mem"),
            Err(MergeError::Length { .. })
        ));
        assert!(matches!(
            Weights::from_tensors(
                [
                    ("w".to_string(), vec![1], vec![1.0]),
                    ("w".to_string(), vec![1], vec![2.0])
                ],
                "mem"
            ),
            Err(MergeError::Duplicate { .. })
        ));
    }

    proptest! {
        #[test]
        fn a_missing_tensor_or_a_reshaped_one_is_refused(models in family(2)) {
            let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = models[1]
                .tensors()
                .map(|(name, shape, values)| (name.to_string(), shape.to_vec(), values.to_vec()))
                .collect();
            let (name, shape, values) = tensors.pop().unwrap();
            let short = Weights::from_tensors(tensors.clone(), "short").unwrap();
            let err = check_compatible(&[&models[0], &short]).unwrap_err();
            prop_assert_eq!(
                err.to_string(), format!("model 1 lacks tensor {name}, which model 0 has")
            );
            tensors.push((name.clone(), vec![shape.iter().product()], values));
            let flat = Weights::from_tensors(tensors, "flat").unwrap();
            let average = MergeMethod::WeightedAverage { weights: vec![1.0, 1.0] };
            let err = merge(&average, None, &[&models[0], &flat]).unwrap_err();
            let is_shape_error = matches!(err, MergeError::ShapeMismatch { .. });
            prop_assert!(is_shape_error, "{}", err);
        }

        #[test]
        fn safetensors_round_trip_is_exact(models in family(1)) {
            let (bytes, sha) = models[0].to_safetensors().unwrap();
            let read = Weights::from_safetensors(&bytes, "round trip").unwrap();
            prop_assert_eq!(&read, &models[0]);
            prop_assert_eq!(read.to_safetensors().unwrap(), (bytes, sha));
        }
    }
}
