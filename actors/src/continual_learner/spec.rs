//! `[experts.learning]`: how an expert's continual learner watches, learns and decides
//! ([`LearningSpec`], the drift detectors' settings in [`DriftSpec`]), and the checks
//! that refuse a setting out of its range before a learner starts, naming the field by
//! its path inside `learning` ([`InvalidLearning`]).

use fogmesh_models::continual::{FineTuneOptions, ValidationGate};
use fogmesh_models::drift::{KsDrift, PageHinkley};
use serde::{Deserialize, Serialize};

/// The drift detectors' settings (see `fogmesh_models::drift`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftSpec {
    /// Page–Hinkley on ln(score / threshold) (0 is the alarm limit, 1 a score e times
    /// the limit): shifts of the mean smaller than this are tolerated.
    pub score_delta: f64,
    /// Page–Hinkley: the cumulative deviation that fires.
    pub score_lambda: f64,
    /// Windows Page–Hinkley sees before it tests, so its mean settles first.
    pub min_windows: u64,
    /// Kolmogorov–Smirnov on each window's mean value: windows in the reference and in
    /// the recent sample (at least 20).
    pub ks_size: usize,
    /// Kolmogorov–Smirnov: fire when the p-value is below this.
    pub ks_alpha: f64,
}

impl Default for DriftSpec {
    /// Scores are measured against the alarm limit on a log scale, so these suit any
    /// expert, and a model far off its regime (scores many limits high, and as many
    /// times noisier) does not look like it keeps drifting: a level change by a factor
    /// under 1.2 is tolerated, one by a factor e fires within about 25 windows, one by
    /// 20 within 7. KS at 0.001 because consecutive windows overlap and so are
    /// correlated, which makes the test more eager than its nominal level.
    fn default() -> Self {
        DriftSpec {
            score_delta: 0.2,
            score_lambda: 20.0,
            min_windows: 30,
            ks_size: 200,
            ks_alpha: 0.001,
        }
    }
}

/// `[experts.learning]`: how an expert's learner watches, learns and decides.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LearningSpec {
    /// Old-regime windows kept for replay and validation.
    pub reservoir: usize,
    /// Share of the old and of the new windows held out to validate a candidate.
    pub holdout: f64,
    /// New windows after a drift (or since the last scheduled round) that start a
    /// round; also the fewest new windows any round needs.
    pub min_new_windows: usize,
    /// Most new-regime windows held while collecting (the newest are kept).
    pub max_new_windows: usize,
    /// Seconds between scheduled rounds; none: rounds follow drift and commands only.
    pub every_s: Option<f64>,
    pub drift: DriftSpec,
    pub fine_tune: FineTuneOptions,
    pub gate: ValidationGate,
    /// Seeds the reservoir and the holdout split.
    pub seed: u64,
}

impl Default for LearningSpec {
    fn default() -> Self {
        LearningSpec {
            reservoir: 512,
            holdout: 0.25,
            min_new_windows: 256,
            max_new_windows: 2048,
            every_s: None,
            drift: DriftSpec::default(),
            fine_tune: FineTuneOptions::default(),
            gate: ValidationGate::default(),
            seed: 0,
        }
    }
}

impl PartialEq for LearningSpec {
    /// Field by field; the models crate's option types have no `PartialEq`, so they
    /// compare by their serialised form, which covers every field they have.
    fn eq(&self, other: &Self) -> bool {
        let same = |a: serde_json::Result<serde_json::Value>, b| match (a, b) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        self.reservoir == other.reservoir
            && self.holdout == other.holdout
            && self.min_new_windows == other.min_new_windows
            && self.max_new_windows == other.max_new_windows
            && self.every_s == other.every_s
            && self.drift == other.drift
            && self.seed == other.seed
            && same(
                serde_json::to_value(&self.fine_tune),
                serde_json::to_value(&other.fine_tune),
            )
            && same(
                serde_json::to_value(&self.gate),
                serde_json::to_value(&other.gate),
            )
    }
}

/// A learning setting out of its range: the field (its path inside `learning`), the
/// value and the limit.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}` = {value}: {reason}")]
pub struct InvalidLearning {
    pub field: String,
    pub value: String,
    pub reason: String,
}

/// Largest accepted `reservoir` and `max_new_windows`: both are held in memory.
pub const MAX_HELD_WINDOWS: usize = 1 << 20;

