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
//! actors share its cores). The PyTorch side is each network as a PyTorch user writes
//! it (default layout, `torch.optim.Adam`); fogmesh computes the same functions its own
//! way: activations channels-last (`models/src/layout.rs`), batch norm folded into the
//! convolutions at inference, Adam over one flat buffer (`models/src/training.rs`), and
//! no Python around the kernels.
//!
//! The machine this runs on is shared, and its load drifts by more than the difference
//! being measured: one measurement per side, minutes apart, lets a quiet minute on one
//! side and a busy one on the other decide the ratio. So the two sides take turns:
//!
//! 1. Per model, the random windows (and labels) are drawn once on each side, and one
//!    Python process starts, draws its own and says `ready` before the first fogmesh
//!    round, so its start-up competes with nothing being timed.
//! 2. A round is a freshly initialised model (the same seed every round, on both sides),
//!    trained for `epochs` passes, then three timed inference passes (their median). A
//!    fogmesh round and a Python round (a `round` line on its stdin, one JSON line
//!    back) run back to back, `rounds` times, taking turns at going first, so both
//!    sides see the same stretch of machine conditions.
//! 3. Each side's figure is the median of its rounds, which neither the slower first
//!    (warm-up) round nor a round that a burst of load hit can move far; the speedups
//!    are median over median. The report keeps every round too, in the order run
//!    (`fogmesh_rounds`, `pytorch_rounds`: `{"train": samples/s, "inference":
//!    windows/s}` each), to show how far they spread.
//!
//! Python is killed once its model's rounds are done or one failed, and leaves by itself
//! when its stdin closes, so even a benchmark killed outright leaves no process behind.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::thread::JoinHandle;
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
    /// Rounds per side and model, taken in turns; at least 1.
    pub rounds: usize,
}

impl Default for BenchTrainOptions {
    /// About eight minutes on two cores, most of it the vision expert's.
    fn default() -> Self {
        BenchTrainOptions {
            script: PathBuf::from("scripts/bench_train.py"),
            samples: SAMPLES,
            batch: 64,
            epochs: EPOCHS,
            threads: 1,
            rounds: ROUNDS,
        }
    }
}

/// `fogmesh bench train`'s default random windows per model.
pub const SAMPLES: usize = 4096;
/// `fogmesh bench train`'s default training passes per round.
pub const EPOCHS: usize = 2;
/// `fogmesh bench train`'s default rounds per side and model.
pub const ROUNDS: usize = 5;
/// Timed inference passes over the windows per round; the round keeps their median, as
/// `scripts/bench_train.py` does. The first pass after training runs cold (fresh
/// buffers, primitives for the new batch size); a serving expert lives in the later ones.
const INFERENCE_PASSES: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum BenchTrainError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{}: {reason} (run from the repository root after `just setup`)", script.display())]
    PyTorch { script: PathBuf, reason: String },
    #[error("rounds must be at least 1")]
    NoRounds,
}

/// One round of one side: a fresh model trained, then scoring every window.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RoundSpeed {
    /// Training samples per second of optimisation steps.
    pub train: f64,
    /// Inference windows per second.
    pub inference: f64,
}

/// One model's medians over the rounds, and the rounds themselves in the order run.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSpeed {
    pub model: &'static str,
    pub fogmesh_samples_per_s: f64,
    pub pytorch_samples_per_s: f64,
    pub speedup_vs_pytorch: f64,
    pub fogmesh_inference_windows_per_s: f64,
    pub pytorch_inference_windows_per_s: f64,
    pub inference_speedup_vs_pytorch: f64,
    pub fogmesh_rounds: Vec<RoundSpeed>,
    pub pytorch_rounds: Vec<RoundSpeed>,
}

