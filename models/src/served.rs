//! Any stored model version as one servable thing: what an expert runs when its config
//! names a model in the store (`model = "tep-diagnosis@3"`).
//!
//! A [`Manifest`]'s `architecture` and `hyper` together are an [`Architecture`]: the
//! network and every size needed to rebuild it, so the weights in the store can be
//! loaded into it with the usual checks (hash, names, shapes, finite values). Every
//! architecture takes a flat window of `f32` values and gives one [`Inference`] per
//! window:
//!
//! - `score`: the number the router compares with the expert's threshold. Anomaly
//!   models give their raw anomaly score (reconstruction or forecast error);
//!   classifiers give the probability that the window is *not* the normal class, so
//!   every kind reads the same way: higher is worse, at the threshold it alarms.
//! - `class`: for classifiers, the most likely class (an index into
//!   [`ServedModel::labels`]): which fault, which defect.
//!
//! Why flat `f32` windows for every kind: the router, the remote endpoint codec and the
//! gRPC `Score` call already move windows of that shape between nodes, batched and
//! de-duplicated. An image is `height` rows of `width` pixels (channels × length =
//! height × width); a text is its token ids, which f32 holds exactly (the MiniLM vocabulary
//! is 30,522 words, far below 2^24), padded with 0.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::autoencoder::{AutoencoderConfig, ConvAutoencoder};
use crate::classifier::{ClassifierConfig, FaultClassifier};
use crate::error::ModelError;
use crate::forecaster::{ForecasterConfig, TcnForecaster};
use crate::fusion::{FusionClassifier, FusionConfig};
use crate::minilm::MiniLm;
use crate::notes::{NoteClassifier, NoteClassifierConfig};
use crate::store::{InputSpec, Manifest, ModelKind};
use crate::vision::{DefectCnn, VisionConfig};

/// The class names of a classifier and which one is normal operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Classes {
    pub names: Vec<String>,
    /// Index of the class that is not an alarm (`normal`, `functional`).
    pub normal: usize,
}

impl Classes {
    fn validate(&self, count: i64) -> Result<(), ModelError> {
        if self.names.len() as i64 != count {
            return Err(ModelError::InvalidOption {
                field: "classes.names",
                value: self.names.len().to_string(),
                reason: format!("the network has {count} outputs"),
            });
        }
        if self.normal >= self.names.len() {
            return Err(ModelError::InvalidOption {
                field: "classes.normal",
                value: self.normal.to_string(),
                reason: format!("there are {} classes", self.names.len()),
            });
        }
        Ok(())
    }
}

/// A network and its sizes: a manifest's `architecture` (the tag) with its `hyper`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "architecture", content = "hyper", rename_all = "snake_case")]
pub enum Architecture {
    ConvAutoencoder(AutoencoderConfig),
    /// Scored on windows of `context + horizon` steps: the forecast error of the last
    /// `horizon`.
    TcnForecaster(ForecasterConfig),
    FaultClassifier {
        config: ClassifierConfig,
        classes: Classes,
    },
    /// Images: `height` rows of `width` grey values in [0, 1] (channels × length =
    /// height × width).
    DefectCnn {
        config: VisionConfig,
        classes: Classes,
    },
    /// Operator notes and alarm texts: `tokens` MiniLM token ids per window (0 pads),
    /// embedded by the node's MiniLM, whose weights must hash to `encoder_sha256`.
    NoteClassifier {
        config: NoteClassifierConfig,
        tokens: i64,
        classes: Classes,
        encoder_sha256: String,
    },
    /// Sensor window and note: `channels × window` sensor values, then `tokens` token
    /// ids, in one flat window.
    Fusion {
        config: FusionConfig,
        tokens: i64,
        classes: Classes,
        encoder_sha256: String,
    },
}

impl Architecture {
    /// The architecture a manifest describes; errors name the manifest.
    pub fn from_manifest(manifest: &Manifest) -> Result<Architecture, ModelError> {
        let tagged = serde_json::json!({
            "architecture": manifest.architecture,
            "hyper": manifest.hyper,
        });
        let architecture: Architecture =
            serde_json::from_value(tagged).map_err(|e| ModelError::InvalidOption {
                field: "architecture",
                value: format!("{} ({})", manifest.architecture, manifest.id()),
                reason: e.to_string(),
            })?;
        architecture.validate()?;
        Ok(architecture)
    }

