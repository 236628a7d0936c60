//! Bring-your-own-model end to end: `scripts/export_torchscript.py` builds and exports
//! models with the PyTorch that `just setup` installs, and `ScriptedModel` must load
//! them, reproduce PyTorch's scores, and refuse wrong declarations, wrong files and
//! wrong inputs with messages that say what is wrong.
//!
//! The export runs for real in every test that needs its models (about two seconds):
//! the point is that a file written by Python's torch.jit loads here, so nothing is faked
//! or skipped. No python3 or no torch is a failure that says to run `just setup`. Modules
//! that misbehave on purpose (an f64 output, a tuple, a batch baked in) are traced on the
//! spot instead, so the export script stays the example an engineer would copy.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use fogmesh_models::torchscript::Dtype;
use fogmesh_models::{default_device, ScriptError, ScriptedModel, Signature, TensorSpec};
use serde::Deserialize;
use tch::{CModule, Device, Kind, Tensor};
use tempfile::TempDir;

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/export_torchscript.py"
);

/// `reference.json` as the export script writes it.
#[derive(Deserialize)]
struct Reference {
    input_shape: Vec<usize>,
    input: Vec<f32>,
    output: Vec<f32>,
}

/// Runs the `python3` on PATH, which must have torch.
fn python(args: &[&OsStr]) {
    let output = match Command::new("python3").args(args).output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run python3 ({err}); run `just setup` to install it with torch"),
    };
    assert!(
        output.status.success(),
        "python3 {args:?} failed ({}); if torch is missing, run `just setup`:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A temporary folder holding `model.pt`, `model_2in.pt` and `reference.json`.
fn export() -> TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    python(&[SCRIPT.as_ref(), dir.path().as_os_str()]);
    dir
}

fn spec(shape: &[i64]) -> TensorSpec {
    TensorSpec {
        shape: shape.to_vec(),
        dtype: Dtype::F32,
    }
}

fn scorer_signature() -> Signature {
    Signature {
        inputs: vec![spec(&[-1, 8, 60])],
        output: spec(&[-1]),
    }
}

fn load(path: &Path, signature: Signature) -> Result<ScriptedModel, ScriptError> {
    ScriptedModel::load(path, signature, default_device())
}

fn reference(dir: &Path) -> Reference {
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference written");
    serde_json::from_str(&text).expect("reference is the documented json")
}

#[test]
fn traced_model_reproduces_pytorch_scores() {
    let dir = export();
    let reference = reference(dir.path());
    assert_eq!(reference.input_shape, [5, 8, 60]);
    assert_eq!(reference.input.len(), 5 * 8 * 60);

    let model = load(&dir.path().join("model.pt"), scorer_signature()).expect("loads");
    assert_eq!(model.signature(), &scorer_signature());
    let scores = model.forward(&[&reference.input], 5).expect("scores");
    assert_eq!(scores.len(), reference.output.len());
    for (i, (ours, theirs)) in scores.iter().zip(&reference.output).enumerate() {
        assert!(
            (ours - theirs).abs() <= 1e-5,
            "window {i}: fogmesh {ours}, PyTorch {theirs} (device {:?})",
            model.device()
        );
    }

    // One window alone scores as it did inside the batch: windows do not interact.
    let single = model
        .forward(&[&reference.input[..8 * 60]], 1)
        .expect("scores one window");
    assert!(
        (single[0] - reference.output[0]).abs() <= 1e-5,
        "{single:?}"
    );
}

