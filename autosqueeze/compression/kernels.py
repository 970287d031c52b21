"""Execution forms: how a layer runs once loaded, chosen per layer by the search.

The artifact stores weights at the plan's ``bits``; ``kernel`` says which real kernel runs the
layer on the target device. A kernel converts the loaded fp32 layer into a module that holds
its weights in the kernel's own format (int8 rows, packed int4, bf16, ...) and calls the kernel,
so the metric, latency and memory a trial reports are those of the deployed layer.

Which kernel is faster depends on the device, the layer's shape and the batch: measure
(``benchmarks/kernels.py``), never assume. A new kernel is one class and one registry line.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class Kernel(ABC):
    """One execution form: the devices and layers it serves, and how a layer becomes it."""

    name: ClassVar[str]
    devices: ClassVar[frozenset[str]]
    layers: ClassVar[tuple[type[nn.Module], ...]]
    weight_bits: ClassVar[int]  # bits a weight takes in memory while it runs (compactness)
    # where the layer runs in this form: torch (the loaded artifact), or onnxruntime (the
    # ONNX export, whose node ONNX Runtime's quantizer rewrites: ``onnx_forms``); fp32 is both
    runtimes: ClassVar[frozenset[str]] = frozenset({"torch"})
    # ONNX Runtime's quantizer that puts the layer in this form ("dynamic", "static" or "int4"),
    # "": none
    ort_quantizer: ClassVar[str] = ""
    # why ``torch.export`` cannot trace a layer in this form ("": it can); ``export --format
    # pt2`` refuses a plan that uses it, naming the layer
    export_refusal: ClassVar[str] = ""

    def fits(self, layer: nn.Module, device: str) -> bool:
        """Whether this kernel can run ``layer`` on ``device`` (type and shape constraints)."""
        linear_like = nn.Linear in self.layers and is_conv1d(layer)
        return device in self.devices and (isinstance(layer, self.layers) or linear_like)

    def deploy(self, layer: nn.Module) -> nn.Module:
        """``convert``, a Hugging Face ``Conv1D`` first turned into the Linear it is."""
        return self.convert(as_linear(layer))

    def refuses(self, layer_plan: Any) -> str:
        """Why a layer plan cannot run in this form (a kernel that needs a weight pattern the
        plan does not make), or "": a plan is refused when it is compressed, not loaded."""
        return ""

    def refuses_export(self, deployed: nn.Module) -> str:
        """Why ``torch.export`` cannot trace ``deployed`` (a layer in this form), or ""."""
        return self.export_refusal

    @abstractmethod
    def convert(self, layer: nn.Module) -> nn.Module:
        """The layer in this execution form (on the layer's device)."""


class Float32(Kernel):
    """The layer as PyTorch runs it by default."""

    name = "fp32"
    devices = frozenset({"cpu", "cuda"})
    layers = (nn.Linear, *_CONVS, nn.Embedding)
    weight_bits = 32
    runtimes = frozenset({"torch", "onnxruntime"})

    def deploy(self, layer: nn.Module) -> nn.Module:
        return layer  # as the model wrote it, Conv1D included

    def convert(self, layer: nn.Module) -> nn.Module:
        return layer


class Cast(Kernel):
    """The layer's weights and arithmetic in a 16-bit float; inputs are cast on the way in
    and outputs back to fp32 on the way out, so neighbouring layers need not change."""

    dtype: ClassVar[torch.dtype]
    layers = (nn.Linear, *_CONVS, nn.Embedding)
    weight_bits = 16

    def convert(self, layer: nn.Module) -> nn.Module:
        return CastLayer(layer.to(self.dtype), self.dtype)


class BFloat16(Cast):
    name = "bf16"
    dtype = torch.bfloat16
    devices = frozenset({"cpu", "cuda"})


class Float16(Cast):
    name = "fp16"
    dtype = torch.float16
    devices = frozenset({"cuda"})  # CPUs without fp16 arithmetic emulate it slowly


class DynamicInt8(Kernel):
    """int8 weights with one scale per output channel, activations quantized per batch at
    run time, int8 GEMM. A Linear runs PyTorch's x86 (fbgemm) dynamically quantized Linear;
    a Conv2d runs ``Int8DynamicConv2d``, the same arithmetic on ``torch._int_mm``. (torch.ao's
    own dynamic convolutions are wrong: they return their output in the input's quantized
    range, so after a ReLU every negative output comes back as 0; docs/techniques.md.)"""

    name = "int8_dynamic"
    devices = frozenset({"cpu"})
    layers = (nn.Linear, nn.Conv2d)
    weight_bits = 8
    export_refusal = (
        "torch.ao's packed dynamic Linear, which torch.export cannot trace (LinearPackedParamsBase)"
    )

    def fits(self, layer: nn.Module, device: str) -> bool:
        if isinstance(layer, nn.Conv2d):
            plain = layer.groups == 1 and layer.padding_mode == "zeros"
            return device in self.devices and plain and not isinstance(layer.padding, str)
        return super().fits(layer, device)

    def convert(self, layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Conv2d):
            return Int8DynamicConv2d(layer)
        from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        # torch types Module.__setattr__'s value as Tensor | Module, not any attribute
        layer.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
        with warnings.catch_warnings():  # torch.ao.quantization is deprecated, not yet replaced
            warnings.simplefilter("ignore")
            return QuantizedLinear.from_float(layer)

    def refuses(self, layer_plan: Any) -> str:
        """Why a layer plan cannot run in this form (a kernel that needs a weight pattern the
        plan does not make), or "": a plan is refused when it is compressed, not loaded."""
        return ""

    def refuses_export(self, deployed: nn.Module) -> str:
        packed = any(type(m).__module__.startswith("torch.ao.") for m in deployed.modules())
        return self.export_refusal if packed else ""  # Int8DynamicConv2d traces


class WeightOnlyInt8(Kernel):
    """int8 weights with one scale per row, bf16 activations: ``torch._weight_int8pack_mm``
    for Linear on the CPU, a widened bf16 GEMM on CUDA; Embedding gathers int8 rows and
    scales them."""

    name = "int8_weight_only"
    devices = frozenset({"cpu", "cuda"})
    layers = (nn.Linear, nn.Embedding)
    weight_bits = 8

    def convert(self, layer: nn.Module) -> nn.Module:
        if isinstance(layer, nn.Embedding):
            return Int8Embedding(layer)
        return Int8WeightOnlyLinear(cast(nn.Linear, layer))  # a Conv1D is one already


class WeightOnlyInt4(Kernel):
    """Asymmetric int4 weights in groups along the input (32 on CPU, 128 on CUDA), packed for
    the tinygemm-style kernels (``torch._weight_int4pack_mm_for_cpu``, or
    ``torch._weight_int4pack_mm`` on CUDA), bf16 activations. The packing wants out_features
    a multiple of 16 and in_features a multiple of the group: other shapes are zero-padded
    (the padding's cost is part of what is measured)."""

    name = "int4_weight_only"
    devices = frozenset({"cpu", "cuda"})
    layers = (nn.Linear,)
    weight_bits = 4

    def convert(self, layer: nn.Module) -> nn.Module:
        linear = cast(nn.Linear, layer)  # a Conv1D is one already (``deploy``)
        return Int4WeightOnlyLinear(linear, 32 if linear.weight.device.type == "cpu" else 128)


class SemiStructured24(Kernel):
    """fp16 weights pruned 2 of every 4 (``prune_by: "2:4"``, ``prune: 0.5``) held in NVIDIA's
    semi-structured sparse format (the kept half and 2-bit positions) and run by CUTLASS's
    sparse tensor-core GEMM (``torch.sparse.to_sparse_semi_structured``; Ampere and later).
    Its shapes: out_features a multiple of 32, in_features of 64. A weight that is not 2:4
    when it loads is refused, naming the layer: the kernel would silently drop weights."""

    name = "sparse24"
    devices = frozenset({"cuda"})
    layers = (nn.Linear,)
    weight_bits = 10  # half the weights at 16 bits, and their positions
    export_refusal = "a semi-structured sparse tensor subclass, which torch.export cannot trace"

    def fits(self, layer: nn.Module, device: str) -> bool:
        if not super().fits(layer, device):
            return False
        rows, cols = cast(torch.Tensor, layer.weight).shape
        out, inputs = (cols, rows) if is_conv1d(layer) else (rows, cols)
        return out % 32 == 0 and inputs % 64 == 0

    def refuses(self, layer_plan: Any) -> str:
        if layer_plan.prune_by == "2:4" and layer_plan.prune == 0.5:
            return ""
        return "kernel sparse24 runs weights pruned 2:4: its plan needs prune_by '2:4', prune 0.5"

    def convert(self, layer: nn.Module) -> nn.Module:
        from torch.sparse import to_sparse_semi_structured

        weight = cast(torch.Tensor, layer.weight).detach().half()
        if not is_two_of_four(weight):
            raise ValueError(
                "kernel sparse24 runs weights pruned 2:4 (prune_by: '2:4', prune: 0.5); "
                "this layer's are not"
            )
        layer = layer.half()
        layer.weight = nn.Parameter(to_sparse_semi_structured(weight), requires_grad=False)
        return CastLayer(layer, torch.float16)


class OrtInt8(Kernel):
    """ONNX Runtime's int8 kernels, for a study that ships there (``budgets.runtime:
    onnxruntime``): the export hands the layer's node to ONNX Runtime's own quantizer
    (``onnx_forms``), int8 weights per output channel. In torch, where the sensitivity pass
    probes it, the layer runs torch's dynamic int8 form, the nearest arithmetic torch has
    (a layer that form does not fit runs as it is); each trial is measured in ONNX Runtime."""

    devices = frozenset({"cpu"})
    weight_bits = 8
    runtimes = frozenset({"onnxruntime"})

    def convert(self, layer: nn.Module) -> nn.Module:
        twin = KERNELS["int8_dynamic"]
        return twin.convert(layer) if twin.fits(layer, "cpu") else layer


class OrtDynamicInt8(OrtInt8):
    """MatMulInteger: activations quantized to uint8 on every call (DynamicQuantizeLinear),
    what ``onnxruntime.quantization.quantize_dynamic`` makes of a MatMul."""

    name = "ort_int8_dynamic"
    layers = (nn.Linear,)
    ort_quantizer = "dynamic"


class OrtStaticInt8(OrtInt8):
    """QDQ with activation ranges calibrated on ``task.calibration`` (MinMax), which ONNX
    Runtime fuses at load into QLinearConv / QLinearMatMul / QGemm: what
    ``onnxruntime.quantization.quantize_static`` makes of a Conv, MatMul or Gemm."""

    name = "ort_int8_static"
    layers = (nn.Linear, nn.Conv1d, nn.Conv2d)
    ort_quantizer = "static"


class OrtInt4(Kernel):
    """MatMulNBits: int4 weights in symmetric blocks of ``block`` along the input, activations
    quantized to int8 per block on every call (``accuracy_level`` 4), what
    ``onnxruntime.quantization.MatMulNBitsQuantizer`` makes of a MatMul: half the bytes of
    the int8 kernels, and faster than fp32 where a weight stored at 4 bits would otherwise
    run its decoded floats (MiniLM, every Linear: 1.4x ONNX Runtime fp32, one thread; the
    int8 kernels 2.7x). In torch, where the sensitivity pass probes it, the layer runs
    torch's int4 weight-only form; each trial is measured in ONNX Runtime."""

    name = "ort_int4"
    devices = frozenset({"cpu"})
    layers = (nn.Linear,)
    weight_bits = 4
    runtimes = frozenset({"onnxruntime"})
    ort_quantizer = "int4"
    block = 32
    """Weights per scale: ONNX Runtime's examples' block; 64 ran alike on MiniLM (3.04
    against 3.17 ms, one thread) with 1% fewer bytes."""

    def convert(self, layer: nn.Module) -> nn.Module:
        twin = KERNELS["int4_weight_only"]
        return twin.convert(layer) if twin.fits(layer, "cpu") else layer


KERNELS: dict[str, Kernel] = {
    k.name: k
    for k in (
        Float32(),
        BFloat16(),
        Float16(),
        DynamicInt8(),
        WeightOnlyInt8(),
        WeightOnlyInt4(),
        SemiStructured24(),
        OrtDynamicInt8(),
        OrtStaticInt8(),
        OrtInt4(),
    )
}
"""kernel name -> kernel; the names a space file's ``kernel`` knob may list."""


def is_two_of_four(weight: torch.Tensor) -> bool:
    """Whether at least 2 of every 4 consecutive weights along each row are 0 (``sparse24``'s
    pattern; ``techniques.prune.prune_two_of_four`` makes it)."""
    flat = weight.detach().reshape(weight.shape[0], -1)
    if flat.shape[1] % 4:
        return False
    return bool(((flat.reshape(flat.shape[0], -1, 4) == 0).sum(-1) >= 2).all())


def is_conv1d(layer: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections): a Linear whose weight is stored
    transposed, (in, out), computing ``x @ weight + bias``."""
    weight = getattr(layer, "weight", None)
    return (
        type(layer).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and getattr(layer, "nf", None) == weight.shape[1]
    )


def as_linear(layer: nn.Module) -> nn.Module:
    """A ``Conv1D`` as the ``nn.Linear`` that computes the same; any other layer as it is."""
    if not is_conv1d(layer):
        return layer
    weight = cast(torch.Tensor, layer.weight).detach()
    bias = cast("torch.Tensor | None", layer.bias)
    linear = nn.Linear(
        weight.shape[0], weight.shape[1], bias=bias is not None,
        device=weight.device, dtype=weight.dtype,
    )  # fmt: skip
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if bias is not None:
            linear.bias.copy_(bias.detach())
    return linear.train(layer.training)


K = TypeVar("K", bound=type[Kernel])


def register(kernel_class: K) -> K:
    """Add a kernel to ``KERNELS``, as a class decorator, from any module: put it in the
    module the config's ``model.factory`` names, so every evaluator imports it with the
    model (docs/extending.md). A name already taken by another kernel is refused."""
    kernel = kernel_class()
    taken = KERNELS.get(kernel.name)
    if taken is not None and type(taken).__qualname__ != kernel_class.__qualname__:
        raise ValueError(f"kernel {kernel.name!r} is registered already ({type(taken).__name__})")
    KERNELS[kernel.name] = kernel
    return kernel_class


def kernel_for(name: str) -> Kernel:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r}; the kernels are {', '.join(KERNELS)}")
    return KERNELS[name]


# --- the modules the kernels produce ---------------------------------------------------------


class CastLayer(nn.Module):
    def __init__(self, layer: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer = layer
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        if x.is_floating_point():
            x = x.to(self.dtype)
        return self.layer(x).to(out_dtype)


def _int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: (int8 codes, fp32 scale per row)."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    codes = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return codes, scale


class _PackedLinear(nn.Module):
    """A Linear whose weight is packed for a bf16-activation kernel. The weight is zero-padded
    to ``out_features`` a multiple of 16 and ``in_features`` a multiple of ``in_multiple``
    (what the packing needs; ``_weight_int8pack_mm`` also crashes on some narrow shapes in
    torch 2.13); inputs are padded to match and the extra outputs dropped."""

    bias: torch.Tensor | None

    def __init__(self, layer: nn.Linear, in_multiple: int) -> None:
        super().__init__()
        out_features, in_features = layer.weight.shape
        self.out_features, self.pad_in = out_features, -in_features % in_multiple
        bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    def padded_weight(self, layer: nn.Linear) -> torch.Tensor:
        return F.pad(layer.weight.detach().float(), (0, self.pad_in, 0, -self.out_features % 16))

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """(rows, padded in) bf16 -> (rows, padded out) bf16."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.pad_in:
            flat = F.pad(flat, (0, self.pad_in))
        out = self.matmul(flat)[:, : self.out_features]
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int8WeightOnlyLinear(_PackedLinear):
    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, layer: nn.Linear) -> None:
        super().__init__(layer, in_multiple=16)
        codes, scale = _int8_rows(self.padded_weight(layer))
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.bfloat16))

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        if flat.device.type == "cpu":
            return torch._weight_int8pack_mm(flat, self.codes, self.scale)
        # CUDA: the weight stays int8 in memory and is widened for a bf16 GEMM. PyTorch 2.11's
        # CUDA _weight_int8pack_mm ran at 0.02-0.24x fp32 on an H200 (docs/results.md)
        return F.linear(flat, self.codes.to(flat.dtype)) * self.scale


