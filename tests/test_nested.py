"""The one walk over nested batches and outputs, on the containers other libraries return."""

from __future__ import annotations

import dataclasses
from collections import namedtuple

import torch
from transformers import BatchEncoding
from transformers.modeling_outputs import BaseModelOutput

from autosqueeze.common.nested import batch_of, leaves, map_tensors, samples_in, tensors
from autosqueeze.compression.recovery import floating_tensors
from autosqueeze.measuring.measure import _held_bytes
from autosqueeze.usercode.metrics import call_model, to_device

Pair = namedtuple("Pair", "image mask")


@dataclasses.dataclass
class Batch:
    pixels: torch.Tensor
    label: str = "x"
    cached: torch.Tensor | None = dataclasses.field(default=None, init=False)


def test_a_dict_subclass_is_walked_not_a_leaf():
    encoded = BatchEncoding({"input_ids": torch.ones(4, 7, dtype=torch.long)})
    assert [t.shape for t in tensors(encoded)] == [(4, 7)]
    assert samples_in(encoded) == 4
    assert batch_of(encoded, 2)["input_ids"].shape == (2, 7)


def test_named_tuples_and_dataclasses_keep_their_type():
    pair = Pair(torch.zeros(3, 2), torch.ones(3, dtype=torch.bool))
    cut = batch_of(pair, 5)  # repeated: the batch holds 3
    assert isinstance(cut, Pair) and cut.image.shape == (5, 2) and cut.mask.shape == (5,)
    batch = Batch(torch.zeros(6, 2))
    batch.cached = torch.ones(6)
    moved = to_device(batch, torch.device("cpu"))
    assert isinstance(moved, Batch) and moved.label == "x" and moved.cached.shape == (6,)
    doubled = map_tensors(lambda t: t * 2, [batch, (torch.ones(1),)])
    assert doubled[1][0].item() == 2.0 and batch.cached.sum().item() == 6.0  # not in place


def test_model_outputs_give_their_floating_tensors_in_order():
    output = BaseModelOutput(last_hidden_state=torch.zeros(2, 3, 4), hidden_states=(torch.ones(2),))
    assert [t.shape for t in floating_tensors(output)] == [(2, 3, 4), (2,)]
    assert floating_tensors({"ids": torch.ones(2, dtype=torch.long)}) == []


def test_leaves_keep_what_is_not_a_tensor():
    assert [type(x).__name__ for x in leaves({"a": [1, None], "b": torch.ones(1)})] == [
        "int",
        "NoneType",
        "Tensor",
    ]


def test_shared_storage_is_counted_once():
    weight = torch.zeros(10, 10)
    assert _held_bytes({"w": weight, "again": weight, "view": [weight]}) == 400


def test_a_tokenizers_batch_is_passed_as_keywords():
    class Embed(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids.float() * attention_mask

    encoded = BatchEncoding({"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3)})
    assert call_model(Embed(), encoded).shape == (2, 3)
