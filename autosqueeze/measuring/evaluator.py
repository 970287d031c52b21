"""An evaluator's work for one task: plans into artifact bytes (the file a user gets), those
bytes loaded back and measured (``autosqueeze.measuring.measure``), and the sensitivity pass's
probes and layer timings. The executors hold one per worker; the front's files are rebuilt here.
"""

from __future__ import annotations

import contextlib
import copy
import math
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from autosqueeze.artifacts.artifact import (
    artifact_bytes,
    bit_packed_bytes,
    load_artifact,
    read_plan,
    save_artifact,
    stored_bytes,
    stored_integers,
)
from autosqueeze.artifacts.export import (
    OnnxModel,
    export_onnx,
    export_onnx_as_users_do,
    load_program,
)
from autosqueeze.artifacts.onnx_forms import one_call
from autosqueeze.common.errors import TrialError
from autosqueeze.compression.techniques import applied, changes, compress, runs_differently
from autosqueeze.compression.techniques.base import is_weighted
from autosqueeze.measuring.device_lock import DeviceLock, Held
from autosqueeze.measuring.layer_calls import Call, record_calls, relative_error
from autosqueeze.measuring.measure import (
    Limits,
    Measurements,
    ProbeResult,
    measure_latency,
    measure_latency_beside,
    measure_layers_beside,
    measure_memory,
    measure_pairs_beside,
    robust_latency,
)
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import Task
from autosqueeze.settings.objectives import extra_objectives
from autosqueeze.usercode.metrics import call_model, distortion, recorded_outputs, to_device


