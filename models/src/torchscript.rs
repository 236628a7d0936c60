//! Bring your own model: a TorchScript module exported from PyTorch, served as an expert.
//!
//! A plant engineer traces or scripts a model in Python (`torch.jit.trace` or
//! `torch.jit.script`, then `.save("model.pt")`) and declares its [`Signature`]: the
//! shape and dtype of every input and of the output. The file itself cannot be trusted
//! to say this (a traced module only knows its inputs are "Tensor"), so the declaration
//! is the contract, and [`ScriptedModel::load`] checks it once by running the module on
//! zeros of the declared shapes. A wrong declaration is refused when the model is
//! deployed, naming the file, the declaration and what the module did, instead of
//! failing on the first plant window. Values cross as flat f32 slices, the layout the
//! rest of fogmesh uses for windows.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{CModule, Device, IValue, Kind, TchError, Tensor};

/// The batch size of the load-time check: 2 rather than 1, so that a module which drops
/// or broadcasts the batch dimension (a stray `squeeze`, a sum over dim 0) shows it.
const PROBE_BATCH: usize = 2;

/// The element type of a declared tensor. Only f32 exists: fogmesh's windows and scores
/// are f32, and a manifest naming any other dtype is refused when it is parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
}

impl Dtype {
    fn kind(self) -> Kind {
        match self {
            Dtype::F32 => Kind::Float,
        }
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dtype::F32 => "f32",
        })
    }
}

/// One declared tensor: `shape` holds positive sizes and at most one `-1`, which marks
/// the batch dimension (any size, the `batch` of [`ScriptedModel::forward`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub shape: Vec<i64>,
    pub dtype: Dtype,
}

impl TensorSpec {
    /// The shape with `batch` in place of `-1`; `None` when the element count overflows.
    fn shape_for(&self, batch: usize) -> Option<(Vec<i64>, usize)> {
        let batch = i64::try_from(batch).ok()?;
        let shape: Vec<i64> = self
            .shape
            .iter()
            .map(|&d| if d == -1 { batch } else { d })
            .collect();
        let count = shape.iter().try_fold(1usize, |count, &d| {
            count.checked_mul(usize::try_from(d).ok()?)
        })?;
        // Element counts past i64 cannot become tensors; refuse them here, not in libtorch.
        i64::try_from(count).ok()?;
        Some((shape, count))
    }

    fn validate(&self, what: &str) -> Result<(), String> {
        if let Some(d) = self.shape.iter().find(|&&d| d <= 0 && d != -1) {
            return Err(format!(
                "{what} {self} has size {d}: sizes are positive, or -1 for the batch"
            ));
        }
        if self.shape.iter().filter(|&&d| d == -1).count() > 1 {
            return Err(format!(
                "{what} {self} has more than one -1: only the batch dimension is free"
            ));
        }
        if self.shape_for(PROBE_BATCH).is_none() {
            return Err(format!("{what} {self} has too many elements"));
        }
        Ok(())
    }
}

impl fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {}", self.shape, self.dtype)
    }
}

/// What a module takes and returns, in `forward`'s argument order. In a TOML manifest:
/// `inputs = [{ shape = [-1, 8, 60], dtype = "f32" }]` and
/// `output = { shape = [-1], dtype = "f32" }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub output: TensorSpec,
}

impl Signature {
    fn validate(&self) -> Result<(), String> {
        if self.inputs.is_empty() {
            return Err("no inputs are declared".into());
        }
        for (i, input) in self.inputs.iter().enumerate() {
            input.validate(&format!("input {i}"))?;
        }
        self.output.validate("output")
    }
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("inputs [")?;
        for (i, input) in self.inputs.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{input}")?;
        }
        write!(f, "], output {}", self.output)
    }
}

/// Why a TorchScript model was refused or failed. Like [`crate::ModelError`], every
/// message names the file and the values involved, lowercase, with no trailing period.
#[derive(Debug, thiserror::Error)]
pub enum ScriptError {
    /// The file could not be opened.
    #[error("i/o error on {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// The file opened but libtorch cannot load it as a TorchScript module.
    #[error("{} is not a loadable TorchScript module: {reason}", .path.display())]
    NotTorchScript { path: PathBuf, reason: String },

    /// The declaration itself is impossible (no inputs, a size of 0, two batch dims).
    #[error("signature declared for {}: {reason}", .path.display())]
    InvalidSignature { path: PathBuf, reason: String },

    /// The module did not do what its signature declares on the load-time check.
    #[error("{} does not match its declared signature: declared {declared}, but {found}", .path.display())]
    Mismatch {
        path: PathBuf,
        declared: String,
        found: String,
    },

