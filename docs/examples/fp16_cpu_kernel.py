"""A kernel registered from outside autosqueeze: fp16 weights and arithmetic on the CPU
(the built-in ``fp16`` kernel is offered on CUDA only). ``docs/extending.md`` walks through
it, and ``tests/test_extending.py`` runs it."""

import torch

from autosqueeze.compression.kernels import Cast, register
from autosqueeze.examples.digits import pretrained_cnn


@register
class Float16OnCpu(Cast):
    """Cast's layer wrapper, in float16: inputs cast on the way in, outputs back to fp32."""

    name = "fp16_cpu"
    dtype = torch.float16
    devices = frozenset({"cpu"})


def model() -> torch.nn.Module:
    """The config's ``model.factory``: importing this module registers the kernel, in the
    search and in every evaluator that loads the model."""
    return pretrained_cnn()
