#!/usr/bin/env python3
"""Generate fogmesh's Tennessee Eastman plant recordings (``.fogrec`` files).

What it does
------------
Runs the revised Tennessee Eastman process (Bathelt, Ricker & Jelali 2015) under the
Ricker decentralized controller, as packaged by PyPI ``tep-studio==0.2.0``, and writes
one ``.fogrec`` file per scenario plus ``manifest.json`` into ``--out`` (default
``data/tep``):

* ``normal-train-1/2/3.fogrec``: normal operation, 24 h each, seeds 1001, 1003, 1005;
* ``normal-calibration.fogrec``: normal operation, 24 h, seed 1004 (for alarm limits);
* ``normal-test.fogrec``: normal operation, 24 h, seed 1002;
* ``idvNN.fogrec`` for IDV 1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14: fault NN switched on at
  t = 4 h, 24 h horizon, seed 2000 + NN.  A run whose plant shuts down (IDV 6 does) keeps
  the rows recorded up to the shutdown and is marked ``terminated_early`` in the manifest.

Each row holds the 41 XMEAS measurements then the 12 XMV manipulated variables (the
implemented, clipped valve positions), as float32, sampled every 20 control steps of
0.0005 h, i.e. every 0.01 h = 36 s.  Every run starts recording after a 24 h burn-in from
the initial state (the plant needs most of a day to settle); times count from there.  The demo, tests and benchmarks replay these files.

Why it is generated rather than committed
-----------------------------------------
The C model inside tep-studio (``temexd_mod.c``) is distributed "for research and educational
use" with no open-source licence, so neither it nor data made from it is shipped in this
repository.  ``just setup`` installs tep-studio and runs this script; ``data/`` is git-ignored.

The script is idempotent: when ``manifest.json`` already lists every expected file, made by
the same generator version with the same parameters, and the files' hashes match, it prints
``tep recordings up to date`` and exits at once.  Otherwise it regenerates everything, two
scenarios at a time (``--jobs``), in about a minute on two free cores.

The ``.fogrec`` format (read by the Rust side; keep the two in step)
--------------------------------------------------------------------
::

    8 bytes   magic b"FOGREC1\\n"
    4 bytes   N, uint32 little-endian
    N bytes   UTF-8 JSON header with exactly these keys:
                source (str), columns (list of str), sample_period_s (float),
                start_timestamp_us (int, Unix epoch microseconds of row 0),
                rows (int), fault (int IDV number or null),
                fault_onset_row (int or null: first row whose plant time >= onset),
                seed (float or null), description (str)
    rest      rows * len(columns) float32 little-endian, row-major

Only the Python standard library and numpy are needed to write or read it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import struct
import sys
import time
from pathlib import Path

try:
    import numpy as np
except ImportError:  # pragma: no cover - depends on the machine
    sys.exit("error: numpy is not installed for this python3; run `just setup`")

# Bump when the output of this script changes for the same parameters.
GENERATOR_VERSION = 3
TEP_STUDIO_VERSION = "0.2.0"

MAGIC = b"FOGREC1\n"
SOURCE = (
    "tep-studio 0.2.0, revised Tennessee Eastman (Bathelt, Ricker, Jelali 2015), "
    "Ricker decentralized control"
)
START_TIMESTAMP_US = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z, the same for every file
CONTROL_INTERVAL_H = 0.0005  # tep-studio's default control step (1.8 s)
RECORD_EVERY = 20  # keep every 20th step: 0.01 h = 36 s between rows
SAMPLE_PERIOD_H = CONTROL_INTERVAL_H * RECORD_EVERY
# The plant leaves its initial state in a damped oscillation that takes most of a day to
# die out (valve positions swing by 3 standard deviations of steady operation). Recordings
# start after this burn-in, so "normal operation" means steady operation, as in the classic
# TEP data sets; all times below (onset, horizon) count from the end of the burn-in.
BURN_IN_H = 24.0
FAULT_ONSET_H = 4.0
FAULT_HORIZON_H = 24.0
FAULTS = (1, 2, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14)
N_IDV = 28
# Tolerance for plant times, which tep-studio accumulates step by step in float64.
TIME_TOL_H = 1e-6


def recording_specs() -> list[dict]:
    """Every recording this script makes, longest first (so the process pool balances)."""
    specs = [
        # Normal operation wanders slowly from run to run by more than it varies within a
        # day, so models learn from several runs and set their alarm limits on another.
        {"file": "normal-train-1.fogrec", "horizon_h": 24.0, "seed": 1001.0, "fault": None},
        {"file": "normal-train-2.fogrec", "horizon_h": 24.0, "seed": 1003.0, "fault": None},
        {"file": "normal-train-3.fogrec", "horizon_h": 24.0, "seed": 1005.0, "fault": None},
        {"file": "normal-calibration.fogrec", "horizon_h": 24.0, "seed": 1004.0, "fault": None},
        {"file": "normal-test.fogrec", "horizon_h": 24.0, "seed": 1002.0, "fault": None},
    ]
    for k in FAULTS:
        specs.append(
            {"file": f"idv{k:02d}.fogrec", "horizon_h": FAULT_HORIZON_H, "seed": float(2000 + k), "fault": k}
        )
    return specs


def parameters() -> dict:
    """Everything that determines the output; stored in the manifest for the up-to-date check."""
    return {
        "tep_studio_version": TEP_STUDIO_VERSION,
        "mode": "mode1",
        "controller": "RickerMultiLoopController (tep-studio default)",
        "control_interval_h": CONTROL_INTERVAL_H,
        "record_every": RECORD_EVERY,
        "sample_period_s": round(SAMPLE_PERIOD_H * 3600.0, 6),
        "start_timestamp_us": START_TIMESTAMP_US,
        "burn_in_h": BURN_IN_H,
        "fault_onset_h": FAULT_ONSET_H,
        "columns": "41 XMEAS measurements then 12 XMV implemented actions, float32",
        "recordings": recording_specs(),
    }


# --------------------------------------------------------------------------- fogrec I/O


def encode_fogrec(header: dict, data: np.ndarray) -> bytes:
    """Serialize one recording; ``data`` is (rows, columns) and is stored as float32 LE."""
    body = np.ascontiguousarray(data, dtype="<f4")
    assert body.shape == (header["rows"], len(header["columns"])), (body.shape, header["rows"])
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return MAGIC + struct.pack("<I", len(head)) + head + body.tobytes(order="C")


def read_fogrec(path: Path) -> tuple[dict, np.ndarray]:
    """Read a ``.fogrec`` file back: (header, float32 array of shape (rows, columns))."""
    raw = Path(path).read_bytes()
    if raw[:8] != MAGIC:
        raise ValueError(f"{path}: not a fogrec file (bad magic)")
    (n,) = struct.unpack_from("<I", raw, 8)
    header = json.loads(raw[12 : 12 + n].decode("utf-8"))
    rows, cols = header["rows"], len(header["columns"])
    body = raw[12 + n :]
    if len(body) != rows * cols * 4:
        raise ValueError(f"{path}: {len(body)} data bytes, expected {rows * cols * 4}")
    return header, np.frombuffer(body, dtype="<f4").reshape(rows, cols)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomically(path: Path, payload: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- generation


def import_tep_studio():
    """Import tep-studio, or exit with an instruction the user can act on."""
    try:
        import tep_studio
    except ImportError as e:
        sys.exit(
            f"error: tep-studio is not installed for {sys.executable} ({e}).\n"
            f"       run `just setup` (it installs tep-studio=={TEP_STUDIO_VERSION} and makes the recordings)"
        )
    found = getattr(tep_studio, "__version__", "unknown")
    if found != TEP_STUDIO_VERSION:
        sys.exit(
            f"error: tep-studio {found} is installed for {sys.executable}, but the recordings are "
            f"defined for tep-studio=={TEP_STUDIO_VERSION}; run `just setup`"
        )
    return tep_studio


def make_recording(job: tuple[dict, str]) -> dict:
    """Simulate one scenario and write its .fogrec; runs in a worker process."""
    spec, out_dir = job
    started = time.monotonic()
    tep = import_tep_studio()
    from tep_studio import ClosedLoopSimulation

    fault = spec["fault"]

    def schedule(t_h: float) -> np.ndarray:
        idv = np.zeros(N_IDV)
        if fault is not None and t_h >= BURN_IN_H + FAULT_ONSET_H - TIME_TOL_H:
            idv[fault - 1] = 1.0
        return idv

    sim = ClosedLoopSimulation(control_interval=CONTROL_INTERVAL_H, horizon=BURN_IN_H + spec["horizon_h"])
    res = sim.run(seed=spec["seed"], disturbance_schedule=schedule, record_every=RECORD_EVERY)
    steps = res.results
    times = np.array([r.time_end for r in steps], dtype=np.float64)
    data = np.array([np.concatenate([r.measurements, r.implemented_action]) for r in steps], dtype=np.float64)

    # tep-studio keeps every RECORD_EVERY-th step and, on a shutdown, also the tripping step,
    # which is generally off the grid.  A fogrec file has one sample period, so keep only the
    # on-grid rows (the "rows produced up to shutdown") and note the shutdown time separately.
    grid = times[0] + SAMPLE_PERIOD_H * np.arange(len(times))
    if res.terminated and len(times) > 1 and abs(times[-1] - grid[-1]) > TIME_TOL_H:
        times, data = times[:-1], data[:-1]
        grid = grid[:-1]
    if abs(times[0] - CONTROL_INTERVAL_H) > TIME_TOL_H or np.max(np.abs(times - grid)) > TIME_TOL_H:
        raise RuntimeError(
            f"{spec['file']}: time column is not a {SAMPLE_PERIOD_H} h grid starting at {CONTROL_INTERVAL_H} h "
            f"(first {times[:3]}, max deviation {np.max(np.abs(times - grid)):.3g} h)"
        )
    recorded = times > BURN_IN_H + TIME_TOL_H
    times, data = times[recorded] - BURN_IN_H, data[recorded]
    if len(times) == 0:
        raise RuntimeError(f"{spec['file']}: the plant shut down during the {BURN_IN_H:g} h burn-in")
    period_s = float(np.median(np.diff(times))) * 3600.0
    if abs(period_s - SAMPLE_PERIOD_H * 3600.0) > 1e-3:
        raise RuntimeError(f"{spec['file']}: measured sample period {period_s} s, expected 36 s")
    if not np.isfinite(data).all():
        raise RuntimeError(f"{spec['file']}: simulation produced non-finite values")
    values = data.astype(np.float32)
    if not np.isfinite(values).all():
        raise RuntimeError(f"{spec['file']}: values overflow float32")

    meas_names = [v[0] for v in tep.list_measurements()]
    mv_names = [v[0] for v in tep.list_manipulated_variables()]
    columns = meas_names + mv_names
    if len(meas_names) != 41 or len(mv_names) != 12 or len(set(columns)) != len(columns):
        raise RuntimeError(f"unexpected tep-studio variables: {len(meas_names)} XMEAS, {len(mv_names)} XMV")

    rows = len(times)
    onset_row = None
    if fault is not None:
        after = np.nonzero(times >= FAULT_ONSET_H - TIME_TOL_H)[0]
        onset_row = int(after[0]) if len(after) else None
    shutdown_h = float(res.final_time) - BURN_IN_H if res.terminated else None

    row_time = (
        f"Row i is the plant state at t = {CONTROL_INTERVAL_H} + {SAMPLE_PERIOD_H} * i h after a "
        f"{BURN_IN_H:g} h burn-in from the initial state "
        f"(every {RECORD_EVERY}th {CONTROL_INTERVAL_H} h control step); columns are the 41 XMEAS "
        f"measurements then the 12 XMV implemented manipulated variables (% open)."
    )
    if fault is None:
        description = (
            f"Normal operation (no IDV), mode 1, {spec['horizon_h']:g} h, noise seed {spec['seed']:g}. " + row_time
        )
    else:
        idv_desc = dict(tep.list_disturbances()).get(f"idv_{fault:02d}", "")
        description = (
            f"Fault IDV({fault}) ({idv_desc}) switched on at t = {FAULT_ONSET_H:g} h (row {onset_row}), "
            f"mode 1, {spec['horizon_h']:g} h horizon, noise seed {spec['seed']:g}. "
        )
        if shutdown_h is not None:
            description += (
                f"The plant shut down at t = {shutdown_h:.4f} h; the rows up to the shutdown are kept. "
            )
        description += row_time

    header = {
        "source": SOURCE,
        "columns": columns,
        "sample_period_s": round(period_s, 6),
        "start_timestamp_us": START_TIMESTAMP_US,
        "rows": rows,
        "fault": fault,
        "fault_onset_row": onset_row,
        "seed": spec["seed"],
        "description": description,
    }
    path = Path(out_dir) / spec["file"]
    write_atomically(path, encode_fogrec(header, values))

    # Read the file back so a broken writer never leaves a plausible-looking file behind.
    back_header, back = read_fogrec(path)
    if back_header != header or not np.array_equal(back, values):
        raise RuntimeError(f"{path}: read-back does not match what was written")

    return {
        "file": spec["file"],
        "rows": rows,
        "fault": fault,
        "fault_onset_row": onset_row,
        "seed": spec["seed"],
        "horizon_h": spec["horizon_h"],
        "terminated_early": bool(res.terminated),
        "shutdown_time_h": shutdown_h,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "seconds": round(time.monotonic() - started, 1),
    }


# --------------------------------------------------------------------------- driver


def up_to_date(out: Path) -> bool:
    """True when manifest.json describes exactly the files this version would make, intact."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("generator_version") != GENERATOR_VERSION or manifest.get("parameters") != parameters():
        return False
    listed = {entry.get("file"): entry for entry in manifest.get("files", [])}
    for spec in recording_specs():
        entry = listed.get(spec["file"])
        path = out / spec["file"]
        if entry is None or not path.is_file():
            return False
        if path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/tep"), help="output folder (default data/tep)")
    parser.add_argument("--jobs", type=int, default=2, help="parallel simulations (default 2)")
    parser.add_argument("--force", action="store_true", help="regenerate even if up to date")
    args = parser.parse_args()

    out: Path = args.out
    if not args.force and up_to_date(out):
        print(f"tep recordings up to date ({out}/manifest.json)")
        return 0

    import_tep_studio()  # fail fast, in the parent, with the `just setup` hint
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest_path.unlink(missing_ok=True)  # an interrupted run must not look up to date

    specs = recording_specs()
    jobs = max(1, min(args.jobs, len(specs)))
    print(
        f"generating {len(specs)} TEP recordings into {out} with tep-studio {TEP_STUDIO_VERSION} "
        f"({jobs} processes, one row per {SAMPLE_PERIOD_H * 3600:g} s)",
        flush=True,
    )
    started = time.monotonic()
    made: dict[str, dict] = {}
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        for entry in pool.imap_unordered(make_recording, [(s, str(out)) for s in specs]):
            made[entry["file"]] = entry
            note = f", plant shut down at {entry['shutdown_time_h']:.2f} h" if entry["terminated_early"] else ""
            onset = "" if entry["fault_onset_row"] is None else f", fault from row {entry['fault_onset_row']}"
            print(
                f"  {entry['file']:<20} {entry['rows']:>5} rows{onset}{note} "
                f"({entry['bytes'] / 1e6:.2f} MB, {entry['seconds']:.1f} s)",
                flush=True,
            )

    files = []
    for spec in specs:  # manifest in a stable order
        entry = dict(made[spec["file"]])
        del entry["seconds"]
        files.append(entry)
    first_header, _ = read_fogrec(out / specs[0]["file"])
    manifest = {
        "generator": "scripts/make_tep_recordings.py",
        "generator_version": GENERATOR_VERSION,
        "format": "fogrec1",
        "source": SOURCE,
        "parameters": parameters(),
        "columns": first_header["columns"],
        "files": files,
    }
    write_atomically(manifest_path, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    print(f"tep recordings written to {out} in {time.monotonic() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
