//! Model merging: replicas of one architecture that learned on different fog nodes fused
//! into one model, and fine-tuned deltas folded back into the base they started from.
//!
//! Merging is arithmetic on named f32 tensors, so it works on the weights as the model
//! store keeps them (safetensors bytes, [`crate::weights`]) without building the network:
//! [`Weights`] reads them into one flat buffer (tensors sorted by name, each a range of
//! it), [`merge`] checks that every input has the same tensors with the same shapes
//! ([`check_compatible`]) and the method's parameters, then computes the merged buffer
//! in one pass over the output, in cache-sized blocks spread over scoped threads. The
//! result is checked finite (a large `scale` can overflow) and written back through the
//! zoo's one safetensors writer, so equal weights give equal bytes and the same sha256
//! as [`crate::weights::to_safetensors`] gives the network's own.
//!
//! The methods ([`MergeMethod`]): a weighted average of N replicas; task arithmetic
//! (Ilharco et al. 2023), TIES (Yadav et al. 2023) and DARE (Yu et al. 2023), which add
//! the models' deltas from a separate base; and SLERP between two models. Libtorch is
//! not involved: the loops are plain slices the compiler vectorises, and a merge of a
//! few hundred megabytes runs near memory bandwidth.
//!
//! [`merge_stored`] is the step around the arithmetic for stored versions, which the
//! `Merger` actor and `fogmesh merge` share: it checks that the versions are one network,
//! reads them hash-checked, merges them and proves the result serves.
//!
//! Files: `weights.rs`, the tensor container and the check that models are compatible;
//! `arithmetic.rs`, the per-method math and its threads; `stored.rs`, the store-level
//! step. This one holds what they share, the method and its errors, and re-exports
//! everything callers use, so that every path is `fogmesh_models::merge::…`.

use serde::{Deserialize, Serialize};

mod arithmetic;
#[cfg(test)]
mod fixtures;
mod stored;
mod weights;

pub use arithmetic::{default_threads, merge, merge_into, merge_with_threads};
pub use stored::{check_same_network, merge_stored, MergeSpec, MergingError};
pub use weights::{check_compatible, Weights};

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The bytes are not a safetensors file, or their layout is inconsistent.
    #[error("weights from {origin}: {reason}")]
    Unreadable { origin: String, reason: String },

    /// Merging is f32 arithmetic; other dtypes would need a policy for the result's.
    #[error("tensor {name} in weights from {origin} has dtype {dtype}, merging needs F32")]
    Dtype {
        origin: String,
        name: String,
        dtype: String,
    },

    #[error("tensor {name} in weights from {origin} holds a non-finite value at index {index}")]
    NonFinite {
        origin: String,
        name: String,
        index: usize,
    },

    /// Tensors handed over in memory whose values do not fill their shape.
    #[error("tensor {name} in {origin} has shape {shape:?} but {values} values")]
    Length {
        origin: String,
        name: String,
        shape: Vec<usize>,
        values: usize,
    },

    #[error("tensor {name} appears twice in {origin}")]
    Duplicate { origin: String, name: String },

    /// `missing_in` and `present_in` name inputs: `the base` or `model <i>`.
    #[error("{missing_in} lacks tensor {name}, which {present_in} has")]
    MissingTensor {
        name: String,
        missing_in: String,
        present_in: String,
    },

    #[error("tensor {name} has shape {first_shape:?} in {first} but {second_shape:?} in {second}")]
    ShapeMismatch {
        name: String,
        first: String,
        first_shape: Vec<usize>,
        second: String,
        second_shape: Vec<usize>,
    },

    /// A method parameter (or the number of models, or the base) is out of range.
    #[error("invalid {field} = {value}: {reason}")]
    InvalidParameter {
        field: String,
        value: String,
        reason: String,
    },

    /// Finite inputs can still overflow f32 (large deltas times a large `scale`).
    #[error(
        "the merge produced a non-finite value in tensor {name} at index {index}; lower the scale"
    )]
    NonFiniteResult { name: String, index: usize },

    #[error("serialising merged weights: {0}")]
    Serialise(String),
}