    /// Caller data for [`ScriptedModel::forward`] disagrees with the signature.
    #[error("{what} has the wrong shape: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// The module raised, or returned something else than declared, on a real batch
    /// after passing the load-time check (a data-dependent path).
    #[error("{} failed on a batch of {batch}: {reason}", .path.display())]
    Run {
        path: PathBuf,
        batch: usize,
        reason: String,
    },

    /// libtorch failed outside the module (device out of memory, a copy between devices).
    #[error("libtorch: {0}")]
    Torch(#[from] TchError),
}

/// A loaded TorchScript module in eval mode, on one device, whose signature has been
/// checked. `Send` and `Sync`: libtorch runs a module's forward from any thread.
#[derive(Debug)]
pub struct ScriptedModel {
    path: PathBuf,
    signature: Signature,
    device: Device,
    module: CModule,
}

impl ScriptedModel {
    /// Loads `path` onto `device` (callers pass [`crate::default_device`]) and checks
    /// `signature` by running the module once on zeros of the declared shapes, with a
    /// batch of 2 for `-1`. Refuses a file that is not TorchScript (`NotTorchScript`),
    /// an impossible declaration (`InvalidSignature`), and a module that raises on the
    /// declared inputs, returns something other than a tensor, or returns another shape
    /// or dtype than declared (`Mismatch`).
    pub fn load(path: &Path, signature: Signature, device: Device) -> Result<Self, ScriptError> {
        // libtorch reports a missing file as a format error; say which it is first.
        std::fs::File::open(path).map_err(|source| ScriptError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        signature
            .validate()
            .map_err(|reason| ScriptError::InvalidSignature {
                path: path.to_path_buf(),
                reason,
            })?;
        let not_script = |err: TchError| ScriptError::NotTorchScript {
            path: path.to_path_buf(),
            reason: torch_reason(&err),
        };
        let mut module = CModule::load_on_device(path, device).map_err(not_script)?;
        // Dropout and batch-norm statistics must not move while serving.
        module.f_set_eval().map_err(not_script)?;
        let model = Self {
            path: path.to_path_buf(),
            signature,
            device,
            module,
        };
        model.check_signature()?;
        Ok(model)
    }

    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Runs the module on one batch. `inputs[i]` holds input i flat, row-major, in its
    /// declared shape with `batch` in place of `-1`; returns the output flat the same
    /// way. A wrong number of inputs, a wrong length or a batch of 0 is a `Shape` error;
    /// a module that raises or returns another shape than declared is a `Run` error.
    pub fn forward(&self, inputs: &[&[f32]], batch: usize) -> Result<Vec<f32>, ScriptError> {
        if inputs.len() != self.signature.inputs.len() {
            return Err(ScriptError::Shape {
                what: "inputs".into(),
                expected: format!(
                    "{}, one tensor per declared input ({})",
                    self.signature.inputs.len(),
                    self.signature
                ),
                got: inputs.len().to_string(),
            });
        }
        if batch == 0 {
            return Err(ScriptError::Shape {
                what: "batch".into(),
                expected: "at least 1".into(),
                got: "0".into(),
            });
        }
        let mut values = Vec::with_capacity(inputs.len());
        for (i, (data, spec)) in inputs.iter().zip(&self.signature.inputs).enumerate() {
            let Some((shape, count)) = spec.shape_for(batch) else {
                return Err(ScriptError::Shape {
                    what: format!("input {i}"),
                    expected: format!("{spec} for a batch of {batch}"),
                    got: "a batch too large to address".into(),
                });
            };
            if data.len() != count {
                return Err(ScriptError::Shape {
                    what: format!("input {i}"),
                    expected: format!("{count} values ({spec} for a batch of {batch}: {shape:?})"),
                    got: format!("{} values", data.len()),
                });
            }
            let tensor = Tensor::f_from_slice(data)?
                .f_view(shape.as_slice())?
                .f_to_device(self.device)?;
            values.push(IValue::Tensor(tensor));
        }
        let run_error = |reason: String| ScriptError::Run {
            path: self.path.clone(),
            batch,
            reason,
        };
        let _no_grad = tch::no_grad_guard();
        let output = self
            .module
            .forward_is(&values)
            .map_err(|err| run_error(format!("the module raised: {}", torch_reason(&err))))?;
        let output = self.check_output(output, batch).map_err(|found| {
            run_error(format!(
                "declared {}, but {found}",
                self.declared_output(batch)
            ))
        })?;
        Ok(Vec::<f32>::try_from(&output.f_reshape([-1])?)?)
    }

    /// The load-time check: zeros of every declared input shape, batch `PROBE_BATCH`.
    fn check_signature(&self) -> Result<(), ScriptError> {
        let mut shapes = Vec::with_capacity(self.signature.inputs.len());
        let mut values = Vec::with_capacity(self.signature.inputs.len());
        for spec in &self.signature.inputs {
            // `validate` has checked that every declared shape is addressable.
            let (shape, _) = spec
                .shape_for(PROBE_BATCH)
                .expect("validated signatures have addressable probe shapes");
            let zeros = Tensor::f_zeros(shape.as_slice(), (spec.dtype.kind(), self.device))?;
            values.push(IValue::Tensor(zeros));
            shapes.push(shape);
        }
        let mismatch = |declared: String, found: String| ScriptError::Mismatch {
            path: self.path.clone(),
            declared,
            found,
        };
        let _no_grad = tch::no_grad_guard();
        let output = self.module.forward_is(&values).map_err(|err| {
            let declared = self.signature.inputs.iter().zip(&shapes);
            let declared: Vec<String> = declared
                .map(|(spec, shape)| format!("{spec} (batch {PROBE_BATCH}: {shape:?})"))
                .collect();
            mismatch(
                format!("inputs [{}]", declared.join(", ")),
                format!(
                    "the module raised on zeros of those shapes: {}",
                    torch_reason(&err)
                ),
            )
        })?;
        self.check_output(output, PROBE_BATCH)
            .map(drop)
            .map_err(|found| mismatch(self.declared_output(PROBE_BATCH), found))
    }

    /// The output as a tensor if it has the declared shape (for `batch`) and dtype, else
    /// what the module returned instead.
    fn check_output(&self, output: IValue, batch: usize) -> Result<Tensor, String> {
        let tensor = match output {
            IValue::Tensor(tensor) => tensor,
            other => {
                return Err(format!(
                    "the module returned {}, not a tensor",
                    describe_ivalue(&other)
                ))
            }
        };
        let spec = &self.signature.output;
        let got_shape = tensor.size();
        let got_kind = tensor.f_kind().map_err(|err| torch_reason(&err))?;
        let shape_ok = spec
            .shape_for(batch)
            .is_some_and(|(shape, _)| shape == got_shape);
        if shape_ok && got_kind == spec.dtype.kind() {
            return Ok(tensor);
        }
        let mut found = format!(
            "the module returned a tensor of shape {got_shape:?} and dtype {}",
            kind_name(got_kind)
        );
        if got_shape.len() != spec.shape.len() {
            found.push_str(&format!(
                " (rank {}, declared rank {})",
                got_shape.len(),
                spec.shape.len()
            ));
        }
        Err(found)
    }

    fn declared_output(&self, batch: usize) -> String {
        let spec = &self.signature.output;
        match spec.shape_for(batch) {
            Some((shape, _)) if spec.shape.contains(&-1) => {
                format!("output {spec} (batch {batch}: {shape:?})")
            }
            _ => format!("output {spec}"),
        }
    }
}

/// The part of libtorch's message that speaks about the model. A TorchScript traceback
/// ends with the Python-style exception line (the serialized code above it and the
/// exporter's file paths say little to whoever reads a node's log); a plain libtorch
/// error carries C++ frames that name libtorch's own source files.
fn torch_reason(err: &TchError) -> String {
    let message = match err {
        TchError::Torch(message) => message.clone(),
        other => other.to_string(),
    };
    if message.contains("Traceback of TorchScript") {
        if let Some(last) = message.lines().rev().find(|line| !line.trim().is_empty()) {
            return last.trim().to_string();
        }
    }
    let cut = message
        .find("\nException raised from")
        .unwrap_or(message.len());
    message[..cut].trim().to_string()
}

/// What a module returned instead of a tensor, in PyTorch's words.
fn describe_ivalue(value: &IValue) -> String {
    match value {
        IValue::None => "None".into(),
        IValue::Double(v) => format!("the float {v}"),
        IValue::Int(v) => format!("the int {v}"),
        IValue::Bool(v) => format!("the bool {v}"),
        IValue::Tuple(items) => format!("a tuple of {} values", items.len()),
        IValue::TensorList(items) => format!("a list of {} tensors", items.len()),
        IValue::IntList(_)
        | IValue::DoubleList(_)
        | IValue::BoolList(_)
        | IValue::StringList(_)
        | IValue::GenericList(_) => "a list".into(),
        IValue::GenericDict(_) => "a dict".into(),
        IValue::String(_) => "a string".into(),
        // tch may add kinds of value; an object, a device and those are all "not a tensor".
        _ => "a value that is not a tensor".into(),
    }
}

/// A libtorch element type in the names PyTorch users know (`torch.float64` → `f64`).
fn kind_name(kind: Kind) -> String {
    match kind {
        Kind::Float => "f32".into(),
        Kind::Double => "f64".into(),
        Kind::Half => "f16".into(),
        Kind::BFloat16 => "bf16".into(),
        Kind::Int64 => "i64".into(),
        Kind::Int => "i32".into(),
        Kind::Bool => "bool".into(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(shape: &[i64]) -> TensorSpec {
        TensorSpec {
            shape: shape.to_vec(),
            dtype: Dtype::F32,
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ScriptedModel>();
    }

    #[test]
    fn signature_round_trips_through_json_in_manifest_form() {
        let json = r#"{"inputs":[{"shape":[-1,8,60],"dtype":"f32"}],"output":{"shape":[-1],"dtype":"f32"}}"#;
        let signature: Signature = serde_json::from_str(json).expect("valid signature");
        assert_eq!(
            signature,
            Signature {
                inputs: vec![spec(&[-1, 8, 60])],
                output: spec(&[-1]),
            }
        );
        assert_eq!(serde_json::to_string(&signature).expect("serialises"), json);
        assert_eq!(
            signature.to_string(),
            "inputs [[-1, 8, 60] f32], output [-1] f32"
        );
    }

    #[test]
    fn other_dtypes_and_unknown_fields_are_refused() {
        let f64_input =
            r#"{"inputs":[{"shape":[-1,8],"dtype":"f64"}],"output":{"shape":[-1],"dtype":"f32"}}"#;
        let err = serde_json::from_str::<Signature>(f64_input).expect_err("f64 is refused");
        assert!(err.to_string().contains("f64"), "{err}");
        let typo = r#"{"inputs":[{"shape":[-1,8],"dtype":"f32","dtyp":"f32"}],"output":{"shape":[-1],"dtype":"f32"}}"#;
        let err = serde_json::from_str::<Signature>(typo).expect_err("unknown field");
        assert!(err.to_string().contains("dtyp"), "{err}");
    }

    #[test]
    fn impossible_declarations_are_refused() {
        let cases = [
            (vec![], spec(&[-1]), "no inputs"),
            (vec![spec(&[-1, 0, 60])], spec(&[-1]), "size 0"),
            (vec![spec(&[-1, 8, -2])], spec(&[-1]), "size -2"),
            (vec![spec(&[-1, -1])], spec(&[-1]), "more than one -1"),
            (
                vec![spec(&[-1, 8])],
                spec(&[i64::MAX, 4]),
                "too many elements",
            ),
        ];
        for (inputs, output, expected) in cases {
            let signature = Signature { inputs, output };
            match signature.validate() {
                Err(reason) => assert!(reason.contains(expected), "{signature}: {reason}"),
                Ok(()) => panic!("{signature} was accepted"),
            }
        }
        let ok = Signature {
            inputs: vec![spec(&[-1, 8, 60]), spec(&[8])],
            output: spec(&[]),
        };
        assert_eq!(ok.validate(), Ok(()));
    }

    #[test]
    fn batch_takes_the_place_of_minus_one() {
        assert_eq!(
            spec(&[-1, 8, 60]).shape_for(5),
            Some((vec![5, 8, 60], 2400))
        );
        assert_eq!(spec(&[60, -1]).shape_for(3), Some((vec![60, 3], 180)));
        assert_eq!(spec(&[]).shape_for(3), Some((vec![], 1)));
        assert_eq!(spec(&[-1, i64::MAX]).shape_for(2), None);
    }

    #[test]
    fn libtorch_messages_keep_what_speaks_about_the_model() {
        let plain = TchError::Torch(
            "shape mismatch\nException raised from meta at /pytorch/aten/src/ATen/native/X.cpp:198 (most recent call first):\nframe #0: c10::Error::Error".into(),
        );
        assert_eq!(torch_reason(&plain), "shape mismatch");
        let scripted = TchError::Torch(
            "The following operation failed in the TorchScript interpreter.\nTraceback of TorchScript, serialized code (most recent call last):\n  File \"code/__torch__.py\", line 13, in forward\n    return torch.linear(input, weight, bias)\nRuntimeError: mat1 and mat2 shapes cannot be multiplied (2x400 and 480x24)\n".into(),
        );
        assert_eq!(
            torch_reason(&scripted),
            "RuntimeError: mat1 and mat2 shapes cannot be multiplied (2x400 and 480x24)"
        );
    }
}