#[test]
fn scripted_model_takes_its_inputs_in_declared_order() {
    let dir = export();
    let signature = Signature {
        inputs: vec![spec(&[-1, 8, 60]), spec(&[-1, 8])],
        output: spec(&[-1]),
    };
    let model = load(&dir.path().join("model_2in.pt"), signature).expect("loads");
    let batch = 3;
    let windows: Vec<f32> = (0..batch * 8 * 60)
        .map(|i| ((i % 17) as f32 - 8.0) / 8.0)
        .collect();
    let gains: Vec<f32> = (0..batch * 8).map(|i| 0.5 + (i % 5) as f32).collect();
    let scores = model.forward(&[&windows, &gains], batch).expect("scores");

    let expected: Vec<f32> = (0..batch)
        .map(|b| {
            let mut sum = 0.0f64;
            for c in 0..8 {
                let gain = f64::from(gains[b * 8 + c]);
                for t in 0..60 {
                    let v = f64::from(windows[(b * 8 + c) * 60 + t]) * gain;
                    sum += v * v;
                }
            }
            (sum / 480.0) as f32
        })
        .collect();
    for (ours, theirs) in scores.iter().zip(&expected) {
        assert!(
            (ours - theirs).abs() <= 1e-5 * theirs.max(1.0),
            "{scores:?} vs {expected:?}"
        );
    }
}

#[test]
fn mismatched_signatures_are_refused_naming_file_and_mismatch() {
    let dir = export();
    let path = dir.path().join("model.pt");
    let file = path.display().to_string();
    let cases: [(Signature, &[&str]); 4] = [
        (
            Signature {
                inputs: vec![spec(&[-1, 8, 50])],
                output: spec(&[-1]),
            },
            &["[-1, 8, 50]", "[2, 8, 50]", "raised", "mat1 and mat2"],
        ),
        (
            Signature {
                inputs: vec![spec(&[-1, 4, 60])],
                output: spec(&[-1]),
            },
            &["[-1, 4, 60]", "raised"],
        ),
        (
            Signature {
                inputs: vec![spec(&[-1, 8, 60])],
                output: spec(&[-1, 1]),
            },
            &["output [-1, 1] f32", "shape [2]", "rank 1, declared rank 2"],
        ),
        (
            Signature {
                inputs: vec![spec(&[-1, 8, 60])],
                output: spec(&[5]),
            },
            &["output [5] f32", "shape [2]"],
        ),
    ];
    for (signature, needles) in cases {
        let declared = signature.to_string();
        match load(&path, signature) {
            Err(err @ ScriptError::Mismatch { .. }) => {
                let message = err.to_string();
                assert!(message.contains(&file), "{message}");
                for needle in needles {
                    assert!(message.contains(needle), "{needle:?} not in: {message}");
                }
                assert!(
                    !message.contains("Exception raised from"),
                    "libtorch frames leak into: {message}"
                );
            }
            Err(other) => panic!("{declared}: expected Mismatch, got {other}"),
            Ok(_) => panic!("{declared}: a wrong signature was accepted"),
        }
    }
}

/// Traces `f` on a `[2, 8]` input into `dir/name`: TorchScript written by libtorch's
/// own tracer, for module behaviours the Python export has no reason to show.
fn trace(dir: &Path, name: &str, f: impl Fn(&Tensor) -> Vec<Tensor>) -> PathBuf {
    let example = Tensor::zeros([2, 8], (Kind::Float, Device::Cpu));
    let module =
        CModule::create_by_tracing("Traced", "forward", &[example], &mut |inputs| f(&inputs[0]))
            .expect("traces");
    let path = dir.join(name);
    module.save(&path).expect("saves");
    path
}

#[test]
fn outputs_that_are_not_a_declared_f32_tensor_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let f64_sum = trace(dir.path(), "f64.pt", |x| {
        vec![x
            .to_kind(Kind::Double)
            .sum_dim_intlist(1, false, Kind::Double)]
    });
    // libtorch's tracer saves single outputs only; Python's keeps the tuple.
    let pair = dir.path().join("pair.pt");
    let source = "import sys, torch\n\
        class Pair(torch.nn.Module):\n\
        \x20   def forward(self, x):\n\
        \x20       return x.sum(1), x.amax(1)\n\
        torch.jit.trace(Pair(), torch.zeros(2, 8)).save(sys.argv[1])\n";
    python(&["-c".as_ref(), source.as_ref(), pair.as_os_str()]);
    let signature = || Signature {
        inputs: vec![spec(&[-1, 8])],
        output: spec(&[-1]),
    };
    for (path, needle) in [(f64_sum, "dtype f64"), (pair, "a tuple of 2 values")] {
        match load(&path, signature()) {
            Err(err @ ScriptError::Mismatch { .. }) => {
                let message = err.to_string();
                assert!(message.contains(&path.display().to_string()), "{message}");
                assert!(message.contains("output [-1] f32"), "{message}");
                assert!(message.contains(needle), "{needle:?} not in: {message}");
            }
            Err(other) => panic!("{}: expected Mismatch, got {other}", path.display()),
            Ok(_) => panic!("{}: a wrong output was accepted", path.display()),
        }
    }
}