class Int8DynamicConv2d(nn.Module):
    """A Conv2d as an int8 GEMM: the input quantized per batch (symmetric, one scale), cut
    into patches as int8 (a quarter of fp32's bytes to copy), multiplied by int8 weights
    (one scale per output channel) in ``torch._int_mm`` with int32 sums, then scaled back
    to fp32. The output is channels-last in memory, NCHW in shape."""

    codes: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        weight = conv.weight.detach().float()
        rows = weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)  # the patches' order
        codes, scale = _int8_rows(rows)
        self.register_buffer("codes", codes.t().contiguous())  # (kh * kw * in, out)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float())
        if isinstance(conv.padding, str):  # ``DynamicInt8.fits`` refuses it
            raise ValueError(f"Int8DynamicConv2d takes numbers as padding, not {conv.padding!r}")
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # one unbatched image, as Conv2d takes it
            return self(x[None])[0]
        x_scale = (x.detach().abs().amax() / 127).clamp(min=1e-12)
        q = torch.round(x / x_scale).clamp(-127, 127).to(torch.int8)
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation
        )  # fmt: skip
        if ph or pw:
            q = F.pad(q, (pw, pw, ph, ph))
        patches = q.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
        patches = patches[..., ::dh, ::dw]  # (n, in, oh, ow, kh, kw)
        n, _, oh, ow = patches.shape[:4]
        cols = patches.permute(0, 2, 3, 4, 5, 1).reshape(n * oh * ow, -1)
        y = torch._int_mm(cols, self.codes).float() * (x_scale * self.scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(n, oh, ow, self.out_channels).permute(0, 3, 1, 2).to(x.dtype)


class Int8Embedding(nn.Module):
    codes: torch.Tensor
    scale: torch.Tensor

    def __init__(self, layer: nn.Embedding) -> None:
        super().__init__()
        codes, scale = _int8_rows(layer.weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale[:, None])
        self.padding_idx = layer.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].float() * self.scale[ids]


