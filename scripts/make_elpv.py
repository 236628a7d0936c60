#!/usr/bin/env python3
"""Convert the ELPV solar-cell images into fogmesh's compact cell format (``data/elpv``).

What it does
------------
Reads ``labels.csv`` and the 2,624 cell images (300 x 300, 8-bit grey
electroluminescence images, Buerhop-Lutz et al. 2018, Deitsch et al. 2019) from the
installed PyPI package ``elpv-dataset==1.0.0.post1``, shrinks every image to
``--size`` x ``--size`` pixels with a box filter (each output pixel is the mean of the
source pixels it covers, so thin cracks fade but do not alias away), and writes
``cells.bin``, ``labels.tsv`` and ``manifest.json`` into ``--out`` (default
``data/elpv``).

Why it is converted rather than committed
-----------------------------------------
The images are CC BY-NC-SA 4.0; neither they nor pixels derived from them are shipped in
this repository. ``just setup`` installs the package and runs this script; ``data/`` is
git-ignored.

The script is idempotent: when ``manifest.json`` was written by the same format version
from the same package version at the same size, and ``cells.bin`` still hashes to the
recorded sha256, it prints ``elpv cells up to date`` and exits. Otherwise it rewrites
everything (a few seconds); the manifest goes last, so an interrupted run is redone.

The format (read by ``models/src/elpv.rs``; keep the two in step)
-----------------------------------------------------------------
``cells.bin``
    ``count * height * width`` bytes: the cells' 8-bit grey pixels, one image after
    another in ``labels.tsv`` order, each row-major (top row first); 0 is black.
``labels.tsv``
    UTF-8, tab-separated, a header line ``index<TAB>source<TAB>probability<TAB>type``, then one
    line per cell: ``index`` (0, 1, 2, ... in order), ``source`` (the image's path
    inside the package, e.g. ``images/cell0001.png``), ``probability`` (the experts'
    defect probability: 0, 1/3, 2/3 or 1, written with 17 significant digits so it reads
    back exactly) and ``type`` (``mono`` or ``poly`` crystalline silicon).
``manifest.json``
    ``format`` ("fogmesh-elpv"), ``format_version`` (int), ``source_package``
    ("elpv-dataset"), ``source_version``, ``width``, ``height``, ``count``,
    ``cells_file`` ("cells.bin"), ``cells_sha256`` (lowercase hex), ``labels_file``
    ("labels.tsv"), ``licence``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

try:
    import numpy as np
    from PIL import Image
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("error: numpy or pillow is not installed for this python3; run `just setup`")

# Bump when the bytes this script writes change for the same package and size.
FORMAT_VERSION = 1
SOURCE_PACKAGE = "elpv-dataset"
SOURCE_VERSION = "1.0.0.post1"
LICENCE = "CC BY-NC-SA 4.0 (ELPV dataset, Buerhop-Lutz et al. 2018; Deitsch et al. 2019)"
TYPES = ("mono", "poly")


def package_dir() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        sys.exit(
            f"error: the {SOURCE_PACKAGE} package is not installed for this python3; "
            "run `just setup`"
        )
    from importlib.metadata import version as installed_version

    version = installed_version(SOURCE_PACKAGE)
    if version != SOURCE_VERSION:
        sys.exit(
            f"error: {SOURCE_PACKAGE} {version} is installed, this script reads "
            f"{SOURCE_VERSION}; run `just setup`"
        )
    return Path(os.path.dirname(elpv_dataset.__file__)) / "data"


def read_labels(source: Path) -> list[tuple[str, float, str]]:
    """(image path, probability, type) per line of the package's labels.csv."""
    path = source / "labels.csv"
    cells = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            sys.exit(f"error: {path}:{number}: expected 3 fields, got {len(fields)}")
        image, probability, kind = fields
        probability = float(probability)
        if not 0.0 <= probability <= 1.0 or kind not in TYPES:
            sys.exit(f"error: {path}:{number}: bad probability or type: {line!r}")
        cells.append((image, probability, kind))
    return cells


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def up_to_date(out: Path, size: int) -> bool:
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    expected = {
        "format_version": FORMAT_VERSION,
        "source_version": SOURCE_VERSION,
        "width": size,
        "height": size,
    }
    if any(manifest.get(key) != value for key, value in expected.items()):
        return False
    cells = out / manifest.get("cells_file", "cells.bin")
    return (
        (out / manifest.get("labels_file", "labels.tsv")).is_file()
        and cells.is_file()
        and cells.stat().st_size == manifest.get("count", -1) * size * size
        and sha256_file(cells) == manifest.get("cells_sha256")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/elpv"))
    parser.add_argument("--size", type=int, default=64, help="output width and height, pixels")
    args = parser.parse_args()
    if not 16 <= args.size <= 300:
        sys.exit(f"error: --size {args.size}: must lie in 16..=300 (the source is 300 x 300)")
    if up_to_date(args.out, args.size):
        print(f"elpv cells up to date ({args.out})")
        return

    started = time.monotonic()
    source = package_dir()
    cells = read_labels(source)
    args.out.mkdir(parents=True, exist_ok=True)
    pixels = np.empty((len(cells), args.size, args.size), dtype=np.uint8)
    for i, (image, _, _) in enumerate(cells):
        with Image.open(source / image) as picture:
            grey = picture.convert("L")
            pixels[i] = np.asarray(grey.resize((args.size, args.size), Image.Resampling.BOX))

    # The old manifest goes first: files half rewritten must not look up to date.
    (args.out / "manifest.json").unlink(missing_ok=True)
    (args.out / "cells.bin").write_bytes(pixels.tobytes())
    lines = ["index\tsource\tprobability\ttype"]
    lines += [f"{i}\t{image}\t{p:.17g}\t{kind}" for i, (image, p, kind) in enumerate(cells)]
    (args.out / "labels.tsv").write_text("\n".join(lines) + "\n")
    manifest = {
        "format": "fogmesh-elpv",
        "format_version": FORMAT_VERSION,
        "source_package": SOURCE_PACKAGE,
        "source_version": SOURCE_VERSION,
        "width": args.size,
        "height": args.size,
        "count": len(cells),
        "cells_file": "cells.bin",
        "cells_sha256": hashlib.sha256(pixels.tobytes()).hexdigest(),
        "labels_file": "labels.tsv",
        "licence": LICENCE,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    defective = sum(p >= 0.5 for _, p, _ in cells)
    print(
        f"elpv: wrote {len(cells)} cells ({defective} defective) at {args.size}x{args.size} "
        f"into {args.out} in {time.monotonic() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
