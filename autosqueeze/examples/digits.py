"""A LeNet-scale CNN trained on scikit-learn's bundled 8x8 digits (no download needed).

The trained weights ship beside this file (``digits_cnn.safetensors``) so every machine
starts from the same model; ``python -m autosqueeze.examples.digits`` retrains them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits_cnn.safetensors")
M = TypeVar("M", bound=nn.Module)
SPLIT_SEED = 0
VALIDATION_FRACTION = 0.3


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two Linear layers: ~190k parameters, ~760 KB in fp32."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _splits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_val = train_test_split(
        list(range(len(labels))),
        test_size=VALIDATION_FRACTION,
        random_state=SPLIT_SEED,
        stratify=labels.numpy(),
    )
    return images[idx_train], labels[idx_train], images[idx_val], labels[idx_val]


def loaders(batch_size: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches ``(images, labels)``: 540 held-out digits, in a fixed order."""
    _, _, images, labels = _splits()
    return [
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def calibration(batch_size: int = 16) -> list[torch.Tensor]:
    """Training-split images (no labels) for recovery training: never the validation ones."""
    images, _, _, _ = _splits()
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def example_input() -> torch.Tensor:
    """One image, shaped as the model takes it."""
    return loaders(batch_size=1)[0][0]


def pretrained_cnn() -> DigitsCNN:
    """The shipped, trained model (validation accuracy ~0.98)."""
    return with_weights(DigitsCNN(), WEIGHTS)


def with_weights(model: M, path: Path) -> M:
    """``model`` with the weights shipped at ``path``, in eval mode."""
    from safetensors.torch import load_file

    model.load_state_dict(load_file(path))
    return model.eval()


def train(epochs: int = 40, seed: int = 0) -> DigitsCNN:
    """Deterministic training on the training split (a few seconds on a CPU)."""
    return fit(DigitsCNN, epochs=epochs, lr=1e-3, seed=seed)


def fit(build: Callable[[], M], *, epochs: int, lr: float, seed: int = 0) -> M:
    """A model from ``build()`` trained deterministically on the digits training split."""
    torch.manual_seed(seed)
    images, labels, _, _ = _splits()
    model = build()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), 64):
            batch = order[i : i + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
    return model.eval()


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    from safetensors.torch import save_file

    from autosqueeze.usercode.metrics import accuracy

    trained = train()
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, WEIGHTS)
    print(f"saved {WEIGHTS} ({WEIGHTS.stat().st_size} bytes)")
    print(f"validation accuracy {accuracy(trained, loaders(), torch.device('cpu')):.4f}")