class Int4WeightOnlyLinear(_PackedLinear):
    packed: torch.Tensor
    scales_and_zeros: torch.Tensor

    def __init__(self, layer: nn.Linear, group_size: int) -> None:
        super().__init__(layer, in_multiple=group_size)
        w = self.padded_weight(layer)
        rows = w.shape[0]
        w = w.reshape(rows, -1, group_size)
        low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((high - low) / 15).clamp(min=1e-12)
        codes = torch.round((w - low) / scale).clamp(0, 15).reshape(rows, -1)
        zero = low + 8 * scale  # the kernels compute (code - 8) * scale + zero
        scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1)
        self.on_cpu = layer.weight.device.type == "cpu"  # not ``cpu``: Module.cpu() is a method
        if self.on_cpu:
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        else:
            uint8 = (codes[:, ::2].to(torch.uint8) << 4) | codes[:, 1::2].to(torch.uint8)
            packed = torch._convert_weight_to_int4pack(uint8.contiguous(), 8)
        self.register_buffer("packed", packed)
        self.register_buffer(
            "scales_and_zeros", scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)
        )
        self.group_size = group_size

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        mm = torch._weight_int4pack_mm_for_cpu if self.on_cpu else torch._weight_int4pack_mm
        return mm(flat, self.packed, self.group_size, self.scales_and_zeros)


__all__ = ["KERNELS", "Kernel", "kernel_for", "register"]
