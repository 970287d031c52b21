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


def build_small() -> nn.Module:
    """A 4-layer, 256-wide BERT from the same classes (random weights under a seed): a
    model the project did not write, small enough to search many times."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024
    )
    return BertModel(config, add_pooling_layer=False).eval()


def validation_small(count: int = 192, batch_size: int = 32) -> list:
    from autosqueeze.examples.minilm import validation as sentences

    return sentences(count, batch_size)