class Evaluator:
    """Turns plans into measurements for one task; holds the base model once.

    Everything it computes holds the device lock shared; only the latency timing holds it
    exclusive, so nothing this machine's evaluators (or the driver) do runs beside a timing.
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.lock = DeviceLock(task.device)
        self._reference_model: nn.Module | None = None
        self._original_onnx: OnnxModel | None = None  # the original, as ONNX Runtime runs it
        self._scratch: tempfile.TemporaryDirectory[str] | None = None  # its ONNX files
        self._reference_timings: list[float] = []  # the original, as timed here so far
        self._probe_model: nn.Module | None = None
        self._original_outputs: list[torch.Tensor] = []
        self._first_look: Task | None = None
        self._first_look_base: float | None = None  # the original's metric on them
        self._model_ms: float | None = None  # the original, timed by the first time_probe
        self._calls: dict[str, list[Call]] | None = None  # the pass by layer's reference

    @property
    def first_look(self) -> Task:
        """The task on its first ``sensitivity.samples`` samples: probes and early stops."""
        if self._first_look is None:
            self._first_look = self.task.subset(self.task.config.sensitivity.samples)
        return self._first_look

    def probe(self, plan: Plan) -> ProbeResult:
        """The metric and distortion on the first samples with ``plan`` applied in place to a
        working copy of the base model: a sensitivity probe (no artifact, no timing; the
        model is numerically the one the plan's artifact loads). The distortion is the
        outputs' squared error relative to the original's (``metrics.distortion``)."""
        with self.lock.shared():
            base = self._probe_base()
            try:
                with applied(base, plan, self.task.target) as model:
                    with recorded_outputs(model, self.task.config.task.output) as outputs:
                        metric = float(self.first_look.evaluate_metric(model))
            except ValueError as exc:
                raise TrialError(str(exc)) from exc
            return ProbeResult(metric, distortion(outputs, self._original_outputs))

    def layer_probe(self, plan: Plan) -> ProbeResult:
        """The pass by layer's probe (``sensitivity.by``): each layer ``plan`` changes run
        alone on the inputs it took in the original on the first samples, and per layer its
        outputs' squared error relative to the original's (``layer_calls``): no whole-model
        run. A plan that reshapes a layer's neighbours (built as a copy) is refused: its
        harm shows in the whole model only."""
        with self.lock.shared():
            base = self._probe_base()
            if self._calls is None:
                names = [n for n, m in base.named_modules() if n and is_weighted(m)]
                inputs = [to_device(x, self.task.device) for x, _ in self.first_look.data]
                self._calls = record_calls(base, names, inputs)
            try:
                with applied(base, plan, self.task.target) as model:
                    if model is not base:
                        raise TrialError("it reshapes the layers around it")
                    changed = [n for n, lp in plan.layers.items() if changes(lp)]
                    errors = {
                        name: relative_error(model.get_submodule(name), self._calls[name])
                        for name in changed
                        if name in self._calls
                    }
            except ValueError as exc:
                raise TrialError(str(exc)) from exc
            found = {n: e for n, e in errors.items() if e is not None}
            if changed and not found:
                raise TrialError("its layers did not run on the first samples")
            return ProbeResult(layer_errors=found)

    def time_probe(self, plan: Plan) -> ProbeResult:
        """The latency model's probe: the layers whose execution form ``plan`` changes (a
        kernel, a rank) timed beside the original layers, with the lock held exclusive for
        those milliseconds only, and the whole original model (once per evaluator). None
        for a plan that reshapes neighbours (built as a copy) or whose layers never run."""
        with self.lock.shared() as held:
            base = self._probe_base()
            if self._model_ms is None:
                with held.exclusive():
                    self._model_ms = self._time_model(base)
            try:
                with applied(base, plan, self.task.target) as model:
                    timed = [n for n, lp in plan.layers.items() if runs_differently(lp)]
                    layer_ms = None
                    if timed and model is base:
                        layer_ms = self._time_layers(model, plan, timed, held)
            except ValueError as exc:
                raise TrialError(str(exc)) from exc
            return ProbeResult(layer_ms=layer_ms, model_ms=self._model_ms)

    def _probe_base(self) -> nn.Module:
        """The working copy probes change in place (and the original's outputs on it)."""
        if self._probe_model is None:
            self._probe_model = copy.deepcopy(self.task.model).to(self.task.device).eval()
            with recorded_outputs(self._probe_model, self.task.config.task.output) as outputs:
                self.first_look.evaluate_metric(self._probe_model)
            self._original_outputs = outputs
        return self._probe_model

    def _time_model(self, model: nn.Module) -> float:
        """The whole original's milliseconds, in the runtime it ships to."""
        measure = self.task.config.measure
        return measure_latency(
            self.original_in_ort() if self._runtime == "onnxruntime" else model,
            self.task.example_input,
            self.task.device,
            warmup=measure.warmup,
            repeats=measure.repeats,
            threads=measure.threads,
        )

    def _time_layers(
        self, model: nn.Module, plan: Plan, names: list[str], held: Held
    ) -> tuple[float, float] | None:
        """(original, probed) milliseconds of layers ``names``, each pair timed side by side
        in interleaved rounds on the inputs the layer gets from the example input: in torch,
        or, where the model ships to ONNX Runtime, each layer alone as its own ONNX file
        there (``_alone_in_ort``), so the latency model prices ONNX Runtime's kernels."""
        inputs: dict[str, tuple[Any, Any]] = {}
        hooks = [
            model.get_submodule(name).register_forward_pre_hook(
                lambda _m, args, kwargs, name=name: inputs.setdefault(name, (args, kwargs)),
                with_kwargs=True,
            )
            for name in names
        ]
        try:
            with torch.inference_mode():
                call_model(model, to_device(self.task.example_input, self.task.device))
        finally:
            for hook in hooks:
                hook.remove()
        if not inputs:
            return None
        threads = self.task.config.measure.threads
        if self._runtime == "onnxruntime":
            pairs = {}
            for name, (args, kwargs) in inputs.items():
                alone = self._alone_in_ort(name, plan.layers[name], args, kwargs)
                if alone is None:
                    return None
                pairs[name] = (*alone, args, kwargs)
            with held.exclusive():
                return measure_pairs_beside(pairs, self.task.device, threads)
        with held.exclusive():
            return measure_layers_beside(
                self._reference(), model, inputs, self.task.device, threads
            )

    def _alone_in_ort(
        self, name: str, lp: LayerPlan, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[OnnxModel, OnnxModel] | None:
        """The original layer ``name`` and the layer as ``lp`` makes it, each exported alone
        the way a trial's file is (stored integers, ONNX Runtime's kernels, fusions) and
        loaded in ONNX Runtime; None where the layer's inputs mix positions and keywords or
        it does not export alone (then it is not timed)."""
        if args and kwargs:
            return None
        example = kwargs or (args[0] if len(args) == 1 else args)
        directory = self._scratch_dir() / "layers"
        directory.mkdir(exist_ok=True)
        layer = _Alone(copy.deepcopy(self._reference().get_submodule(name)).cpu())
        threads = self.task.config.measure.threads or 0
        target = replace(self.task.target, example_input=example, calibration=[example])
        found = []
        try:
            for index, alone_plan in enumerate((Plan({}), Plan({"layer": lp}))):
                data = artifact_bytes(compress(copy.deepcopy(layer), alone_plan, target))
                decoded = load_artifact(data, copy.deepcopy(layer), target, execution_form=False)
                path = directory / f"{index}-{uuid.uuid4().hex[:8]}.onnx"
                export_onnx(decoded, alone_plan, stored_integers(data), example, path, [example])
                found.append(OnnxModel(path, threads=threads))
        except Exception:  # noqa: BLE001 - a layer that will not export alone goes untimed
            return None
        return found[0], found[1]

    def artifact(self, plan: Plan) -> bytes:
        """Compress the base model by ``plan``: the artifact file's exact bytes."""
        with self.lock.shared() as pause:
            recovery = self.task.recovery
            if recovery is not None:  # training is long: let latency timings in between
                recovery = replace(recovery, between_windows=pause)
            try:
                base = self.task.base_model(plan.base)
                compressed = compress(base, plan, self.task.target, recovery)
            except ValueError as exc:
                raise TrialError(str(exc)) from exc
            return artifact_bytes(compressed)

    def build(self, plan: Plan, path: Path) -> int:
        """Compress the base model by ``plan`` and write the artifact; returns its bytes."""
        return save_artifact(self.artifact(plan), path)

    def evaluate(self, plan: Plan, limits: Limits | None = None) -> Measurements:
        clock = _PhaseClock()
        with clock("compress"):
            data = self.artifact(plan)
        return self.measure_artifact(data, limits, clock)

    def measure_artifact(
        self,
        source: Path | bytes,
        limits: Limits | None = None,
        clock: _PhaseClock | None = None,
        *,
        trust_pickle: bool = False,
    ) -> Measurements:
        """Load an artifact (its file or bytes) and measure it: the metric beside other work,
        then, unless ``limits`` already rule it out, memory, and latency alone. An ``.onnx``
        file (``export --format onnx``) is measured as ONNX Runtime runs it, on the CPU with
        the threads the original is timed with; its memory is not measured (ONNX Runtime's
        allocations are its own). A ``.pt2`` program is loaded only with ``trust_pickle``:
        ``torch.export.load`` unpickles parts of it (SECURITY.md). With ``budgets.runtime``
        onnxruntime, an artifact is measured as it ships there: its size is its ONNX
        export's and its latency ONNX Runtime's, beside the original's export."""
        clock = clock or _PhaseClock()
        with self.lock.shared():
            with clock("load"):
                model = self._load(source, trust_pickle)
            exporting = self._runtime != "torch" and not isinstance(model, OnnxModel)
            with clock("export") if exporting else contextlib.nullcontext():
                shipped, size = self._as_shipped(model, source)
            if exporting:  # judged as it ships: ONNX Runtime's integer kernels are its own
                model = shipped
            with clock("first_look"):
                early = self._first_look_stop(model, limits)
            if early is not None:
                metric, reason = early
                return Measurements(metric, size, None, stopped=reason, seconds=clock.seconds)
            with clock("metric"):
                metric = float(self.task.evaluate_metric(model))
            if not math.isfinite(metric):
                raise TrialError(f"the metric is {metric} for this model")
            stopped = (limits or Limits()).missed(metric, size)
            if stopped:
                return Measurements(metric, size, None, stopped=stopped, seconds=clock.seconds)
            with clock("memory"):
                memory = (  # ONNX Runtime's allocations are its own
                    None
                    if isinstance(shipped, OnnxModel)
                    else measure_memory(model, self.task.example_input, self.task.device)
                )
            extra = self._measure_extra(model, clock)
            original = self._original_as_shipped(shipped)
        measure = self.task.config.measure
        with self.lock.exclusive(), clock("latency"):
            timing = measure_latency_beside(
                shipped,
                original,
                self.task.example_input,
                self.task.device,
                warmup=measure.warmup,
                repeats=measure.repeats,
                threads=measure.threads,
                attempts=measure.attempts,
                max_spread=measure.max_spread,
                expected_reference_ms=robust_latency(self._reference_timings)
                if len(self._reference_timings) >= 3
                else None,
            )
        self._reference_timings.append(timing.reference_ms)
        return Measurements(
            metric,
            size,
            timing.latency_ms,
            memory,
            reference_latency_ms=timing.reference_ms,
            speedup=timing.speedup,
            timing_spread=timing.spread,
            timing_attempts=timing.attempts,
            seconds=clock.seconds,
            extra=extra,
        )

    @property
    def _runtime(self) -> str:
        return self.task.runtime

    def _as_shipped(self, model: nn.Module, source: Path | bytes) -> tuple[nn.Module, int]:
        """The model as it runs where it ships (``budgets.runtime``), and the bytes of the
        file it ships as: the loaded model and its file in torch; its ONNX export for ONNX
        Runtime (an ONNX file given: itself)."""
        size = len(source) if isinstance(source, bytes) else source.stat().st_size
        if self._runtime == "torch" or isinstance(model, OnnxModel):
            return model, size
        if isinstance(source, Path) and source.suffix == ".pt2":
            raise ValueError("budgets.runtime is onnxruntime: evaluate the ONNX export")
        exported = self._exported(source, "model.onnx")
        return exported, exported.path.stat().st_size

    def _original_as_shipped(self, shipped: nn.Module) -> nn.Module:
        """The original model in the runtime ``shipped`` runs in, timed beside it."""
        if not isinstance(shipped, OnnxModel):
            return self._reference()
        return self.original_in_ort()

    def original_in_ort(self) -> OnnxModel:
        """The original model as a user runs it in ONNX Runtime without autosqueeze: written
        by ``torch.onnx.export`` with its defaults (its graph optimizer folds BatchNorm into
        the convolutions: 1.8x faster than the unoptimized export on the residual CNN), the
        fp32 baseline every trial is timed beside and the one-call quantizers are given."""
        if self._original_onnx is None:
            path = self._scratch_dir() / "original.onnx"
            export_onnx_as_users_do(self.task.model, self.task.example_input, path)
            self._original_onnx = OnnxModel(path, threads=self.task.config.measure.threads or 0)
        return self._original_onnx

    def one_call(self, name: str, output: Path) -> Measurements:
        """ONNX Runtime's one-call quantizer ``name`` (``onnx_forms.ONE_CALL``) applied to
        the original as a user exports it (``original_in_ort``; in the unoptimized export
        ``quantize_dynamic`` finds no weight to quantize, each Linear's reaching its MatMul
        through a Transpose), on the task's calibration data, written to ``output`` and
        measured as a trial's file is: the baseline a search that ships there must beat."""
        with self.lock.shared():
            one_call(name, self.original_in_ort().path, output, self.task.calibration_inputs)
        return self.measure_artifact(output)

    def shipped_file(self, artifact: bytes) -> tuple[str, bytes]:
        """The file an artifact ships as in ONNX Runtime: its ONNX export's name and bytes."""
        return "model.onnx", self._exported(artifact, "shipped.onnx").path.read_bytes()

    def _exported(self, artifact: Path | bytes, name: str) -> OnnxModel:
        """An artifact's ONNX export (``export --format onnx``), loaded in ONNX Runtime."""
        path = self._scratch_dir() / name
        plan = read_plan(artifact)
        skeleton = self.task.skeleton(plan.base)
        decoded = load_artifact(artifact, skeleton, self.task.target, execution_form=False)
        integers = stored_integers(artifact)
        calibration = self.task.calibration_inputs
        export_onnx(decoded, plan, integers, self.task.example_input, path, calibration)
        return OnnxModel(path, threads=self.task.config.measure.threads or 0)

    def _scratch_dir(self) -> Path:
        """Where this evaluator's ONNX files are written (removed by ``close``)."""
        if self._scratch is None:
            self._scratch = tempfile.TemporaryDirectory(prefix="autosqueeze-onnx-")
        return Path(self._scratch.name)

    def _load(self, source: Path | bytes, trust_pickle: bool) -> nn.Module:
        if isinstance(source, Path) and source.suffix == ".pt2":
            if not trust_pickle:
                raise ValueError(
                    "a .pt2 program is loaded by torch.export.load, which unpickles parts of "
                    "it and so runs whatever code its author put there; evaluate it only if "
                    "you made it or trust who did, with --trust-pickle (SECURITY.md)"
                )
            return load_program(source, self.task.device)
        if isinstance(source, Path) and source.suffix == ".onnx":
            if self.task.device.type != "cpu":
                raise ValueError("an ONNX file is measured in ONNX Runtime on the CPU only")
            return OnnxModel(source, threads=self.task.config.measure.threads or 0)
        skeleton = self.task.skeleton(read_plan(source).base)
        return load_artifact(source, skeleton, self.task.target)

    def _measure_extra(self, model: nn.Module, clock: _PhaseClock) -> dict[str, float]:
        """The study's objectives that carry their own ``measure`` (those it optimizes, or
        budgets), on the loaded model."""
        config = self.task.config
        found = {}
        for objective in extra_objectives():
            budgeted = objective.budget_of(config.budgets) is not None
            if objective.name not in config.objectives and not budgeted:
                continue
            with clock(objective.name):
                value = float(objective.measure(model, self.task))  # type: ignore[misc]
            if not math.isfinite(value):
                raise TrialError(f"the objective {objective.name!r} measured {value}")
            found[objective.name] = value
        return found

    def _first_look_stop(self, model: nn.Module, limits: Limits | None) -> tuple[float, str] | None:
        """(metric, reason) when the metric on the first samples already fell past
        ``limits.max_first_look_drop``: a multi-fidelity trial stops there."""
        if limits is None or limits.max_first_look_drop is None or self.first_look is self.task:
            return None
        if self._first_look_base is None:
            self._first_look_base = float(self.first_look.evaluate_metric(self._reference()))
        metric = float(self.first_look.evaluate_metric(model))
        samples = self.task.config.sensitivity.samples
        if not math.isfinite(metric):
            raise TrialError(f"the metric is {metric} for this model (on the first {samples})")
        drop = self._first_look_base - metric
        if drop <= limits.max_first_look_drop:
            return None
        return metric, (
            f"on the first {samples} samples the metric fell {drop:.4g} (to {metric:.6g}), "
            f"past {limits.max_first_look_drop:.4g} (sensitivity.early_stop x "
            "budgets.max_metric_drop): stopped before the full metric"
        )

    def _reference(self) -> nn.Module:
        """The original model on the device, timed beside every trial."""
        if self._reference_model is None:
            model = self.task.model
            if self.task.device.type != "cpu":
                model = copy.deepcopy(model).to(self.task.device)
            self._reference_model = model.eval()
        return self._reference_model

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch, self._original_onnx = None, None


@dataclass(frozen=True)
class Evaluated:
    """A file measured by ``evaluate_file``."""

    measurements: Measurements
    # the speedup applied to the study's robust latency of the original, as the search
    # stores latency (comparable with the front's latency_ms); None without a reference
    study_latency_ms: float | None
    # an artifact measured as torch runs it: its safetensors file before deflate, and its
    # bytes with no tensor entropy-coded (what coding saved); None for other files
    stored_bytes: int | None
    packed_bytes: int | None


def evaluate_file(
    task: Task, path: Path, *, reference: Measurements | None = None, trust_pickle: bool = False
) -> Evaluated:
    """Measure an artifact, an ONNX file or (with ``trust_pickle``) a ``.pt2`` program as a
    trial is measured: ``autosqueeze evaluate``'s procedure. With the study's ``reference``
    (``records.reference``), the latency is also given as the study would store it, since a
    timing beside the original is what compares across runs and machines' moods."""
    evaluator = Evaluator(task)
    try:
        got = evaluator.measure_artifact(path, trust_pickle=trust_pickle)
    finally:
        evaluator.close()
    at_study = (
        got.at_reference(reference.latency_ms).latency_ms
        if reference and reference.latency_ms
        else None
    )
    stored = packed = None
    if path.suffix not in (".pt2", ".onnx") and evaluator.task.runtime == "torch":
        stored, packed = len(stored_bytes(path)), len(bit_packed_bytes(path))
    return Evaluated(got, at_study, stored, packed)


class _Alone(nn.Module):
    """One layer as a model of its own, named ``layer``: what ``_alone_in_ort`` exports."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer(*args, **kwargs)


class _PhaseClock:
    """Seconds spent per phase of a trial (what ``benchmarks/trial_cost.py`` prints)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + elapsed, 6)