impl ModelSpeed {
    fn from_rounds(
        model: &'static str,
        fogmesh_rounds: Vec<RoundSpeed>,
        pytorch_rounds: Vec<RoundSpeed>,
    ) -> ModelSpeed {
        let medians = |rounds: &[RoundSpeed]| {
            let train: Vec<f64> = rounds.iter().map(|r| r.train).collect();
            let inference: Vec<f64> = rounds.iter().map(|r| r.inference).collect();
            (median(&train), median(&inference))
        };
        let (fogmesh_train, fogmesh_inference) = medians(&fogmesh_rounds);
        let (pytorch_train, pytorch_inference) = medians(&pytorch_rounds);
        ModelSpeed {
            model,
            fogmesh_samples_per_s: fogmesh_train,
            pytorch_samples_per_s: pytorch_train,
            speedup_vs_pytorch: fogmesh_train / pytorch_train,
            fogmesh_inference_windows_per_s: fogmesh_inference,
            pytorch_inference_windows_per_s: pytorch_inference,
            inference_speedup_vs_pytorch: fogmesh_inference / pytorch_inference,
            fogmesh_rounds,
            pytorch_rounds,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchTrainReport {
    pub models: Vec<ModelSpeed>,
    pub samples: usize,
    pub batch: usize,
    pub epochs: usize,
    pub threads: usize,
    pub rounds: usize,
}

/// What `scripts/bench_train.py` prints after each round.
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
    /// Label classes, for the classifiers; the others reconstruct or forecast.
    classes: Option<u64>,
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
        classes: None,
    },
    // `fogmesh eval tep`'s classifier: 53 TEP variables, 13 classes.
    Case {
        model: "fault_classifier",
        channels: 53,
        window: 20,
        image: false,
        classes: Some(13),
    },
    // The TEP forecaster: 53 variables, 32 steps of context and 4 of horizon.
    Case {
        model: "tcn_forecaster",
        channels: 53,
        window: 36,
        image: false,
        classes: None,
    },
    // `fogmesh eval elpv`'s vision expert: 64 × 64 grey solar cells, 2 classes.
    Case {
        model: "defect_cnn",
        channels: 1,
        window: 64,
        image: true,
        classes: Some(2),
    },
];

pub fn run(options: &BenchTrainOptions) -> Result<BenchTrainReport, BenchTrainError> {
    if options.rounds == 0 {
        return Err(BenchTrainError::NoRounds);
    }
    tch::set_num_threads(options.threads as i32);
    let models = CASES
        .iter()
        .map(|case| compare(case, options))
        .collect::<Result<_, _>>()?;
    Ok(BenchTrainReport {
        models,
        samples: options.samples,
        batch: options.batch,
        epochs: options.epochs,
        threads: options.threads,
        rounds: options.rounds,
    })
}

/// The rounds of one model, fogmesh and PyTorch in turns.
fn compare(case: &Case, options: &BenchTrainOptions) -> Result<ModelSpeed, BenchTrainError> {
    let inputs = Inputs::draw(case, options.samples);
    let mut pytorch = PyTorchRounds::start(case, options)?;
    let mut fogmesh_rounds = Vec::with_capacity(options.rounds);
    let mut pytorch_rounds = Vec::with_capacity(options.rounds);
    for round in 0..options.rounds {
        // Taking turns at going first cancels a load that drifts one way over a model's rounds.
        if round % 2 == 0 {
            fogmesh_rounds.push(fogmesh_round(case, options, &inputs)?);
            pytorch_rounds.push(pytorch.round()?);
        } else {
            pytorch_rounds.push(pytorch.round()?);
            fogmesh_rounds.push(fogmesh_round(case, options, &inputs)?);
        }
    }
    Ok(ModelSpeed::from_rounds(
        case.model,
        fogmesh_rounds,
        pytorch_rounds,
    ))
}

/// The middle value, or the mean of the two middle values of an even count; NaN for
/// none.
fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let middle = sorted.len() / 2;
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[middle],
        _ => (sorted[middle - 1] + sorted[middle]) / 2.0,
    }
}

/// One model's random windows, and labels for the classifiers, drawn once so that
/// every round trains on the same data.
struct Inputs {
    windows: Vec<f32>,
    labels: Vec<i64>,
}

impl Inputs {
    fn draw(case: &Case, samples: usize) -> Inputs {
        let mut rng = SplitMix64::new(1);
        let windows = (0..samples * case.values())
            .map(|_| rng.normal() as f32)
            .collect();
        let labels = match case.classes {
            Some(classes) => (0..samples)
                .map(|_| (rng.next_u64() % classes) as i64)
                .collect(),
            None => Vec::new(),
        };
        Inputs { windows, labels }
    }
}