    /// A manifest for version `name@version` of this network: kind, architecture,
    /// hyper-parameters and input shape come from the network, the rest is empty (the
    /// store fills the weights' hash and size on import). Everything that stores a
    /// network starts from here, so the fields that rebuild it always agree.
    pub fn manifest(&self, name: &str, version: &str) -> Manifest {
        let (architecture, hyper) = self.manifest_fields();
        let [channels, length] = self.input_shape();
        Manifest {
            name: name.to_string(),
            version: version.to_string(),
            kind: self.kind(),
            architecture,
            hyper,
            input: InputSpec {
                shape: vec![-1, channels, length],
                description: String::new(),
            },
            training: serde_json::Value::Null,
            metrics: Default::default(),
            parents: Vec::new(),
            weights_sha256: String::new(),
            weights_bytes: 0,
            created_us: 0,
        }
    }

    /// The manifest's `architecture` and `hyper` fields for this architecture.
    pub fn manifest_fields(&self) -> (String, serde_json::Value) {
        let mut tagged = serde_json::to_value(self).unwrap_or_default();
        let name = tagged["architecture"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        (name, tagged["hyper"].take())
    }

    pub fn kind(&self) -> ModelKind {
        match self {
            Architecture::ConvAutoencoder(_)
            | Architecture::TcnForecaster(_)
            | Architecture::FaultClassifier { .. } => ModelKind::TimeSeries,
            Architecture::DefectCnn { .. } => ModelKind::Vision,
            Architecture::NoteClassifier { .. } => ModelKind::Language,
            Architecture::Fusion { .. } => ModelKind::Multimodal,
        }
    }

    /// Whether the score is a probability of not-normal (see the module docs).
    pub fn is_classifier(&self) -> bool {
        !matches!(
            self,
            Architecture::ConvAutoencoder(_) | Architecture::TcnForecaster(_)
        )
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        match self {
            Architecture::ConvAutoencoder(config) => config.validate(),
            Architecture::TcnForecaster(config) => config.validate(),
            Architecture::FaultClassifier { config, classes } => classes.validate(config.classes),
            Architecture::DefectCnn { config, classes } => {
                config.validate()?;
                classes.validate(config.classes)
            }
            Architecture::NoteClassifier {
                config,
                tokens,
                classes,
                ..
            } => {
                check_tokens(*tokens)?;
                classes.validate(config.classes)
            }
            Architecture::Fusion {
                config,
                tokens,
                classes,
                ..
            } => {
                check_tokens(*tokens)?;
                config.validate()?;
                classes.validate(config.classes)
            }
        }
    }

    /// The same network with `hidden` channels: a narrower or wider model of the same
    /// windows and outputs, as the sites of a federated distillation may run.
    pub fn with_hidden(&self, hidden: i64) -> Result<Architecture, ModelError> {
        let changed = match self {
            Architecture::ConvAutoencoder(config) => {
                Architecture::ConvAutoencoder(AutoencoderConfig {
                    hidden,
                    ..config.clone()
                })
            }
            Architecture::FaultClassifier { config, classes } => Architecture::FaultClassifier {
                config: ClassifierConfig { hidden, ..*config },
                classes: classes.clone(),
            },
            other => {
                return Err(ModelError::InvalidOption {
                    field: "hidden",
                    value: hidden.to_string(),
                    reason: format!(
                        "only conv_autoencoder and fault_classifier take another width, not {}",
                        other.manifest_fields().0
                    ),
                })
            }
        };
        if !(1..=4096).contains(&hidden) {
            return Err(ModelError::InvalidOption {
                field: "hidden",
                value: hidden.to_string(),
                reason: "must be between 1 and 4096".into(),
            });
        }
        changed.validate()?;
        Ok(changed)
    }

    /// The window the network takes, as `[channels, length]`.
    pub fn input_shape(&self) -> [i64; 2] {
        match self {
            Architecture::ConvAutoencoder(config) => [config.channels, config.window],
            Architecture::TcnForecaster(config) => {
                [config.channels, config.context + config.horizon]
            }
            Architecture::FaultClassifier { config, .. } => [config.channels, config.window],
            Architecture::DefectCnn { config, .. } => [config.height, config.width],
            Architecture::NoteClassifier { tokens, .. } => [1, *tokens],
            Architecture::Fusion { config, tokens, .. } => {
                [1, config.channels * config.window + tokens]
            }
        }
    }

    /// The MiniLM weights' sha256 a language or multimodal model was trained with.
    pub fn encoder_sha256(&self) -> Option<&str> {
        match self {
            Architecture::NoteClassifier { encoder_sha256, .. }
            | Architecture::Fusion { encoder_sha256, .. } => Some(encoder_sha256),
            _ => None,
        }
    }

    /// Values in one window.
    pub fn window_len(&self) -> usize {
        let [channels, length] = self.input_shape();
        (channels * length) as usize
    }
}

fn check_tokens(tokens: i64) -> Result<(), ModelError> {
    if !(2..=512).contains(&tokens) {
        return Err(ModelError::InvalidOption {
            field: "tokens",
            value: tokens.to_string(),
            reason: "MiniLM takes 2 to 512 tokens".into(),
        });
    }
    Ok(())
}

/// What a model needs besides its own weights: the folder with the MiniLM encoder
/// (`just setup` exports it to `data/minilm`) for language and multimodal models.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Assets {
    pub minilm: Option<PathBuf>,
}