impl LearningSpec {
    /// Checks every field, naming the first that is out of range.
    pub fn validate(&self) -> Result<(), InvalidLearning> {
        let invalid = |field: &str, value: String, reason: String| InvalidLearning {
            field: field.to_string(),
            value,
            reason,
        };
        if !(1..=MAX_HELD_WINDOWS).contains(&self.reservoir) {
            return Err(invalid(
                "reservoir",
                self.reservoir.to_string(),
                format!("must be between 1 and {MAX_HELD_WINDOWS}"),
            ));
        }
        if !(self.holdout > 0.0 && self.holdout < 1.0) {
            return Err(invalid(
                "holdout",
                self.holdout.to_string(),
                "must lie in (0, 1)".into(),
            ));
        }
        if self.min_new_windows < 2 {
            return Err(invalid(
                "min_new_windows",
                self.min_new_windows.to_string(),
                "must be at least 2 (one to train on, one to hold out)".into(),
            ));
        }
        if !(self.min_new_windows..=MAX_HELD_WINDOWS).contains(&self.max_new_windows) {
            return Err(invalid(
                "max_new_windows",
                self.max_new_windows.to_string(),
                format!(
                    "must be between min_new_windows ({}) and {MAX_HELD_WINDOWS}",
                    self.min_new_windows
                ),
            ));
        }
        if let Some(every) = self.every_s {
            if !(every.is_finite() && every >= 1.0) {
                return Err(invalid(
                    "every_s",
                    every.to_string(),
                    "must be at least 1 second".into(),
                ));
            }
        }
        self.detectors()?;
        self.fine_tune
            .validate()
            .map_err(|e| nested_error("fine_tune", &e))?;
        self.gate.validate().map_err(|e| nested_error("gate", &e))?;
        Ok(())
    }

    /// Fresh detectors from the settings; errors name the setting in `drift`.
    pub(super) fn detectors(&self) -> Result<(PageHinkley, KsDrift), InvalidLearning> {
        // The detectors name their own parameters; the config names them per signal.
        let renamed = |e: fogmesh_models::ModelError, names: [(&str, &str); 2]| {
            let mut error = nested_error("drift", &e);
            for (theirs, ours) in names {
                if error.field == format!("drift.{theirs}") {
                    error.field = format!("drift.{ours}");
                }
            }
            error
        };
        let d = &self.drift;
        let score = PageHinkley::new(d.score_delta, d.score_lambda, d.min_windows)
            .map_err(|e| renamed(e, [("delta", "score_delta"), ("lambda", "score_lambda")]))?;
        let shape = KsDrift::new(d.ks_size, d.ks_alpha)
            .map_err(|e| renamed(e, [("size", "ks_size"), ("alpha", "ks_alpha")]))?;
        Ok((score, shape))
    }
}

/// (inner field, value, reason) of a models-crate error, for field paths.
fn model_error_parts(e: &fogmesh_models::ModelError) -> (Option<&'static str>, String, String) {
    match e {
        fogmesh_models::ModelError::InvalidOption {
            field,
            value,
            reason,
        } => (Some(field), value.clone(), reason.clone()),
        other => (None, "-".into(), other.to_string()),
    }
}

/// A models-crate option error under `prefix` (`fine_tune.epochs`).
fn nested_error(prefix: &str, e: &fogmesh_models::ModelError) -> InvalidLearning {
    let (inner, value, reason) = model_error_parts(e);
    InvalidLearning {
        field: match inner {
            Some(inner) => format!("{prefix}.{inner}"),
            None => prefix.to_string(),
        },
        value,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_settings_name_their_field_under_learning() {
        let field = |spec: LearningSpec| spec.validate().unwrap_err().field;
        let spec = LearningSpec::default;
        assert_eq!(
            field(LearningSpec {
                reservoir: 0,
                ..spec()
            }),
            "reservoir"
        );
        assert_eq!(
            field(LearningSpec {
                min_new_windows: 1,
                ..spec()
            }),
            "min_new_windows"
        );
        let mut drift = spec();
        drift.drift.score_lambda = 0.0;
        assert_eq!(field(drift), "drift.score_lambda");
        let mut drift = spec();
        drift.drift.ks_alpha = 1.5;
        assert_eq!(field(drift), "drift.ks_alpha");
        let mut tune = spec();
        tune.fine_tune.batch_size = 0;
        assert_eq!(field(tune), "fine_tune.batch_size");
        let mut gate = spec();
        gate.gate.max_forgetting = -0.5;
        assert_eq!(field(gate), "gate.max_forgetting");
        assert!(spec().validate().is_ok());
    }
}
