"""Does torch's compiled path beat eager int8 on this CPU? (issue 31, item 7)

    pip install torchao            # PT2E quantization lives there in torch >= 2.10
    python -P benchmarks/torch_compiled.py [--models digits,residual,minilm] [--rounds 10]
        [--calls 50] [--threads N] [--warm-cache] [--json out.json]

For each example model (the digits CNN, the residual CNN, all-MiniLM-L6-v2), at batch 1 on
the CPU with torch's default intra-op threads, these execution forms are built and timed:

- ``eager fp32``: the model as loaded.
- ``eager int8 dyn``: ``torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, qint8)``
  (fbgemm dynamic Linear, one scale per tensor; convolutions stay fp32).
- ``eager int8_dynamic (as)``: autosqueeze's ``int8_dynamic`` kernel on every layer it fits
  (Linear: fbgemm dynamic, one scale per output channel; Conv2d: ``Int8DynamicConv2d``).
- ``compile fp32``: ``torch.compile(model, dynamic=False)`` (inductor, default config).
- ``compile fp32 +freezing``: the same with ``torch._inductor.config.freezing = True``
  (weights folded as constants, mkldnn weight prepacking).
- ``PT2E int8 static``: ``torch.export.export(model, example).module()`` ->
  ``prepare_pt2e(X86InductorQuantizer(default x86 inductor config))`` -> calibration ->
  ``convert_pt2e`` -> ``torch.compile`` with ``torch._inductor.config.freezing = True``
  (``options={"freezing": True}`` fails on these graphs). Freezing is what lets
  inductor's quantization passes (registered when torchao's x86_inductor_quantizer is
  imported) turn dequant-conv/linear-quant into oneDNN int8 convolutions and matmuls.
- ``PT2E int8 dyn Linear``: the same with ``get_default_x86_inductor_quantization_config(
  is_dynamic=True)`` set for ``nn.Linear`` only (the quantizer's dynamic mode), nothing else
  quantized: the compiled counterpart of ``quantize_dynamic``.
- ``PT2E int8 static, lowered``: the static PT2E model through torchao's
  ``lower_pt2e_quantized_to_x86`` (freezing passes, no inductor code generation).

Calibration: the first 8 calibration batches of the example (digits: 8 x 16 training images;
MiniLM: 8 x 16 training sentences, each at its own length), one sample per call.
MiniLM is exported with a dynamic sequence length so one calibration serves every length;
every compiled form is then specialised (re-exported / compiled with ``dynamic=False``) per
input shape: the timing shape (the example sentence, 12 tokens) and the evaluation shape.

Timing: ``--rounds`` interleaved rounds (the forms in a rotating order) of ``--calls`` calls
each (fewer, at least 3, where they take over 3 s), after a warm-up; a form's time is the
median over rounds of its round's median call,
and its speed-ups (x fp32, x int8 dyn, x best eager int8) are the medians of the per-round
ratios, robust to a machine that other jobs slow down. Build time (export, quantization,
calibration) and the first call (dynamo + inductor + C++ compilation, with a fresh inductor
cache unless ``--warm-cache``) are reported apart.

Error against eager fp32: digits/residual: accuracy on the 540 held-out digits and the share
of argmaxes equal to fp32's, one image per call; MiniLM: mean (and minimum) cosine of the
mean-pooled sentence embeddings to fp32's (the ``fidelity`` metric), on 256 validation
sentences, one per call, padded to 64 tokens with their attention mask. A form that fails to
build, compile or run shows the exception's first line instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# benchmarks/kernels.py must not shadow the ``kernels`` package transformers may import
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
if "--warm-cache" not in sys.argv:  # cold compile times: inductor's caches start empty
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from autosqueeze.usercode.metrics import call_arguments, pooled, primary_output  # noqa: E402

warnings.filterwarnings("ignore")
torch._dynamo.config.cache_size_limit = 64  # several compiled forms share one forward
CALIBRATION_BATCHES = 8
ROUND_CAP_S = 3.0  # a form's round stops after this long (at least 3 calls): slow forms


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def shape_key(inputs: Any) -> tuple:
    args, kwargs = call_arguments(inputs)
    return tuple(tuple(a.shape) for a in args) + tuple(
        (k, tuple(v.shape)) for k, v in sorted(kwargs.items())
    )


def export(model: nn.Module, inputs: Any, dynamic_shapes: Any = None) -> nn.Module:
    args, kwargs = call_arguments(inputs)
    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes).module()


# --------------------------------------------------------------------------- models


@dataclass
class Case:
    name: str
    model: nn.Module
    timing_input: Any  # one batch-1 input of fixed shape
    calibration: list[Any]  # batch-1 inputs
    evaluation: list[Any]  # batch-1 inputs, one shape
    labels: list[int] | None  # classification: the labels of ``evaluation``
    dynamic_shapes: Any = None  # for export, when calibration inputs vary in shape


def digits_case(residual: bool) -> Case:
    from autosqueeze.examples import digits

    if residual:
        from autosqueeze.examples.residual import pretrained

        model, name = pretrained(), "residual CNN"
    else:
        model, name = digits.pretrained_cnn(), "digits CNN"
    batches = digits.calibration()[:CALIBRATION_BATCHES]
    images = [b[i : i + 1] for b in batches for i in range(len(b))]
    held_out = [(x[i : i + 1], int(y[i])) for x, y in digits.loaders() for i in range(len(y))]
    return Case(
        name,
        model,
        digits.example_input(),
        images,
        [x for x, _ in held_out],
        [y for _, y in held_out],
    )


def minilm_case() -> Case:
    from autosqueeze.examples import minilm

    def singles(batches: list[tuple[dict[str, Any], None]]) -> list[dict[str, torch.Tensor]]:
        out = []
        for encoded, _ in batches:
            for i in range(len(encoded["input_ids"])):
                length = int(encoded["attention_mask"][i].sum())
                out.append({k: v[i : i + 1, :length] for k, v in encoded.items()})
        return out

    def padded(sample: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
        pad = length - sample["input_ids"].shape[1]
        return {k: nn.functional.pad(v, (0, pad)) for k, v in sample.items()}  # [PAD] = 0

    calibration = singles(minilm.calibration(count=16 * CALIBRATION_BATCHES, batch_size=16))
    evaluation = [padded(s, minilm.MAX_TOKENS) for s in singles(minilm.validation())]
    seq = torch.export.Dim("seq", min=2, max=minilm.MAX_TOKENS)
    return Case(
        "MiniLM-L6",
        minilm.pretrained(),
        minilm.example_input(),
        calibration,
        evaluation,
        None,
        dynamic_shapes={"input_ids": {1: seq}, "attention_mask": {1: seq}},
    )


# --------------------------------------------------------------------------- forms


@dataclass
class Form:
    """An execution form: a module per input shape, compiled on its first call there."""

    name: str
    build_for_shape: Callable[[Any], nn.Module] | None = None  # inputs -> module
    compiled: bool = False
    freeze: bool = False  # compiled with inductor's freezing on
    error: str = ""
    build_s: float = 0.0
    # per input shape: specialising (re-export, lowering) + the first call (compiling)
    first_call_s: dict[tuple, float] = field(default_factory=dict)
    next_calls_ms: dict[tuple, list[float]] = field(default_factory=dict)  # calls 2 to 5
    matches: dict[str, int] = field(default_factory=dict)  # inductor quantization fusions
    _modules: dict[tuple, nn.Module] = field(default_factory=dict)

    def module(self, inputs: Any) -> nn.Module:
        key = shape_key(inputs)
        if key not in self._modules:
            assert self.build_for_shape is not None
            before = dict(_quant_counters())
            # freezing on in the config while compiling (torch.compile(options={"freezing":
            # True}) fails the PT2E graphs: "UnsupportedOperatorException:
            # onednn.qconv_prepack.default")
            patch = torch._inductor.config.patch(freezing=self.freeze)
            with patch, torch.no_grad():
                start = time.perf_counter()
                module = self.build_for_shape(inputs)  # re-export / lowering, if any
                call(module, inputs)  # compiles
                self.first_call_s[key] = time.perf_counter() - start
                self.next_calls_ms[key] = []
                for _ in range(4):  # what the first calls after compiling cost
                    start = time.perf_counter()
                    call(module, inputs)
                    self.next_calls_ms[key].append((time.perf_counter() - start) * 1e3)
            after = _quant_counters()
            for k, v in after.items():
                if v != before.get(k, 0):
                    self.matches[k] = self.matches.get(k, 0) + v - before.get(k, 0)
            self._modules[key] = module
        return self._modules[key]


def _quant_counters() -> dict[str, int]:
    from torch._dynamo.utils import counters

    return {
        k: v
        for k, v in counters["inductor"].items()
        if k.endswith("_count") and ("qconv" in k or "qlinear" in k or "qmaxpool" in k)
    }


def call(module: nn.Module, inputs: Any) -> Any:
    args, kwargs = call_arguments(inputs)
    return module(*args, **kwargs)


def attempt(form: Form, build: Callable[[], Callable[[Any], nn.Module]]) -> Form:
    start = time.perf_counter()
    try:
        with torch.no_grad():
            form.build_for_shape = build()
    except Exception as error:  # noqa: BLE001 - recorded in the table
        form.error = first_line(error)
        traceback.print_exc(limit=3)
    form.build_s = time.perf_counter() - start
    return form


def autosqueeze_int8(model: nn.Module) -> nn.Module:
    from autosqueeze.compression.kernels import KERNELS

    kernel = KERNELS["int8_dynamic"]
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if kernel.fits(child, "cpu"):
                setattr(parent, name, kernel.deploy(child))
    return model


def pt2e(case: Case, config: str) -> Callable[[], Callable[[Any], nn.Module]]:
    """Export, quantize with the X86InductorQuantizer, calibrate, convert; a module per
    input shape (re-exported there when the export had dynamic shapes)."""

    def build() -> Callable[[Any], nn.Module]:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

        quantizer = xiq.X86InductorQuantizer()
        if config == "dynamic":
            dynamic = xiq.get_default_x86_inductor_quantization_config(is_dynamic=True)
            quantizer.set_module_type_qconfig(nn.Linear, dynamic)
        else:
            quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        exported = export(copy.deepcopy(case.model), case.timing_input, case.dynamic_shapes)
        prepared = prepare_pt2e(exported, quantizer)
        for sample in case.calibration if config != "dynamic" else case.calibration[:1]:
            call(prepared, sample)
        converted = convert_pt2e(prepared)

        def specialised(inputs: Any) -> nn.Module:
            return export(converted, inputs) if case.dynamic_shapes else converted

        if config == "lowered":
            from torchao.quantization.pt2e.lowering import lower_pt2e_quantized_to_x86

            def lowered(inputs: Any) -> nn.Module:
                args, kwargs = call_arguments(inputs)
                module, names = specialised(inputs), tuple(kwargs)
                if names:  # the lowering exports from positional arguments
                    module, args = _Positional(module, names), tuple(kwargs.values())
                return _Keywords(lower_pt2e_quantized_to_x86(module, args), names)

            return lowered
        return lambda inputs: torch.compile(specialised(inputs))  # frozen: Form.freeze

    return build


class _Positional(nn.Module):
    """A module that takes keywords (``names``), called with them as positional arguments."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner, self.names = module, names

    def forward(self, *args: Any) -> Any:
        return self.inner(**dict(zip(self.names, args)))