impl Assets {
    /// The encoder in `minilm`, checked against the hash the model was trained with.
    fn encoder(&self, expected_sha256: &str, device: Device) -> Result<MiniLm, ModelError> {
        let dir = self
            .minilm
            .as_deref()
            .ok_or_else(|| ModelError::InvalidOption {
                field: "minilm",
                value: "(absent)".into(),
                reason: "a language or multimodal model needs the MiniLM encoder folder".into(),
            })?;
        let actual = encoder_sha256(dir)?;
        if !actual.eq_ignore_ascii_case(expected_sha256) {
            return Err(ModelError::HashMismatch {
                origin: dir.join("model.safetensors").display().to_string(),
                expected: expected_sha256.to_string(),
                actual,
            });
        }
        MiniLm::load(dir, device)
    }
}

/// sha256 of the MiniLM weights in `dir`, for the manifests of models trained on them.
pub fn encoder_sha256(dir: &Path) -> Result<String, ModelError> {
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).map_err(|source| ModelError::Io {
        path: weights,
        source,
    })?;
    Ok(crate::weights::sha256_hex(&bytes))
}

/// One window's result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inference {
    /// Higher is worse; see the module docs.
    pub score: f32,
    /// For classifiers: the most likely class.
    pub class: Option<u32>,
}

enum Network {
    Autoencoder(ConvAutoencoder),
    Forecaster(TcnForecaster),
    Classifier(Box<FaultClassifier>, Classes),
    Vision(Box<DefectCnn>, Classes),
    // Boxed: an encoder is far larger than the other networks' handles.
    Notes(Box<(NoteClassifier, MiniLm)>, i64, Classes),
    Fusion(Box<(FusionClassifier, MiniLm)>, i64, Classes),
}

/// A stored model version loaded for serving.
pub struct ServedModel {
    architecture: Architecture,
    network: Network,
    labels: Vec<String>,
}

impl ServedModel {
    /// Builds the manifest's network and loads `weights` into it, checking them against
    /// the manifest's hash.
    pub fn load(
        manifest: &Manifest,
        weights: &[u8],
        assets: &Assets,
        device: Device,
    ) -> Result<Self, ModelError> {
        let architecture = Architecture::from_manifest(manifest)?;
        let sha = Some(manifest.weights_sha256.as_str());
        let network = match &architecture {
            Architecture::ConvAutoencoder(config) => Network::Autoencoder(
                ConvAutoencoder::from_safetensors(config.clone(), weights, sha, device)?,
            ),
            Architecture::TcnForecaster(config) => Network::Forecaster(
                TcnForecaster::from_safetensors(config.clone(), weights, sha, device)?,
            ),
            Architecture::FaultClassifier { config, classes } => Network::Classifier(
                Box::new(FaultClassifier::from_safetensors(
                    *config, weights, sha, device,
                )?),
                classes.clone(),
            ),
            Architecture::DefectCnn { config, classes } => Network::Vision(
                Box::new(DefectCnn::from_safetensors(*config, weights, sha, device)?),
                classes.clone(),
            ),
            Architecture::NoteClassifier {
                config,
                tokens,
                classes,
                encoder_sha256,
            } => Network::Notes(
                Box::new((
                    NoteClassifier::from_safetensors(*config, weights, sha, device)?,
                    assets.encoder(encoder_sha256, device)?,
                )),
                *tokens,
                classes.clone(),
            ),
            Architecture::Fusion {
                config,
                tokens,
                classes,
                encoder_sha256,
            } => Network::Fusion(
                Box::new((
                    FusionClassifier::from_safetensors(*config, weights, sha, device)?,
                    assets.encoder(encoder_sha256, device)?,
                )),
                *tokens,
                classes.clone(),
            ),
        };
        let labels = match &network {
            Network::Classifier(_, classes)
            | Network::Vision(_, classes)
            | Network::Notes(_, _, classes)
            | Network::Fusion(_, _, classes) => classes.names.clone(),
            Network::Autoencoder(_) | Network::Forecaster(_) => Vec::new(),
        };
        Ok(ServedModel {
            architecture,
            network,
            labels,
        })
    }