fn fogmesh_round(
    case: &Case,
    options: &BenchTrainOptions,
    inputs: &Inputs,
) -> Result<RoundSpeed, BenchTrainError> {
    let Inputs { windows, labels } = inputs;
    let per_window = case.values();
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
    // The steady state of an expert that keeps serving: the median of a few passes.
    let chunks = |f: &mut dyn FnMut(&[f32]) -> Result<(), ModelError>| -> Result<f64, ModelError> {
        let mut rates = Vec::with_capacity(INFERENCE_PASSES);
        for _ in 0..INFERENCE_PASSES {
            let started = Instant::now();
            for chunk in windows.chunks(256 * per_window) {
                f(chunk)?;
            }
            rates.push(options.samples as f64 / started.elapsed().as_secs_f64());
        }
        Ok(median(&rates))
    };
    let (train, inference) = match case.model {
        "conv_autoencoder" => {
            let config = AutoencoderConfig::w1(case.channels as i64, case.window as i64);
            let mut model = ConvAutoencoder::new(config, device, 0)?;
            let report = model.fit(windows, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.score(c).map(|_| ()))?;
            (report.samples_per_s, inference)
        }
        "tcn_forecaster" => {
            let defaults = ForecasterConfig::default();
            let config = ForecasterConfig {
                channels: case.channels as i64,
                context: case.window as i64 - defaults.horizon,
                ..defaults
            };
            let mut model = TcnForecaster::new(config, device, 0)?;
            let report = model.fit(windows, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.score(c).map(|_| ()))?;
            (report.samples_per_s, inference)
        }
        "defect_cnn" => {
            let config = VisionConfig {
                height: case.window as i64,
                width: case.window as i64,
                ..VisionConfig::default()
            };
            let mut model = DefectCnn::new(config, device, 0)?;
            let report = model.fit(windows, labels, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.predict_proba(c).map(|_| ()))?;
            (report.samples_per_s, inference)
        }
        _ => {
            let config = ClassifierConfig {
                channels: case.channels as i64,
                window: case.window as i64,
                hidden: 64,
                classes: 13,
            };
            let mut model = FaultClassifier::new(config, device, 0)?;
            let report = model.fit(windows, labels, &train, &mut |_| {})?;
            let inference = chunks(&mut |c| model.predict(c).map(|_| ()))?;
            (report.samples_per_s, inference)
        }
    };
    Ok(RoundSpeed { train, inference })
}

/// `scripts/bench_train.py` serving one model's rounds: a `round` line in, one JSON
/// line out. Dropping it kills the process, which may be mid-round when a round failed.
struct PyTorchRounds {
    script: PathBuf,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// Everything Python writes to stderr, read on its own thread so that a chatty
    /// Python cannot fill the pipe and stall while we wait on its stdout.
    stderr: Option<JoinHandle<String>>,
}

impl PyTorchRounds {
    /// Starts Python and waits until it has drawn its data.
    fn start(case: &Case, options: &BenchTrainOptions) -> Result<PyTorchRounds, BenchTrainError> {
        let script = &options.script;
        let failed = |reason: String| BenchTrainError::PyTorch {
            script: script.clone(),
            reason,
        };
        if !script.exists() {
            return Err(failed("not found".into()));
        }
        let mut child = Command::new("python3")
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
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| failed(format!("cannot run python3: {e}")))?;
        let (Some(stdin), Some(stdout), Some(mut stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            // Never: all three were asked for as pipes.
            let _ = child.kill();
            return Err(failed("started without its pipes".into()));
        };
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            // What could not be read is lost from the message, nothing more.
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let mut rounds = PyTorchRounds {
            script: script.clone(),
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr: Some(stderr),
        };
        match rounds.read_line("before it was ready")? {
            line if line == "ready" => Ok(rounds),
            line => Err(rounds.failed(format!("said {line:?} instead of ready"))),
        }
    }

    fn round(&mut self) -> Result<RoundSpeed, BenchTrainError> {
        if let Err(e) = writeln!(self.stdin, "round").and_then(|()| self.stdin.flush()) {
            return Err(self.failed(format!("cannot ask for a round: {e}")));
        }
        let line = self.read_line("during a round")?;
        match serde_json::from_str::<PyTorchSpeed>(&line) {
            Ok(speed) => Ok(RoundSpeed {
                train: speed.samples_per_s,
                inference: speed.inference_windows_per_s,
            }),
            Err(e) => Err(self.failed(format!("unreadable round {line:?}: {e}"))),
        }
    }

