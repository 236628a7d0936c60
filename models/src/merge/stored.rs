//! Merging stored model versions into a new stored version: what the `Merger` actor and
//! `fogmesh merge` share.
//!
//! The arithmetic beside this file works on named tensors and knows nothing of the
//! store, of manifests or of libtorch (which is why it runs near memory bandwidth and is
//! benchmarked alone); this file is the store-level step around it. [`merge_stored`]
//! resolves the versions named, refuses before reading any weights when the method's
//! parameters are wrong or the versions are not one network with the same sizes
//! (`architecture` and `hyper`, compared field by field so the error names the first
//! field that differs), reads every input through the store (hash-checked), merges,
//! writes the manifest of the result (lineage in `parents`, the method and inputs in
//! `training`) and loads the result as a servable model on the CPU, so that a merged
//! version that could not serve is refused here rather than on a node. It stores
//! nothing: whether the result is stored is the caller's decision, after any validation.

use std::collections::BTreeSet;

use serde_json::Value;

use super::{merge_with_threads, MergeError, MergeMethod, Weights};
use crate::error::ModelError;
use crate::served::{Assets, ServedModel};
use crate::store::{Manifest, ModelStore, StoreError};

/// What to merge and what to call the result.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSpec {
    /// The versions merged, `name@version` or a bare name for its newest version, in
    /// the order the method's parameters refer to (a weighted average's weights,
    /// SLERP's `t = 0` and `t = 1` ends).
    pub inputs: Vec<String>,
    /// The version the deltas are taken from; required by the methods that
    /// [`MergeMethod::needs_base`], refused by the others.
    pub base: Option<String>,
    pub method: MergeMethod,
    /// The merged version's name in the store.
    pub name: String,
    /// Its version; by default one more than the largest whole-number version of
    /// `name` ([`ModelStore::next_version`]).
    pub version: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MergingError {
    #[error("nothing to merge: name at least one stored version")]
    NoInputs,

    #[error("reading {id} from the store: {source}")]
    Store {
        id: String,
        #[source]
        source: StoreError,
    },

    /// Two versions are not the same network with the same sizes; `difference` names
    /// the first differing field and both values.
    #[error("{first} and {second} differ in {difference}: only versions of one network with the same sizes merge")]
    Incompatible {
        first: String,
        second: String,
        difference: String,
    },

    /// The method's parameters, or the weights themselves (missing tensors, shapes,
    /// overflow). `inputs` says which version each `model <i>` of the error is.
    #[error("merging {inputs}: {source}")]
    Merge {
        inputs: String,
        // Boxed, as `source` below: the merge errors are large and this one is returned
        // through every step.
        #[source]
        source: Box<MergeError>,
    },

    #[error("the merged version {id} would not serve: {source}")]
    Unservable {
        id: String,
        #[source]
        source: Box<ModelError>,
    },
}

/// Refuses two manifests that are not the same network with the same sizes: `kind`
/// and the input follow from these two, and the weights' names and shapes too.
pub fn check_same_network(first: &Manifest, second: &Manifest) -> Result<(), MergingError> {
    let incompatible = |difference: String| MergingError::Incompatible {
        first: first.id(),
        second: second.id(),
        difference,
    };
    if first.architecture != second.architecture {
        return Err(incompatible(format!(
            "architecture: {} vs {}",
            first.architecture, second.architecture
        )));
    }
    match json_difference("hyper", &first.hyper, &second.hyper) {
        Some(difference) => Err(incompatible(difference)),
        None => Ok(()),
    }
}

/// The first place (in key order) where `a` and `b` differ, as `path: a vs b`; `None`
/// when they are equal. Arrays of different lengths are reported by their lengths, not
/// printed: a class list or a normalisation vector would drown the message.
fn json_difference(path: &str, a: &Value, b: &Value) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|key| {
                let path = format!("{path}.{key}");
                match (x.get(key), y.get(key)) {
                    (Some(u), Some(v)) => json_difference(&path, u, v),
                    (u, v) => Some(format!(
                        "{path}: {} vs {}",
                        u.map_or("(absent)".to_string(), Value::to_string),
                        v.map_or("(absent)".to_string(), Value::to_string)
                    )),
                }
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() != y.len() => {
            Some(format!("{path}: {} items vs {} items", x.len(), y.len()))
        }
        (Value::Array(x), Value::Array(y)) => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| json_difference(&format!("{path}[{i}]"), u, v)),
        _ if a == b => None,
        _ => Some(format!("{path}: {a} vs {b}")),
    }
}