    pub fn architecture(&self) -> &Architecture {
        &self.architecture
    }

    /// Class names, for classifiers (empty for anomaly models).
    pub fn labels(&self) -> &[String] {
        &self.labels
    }

    /// One inference per window of `input` (windows back to back).
    pub fn infer(&self, input: &[f32]) -> Result<Vec<Inference>, ModelError> {
        match &self.network {
            Network::Autoencoder(model) => Ok(anomaly(model.score(input)?)),
            Network::Forecaster(model) => Ok(anomaly(model.score(input)?)),
            Network::Classifier(model, classes) => {
                classified(&model.predict_proba(input)?, classes.normal)
            }
            Network::Vision(model, classes) => {
                classified(&model.class_probabilities(input)?, classes.normal)
            }
            Network::Notes(networks, tokens, classes) => {
                let (model, encoder) = &**networks;
                let texts = embed_token_windows(encoder, input, *tokens as usize)?;
                classified(&model.predict_proba(&texts)?, classes.normal)
            }
            Network::Fusion(networks, tokens, classes) => {
                let (model, encoder) = &**networks;
                let sensor = (model.config().channels * model.config().window) as usize;
                let per = sensor + *tokens as usize;
                if input.is_empty() || !input.len().is_multiple_of(per) {
                    return Err(ModelError::Shape {
                        what: "fusion windows",
                        expected: format!("a positive multiple of {per} values"),
                        got: format!("{} values", input.len()),
                    });
                }
                let (mut sensors, mut ids) = (Vec::new(), Vec::new());
                for window in input.chunks_exact(per) {
                    sensors.extend_from_slice(&window[..sensor]);
                    ids.extend_from_slice(&window[sensor..]);
                }
                let texts = embed_token_windows(encoder, &ids, *tokens as usize)?;
                classified(&model.predict_proba(&sensors, &texts)?, classes.normal)
            }
        }
    }
}

/// Sentence embeddings of windows of `tokens` token ids each (as f32, 0 pads).
fn embed_token_windows(
    encoder: &MiniLm,
    input: &[f32],
    tokens: usize,
) -> Result<Tensor, ModelError> {
    if input.is_empty() || !input.len().is_multiple_of(tokens) {
        return Err(ModelError::Shape {
            what: "token windows",
            expected: format!("a positive multiple of {tokens} token ids"),
            got: format!("{} values", input.len()),
        });
    }
    let mut ids = Vec::with_capacity(input.len());
    for (index, &v) in input.iter().enumerate() {
        // Token ids travel as f32, exact below 2^24; anything else is not a token.
        if !(v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 30_522.0) {
            return Err(ModelError::InvalidOption {
                field: "token id",
                value: format!("{v} at index {index}"),
                reason: "token ids are whole numbers from 0 to 30521".into(),
            });
        }
        ids.push(v as i64);
    }
    let n = (ids.len() / tokens) as i64;
    let ids = Tensor::f_from_slice(&ids)?.f_view([n, tokens as i64])?;
    let mask = ids.f_ne(0)?.f_to_kind(Kind::Int64)?;
    Ok(encoder
        .embed_tokens(&ids, &mask)?
        .f_to_device(Device::Cpu)?)
}

