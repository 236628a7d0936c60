//! Principal component analysis monitoring, the classic multivariate process baseline
//! (Chiang, Russell and Braatz, *Fault Detection and Diagnosis in Industrial Systems*):
//! fitted on normal operation, it flags a sample whose Hotelling T² (distance inside the
//! principal subspace) or Q / squared prediction error (distance from it) exceeds a
//! limit set on normal data.
//!
//! Variables are standardised by the training mean and deviation; components are kept
//! until they explain [`Pca::fit`]'s `explained` share of the variance. The
//! eigen-decomposition runs in libtorch (`linalg_eigh`, double precision); scoring is
//! plain Rust over the kept loadings.

use tch::{Kind, Tensor};

use crate::error::ModelError;

/// A fitted PCA monitor.
#[derive(Debug, Clone, PartialEq)]
pub struct Pca {
    columns: usize,
    mean: Vec<f64>,
    std: Vec<f64>,
    /// `components` rows of `columns` loadings each.
    loadings: Vec<f64>,
    eigenvalues: Vec<f64>,
}

/// T² and Q of one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PcaScores {
    pub t2: f64,
    pub q: f64,
}

impl Pca {
    /// Fits on `rows` (row-major, `columns` values each) of normal operation, keeping
    /// the fewest components that explain at least `explained` (0..1] of the variance.
    pub fn fit(rows: &[f32], columns: usize, explained: f64) -> Result<Pca, ModelError> {
        if columns == 0 || rows.is_empty() || !rows.len().is_multiple_of(columns) {
            return Err(ModelError::Shape {
                what: "PCA training rows",
                expected: format!("a positive multiple of {columns} values"),
                got: format!("{} values", rows.len()),
            });
        }
        if !(explained > 0.0 && explained <= 1.0) {
            return Err(ModelError::InvalidOption {
                field: "explained",
                value: explained.to_string(),
                reason: "must be in (0, 1]".into(),
            });
        }
        if let Some(index) = rows.iter().position(|v| !v.is_finite()) {
            return Err(ModelError::NonFinite {
                what: "PCA training rows",
                index,
            });
        }
        let n = rows.len() / columns;
        let mut mean = vec![0.0f64; columns];
        for row in rows.chunks_exact(columns) {
            for (m, v) in mean.iter_mut().zip(row) {
                *m += f64::from(*v);
            }
        }
        mean.iter_mut().for_each(|m| *m /= n as f64);
        let mut var = vec![0.0f64; columns];
        for row in rows.chunks_exact(columns) {
            for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
                *s += (f64::from(*v) - m).powi(2);
            }
        }
        // A variable that never moved in normal operation carries no direction; a unit
        // deviation keeps it from dividing by zero and leaves any later move visible in Q.
        let std: Vec<f64> = var
            .iter()
            .map(|s| {
                let sd = (s / (n.max(2) - 1) as f64).sqrt();
                if sd > 1e-9 {
                    sd
                } else {
                    1.0
                }
            })
            .collect();
        let standardised: Vec<f64> = rows
            .iter()
            .enumerate()
            .map(|(i, v)| (f64::from(*v) - mean[i % columns]) / std[i % columns])
            .collect();
        let x = Tensor::f_from_slice(&standardised)?.f_view([n as i64, columns as i64])?;
        let covariance = x
            .f_tr()?
            .f_matmul(&x)?
            .f_div_scalar((n.max(2) - 1) as f64)?;
        let (values, vectors) = covariance.f_linalg_eigh("L")?;
        // eigh sorts ascending; monitoring wants the largest first.
        let values: Vec<f64> = Vec::<f64>::try_from(values.f_to_kind(Kind::Double)?)?;
        let vectors: Vec<f64> =
            Vec::<f64>::try_from(vectors.f_tr()?.f_contiguous()?.f_view([-1])?)?;
        let total: f64 = values.iter().map(|v| v.max(0.0)).sum();
        let mut kept = Vec::new();
        let mut loadings = Vec::new();
        let mut cumulative = 0.0;
        for k in (0..columns).rev() {
            let value = values[k].max(0.0);
            if value <= 1e-12 {
                break;
            }
            kept.push(value);
            loadings.extend_from_slice(&vectors[k * columns..(k + 1) * columns]);
            cumulative += value;
            if total <= 0.0 || cumulative / total >= explained {
                break;
            }
        }
        if kept.is_empty() {
            return Err(ModelError::InvalidOption {
                field: "PCA training rows",
                value: format!("{n} rows"),
                reason: "no variable varies: nothing to model".into(),
            });
        }
        Ok(Pca {
            columns,
            mean,
            std,
            loadings,
            eigenvalues: kept,
        })
    }

    pub fn components(&self) -> usize {
        self.eigenvalues.len()
    }

    /// T² and Q of each row of `rows`.
    pub fn score(&self, rows: &[f32]) -> Result<Vec<PcaScores>, ModelError> {
        if !rows.len().is_multiple_of(self.columns) {
            return Err(ModelError::Shape {
                what: "PCA scored rows",
                expected: format!("a multiple of {} values", self.columns),
                got: format!("{} values", rows.len()),
            });
        }
        let mut x = vec![0.0f64; self.columns];
        Ok(rows
            .chunks_exact(self.columns)
            .map(|row| {
                for (c, v) in row.iter().enumerate() {
                    x[c] = (f64::from(*v) - self.mean[c]) / self.std[c];
                }
                let mut t2 = 0.0;
                let mut projected = 0.0;
                for (k, lambda) in self.eigenvalues.iter().enumerate() {
                    let p = &self.loadings[k * self.columns..(k + 1) * self.columns];
                    let t: f64 = p.iter().zip(&x).map(|(a, b)| a * b).sum();
                    t2 += t * t / lambda;
                    projected += t * t;
                }
                // ‖x‖² = ‖projection‖² + ‖residual‖², the loadings being orthonormal.
                let norm: f64 = x.iter().map(|v| v * v).sum();
                PcaScores {
                    t2,
                    q: (norm - projected).max(0.0),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;

    /// Three variables driven by one latent factor plus small noise.
    fn correlated(rows: usize, seed: u64) -> Vec<f32> {
        let mut rng = SplitMix64::new(seed);
        (0..rows)
            .flat_map(|_| {
                let f = rng.normal();
                let noise: Vec<f64> = (0..3).map(|_| 0.05 * rng.normal()).collect();
                vec![
                    (f + noise[0]) as f32,
                    (2.0 * f + noise[1]) as f32,
                    (-f + noise[2]) as f32,
                ]
            })
            .collect()
    }

    #[test]
    fn one_factor_needs_one_component_and_breaking_it_shows_in_q() {
        let pca = Pca::fit(&correlated(2000, 1), 3, 0.95).unwrap();
        assert_eq!(pca.components(), 1);
        let normal = pca.score(&correlated(200, 2)).unwrap();
        let q_max = normal.iter().map(|s| s.q).fold(0.0, f64::max);
        // The same magnitudes with the correlation broken: off the principal subspace.
        let broken = pca.score(&[1.0, -2.0, -1.0]).unwrap()[0];
        assert!(
            broken.q > 10.0 * q_max,
            "Q {} vs normal max {q_max}",
            broken.q
        );
        // Far along the factor: inside the subspace, so T² rises and Q does not.
        let along = pca.score(&[5.0, 10.0, -5.0]).unwrap()[0];
        assert!(
            along.t2 > 20.0 && along.q < 10.0 * q_max.max(1e-3),
            "{along:?}"
        );
    }

    #[test]
    fn bad_input_is_refused_not_panicked_on() {
        assert!(Pca::fit(&[1.0, 2.0], 3, 0.9).is_err());
        assert!(Pca::fit(&correlated(10, 1), 3, 0.0).is_err());
        assert!(Pca::fit(&[f32::NAN, 1.0, 2.0], 3, 0.9).is_err());
        assert!(Pca::fit(&[1.0; 30], 3, 0.9).is_err(), "nothing varies");
        let pca = Pca::fit(&correlated(100, 1), 3, 0.9).unwrap();
        assert!(pca.score(&[1.0, 2.0]).is_err());
    }
}