/// Merges the stored versions `spec` names into a new version, on at most `threads`
/// threads, and returns its manifest (hash and size filled in, `created_us` left for
/// the store) and its safetensors bytes, unstored. `assets` is what loading the result
/// needs (the MiniLM folder for language and multimodal models).
///
/// Steps, each refusing before the next costs more:
/// 1. resolve every id to its manifest;
/// 2. check the method's parameters against the number of inputs and the base;
/// 3. check that every input and the base are one network with the same sizes;
/// 4. read the weights (hash-checked by the store) and merge them;
/// 5. load the result as a [`ServedModel`] on the CPU.
pub fn merge_stored(
    store: &ModelStore,
    spec: &MergeSpec,
    assets: &Assets,
    threads: usize,
) -> Result<(Manifest, Vec<u8>), MergingError> {
    let read = |id: &str| {
        store.get(id).map_err(|source| MergingError::Store {
            id: id.to_string(),
            source,
        })
    };
    let inputs = spec
        .inputs
        .iter()
        .map(|id| read(id))
        .collect::<Result<Vec<_>, _>>()?;
    let base = spec.base.as_deref().map(read).transpose()?;
    // `model <i>` and `the base` are how merge errors name the inputs.
    let labels = inputs
        .iter()
        .enumerate()
        .map(|(i, m)| format!("model {i} = {}", m.id()))
        .chain(base.iter().map(|b| format!("the base = {}", b.id())))
        .collect::<Vec<_>>()
        .join(", ");
    let merge_error = |source| MergingError::Merge {
        inputs: labels.clone(),
        source: Box::new(source),
    };
    let Some((first, others)) = inputs.split_first() else {
        return Err(MergingError::NoInputs);
    };
    spec.method
        .validate(base.is_some(), inputs.len())
        .map_err(merge_error)?;
    for other in others.iter().chain(&base) {
        check_same_network(first, other)?;
    }

    let load = |manifest: &Manifest| -> Result<Weights, MergingError> {
        let bytes = store
            .weights(manifest)
            .map_err(|source| MergingError::Store {
                id: manifest.id(),
                source,
            })?;
        Weights::from_safetensors(&bytes, &manifest.id()).map_err(merge_error)
    };
    let input_weights = inputs.iter().map(load).collect::<Result<Vec<_>, _>>()?;
    let base_weights = base.as_ref().map(load).transpose()?;
    let refs: Vec<&Weights> = input_weights.iter().collect();
    let merged = merge_with_threads(&spec.method, base_weights.as_ref(), &refs, threads)
        .map_err(merge_error)?;
    let (bytes, sha256) = merged.to_safetensors().map_err(merge_error)?;

    let version = match &spec.version {
        Some(version) => version.clone(),
        None => store
            .next_version(&spec.name, None)
            .map_err(|source| MergingError::Store {
                id: spec.name.clone(),
                source,
            })?,
    };
    let input_ids: Vec<String> = inputs.iter().map(Manifest::id).collect();
    // Lineage names each parent once, even a version merged with itself.
    let mut parents: Vec<String> = Vec::new();
    for id in input_ids
        .iter()
        .cloned()
        .chain(base.iter().map(Manifest::id))
    {
        if !parents.contains(&id) {
            parents.push(id);
        }
    }
    let manifest = Manifest {
        name: spec.name.clone(),
        version,
        kind: first.kind,
        architecture: first.architecture.clone(),
        hyper: first.hyper.clone(),
        input: first.input.clone(),
        training: serde_json::json!({
            "merge": spec.method,
            "inputs": input_ids,
            "base": base.as_ref().map(Manifest::id),
        }),
        metrics: Default::default(),
        parents,
        weights_sha256: sha256,
        weights_bytes: bytes.len() as u64,
        created_us: 0,
    };
    ServedModel::load(&manifest, &bytes, assets, tch::Device::Cpu).map_err(|source| {
        MergingError::Unservable {
            id: manifest.id(),
            source: Box::new(source),
        }
    })?;
    Ok((manifest, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_first_differing_field_is_named_with_both_values() {
        let cases = [
            (json!({"a": 1, "b": 2}), json!({"a": 1, "b": 2}), None),
            (
                json!({"config": {"window": 60, "channels": 8}}),
                json!({"config": {"window": 120, "channels": 9}}),
                Some("hyper.config.channels: 8 vs 9"),
            ),
            (
                json!({"config": {"window": 60}}),
                json!({"config": {}}),
                Some("hyper.config.window: 60 vs (absent)"),
            ),
            (
                json!({"names": ["normal", "idv01"]}),
                json!({"names": ["normal", "idv02"]}),
                Some("hyper.names[1]: \"idv01\" vs \"idv02\""),
            ),
            (
                json!({"names": ["normal"]}),
                json!({"names": ["normal", "idv02"]}),
                Some("hyper.names: 1 items vs 2 items"),
            ),
            (json!(1), json!("1"), Some("hyper: 1 vs \"1\"")),
        ];
        for (a, b, expected) in cases {
            assert_eq!(
                json_difference("hyper", &a, &b).as_deref(),
                expected,
                "{a} / {b}"
            );
        }
    }
}