#[test]
fn a_module_that_fixes_the_batch_passes_the_check_but_fails_other_batches() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The tracer records the 2 as a constant: the module only works for batch 2.
    let path = trace(dir.path(), "fixed_batch.pt", |x| {
        vec![x.view([2, -1]).sum_dim_intlist(1, false, Kind::Float)]
    });
    let signature = Signature {
        inputs: vec![spec(&[-1, 8])],
        output: spec(&[-1]),
    };
    let model = load(&path, signature).expect("passes the batch-2 check");
    let scores = model.forward(&[&[1.0; 16]], 2).expect("batch 2 works");
    assert_eq!(scores, [8.0, 8.0]);
    match model.forward(&[&[1.0; 24]], 3) {
        Err(err @ ScriptError::Run { batch: 3, .. }) => {
            let message = err.to_string();
            assert!(message.contains(&path.display().to_string()), "{message}");
            assert!(
                message.contains("declared output [-1] f32 (batch 3: [3])"),
                "{message}"
            );
            assert!(message.contains("shape [2]"), "{message}");
        }
        other => panic!("expected Run, got {other:?}"),
    }
}

#[test]
fn a_file_that_is_not_torchscript_is_refused_naming_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let garbage: PathBuf = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"\x00\x13not a zip archive, not a model\xff\xfe").expect("writes");
    match load(&garbage, scorer_signature()) {
        Err(err @ ScriptError::NotTorchScript { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains(&garbage.display().to_string()),
                "{message}"
            );
        }
        Err(other) => panic!("expected NotTorchScript, got {other}"),
        Ok(_) => panic!("garbage loaded as a model"),
    }

    let missing = dir.path().join("missing.pt");
    match load(&missing, scorer_signature()) {
        Err(err @ ScriptError::Io { .. }) => {
            let message = err.to_string();
            assert!(
                message.contains(&missing.display().to_string()),
                "{message}"
            );
        }
        Err(other) => panic!("expected Io, got {other}"),
        Ok(_) => panic!("a missing file loaded"),
    }
}

#[test]
fn forward_with_wrong_inputs_is_refused_without_panicking() {
    let dir = export();
    let model = load(&dir.path().join("model.pt"), scorer_signature()).expect("loads");
    for len in [0, 2 * 480 - 1, 2 * 480 + 1, 480] {
        let data = vec![0.0f32; len];
        match model.forward(&[&data], 2) {
            Err(err @ ScriptError::Shape { .. }) => {
                let message = err.to_string();
                assert!(message.contains("input 0"), "{message}");
                assert!(message.contains("960 values"), "{message}");
                assert!(message.contains(&format!("got {len} values")), "{message}");
            }
            other => panic!("len {len}: expected Shape, got {other:?}"),
        }
    }

    let data = vec![0.0f32; 480];
    match model.forward(&[&data, &data], 1) {
        Err(err @ ScriptError::Shape { .. }) => {
            assert!(err.to_string().contains("expected 1, one tensor"), "{err}")
        }
        other => panic!("two inputs: expected Shape, got {other:?}"),
    }
    match model.forward(&[], 0) {
        Err(ScriptError::Shape { .. }) => {}
        other => panic!("no inputs: expected Shape, got {other:?}"),
    }
    match model.forward(&[&[]], 0) {
        Err(err @ ScriptError::Shape { .. }) => {
            assert!(err.to_string().contains("batch"), "{err}")
        }
        other => panic!("batch 0: expected Shape, got {other:?}"),
    }
    assert_eq!(model.forward(&[&data], 1).expect("still serves").len(), 1);
}