/// Token ids of `text` for a model that takes `tokens` of them: the MiniLM tokens
/// (with `[CLS]` and `[SEP]`), cut or padded with 0 to `tokens`, as f32.
pub fn token_window(encoder: &MiniLm, text: &str, tokens: usize) -> Result<Vec<f32>, ModelError> {
    let (ids, _) = encoder.tokenize(&[text])?;
    let ids = Vec::<i64>::try_from(&ids.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
    let mut out: Vec<f32> = ids.iter().take(tokens).map(|&i| i as f32).collect();
    out.resize(tokens, 0.0);
    Ok(out)
}

fn anomaly(scores: Vec<f32>) -> Vec<Inference> {
    scores
        .into_iter()
        .map(|score| Inference { score, class: None })
        .collect()
}

/// Inferences from class probabilities `[N, classes]`: the score is one minus the
/// probability of the normal class.
fn classified(probabilities: &Tensor, normal: usize) -> Result<Vec<Inference>, ModelError> {
    let probabilities = probabilities.f_to_kind(Kind::Float)?;
    let classes = probabilities.size()[1] as usize;
    let values = Vec::<f32>::try_from(&probabilities.f_flatten(0, -1)?)?;
    Ok(values
        .chunks_exact(classes)
        .map(|row| {
            let (best, _) =
                row.iter().enumerate().fold(
                    (0, f32::MIN),
                    |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc },
                );
            Inference {
                score: 1.0 - row[normal],
                class: Some(best as u32),
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(architecture: &Architecture, sha: String) -> Manifest {
        Manifest {
            weights_sha256: sha,
            ..architecture.manifest("m", "1")
        }
    }

    #[test]
    fn a_stored_classifier_serves_probability_of_not_normal_and_its_class() {
        let config = ClassifierConfig {
            channels: 2,
            window: 8,
            hidden: 4,
            classes: 3,
        };
        let model = FaultClassifier::new(config, Device::Cpu, 1).unwrap();
        let (bytes, sha) = model.to_safetensors().unwrap();
        let architecture = Architecture::FaultClassifier {
            config,
            classes: Classes {
                names: vec!["normal".into(), "idv01".into(), "idv02".into()],
                normal: 0,
            },
        };
        let served = ServedModel::load(
            &manifest(&architecture, sha),
            &bytes,
            &Assets::default(),
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(served.architecture(), &architecture);
        assert_eq!(served.architecture().window_len(), 16);
        let input: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let inferences = served.infer(&input).unwrap();
        let probabilities = model.predict_proba(&input).unwrap();
        let predicted = model.predict(&input).unwrap();
        for (i, inference) in inferences.iter().enumerate() {
            let p_normal = probabilities.double_value(&[i as i64, 0]) as f32;
            assert!((inference.score - (1.0 - p_normal)).abs() < 1e-6);
            assert_eq!(inference.class, Some(predicted[i] as u32));
        }
    }

    #[test]
    fn manifest_fields_round_trip_and_bad_hyper_is_named() {
        let architecture = Architecture::ConvAutoencoder(AutoencoderConfig::w1(3, 16));
        let m = manifest(&architecture, String::new());
        assert_eq!(m.architecture, "conv_autoencoder");
        assert_eq!(Architecture::from_manifest(&m).unwrap(), architecture);
        let mut bad = m.clone();
        bad.architecture = "resnet".into();
        let err = Architecture::from_manifest(&bad).unwrap_err().to_string();
        assert!(err.contains("resnet") && err.contains("m@1"), "{err}");
        let wrong_classes = Architecture::FaultClassifier {
            config: ClassifierConfig {
                channels: 2,
                window: 8,
                hidden: 4,
                classes: 3,
            },
            classes: Classes {
                names: vec!["normal".into()],
                normal: 0,
            },
        };
        let err = Architecture::from_manifest(&manifest(&wrong_classes, String::new()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("classes.names"), "{err}");
    }

    #[test]
    fn weights_that_do_not_match_the_manifest_hash_are_refused() {
        let config = AutoencoderConfig::w1(2, 8);
        let model = ConvAutoencoder::new(config.clone(), Device::Cpu, 1).unwrap();
        let (bytes, _) = model.to_safetensors().unwrap();
        let m = manifest(&Architecture::ConvAutoencoder(config), "ab".repeat(32));
        let err = ServedModel::load(&m, &bytes, &Assets::default(), Device::Cpu)
            .err()
            .unwrap();
        assert!(matches!(err, ModelError::HashMismatch { .. }), "{err}");
    }
}