class _Keywords(nn.Module):
    """A module that takes positional arguments, called with keywords (``names``)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.inner, self.names = module, names

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, *(kwargs[n] for n in self.names))


def forms_for(case: Case) -> list[Form]:
    model = case.model

    def eager(module: nn.Module) -> Callable[[], Callable[[Any], nn.Module]]:
        return lambda: lambda _inputs: module

    def quantize_dynamic() -> Callable[[Any], nn.Module]:
        quantized = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8
        )
        return lambda _inputs: quantized

    def autosqueeze_dynamic() -> Callable[[Any], nn.Module]:
        converted = autosqueeze_int8(model)
        return lambda _inputs: converted

    def compiled(freezing: bool) -> Callable[[], Callable[[Any], nn.Module]]:
        def build() -> Callable[[], Callable[[Any], nn.Module]]:
            # a compile per shape (dynamic=False). The frozen form gets a backend of its own
            # (inductor's compile_fx, as torch.compile's "inductor" calls it): dynamo guards
            # on the backend, so the two forms never share the model's compiled code (with
            # one backend the second form would silently reuse the first's)
            backend: Any = "inductor"
            if freezing:
                from torch._inductor.compile_fx import compile_fx

                def backend(gm: Any, example_inputs: Any) -> Any:
                    return compile_fx(gm, example_inputs)

            module = torch.compile(copy.deepcopy(model), backend=backend, dynamic=False)
            return lambda _inputs: module

        return build

    specs = [
        (Form("eager fp32"), eager(model)),
        (Form("eager int8 dyn"), quantize_dynamic),
        (Form("eager int8_dynamic (as)"), autosqueeze_dynamic),
        (Form("compile fp32", compiled=True), compiled(freezing=False)),
        (Form("compile fp32 +freezing", compiled=True, freeze=True), compiled(freezing=True)),
        (Form("PT2E int8 static", compiled=True, freeze=True), pt2e(case, "static")),
        (Form("PT2E int8 dyn Linear", compiled=True, freeze=True), pt2e(case, "dynamic")),
        (Form("PT2E int8 static, lowered", compiled=True), pt2e(case, "lowered")),
    ]
    forms = []
    for form, build in specs:
        print(f"  building {form.name}", file=sys.stderr, flush=True)
        attempt(form, build)
        if not form.error:
            try:
                form.module(case.timing_input)
            except Exception as error:  # noqa: BLE001
                form.error = first_line(error)
                traceback.print_exc(limit=3)
        forms.append(form)
    return forms


# --------------------------------------------------------------------------- measuring


def time_forms(forms: list[Form], inputs: Any, rounds: int, calls: int) -> dict[str, list[float]]:
    """Per form, its median call (seconds) in each interleaved round."""
    live = [f for f in forms if not f.error]
    modules = {f.name: f.module(inputs) for f in live}
    per_round: dict[str, list[float]] = {f.name: [] for f in live}
    with torch.no_grad():
        for module in modules.values():  # warm-up
            start = time.perf_counter()
            for _ in range(max(5, calls // 2)):
                call(module, inputs)
                if time.perf_counter() - start > ROUND_CAP_S:
                    break
        for r in range(rounds):
            order = live[r % len(live) :] + live[: r % len(live)]
            for form in order:
                module = modules[form.name]
                times: list[float] = []
                while len(times) < calls and (len(times) < 3 or sum(times) < ROUND_CAP_S):
                    start = time.perf_counter()
                    call(module, inputs)
                    times.append(time.perf_counter() - start)
                per_round[form.name].append(statistics.median(times))
    return per_round


def outputs(form: Form, case: Case) -> torch.Tensor:
    """One row per evaluation sample: logits, or the pooled sentence embedding."""
    rows = []
    with torch.no_grad():
        for sample in case.evaluation:
            out = call(form.module(sample), sample)
            rows.append(pooled(out, sample) if case.labels is None else primary_output(out))
    return torch.cat(rows).float()


def error_text(got: torch.Tensor, reference: torch.Tensor, case: Case) -> dict[str, float]:
    if case.labels is None:
        cosine = nn.functional.cosine_similarity(got, reference, dim=1)
        return {"fidelity": cosine.mean().item(), "min cosine": cosine.min().item()}
    labels = torch.tensor(case.labels)
    return {
        "accuracy": (got.argmax(1) == labels).float().mean().item(),
        "agreement": (got.argmax(1) == reference.argmax(1)).float().mean().item(),
    }


def measure(case: Case, rounds: int, calls: int) -> list[dict[str, Any]]:
    print(f"{case.name}:", file=sys.stderr, flush=True)
    forms = forms_for(case)
    print("  timing", file=sys.stderr, flush=True)
    per_round = time_forms(forms, case.timing_input, rounds, calls)
    print("  evaluating", file=sys.stderr, flush=True)
    reference = outputs(forms[0], case)
    rows = []
    for form in forms:
        row: dict[str, Any] = {"model": case.name, "form": form.name, "error": form.error}
        row["build_s"] = round(form.build_s, 2)
        key = shape_key(case.timing_input)
        if form.compiled and key in form.first_call_s:
            row["first_call_s"] = round(form.first_call_s[key], 2)
            row["next_calls_ms"] = [round(t, 2) for t in form.next_calls_ms[key]]
        row["fusions"] = form.matches
        if not form.error:
            mine = per_round[form.name]
            row["ms"] = statistics.median(mine) * 1e3
            for label, base in (("x_fp32", "eager fp32"), ("x_int8dyn", "eager int8 dyn")):
                if base in per_round:
                    row[label] = statistics.median(b / m for b, m in zip(per_round[base], mine))
            eager_int8 = [per_round[n] for n in ("eager int8 dyn", "eager int8_dynamic (as)")
                          if n in per_round]  # fmt: skip
            if eager_int8:
                best = [min(values) for values in zip(*eager_int8)]
                row["x_best_eager_int8"] = statistics.median(b / m for b, m in zip(best, mine))
            row["round_spread"] = (max(mine) - min(mine)) / statistics.median(mine)
            try:
                row.update(error_text(outputs(form, case), reference, case))
            except Exception as error:  # noqa: BLE001
                row["error"] = "eval: " + first_line(error)
                traceback.print_exc(limit=3)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        "| model | form | ms (median) | x eager fp32 | x eager int8 dyn | x best eager int8 "
        "| error vs fp32 | build s | first call s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        if "ms" not in r:
            lines.append(f"| {r['model']} | {r['form']} | failed: {r['error']} | | | | | "
                         f"{fmt(r.get('build_s'), 1)} | |")  # fmt: skip
            continue
        if "fidelity" in r:
            err = f"fidelity {r['fidelity']:.4f} (min {r['min cosine']:.3f})"
        elif "accuracy" in r:
            err = f"acc {r['accuracy']:.4f}, agree {r['agreement']:.4f}"
        else:
            err = r.get("error") or "-"
        lines.append(
            f"| {r['model']} | {r['form']} | {r['ms']:.3f} | {fmt(r.get('x_fp32'), 2)} | "
            f"{fmt(r.get('x_int8dyn'), 2)} | {fmt(r.get('x_best_eager_int8'), 2)} | {err} | "
            f"{fmt(r.get('build_s'), 1)} | {fmt(r.get('first_call_s'), 1)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits,residual,minilm")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's cache")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import torchao

    builders = {
        "digits": lambda: digits_case(residual=False),
        "residual": lambda: digits_case(residual=True),
        "minilm": minilm_case,
    }
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        try:
            case = builders[name]()
        except ImportError as error:
            print(f"({name} skipped: {error})", file=sys.stderr)
            continue
        rows.extend(measure(case, args.rounds, args.calls))
    cpu = torch.backends.cpu.get_cpu_capability()
    print(
        f"\ntorch {torch.__version__}, torchao {torchao.__version__}, CPU {cpu}, "
        f"{torch.get_num_threads()} threads, batch 1; {args.rounds} interleaved rounds x "
        f"{args.calls} calls; inductor cache {'warm' if args.warm_cache else 'cold'}\n"
    )
    print(markdown(rows))
    print("\ninductor int8 fusions (pattern matches) per compiled form:")
    for r in rows:
        if r.get("fusions"):
            print(f"- {r['model']} / {r['form']}: {r['fusions']}")
    print("\ncalls 2 to 5 after compiling (ms); spread of the rounds ((max - min) / median):")
    for r in rows:
        if "ms" in r:
            print(f"- {r['model']} / {r['form']}: {r.get('next_calls_ms', '-')}; "
                  f"spread {r['round_spread']:.2f}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1, default=str)


if __name__ == "__main__":
    main()