/// How to merge; serialised as `{"method": "ties", "density": 0.2, "scale": 1.0}`.
/// Task arithmetic, TIES and DARE work on deltas from a base model, passed to [`merge`]
/// next to the models; the weighted average and SLERP take none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum MergeMethod {
    /// `Σ wᵢ·modelᵢ / Σ wᵢ`: one weight per model, each ≥ 0, not all zero.
    WeightedAverage { weights: Vec<f64> },
    /// `base + scale·Σ (modelᵢ − base)`.
    TaskArithmetic { scale: f64 },
    /// TIES: each delta `modelᵢ − base` keeps its `round(density·n)` largest magnitudes
    /// over the whole model (at least one; values tied with the last kept one are kept
    /// too); each parameter's sign is elected by the sign of the sum of the kept
    /// values; the kept values of the elected sign are averaged, and `scale` times that
    /// mean is added to the base. A parameter whose kept values sum to exactly zero
    /// keeps the base value. `density` in (0, 1].
    Ties { density: f64, scale: f64 },
    /// DARE: each delta element is dropped with probability `drop_rate` (in [0, 1)) and
    /// survivors are scaled by `1 / (1 − drop_rate)`; then as task arithmetic. The drops
    /// depend only on `seed`, the model's position and the element's, not on threads.
    Dare {
        drop_rate: f64,
        seed: u64,
        scale: f64,
    },
    /// Spherical interpolation between exactly two models, tensor by tensor (each
    /// flattened): `t = 0` gives the first, `t = 1` the second. Nearly colinear tensors
    /// (|cos| > 0.9995) and zero tensors are interpolated linearly.
    Slerp { t: f64 },
}

