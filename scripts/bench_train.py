#!/usr/bin/env python3
"""Train and run fogmesh's models in PyTorch eager, round after round, for `fogmesh bench train`.

``python3 scripts/bench_train.py MODEL CHANNELS WINDOW BATCH SAMPLES EPOCHS THREADS``
builds the same network fogmesh builds (``conv_autoencoder``, ``fault_classifier``,
``tcn_forecaster``, whose windows are 4 steps of horizon after the context, or
``defect_cnn``, whose samples are CHANNELS x WINDOW x WINDOW images, randomly transposed
and mirrored in every training batch as fogmesh's training does) and draws its random
windows (and labels) once, then prints ``ready`` and serves rounds: each line read on
stdin (``round``) trains a freshly initialised network with Adam for EPOCHS passes in
batches of BATCH, scores every window in batches of 256, and prints one JSON line:
``{"samples_per_s": ..., "inference_windows_per_s": ...}``. It exits at the end of stdin.
``echo round | python3 scripts/bench_train.py conv_autoencoder 8 64 64 4096 3 1`` is one
round by hand.

Only the training steps are timed (index, forward, loss, backward, step), as fogmesh's
training loop reports them; libtorch runs THREADS intra-op threads on both sides, so the
comparison is the loop around the same kernels. Every round starts from the random state
the first one started from: the same initial weights, batch orders and augmentations.
Printing ``ready`` only once the data is drawn keeps Python's start-up out of the
fogmesh round that the benchmark runs before asking for the first one here.
"""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn


class ConvAutoencoder(nn.Module):
    def __init__(self, channels: int, hidden: int = 32, bottleneck: int = 16, kernel: int = 5):
        super().__init__()
        pad = kernel // 2
        self.enc1 = nn.Conv1d(channels, hidden, kernel, padding=pad)
        self.enc2 = nn.Conv1d(hidden, bottleneck, kernel, padding=pad)
        self.dec1 = nn.Conv1d(bottleneck, hidden, kernel, padding=pad)
        self.dec2 = nn.Conv1d(hidden, channels, kernel, padding=pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.enc1(x))
        x = torch.relu(self.enc2(x))
        x = torch.relu(self.dec1(x))
        return self.dec2(x)


class FaultClassifier(nn.Module):
    def __init__(self, channels: int, hidden: int = 64, classes: int = 13):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, hidden, 5, padding=2)
        self.conv2 = nn.Conv1d(hidden, hidden, 5, padding=2)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=2))


