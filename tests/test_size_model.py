"""The size model prices a plan's layers as the artifact will store them."""

from __future__ import annotations

import itertools

import numpy as np
import torch

from autosqueeze.compression.codecs import encode, huffman_bits
from autosqueeze.compression.size_model import layer_bytes, stored_weights
from autosqueeze.compression.techniques import compress
from autosqueeze.examples.digits import pretrained_cnn
from autosqueeze.plans.plan import LayerPlan, Plan


def test_layer_bytes_are_the_encoded_bytes_of_the_layers_weights():
    """Exact without pruning or factorization; within 8% with them (the pruned values and
    the factors are priced from the unpruned layer's census, not coded)."""
    model = pretrained_cnn()
    trained = model.features[5].weight.detach()
    model.features[5] = torch.nn.Conv2d(64, 64, 3, padding=1, groups=4)  # factorized per group
    with torch.no_grad():
        model.features[5].weight.copy_(trained[:, :16])  # a trained layer's values
    for name in ("features.0", "features.2", "features.5", "classifier.1"):
        layer = model.get_submodule(name)
        for bits, prune, rank, group in itertools.product(
            (3, 4, 6, 8, 16), (0.0, 0.5, 0.7), (1.0, 0.5), (None, 32)
        ):
            plan = Plan({name: LayerPlan(bits=bits, prune=prune, rank=rank, group_size=group)})
            compressed = compress(model, plan)
            stored = sum(
                encode(value, compressed.codecs[key]).nbytes
                for key, value in compressed.module.state_dict().items()
                if key in compressed.codecs
            )
            predicted = layer_bytes(layer, stored_weights(layer, bits, group), prune, rank)
            case = (name, bits, prune, rank, group)
            if prune == 0 and rank == 1:
                assert predicted == stored, case
            else:
                assert abs(predicted - stored) <= 0.08 * stored, case


def test_huffman_bits_lie_between_the_entropy_and_one_bit_a_byte_more():
    rng = np.random.default_rng(0)
    for bits in (2, 3, 4, 6, 8):
        levels = 2**bits - 1
        counts = np.bincount(
            np.clip(np.round(rng.normal(levels // 2, levels / 6, 5000)), 0, levels - 1).astype(int),
            minlength=levels,
        )
        p = counts[counts > 0] / counts.sum()
        entropy = -(p * np.log2(p)).sum() * counts.sum()
        per_byte = 8 // bits
        assert entropy - 1e-6 <= huffman_bits(counts, bits) <= entropy + counts.sum() / per_byte
    assert huffman_bits(np.array([0, 10, 0]), 2) == 10 / 4  # one symbol: one bit a byte


def test_shared_value_layers_are_priced_as_stored():
    """Exact alone; pruned, the coded bytes of a sample pruned and clustered alike (within
    10%); factorized, the bit-packed bytes (a factor's shared values are not known until
    it is clustered), which the coded layout only undercuts."""
    model = pretrained_cnn()
    for name in ("features.2", "classifier.1"):
        layer = model.get_submodule(name)
        for cluster, prune, rank in itertools.product((2, 3, 4), (0.0, 0.5), (1.0, 0.5)):
            compressed = compress(
                model, Plan({name: LayerPlan(cluster=cluster, prune=prune, rank=rank)})
            )
            stored = sum(
                encode(value, compressed.codecs[key]).nbytes
                for key, value in compressed.module.state_dict().items()
                if key in compressed.codecs
            )
            predicted = layer_bytes(layer, stored_weights(layer, 32, None, cluster), prune, rank)
            case = (name, cluster, prune, rank)
            if prune == 0 and rank == 1:
                assert predicted == stored, case
            elif rank == 1:
                assert abs(predicted - stored) <= 0.1 * stored, case
            else:
                assert stored <= predicted, case


def test_a_codebook_per_group_of_rows_is_priced_as_stored():
    """``cluster_rows``: exact alone, each group's fp16 codebook counted; pruned, within
    15% (the coded estimate clusters a sample of the whole matrix)."""
    model = pretrained_cnn()
    for name in ("features.2", "classifier.1"):
        layer = model.get_submodule(name)
        for cluster, prune in itertools.product((2, 4), (0.0, 0.5)):
            lp = LayerPlan(cluster=cluster, prune=prune, cluster_rows=8)
            compressed = compress(model, Plan({name: lp}))
            stored = sum(
                encode(value, compressed.codecs[key]).nbytes
                for key, value in compressed.module.state_dict().items()
                if key in compressed.codecs
            )
            weights = stored_weights(layer, 32, None, cluster, cluster_rows=8)
            predicted = layer_bytes(layer, weights, prune)
            if prune == 0:
                assert predicted == stored, (name, cluster)
            else:
                assert abs(predicted - stored) <= 0.15 * stored, (name, cluster, predicted, stored)