impl MergeMethod {
    /// The method's name as serialised (`weighted_average`, `ties`, …).
    pub fn name(&self) -> &'static str {
        match self {
            MergeMethod::WeightedAverage { .. } => "weighted_average",
            MergeMethod::TaskArithmetic { .. } => "task_arithmetic",
            MergeMethod::Ties { .. } => "ties",
            MergeMethod::Dare { .. } => "dare",
            MergeMethod::Slerp { .. } => "slerp",
        }
    }

    /// Whether the method adds deltas to a base model.
    pub fn needs_base(&self) -> bool {
        matches!(
            self,
            MergeMethod::TaskArithmetic { .. }
                | MergeMethod::Ties { .. }
                | MergeMethod::Dare { .. }
        )
    }

    /// Checks the parameters against a merge of `models` models, with a base or not,
    /// before any weights are read: [`merge`] runs the same check, but a caller that
    /// loads models from disk can refuse a bad request without reading them.
    pub fn validate(&self, base: bool, models: usize) -> Result<(), MergeError> {
        let invalid = |field: &str, value: String, reason: String| {
            Err(MergeError::InvalidParameter {
                field: field.to_string(),
                value,
                reason,
            })
        };
        if models == 0 {
            return invalid("models", "0".into(), "at least one model is needed".into());
        }
        if self.needs_base() && !base {
            return invalid(
                "base",
                "none".into(),
                format!("{} adds deltas to the base model", self.name()),
            );
        }
        if !self.needs_base() && base {
            return invalid(
                "base",
                "given".into(),
                format!("{} takes no base model", self.name()),
            );
        }
        let check_scale = |scale: f64| {
            if scale.is_finite() {
                Ok(())
            } else {
                invalid("scale", scale.to_string(), "must be finite".into())
            }
        };
        match self {
            MergeMethod::WeightedAverage { weights } => {
                if weights.len() != models {
                    return invalid(
                        "weights",
                        format!("{weights:?}"),
                        format!("{} weights for {models} models", weights.len()),
                    );
                }
                if let Some((i, w)) = weights
                    .iter()
                    .enumerate()
                    .find(|(_, w)| !(w.is_finite() && **w >= 0.0))
                {
                    return invalid(
                        &format!("weights[{i}]"),
                        w.to_string(),
                        "weights must be finite and non-negative".into(),
                    );
                }
                let sum: f64 = weights.iter().sum();
                if !(sum > 0.0 && sum.is_finite()) {
                    return invalid(
                        "weights",
                        format!("{weights:?}"),
                        "their sum must be positive and finite".into(),
                    );
                }
                Ok(())
            }
            MergeMethod::TaskArithmetic { scale } => check_scale(*scale),
            MergeMethod::Ties { density, scale } => {
                if !(*density > 0.0 && *density <= 1.0) {
                    return invalid("density", density.to_string(), "must be in (0, 1]".into());
                }
                check_scale(*scale)
            }
            MergeMethod::Dare {
                drop_rate, scale, ..
            } => {
                if !(*drop_rate >= 0.0 && *drop_rate < 1.0) {
                    return invalid(
                        "drop_rate",
                        drop_rate.to_string(),
                        "must be in [0, 1)".into(),
                    );
                }
                check_scale(*scale)
            }
            MergeMethod::Slerp { t } => {
                if models != 2 {
                    return invalid(
                        "models",
                        models.to_string(),
                        "slerp interpolates between exactly two models".into(),
                    );
                }
                if !(*t >= 0.0 && *t <= 1.0) {
                    return invalid("t", t.to_string(), "must be in [0, 1]".into());
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::one;
    use super::*;

    #[test]
    fn invalid_parameters_are_refused_naming_field_and_value() {
        let m = one(&[1.0]);
        let cases: Vec<(MergeMethod, Option<&Weights>, Vec<&Weights>, &str)> = vec![
            (
                MergeMethod::WeightedAverage { weights: vec![] },
                None,
                vec![],
                "invalid models = 0",
            ),
            (
                MergeMethod::WeightedAverage { weights: vec![1.0] },
                None,
                vec![&m, &m],
                "invalid weights = [1.0]: 1 weights for 2 models",
            ),
            (
                MergeMethod::WeightedAverage {
                    weights: vec![1.0, -0.5],
                },
                None,
                vec![&m, &m],
                "invalid weights[1] = -0.5",
            ),
            (
                MergeMethod::WeightedAverage {
                    weights: vec![0.0, 0.0],
                },
                None,
                vec![&m, &m],
                "sum must be positive",
            ),
            (
                MergeMethod::WeightedAverage { weights: vec![1.0] },
                Some(&m),
                vec![&m],
                "invalid base = given",
            ),
            (
                MergeMethod::TaskArithmetic { scale: 1.0 },
                None,
                vec![&m],
                "invalid base = none",
            ),
            (
                MergeMethod::TaskArithmetic { scale: f64::NAN },
                Some(&m),
                vec![&m],
                "invalid scale = NaN",
            ),
            (
                MergeMethod::Ties {
                    density: 0.0,
                    scale: 1.0,
                },
                Some(&m),
                vec![&m],
                "invalid density = 0",
            ),
            (
                MergeMethod::Ties {
                    density: 1.5,
                    scale: 1.0,
                },
                Some(&m),
                vec![&m],
                "invalid density = 1.5",
            ),
            (
                MergeMethod::Dare {
                    drop_rate: 1.0,
                    seed: 0,
                    scale: 1.0,
                },
                Some(&m),
                vec![&m],
                "invalid drop_rate = 1",
            ),
            (
                MergeMethod::Dare {
                    drop_rate: -0.1,
                    seed: 0,
                    scale: 1.0,
                },
                Some(&m),
                vec![&m],
                "invalid drop_rate = -0.1",
            ),
            (
                MergeMethod::Slerp { t: 0.5 },
                None,
                vec![&m, &m, &m],
                "invalid models = 3",
            ),
            (
                MergeMethod::Slerp { t: 1.5 },
                None,
                vec![&m, &m],
                "invalid t = 1.5",
            ),
        ];
        for (method, base, models, expected) in cases {
            let err = merge(&method, base, &models).unwrap_err().to_string();
            assert!(err.contains(expected), "{method:?}: {err}");
        }
    }

    #[test]
    fn methods_round_trip_through_json() {
        let method: MergeMethod =
            serde_json::from_str(r#"{"method":"dare","drop_rate":0.9,"seed":4,"scale":0.5}"#)
                .unwrap();
        assert_eq!(
            method,
            MergeMethod::Dare {
                drop_rate: 0.9,
                seed: 4,
                scale: 0.5
            }
        );
        let json = serde_json::to_string(&MergeMethod::Slerp { t: 0.5 }).unwrap();
        assert_eq!(json, r#"{"method":"slerp","t":0.5}"#);
        assert!(
            serde_json::from_str::<MergeMethod>(r#"{"method":"slerp","t":0.5,"x":1}"#).is_err()
        );
    }
}