class TcnBlock(nn.Module):
    def __init__(self, inputs: int, hidden: int, kernel: int, dilation: int):
        super().__init__()
        self.pad = (kernel - 1) * dilation
        self.conv1 = nn.Conv1d(inputs, hidden, kernel, dilation=dilation)
        self.conv2 = nn.Conv1d(hidden, hidden, kernel, dilation=dilation)
        self.downsample = nn.Conv1d(inputs, hidden, 1) if inputs != hidden else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Left padding only: no output step sees a later input.
        out = torch.relu(self.conv1(nn.functional.pad(x, (self.pad, 0))))
        out = torch.relu(self.conv2(nn.functional.pad(out, (self.pad, 0))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class TcnForecaster(nn.Module):
    """fogmesh's `TcnForecaster`, with the same state-dict names: contexts [B, C, T] to
    forecasts [B, C, horizon], each added to its channel's last context value."""

    def __init__(self, channels: int, horizon: int = 4, hidden: int = 32, levels: int = 4, kernel: int = 3):
        super().__init__()
        self.channels, self.horizon = channels, horizon
        self.blocks = nn.ModuleList(
            TcnBlock(channels if i == 0 else hidden, hidden, kernel, 2**i) for i in range(levels)
        )
        self.head = nn.Linear(hidden, channels * horizon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = x[:, :, -1:]
        for block in self.blocks:
            x = block(x)
        return self.head(x[:, :, -1]).view(-1, self.channels, self.horizon) + last


class ForecastFromWindows(nn.Module):
    """Feeds a window's context to the forecaster, as fogmesh's `fit` and `score` do."""

    def __init__(self, forecaster: TcnForecaster, context: int):
        super().__init__()
        self.forecaster, self.context = forecaster, context

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return self.forecaster(windows[:, :, : self.context])


class ConvBlock(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.conv = nn.Conv2d(inputs, outputs, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Pooling before ReLU, as fogmesh does: the same values, a quarter of the work.
        return torch.relu(nn.functional.max_pool2d(self.bn(self.conv(x)), 2))


class DefectCnn(nn.Module):
    """fogmesh's `DefectCnn`, with the same state-dict names (batch norm's
    ``num_batches_tracked`` aside): images [B, 1, H, W] to class logits."""

    def __init__(self, base: int = 16, classes: int = 2, blocks: int = 4):
        super().__init__()
        widths = [base << i for i in range(blocks)]
        self.blocks = nn.ModuleList(ConvBlock(i, o) for i, o in zip([1] + widths[:-1], widths))
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Each image standardised by its own mean and deviation first.
        centred = x - x.mean(dim=(2, 3), keepdim=True)
        x = centred / (centred.square().mean(dim=(2, 3), keepdim=True) + 1e-6).sqrt()
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def symmetries(images: torch.Tensor) -> torch.Tensor:
    """Each image transposed, mirrored left-right and upside down with probability 1/2."""
    n = images.shape[0]
    for flip in (lambda x: x.transpose(2, 3), lambda x: x.flip(3), lambda x: x.flip(2)):
        images = torch.where(torch.rand(n, 1, 1, 1) < 0.5, flip(images), images)
    return images


# Timed inference passes per round, as in bench/src/training_speed.rs.
INFERENCE_PASSES = 3
MODELS = ("conv_autoencoder", "fault_classifier", "tcn_forecaster", "defect_cnn")
# Label classes of the classifiers; the other models reconstruct or forecast their windows.
CLASSES = {"fault_classifier": 13, "defect_cnn": 2}


def one_round(
    model_name: str, channels: int, window: int, batch: int, epochs: int, data: torch.Tensor, targets
) -> dict:
    """Trains a new network on ``data`` and scores it: one round's two speeds."""
    samples = data.shape[0]
    augment = lambda x: x
    if model_name == "conv_autoencoder":
        model = ConvAutoencoder(channels)
        loss_of = lambda out, idx: nn.functional.mse_loss(out, data.index_select(0, idx))
        score = lambda x: ((model(x) - x) ** 2).mean(dim=(1, 2))
    elif model_name == "fault_classifier":
        model = FaultClassifier(channels)
        loss_of = lambda out, idx: nn.functional.cross_entropy(out, targets.index_select(0, idx))
        score = lambda x: model(x).argmax(dim=1)
    elif model_name == "tcn_forecaster":
        forecaster = TcnForecaster(channels)
        context = window - forecaster.horizon
        model = ForecastFromWindows(forecaster, context)
        loss_of = lambda out, idx: nn.functional.mse_loss(out, data.index_select(0, idx)[:, :, context:])
        score = lambda x: ((model(x) - x[:, :, context:]) ** 2).mean(dim=(1, 2))
    else:
        model = DefectCnn()
        augment = symmetries
        loss_of = lambda out, idx: nn.functional.cross_entropy(out, targets.index_select(0, idx))
        score = lambda x: model(x).softmax(dim=1)[:, 1]
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    trained = 0
    seconds = 0.0
    for _ in range(epochs):
        order = torch.randperm(samples)
        started = time.perf_counter()
        for first in range(0, samples, batch):
            idx = order[first:first + batch]
            optimizer.zero_grad()
            loss = loss_of(model(augment(data.index_select(0, idx))), idx)
            loss.backward()
            optimizer.step()
            trained += len(idx)
        seconds += time.perf_counter() - started
    # Inference as served: batch norm from its running statistics, in the steady state of
    # an expert that keeps serving (the median of INFERENCE_PASSES passes over the windows).
    model.eval()
    passes = []
    with torch.no_grad():
        for _ in range(INFERENCE_PASSES):
            started = time.perf_counter()
            for first in range(0, samples, 256):
                score(data[first:first + 256])
            passes.append(time.perf_counter() - started)
    inference = sorted(passes)[len(passes) // 2]
    return {"samples_per_s": trained / seconds, "inference_windows_per_s": samples / inference}


def main() -> None:
    model_name, channels, window, batch, samples, epochs, threads = sys.argv[1:8]
    channels, window, batch, samples, epochs, threads = map(
        int, (channels, window, batch, samples, epochs, threads)
    )
    if model_name not in MODELS:
        raise SystemExit(f"unknown model {model_name!r}: {', '.join(MODELS)}")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    # The vision expert's samples are square images, the others' channel-major windows.
    shape = (samples, channels, window) + ((window,) if model_name == "defect_cnn" else ())
    data = torch.randn(shape)
    classes = CLASSES.get(model_name)
    targets = None if classes is None else torch.randint(0, classes, (samples,))
    first_round = torch.get_rng_state()
    print("ready", flush=True)
    for _ in sys.stdin:
        torch.set_rng_state(first_round)
        speeds = one_round(model_name, channels, window, batch, epochs, data, targets)
        print(json.dumps(speeds), flush=True)


if __name__ == "__main__":
    main()
