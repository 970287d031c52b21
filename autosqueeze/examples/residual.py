"""A small ResNet (BatchNorm, residual adds) trained on scikit-learn's 8x8 digits.

It exists to exercise what a plain CNN does not: structured pruning must shrink a BatchNorm
with its conv and both sides of a residual add together. The weights ship beside this file
(``residual_cnn.safetensors``); ``python -m autosqueeze.examples.residual`` retrains them.
Data, splits and the example input are the digits example's.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import torch
from torch import nn

from autosqueeze.examples.digits import example_input, fit, loaders, with_weights

WEIGHTS = Path(__file__).with_name("residual_cnn.safetensors")


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout)
    )


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input, then ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels)
        self.conv2 = _conv_bn(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class ResidualCNN(nn.Module):
    """Stem, two residual blocks at 8x8, a strided conv, two blocks at 4x4, linear head."""

    def __init__(self, width: int = 48) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width)
        self.stage1 = nn.Sequential(Block(width), Block(width))
        self.down = _conv_bn(width, 2 * width, stride=2)
        self.stage2 = nn.Sequential(Block(2 * width), Block(2 * width))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage1(torch.relu(self.stem(x)))
        x = self.stage2(torch.relu(self.down(x)))
        return self.head(x.mean(dim=(2, 3)))


def pretrained() -> ResidualCNN:
    """The shipped, trained model."""
    return with_weights(ResidualCNN(), WEIGHTS)


def shallow() -> ResidualCNN:
    """A student for ``model.candidates``: the trained model with the second block of each
    stage dropped (6 convs of 10), as DistilBERT keeps every other layer of its teacher; the
    search distils it from the whole model before compressing it."""
    model = pretrained()
    model.stage1 = cast(nn.Sequential, model.stage1[:1])  # a slice of a Sequential is one
    model.stage2 = cast(nn.Sequential, model.stage2[:1])
    return model


def train(epochs: int = 30, seed: int = 0) -> ResidualCNN:
    """Deterministic training on the digits training split (under a minute on a CPU)."""
    return fit(ResidualCNN, epochs=epochs, lr=2e-3, seed=seed)


__all__ = ["ResidualCNN", "example_input", "loaders", "pretrained", "shallow", "train"]

if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    from safetensors.torch import save_file

    from autosqueeze.usercode.metrics import accuracy

    trained = train()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, WEIGHTS)
    print(f"saved {WEIGHTS} ({WEIGHTS.stat().st_size} bytes)")
    print(f"validation accuracy {accuracy(trained, loaders(), torch.device('cpu')):.4f}")
