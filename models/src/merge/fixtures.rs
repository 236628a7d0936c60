//! Weights written out by hand and random families of one layout, shared by the merge
//! tests of every file in this folder.

use proptest::prelude::*;

use super::Weights;

pub(super) fn weights(tensors: &[(&str, &[usize], &[f32])]) -> Weights {
    Weights::from_tensors(
        tensors
            .iter()
            .map(|(name, shape, values)| (name.to_string(), shape.to_vec(), values.to_vec())),
        "test",
    )
    .unwrap()
}

pub(super) fn one(values: &[f32]) -> Weights {
    weights(&[("w", &[values.len()], values)])
}

pub(super) fn assert_close(actual: &[f32], expected: &[f32], tolerance: f32) {
    assert_eq!(actual.len(), expected.len());
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (a - e).abs() <= tolerance * e.abs().max(1.0),
            "index {i}: {a} != {e} (actual {actual:?}, expected {expected:?})"
        );
    }
}

/// `count` models of one random layout (1 to 3 tensors of up to 4×4), values in ±10.
pub(super) fn family(count: usize) -> impl Strategy<Value = Vec<Weights>> {
    prop::collection::vec((1usize..5, 1usize..5), 1..4).prop_flat_map(move |shapes| {
        let total: usize = shapes.iter().map(|(r, c)| r * c).sum();
        prop::collection::vec(prop::collection::vec(-10.0f32..10.0, total), count)
            .prop_map(move |flats| flats.iter().map(|flat| build(&shapes, flat)).collect())
    })
}

fn build(shapes: &[(usize, usize)], flat: &[f32]) -> Weights {
    let mut at = 0;
    let tensors: Vec<_> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(rows, cols))| {
            let values = flat[at..at + rows * cols].to_vec();
            at += rows * cols;
            (format!("layer{k}.weight"), vec![rows, cols], values)
        })
        .collect();
    Weights::from_tensors(tensors, "proptest").unwrap()
}

/// `layout`'s tensors over other values: models that must share a layout exactly.
pub(super) fn with_values(layout: &Weights, values: Vec<f32>) -> Weights {
    Weights {
        tensors: layout.tensors.clone(),
        values,
    }
}
