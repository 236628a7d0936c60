//! Turning anomaly scores into decision thresholds.
//!
//! An expert's alarm threshold is a high quantile of its scores on held-out normal
//! windows (e.g. q = 0.99 for a 1% false-alarm budget). Scores of windows with missing
//! samples are NaN, so non-finite values are skipped rather than allowed to poison the
//! threshold.

use crate::error::ModelError;

/// Per-column mean and (population) deviation of row-major `rows`, in f64. A column
/// that does not move keeps a deviation of 1, so standardising by it cannot blow up
/// later values.
pub fn column_stats(rows: &[f32], columns: usize) -> (Vec<f64>, Vec<f64>) {
    let n = (rows.len() / columns.max(1)).max(1) as f64;
    let mut mean = vec![0.0f64; columns];
    let mut square = vec![0.0f64; columns];
    for row in rows.chunks_exact(columns.max(1)) {
        for (c, v) in row.iter().enumerate() {
            mean[c] += f64::from(*v);
            square[c] += f64::from(*v) * f64::from(*v);
        }
    }
    let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
    let std = square
        .iter()
        .zip(&mean)
        .map(|(s, m)| {
            let sd = (s / n - m * m).max(0.0).sqrt();
            if sd > 1e-9 {
                sd
            } else {
                1.0
            }
        })
        .collect();
    (mean, std)
}

/// The `q`-quantile (0 ≤ q ≤ 1) of the finite values, interpolating linearly between
/// the two nearest order statistics (NumPy's default "linear" method). Non-finite values
/// are ignored. Errors with `InvalidOption` when `q` is outside [0, 1] or no value is
/// finite. Runs in O(n) by selection, not sorting.
pub fn quantile(values: &[f32], q: f64) -> Result<f32, ModelError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(ModelError::InvalidOption {
            field: "q",
            value: q.to_string(),
            reason: "a quantile must lie in [0, 1]".into(),
        });
    }
    let mut finite: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return Err(ModelError::InvalidOption {
            field: "values",
            value: format!("{} values, none finite", values.len()),
            reason: "a quantile needs at least one finite value".into(),
        });
    }
    let position = q * (finite.len() - 1) as f64;
    let below = position.floor() as usize;
    let fraction = position - below as f64;
    let (_, &mut low, above) = finite.select_nth_unstable_by(below, f32::total_cmp);
    if fraction == 0.0 {
        return Ok(low);
    }
    let high = above
        .iter()
        .copied()
        .min_by(f32::total_cmp)
        .expect("a fractional position lies strictly below the largest value");
    // Between two f32 order statistics, so the f64 result rounds back into their range.
    Ok((f64::from(low) + (f64::from(high) - f64::from(low)) * fraction) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_stats_standardise_and_spare_still_columns() {
        let rows = [1.0, 5.0, 3.0, 5.0];
        let (mean, std) = column_stats(&rows, 2);
        assert_eq!(mean, vec![2.0, 5.0]);
        assert_eq!(std, vec![1.0, 1.0], "column 1 never moves: deviation 1");
        let (_, std) = column_stats(&[0.0, 4.0], 1);
        assert_eq!(std, vec![2.0]);
    }
    use proptest::prelude::*;

    /// The textbook definition over a fully sorted copy.
    fn reference(values: &[f32], q: f64) -> f32 {
        let mut sorted: Vec<f32> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f32::total_cmp);
        let position = q * (sorted.len() - 1) as f64;
        let low = sorted[position.floor() as usize];
        let high = sorted[position.ceil() as usize];
        (f64::from(low) + (f64::from(high) - f64::from(low)) * (position - position.floor())) as f32
    }

    proptest! {
        #[test]
        fn matches_the_sorted_reference(
            values in prop::collection::vec(prop_oneof![
                8 => -1e6f32..1e6,
                1 => Just(f32::NAN),
                1 => Just(f32::INFINITY),
            ], 1..200),
            q in 0.0f64..=1.0,
        ) {
            prop_assume!(values.iter().any(|v| v.is_finite()));
            let got = quantile(&values, q).expect("valid input");
            let want = reference(&values, q);
            prop_assert_eq!(got.to_bits(), want.to_bits(), "q {} got {} want {}", q, got, want);
        }
    }

    #[test]
    fn known_values_and_edges() {
        let values = [4.0, 1.0, 3.0, 2.0];
        assert_eq!(quantile(&values, 0.0).expect("valid"), 1.0);
        assert_eq!(quantile(&values, 1.0).expect("valid"), 4.0);
        assert_eq!(quantile(&values, 0.5).expect("valid"), 2.5);
        assert_eq!(quantile(&[7.0], 0.3).expect("valid"), 7.0);
        assert_eq!(
            quantile(&[f32::NAN, 2.0, f32::NEG_INFINITY], 0.9).expect("valid"),
            2.0
        );
    }

    #[test]
    fn rejects_empty_input_and_bad_q() {
        for (values, q, field) in [
            (&[][..], 0.5, "values"),
            (&[f32::NAN][..], 0.5, "values"),
            (&[1.0][..], 1.5, "q"),
            (&[1.0][..], -0.1, "q"),
            (&[1.0][..], f64::NAN, "q"),
        ] {
            match quantile(values, q) {
                Err(ModelError::InvalidOption { field: got, .. }) => assert_eq!(got, field),
                other => {
                    panic!("{values:?} q {q}: expected InvalidOption on {field}, got {other:?}")
                }
            }
        }
    }
}
