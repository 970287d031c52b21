"""A BERT-base-sized encoder (110M parameters) from transformers' own classes, randomly
initialised under a seed: what a trial costs on a model of that size. The text is the MiniLM
example's (same 30,522-token vocabulary), so nothing is downloaded."""

from __future__ import annotations

import torch
from torch import nn


def build() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(), add_pooling_layer=False).eval()  # bert-base's shape


def validation(count: int = 64, batch_size: int = 32) -> list:
    from autosqueeze.examples.minilm import validation as sentences

    return sentences(count, batch_size)
