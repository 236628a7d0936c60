//! `fogmesh bench train`: how fast fogmesh trains and runs its time-series models and
//! its vision expert, against the same networks in PyTorch eager on the same machine in
//! the same run (`scripts/bench_train.py`, run with the `python3` that supplies
//! libtorch).
//!
//! Both sides train on the same number of random windows (64 × 64 images for the
//! vision expert, randomly mirrored and transposed on both sides as its training does)
//! with Adam in the same batch size and time only the training steps; then both score
//! every window in batches of 256. Both sides run libtorch with the same intra-op
//! thread count (`threads`, 1 by default like an expert's, since a fog node's other
//! actors share its cores): what differs is the loop around the same kernels (Rust and
//! tch against Python and torch).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fogmesh_models::classifier::{ClassifierConfig, FaultClassifier};
use fogmesh_models::{
    AutoencoderConfig, ConvAutoencoder, DefectCnn, ForecasterConfig, ModelError, SplitMix64,
    TcnForecaster, TrainOptions, VisionConfig,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone)]
pub struct BenchTrainOptions {
    /// `scripts/bench_train.py`.
    pub script: PathBuf,
    pub samples: usize,
    pub batch: usize,
    pub epochs: usize,
    /// libtorch intra-op threads, on both sides.
    pub threads: usize,
}

