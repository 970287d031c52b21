"""A tiny, randomly initialised BERT-style encoder for tests: dict inputs, dict outputs,
BERT's layer names (``encoder.layer.N.attention.self.query``, ``intermediate.dense``, ...)."""

from __future__ import annotations

import math

import torch
from torch import nn

VOCAB, WIDTH, LENGTH = 200, 64, 12


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.query(h) @ self.key(h).transpose(1, 2) / math.sqrt(WIDTH)
        scores = scores.masked_fill(mask[:, None, :] == 0, -1e4)
        return scores.softmax(-1) @ self.value(h)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = SelfAttention()
        self.output = nn.Module()
        self.output.dense = nn.Linear(WIDTH, WIDTH)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = Attention()
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(WIDTH, 4 * WIDTH)
        self.output = nn.Module()
        self.output.dense = nn.Linear(4 * WIDTH, WIDTH)
        self.norm1, self.norm2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention.output.dense(self.attention.self(h, mask))
        h = self.norm1(h + attended)
        hidden = nn.functional.gelu(self.intermediate.dense(h))
        return self.norm2(h + self.output.dense(hidden))


class TinyBert(nn.Module):
    def __init__(self, blocks: int = 2) -> None:
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(VOCAB, WIDTH)
        self.embeddings.position_embeddings = nn.Embedding(LENGTH, WIDTH)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embeddings.word_embeddings(input_ids) + self.embeddings.position_embeddings(
            positions
        )
        for block in self.encoder.layer:
            h = block(h, attention_mask)
        return {"last_hidden_state": h, "pooler_output": h[:, 0]}


def build() -> TinyBert:
    torch.manual_seed(0)
    return TinyBert().eval()


def data(samples: int = 64, batch: int = 16) -> list[tuple[dict, None]]:
    """Random token batches with padding; no labels (the fidelity metrics need none)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (samples, LENGTH), generator=generator)
    lengths = torch.randint(4, LENGTH + 1, (samples,), generator=generator)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    return [
        ({"input_ids": ids[i : i + batch], "attention_mask": mask[i : i + batch]}, None)
        for i in range(0, samples, batch)
    ]
