"""The execution form of a layer: which real kernel runs it on the target device.

It leaves the stored bytes alone; when the artifact is loaded, each layer (both halves of a
factorized one) is converted to its kernel's form (``autosqueeze.compression.kernels``), and when it
is exported to ONNX, a layer on one of ONNX Runtime's kernels becomes ONNX Runtime's integer
node (``autosqueeze.artifacts.onnx_forms``). A space file lists kernel names; a layer is offered
those that run it on the config's device in the runtime the model ships to (``budgets.runtime``).
"""

from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, CategoricalDistribution
from torch import nn

from autosqueeze.compression.kernels import KERNELS, Kernel, kernel_for
from autosqueeze.compression.techniques.base import CompressedModel, Site, Technique, weighted_parts
from autosqueeze.plans.knobs import KnobValues, Range
from autosqueeze.plans.plan import LayerPlan


class KernelChoice(Technique):
    knob = "kernel"
    changes_speed = True

    def validate(self, values: KnobValues) -> None:
        if isinstance(values, Range):
            raise ValueError(f"kernel takes a list of kernel names ({', '.join(KERNELS)})")
        for value in values if isinstance(values, list) else [values]:
            kernel_for(str(value))

    def offer(self, site: Site, values: KnobValues) -> BaseDistribution | Any | None:
        names = values if isinstance(values, list) else [values]
        usable = [str(n) for n in names if _runs(KERNELS[str(n)], site)]
        if not usable:
            return None
        return CategoricalDistribution(usable) if len(usable) > 1 else usable[0]

    def why_not(self, site: Site) -> str:
        if not any(_runs(k, site) for k in KERNELS.values()):
            return (
                f"no kernel runs a {type(site.layer).__name__[:40]} on {site.target.device} "
                f"in {site.target.runtime}"
            )
        return ""

    def strength(self, value: Any) -> float:
        return 1.0 - KERNELS[str(value)].weight_bits / 32  # bits a weight takes as it runs

    def apply(self, compressed: CompressedModel, name: str, layer_plan: LayerPlan) -> None:
        """Nothing to store: the kernel is chosen when the artifact is loaded. A plan the
        kernel cannot run (sparse24 without 2:4 pruning) is refused here, naming the layer."""
        if why := kernel_for(layer_plan.kernel).refuses(layer_plan):
            raise ValueError(f"layer {name!r}: {why}")

    def deploy(self, module: nn.Module, name: str, layer_plan: LayerPlan) -> None:
        """Each part of the layer in the kernel's form; a part the kernel cannot run (the
        depthwise half of a separated conv, under an int8 kernel) runs as it is, and the
        trial's latency is what that gives."""
        kernel = kernel_for(layer_plan.kernel)
        for part_name, part in weighted_parts(module, name):
            if kernel.fits(part, next(part.parameters()).device.type):
                module.set_submodule(part_name, kernel.deploy(part))


def _runs(kernel: Kernel, site: Site) -> bool:
    """Whether ``kernel`` runs the site's layer where the model ships (device and runtime)."""
    return site.target.runtime in kernel.runtimes and kernel.fits(site.layer, site.target.device)