impl Default for BenchTrainOptions {
    fn default() -> Self {
        BenchTrainOptions {
            script: PathBuf::from("scripts/bench_train.py"),
            samples: 4096,
            batch: 64,
            epochs: 3,
            threads: 1,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchTrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {reason} (run from the repository root after `just setup`)", script.display())]
    PyTorch { script: PathBuf, reason: String },
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelSpeed {
    pub model: &'static str,
    pub fogmesh_samples_per_s: f64,
    pub pytorch_samples_per_s: f64,
    pub speedup_vs_pytorch: f64,
    pub fogmesh_inference_windows_per_s: f64,
    pub pytorch_inference_windows_per_s: f64,
    pub inference_speedup_vs_pytorch: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchTrainReport {
    pub models: Vec<ModelSpeed>,
    pub samples: usize,
    pub batch: usize,
    pub epochs: usize,
    pub threads: usize,
}

#[derive(Deserialize)]
struct PyTorchSpeed {
    samples_per_s: f64,
    inference_windows_per_s: f64,
}

/// One model's shape in both implementations.
struct Case {
    model: &'static str,
    channels: usize,
    /// Steps per window; for an image, the side of the square.
    window: usize,
    image: bool,
}

impl Case {
    fn values(&self) -> usize {
        let steps = if self.image {
            self.window * self.window
        } else {
            self.window
        };
        self.channels * steps
    }
}

const CASES: [Case; 4] = [
    // W1's autoencoder.
    Case {
        model: "conv_autoencoder",
        channels: 8,
        window: 64,
        image: false,
    },
    // `fogmesh eval tep`'s classifier: 53 TEP variables, 13 classes.
    Case {
        model: "fault_classifier",
        channels: 53,
        window: 20,
        image: false,
    },
    // The TEP forecaster: 53 variables, 32 steps of context and 4 of horizon.
    Case {
        model: "tcn_forecaster",
        channels: 53,
        window: 36,
        image: false,
    },
    // `fogmesh eval elpv`'s vision expert: 64 × 64 grey solar cells, 2 classes.
    Case {
        model: "defect_cnn",
        channels: 1,
        window: 64,
        image: true,
    },
];

pub fn run(options: &BenchTrainOptions) -> Result<BenchTrainReport, BenchTrainError> {
    tch::set_num_threads(options.threads as i32);
    let mut models = Vec::new();
    for case in &CASES {
        let (fogmesh_train, fogmesh_infer) = fogmesh_speed(case, options)?;
        let pytorch = pytorch_speed(&options.script, case, options)?;
        models.push(ModelSpeed {
            model: case.model,
            fogmesh_samples_per_s: fogmesh_train,
            pytorch_samples_per_s: pytorch.samples_per_s,
            speedup_vs_pytorch: fogmesh_train / pytorch.samples_per_s,
            fogmesh_inference_windows_per_s: fogmesh_infer,
            pytorch_inference_windows_per_s: pytorch.inference_windows_per_s,
            inference_speedup_vs_pytorch: fogmesh_infer / pytorch.inference_windows_per_s,
        });
    }
    Ok(BenchTrainReport {
        models,
        samples: options.samples,
        batch: options.batch,
        epochs: options.epochs,
        threads: options.threads,
    })
}

fn fogmesh_speed(case: &Case, options: &BenchTrainOptions) -> Result<(f64, f64), BenchTrainError> {
    let mut rng = SplitMix64::new(1);
    let per_window = case.values();
    let data: Vec<f32> = (0..options.samples * per_window)
        .map(|_| rng.normal() as f32)
        .collect();
    let train = TrainOptions {
        epochs: options.epochs,
        batch_size: options.batch,
        learning_rate: 1e-3,
        validation_fraction: 0.0,
        patience: options.epochs,
        seed: 0,
        max_seconds: None,
    };
    let device = fogmesh_models::default_device();
    let chunks = |f: &mut dyn FnMut(&[f32]) -> Result<(), ModelError>| -> Result<f64, ModelError> {
        let started = Instant::now();
        for chunk in data.chunks(256 * per_window) {
            f(chunk)?;
        }
        Ok(options.samples as f64 / started.elapsed().as_secs_f64())
    };
    match case.model {
        "conv_autoencoder" => {
            let config = AutoencoderConfig::w1(case.channels as i64, case.window as i64);
            let mut model = ConvAutoencoder::new(config, device, 0)?;
            let report = model.fit(&data, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.score(c).map(|_| ()))?;
            Ok((report.samples_per_s, inference))
        }
        "tcn_forecaster" => {
            let defaults = ForecasterConfig::default();
            let config = ForecasterConfig {
                channels: case.channels as i64,
                context: case.window as i64 - defaults.horizon,
                ..defaults
            };
            let mut model = TcnForecaster::new(config, device, 0)?;
            let report = model.fit(&data, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.score(c).map(|_| ()))?;
            Ok((report.samples_per_s, inference))
        }
        "defect_cnn" => {
            let config = VisionConfig {
                height: case.window as i64,
                width: case.window as i64,
                ..VisionConfig::default()
            };
            let mut model = DefectCnn::new(config, device, 0)?;
            let labels: Vec<i64> = (0..options.samples)
                .map(|_| (rng.next_u64() % 2) as i64)
                .collect();
            let report = model.fit(&data, &labels, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.predict_proba(c).map(|_| ()))?;
            Ok((report.samples_per_s, inference))
        }
        _ => {
            let config = ClassifierConfig {
                channels: case.channels as i64,
                window: case.window as i64,
                hidden: 64,
                classes: 13,
            };
            let mut model = FaultClassifier::new(config, device, 0)?;
            let labels: Vec<i64> = (0..options.samples)
                .map(|_| (rng.next_u64() % 13) as i64)
                .collect();
            let report = model.fit(&data, &labels, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.predict(c).map(|_| ()))?;
            Ok((report.samples_per_s, inference))
        }
    }
}

fn pytorch_speed(
    script: &Path,
    case: &Case,
    options: &BenchTrainOptions,
) -> Result<PyTorchSpeed, BenchTrainError> {
    let failed = |reason: String| BenchTrainError::PyTorch {
        script: script.to_path_buf(),
        reason,
    };
    if !script.exists() {
        return Err(failed("not found".into()));
    }
    let output = Command::new("python3")
        .arg(script)
        .args([
            case.model.to_string(),
            case.channels.to_string(),
            case.window.to_string(),
            options.batch.to_string(),
            options.samples.to_string(),
            options.epochs.to_string(),
            options.threads.to_string(),
        ])
        .output()
        .map_err(|e| failed(format!("cannot run python3: {e}")))?;
    if !output.status.success() {
        return Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ));
    }
    serde_json::from_slice(&output.stdout).map_err(|e| failed(format!("unreadable output: {e}")))
}