    /// The next line on Python's stdout, without its line end.
    fn read_line(&mut self, during: &str) -> Result<String, BenchTrainError> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err(self.failed(format!("exited {during}"))),
            Ok(_) => Ok(line.trim_end().to_string()),
            Err(e) => Err(self.failed(format!("unreadable output {during}: {e}"))),
        }
    }

    /// Ends Python and names what went wrong, with its exit status and stderr.
    fn failed(&mut self, what: String) -> BenchTrainError {
        // Killing first: a Python that printed nonsense may still be running.
        let _ = self.child.kill();
        let status = match self.child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("unknown exit status: {e}"),
        };
        let stderr = self
            .stderr
            .take()
            .and_then(|reader| reader.join().ok())
            .unwrap_or_default();
        BenchTrainError::PyTorch {
            script: self.script.clone(),
            reason: format!("python3 {what} ({status}): {}", stderr.trim()),
        }
    }
}

impl Drop for PyTorchRounds {
    fn drop(&mut self) {
        // Waiting after the kill reaps the process; both fail only once it is gone.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/bench_train.py");

    fn tiny(script: PathBuf) -> BenchTrainOptions {
        BenchTrainOptions {
            script,
            samples: 64,
            epochs: 1,
            rounds: 2,
            ..BenchTrainOptions::default()
        }
    }

    #[test]
    fn median_takes_the_middle_or_the_mean_of_the_two_middles() {
        for (values, expected) in [
            (vec![3.0], 3.0),
            (vec![5.0, 1.0, 4.0], 4.0),
            (vec![9.0, 1.0, 2.0, 100.0, 3.0], 3.0),
            (vec![4.0, 1.0], 2.5),
            (vec![8.0, 1.0, 2.0, 6.0], 4.0),
        ] {
            assert_eq!(median(&values), expected, "{values:?}");
        }
        assert!(median(&[]).is_nan());
    }

    /// The real script, so python3 with torch must be there; without them this fails
    /// with the error that says to run `just setup`, as the other tests that run Python
    /// do: nothing is skipped.
    #[test]
    fn both_sides_take_turns_for_the_rounds_asked_and_report_their_medians() {
        let options = tiny(PathBuf::from(SCRIPT));
        let speed = match compare(&CASES[0], &options) {
            Ok(speed) => speed,
            Err(e) => panic!("{e}"),
        };
        for rounds in [&speed.fogmesh_rounds, &speed.pytorch_rounds] {
            assert_eq!(rounds.len(), 2);
            for round in rounds {
                assert!(round.train > 0.0 && round.inference > 0.0, "{round:?}");
            }
        }
        let mean = |rounds: &[RoundSpeed], of: fn(&RoundSpeed) -> f64| {
            (of(&rounds[0]) + of(&rounds[1])) / 2.0
        };
        assert_eq!(
            speed.pytorch_samples_per_s,
            mean(&speed.pytorch_rounds, |r| r.train)
        );
        assert_eq!(
            speed.fogmesh_inference_windows_per_s,
            mean(&speed.fogmesh_rounds, |r| r.inference)
        );
        assert_eq!(
            speed.speedup_vs_pytorch,
            speed.fogmesh_samples_per_s / speed.pytorch_samples_per_s
        );
    }

    /// Stand-ins for the script that break the protocol: each failure is an error that
    /// names the script, says what went wrong and carries Python's stderr.
    #[test]
    fn a_python_that_breaks_the_round_protocol_is_an_error_naming_what_went_wrong() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        for (name, body, expected) in [
            (
                "unready.py",
                "print('hello')",
                r#"said "hello" instead of ready"#,
            ),
            (
                "crash_at_start.py",
                "raise SystemExit('no torch here')",
                "exited before it was ready (exit status: 1): no torch here",
            ),
            (
                "crash_in_round.py",
                "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\nsys.exit('out of memory')",
                "exited during a round (exit status: 1): out of memory",
            ),
            (
                "nonsense.py",
                "import sys\nprint('ready', flush=True)\nsys.stdin.readline()\nprint('fast', flush=True)\nsys.stdin.readline()",
                r#"unreadable round "fast""#,
            ),
        ] {
            let script = dir.path().join(name);
            std::fs::write(&script, body).expect("the stand-in script is written");
            let error = PyTorchRounds::start(&CASES[0], &tiny(script.clone()))
                .and_then(|mut rounds| rounds.round())
                .expect_err(name);
            let message = error.to_string();
            assert!(
                matches!(error, BenchTrainError::PyTorch { .. })
                    && message.contains(&*script.to_string_lossy())
                    && message.contains(expected),
                "{name}: {message}"
            );
        }
    }
}
