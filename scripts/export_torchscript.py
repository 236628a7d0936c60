#!/usr/bin/env python3
"""Export a small TorchScript anomaly scorer and its reference outputs for fogmesh's tests.

What it does
------------
``python3 scripts/export_torchscript.py OUT_DIR`` writes into ``OUT_DIR``:

* ``model.pt``: a traced MLP autoencoder scorer taking ``[B, 8, 60]`` windows
  (8 channels, 60 samples, channel-major) and returning ``[B]`` anomaly scores, the mean
  squared reconstruction error of each window;
* ``reference.json``: ``{"input_shape": [5, 8, 60], "input": [...], "output": [...]}``,
  five windows from a seeded generator, flattened row-major, and the scores PyTorch
  computed for them, as plain JSON floats;
* ``model_2in.pt``: a scripted scorer with two inputs, windows ``[B, 8, 60]`` and
  per-channel gains ``[B, 8]``, returning ``[B]`` = mean of ``(window * gain)^2``.

Why
---
This is the path a plant engineer takes to bring their own model: build it in PyTorch,
``torch.jit.trace`` or ``torch.jit.script`` it to a ``.pt`` file, and declare its
signature in fogmesh.  ``models/tests/torchscript.rs`` runs this script and checks that
``fogmesh_models::torchscript::ScriptedModel`` reproduces PyTorch's scores.

The scorer is linear layers only, on purpose: PyTorch computes float32 matrix products in
full precision on CUDA by default but lets cuDNN convolutions use TF32, which would put a
GPU run of the test further than 1e-5 from the CPU reference.  The flattening layer ties
the model to a 60-sample window, so a signature declaring another length is refused.

Everything is seeded (weights by ``torch.manual_seed(0)``, the input by its own
generator), so two runs write the same reference.  Only torch and the standard library
are needed.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import torch
from torch import nn

CHANNELS = 8
WINDOW = 60
REFERENCE_BATCH = 5


class MlpScorer(nn.Module):
    """Squeezes each window through a 24-wide bottleneck; the score is the reconstruction's
    mean squared error."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(CHANNELS * WINDOW, 24)
        self.decode = nn.Linear(24, CHANNELS * WINDOW)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        flat = windows.flatten(1)
        reconstruction = self.decode(torch.tanh(self.encode(flat)))
        return (reconstruction - flat).square().mean(dim=1)


class GainScorer(nn.Module):
    """Two inputs, to show that fogmesh passes them in declared order."""

    def forward(self, windows: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
        return (windows * gains.unsqueeze(2)).square().mean(dim=(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("out_dir", type=pathlib.Path, help="folder to write into (created)")
    out_dir = parser.parse_args().out_dir
    out_dir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    model = MlpScorer().eval()
    example = torch.zeros(2, CHANNELS, WINDOW)
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    traced.save(str(out_dir / "model.pt"))

    generator = torch.Generator().manual_seed(1)
    windows = torch.randn(REFERENCE_BATCH, CHANNELS, WINDOW, generator=generator)
    with torch.no_grad():
        scores = traced(windows)
    reference = {
        "input_shape": list(windows.shape),
        # float32 values widen to doubles exactly, so the JSON round trip is lossless.
        "input": windows.reshape(-1).tolist(),
        "output": scores.reshape(-1).tolist(),
    }
    (out_dir / "reference.json").write_text(json.dumps(reference))

    torch.jit.script(GainScorer()).save(str(out_dir / "model_2in.pt"))


if __name__ == "__main__":
    main()
