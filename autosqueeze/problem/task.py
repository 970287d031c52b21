"""The user's side of a study, loaded once: model, validation data, example input, metric.

Every call into user code goes through ``user_code`` so a failure there is reported as a
UserError naming the config field, never as a traceback.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from autosqueeze.common.errors import UserError
from autosqueeze.common.nested import batch_of, samples_in, tensors
from autosqueeze.compression.recovery import Recovery
from autosqueeze.compression.techniques import Target
from autosqueeze.problem.plain_weights import fold_parametrizations
from autosqueeze.problem.students import build, distilled, load_factories
from autosqueeze.settings.config import StudyConfig, file_problem
from autosqueeze.usercode.metrics import Metric, call_model, pooled, resolve_metric, to_device
from autosqueeze.usercode.user_code import call_user, describe, load_callable


@dataclass
class Task:
    config: StudyConfig
    model: nn.Module  # the uncompressed model, on the CPU, in eval mode
    data: list[tuple[Any, Any]]
    example_input: Any  # one batch of ``budgets.batch_size``
    metric: Metric
    device: torch.device
    calibration: list[Any] | None = None  # input batches for recovery training
    calibration_labels: list[Any] | None = None  # their targets, where the batches had them
    # ``model.candidates``: name -> factory of a smaller student, and the students distilled
    # so far (``distil_students``; they travel with the task to the evaluators)
    candidates: dict[str, Callable[[], nn.Module]] = field(default_factory=dict)
    students: dict[str, nn.Module] = field(default_factory=dict)
    # where the shipped model runs and trials are measured (``budgets.runtime`` resolved:
    # never ``auto``; ``resolve_runtime``), and why
    runtime: str = "torch"
    runtime_reason: str = "set in budgets.runtime"

    @property
    def recovery(self) -> Recovery | None:
        """Distillation after structural changes, when the config gives calibration data."""
        if not self.calibration:
            return None
        settings = self.config.recovery
        return Recovery(
            self.calibration,
            steps=settings.steps,
            lr=settings.lr,
            min_gain=settings.min_gain,
            on_grid=settings.on_grid,
            labels=self.calibration_labels if settings.labels else None,
        )

    def distil_students(self, progress: Callable[[str, bool], None] | None = None) -> None:
        """Distil every candidate not distilled yet (loading those the cache holds);
        ``progress(name, cached)`` after each."""
        for name in self.candidates:
            if name not in self.students:
                cached = self._distil(name)
                if progress is not None:
                    progress(name, cached)

    def base_model(self, base: str) -> nn.Module:
        """The model a plan with this ``base`` compresses: the original, or a distilled
        student (distilled now, or loaded from the cache, if this process has not yet)."""
        if not base:
            return self.model
        self._check_base(base)
        if base not in self.students:
            self._distil(base)
        return self.students[base]

    def _distil(self, name: str) -> bool:
        """Distil one candidate into ``students``; whether the cache had it."""
        model = self.config.model
        recovery = Recovery(
            self.calibration or [],
            steps=model.distill_steps,
            lr=model.distill_lr,
            labels=self.calibration_labels if self.config.recovery.labels else None,
        )
        ref = model.candidates[name]
        self.students[name], cached = distilled(
            name, self.candidates[name], ref, self.model, recovery
        )
        return cached

    def skeleton(self, base: str) -> nn.Module:
        """A fresh model of the architecture a plan with this ``base`` compresses, for its
        artifact to load into (its weights are the artifact's)."""
        if not base:
            return copy.deepcopy(self.model)
        self._check_base(base)
        field_name = f"model.candidates.{base}"
        return build(self.candidates[base], field_name, self.config.model.candidates[base])

    def _check_base(self, base: str) -> None:
        if base not in self.candidates:
            named = ", ".join(self.candidates) or "none"
            raise ValueError(
                f"its plan compresses the student {base!r}, which this study's "
                f"model.candidates does not name (it names: {named})"
            )

    @property
    def calibration_inputs(self) -> list[Any]:
        """Input batches that calibrate static int8 activations (``ort_int8_static``):
        ``task.calibration``, or the task's own data where the config gives none."""
        return self.calibration or [inputs for inputs, _ in self.data]

    @property
    def target(self) -> Target:
        """Where compressed models run, with an input to trace them (structured pruning)."""
        return Target(self.device.type, self.example_input, self.runtime, self.calibration)

    def subset(self, samples: int) -> Task:
        """The task judged on its first ``samples`` samples (the last batch cut to fit): what
        a sensitivity probe and a trial's first look are judged on. A metric that compares
        with the original's outputs (``fidelity``) is set up again on those samples."""
        batches: list[tuple[Any, Any]] = []
        count = 0
        for inputs, target in self.data:
            if count >= samples:
                break
            held = samples_in(inputs)
            if count + held > samples:  # a probe costs a forward over what it is given
                inputs, target = _first_samples(inputs, target, held, samples - count)
            batches.append((inputs, target))
            count += samples_in(inputs)
        if count >= sum(samples_in(inputs) for inputs, _ in self.data):
            return self
        ref = self.config.task.metric
        metric = call_user(
            lambda: resolve_metric(
                ref,
                search_dir=self.config.folder,
                original=self.model,
                data=batches,
                output=self.config.task.output,
            ),
            field="task.metric",
            ref=ref,
        )
        return replace(self, data=batches, metric=metric)

    def evaluate_metric(self, model: nn.Module) -> float:
        with torch.inference_mode():
            return call_user(
                self.metric,
                model,
                self.data,
                self.device,
                field="task.metric",
                ref=self.config.task.metric,
            )


def load_task(config: StudyConfig) -> Task:
    device = _device(config.budgets.device)
    folder = config.folder
    model = _load_model(config)
    data = _load_data(config)
    if config.model.example_input:
        ref = config.model.example_input
        make = load_callable(ref, field="model.example_input", search_dir=folder)
        example = call_user(make, field="model.example_input", ref=ref)
    else:
        example = data[0][0]
    example = batch_of(example, config.budgets.batch_size)
    try:
        with torch.inference_mode():
            call_model(model, example)
    except Exception as exc:  # noqa: BLE001 - the user's model raised
        source = "model.example_input" if config.model.example_input else "the first data batch"
        raise UserError(
            f"model.factory: the model fails on its example input ({source}): {describe(exc)}"
        ) from None
    metric = call_user(
        lambda: resolve_metric(
            config.task.metric,
            search_dir=folder,
            original=model,
            data=data,
            output=config.task.output,
        ),
        field="task.metric",
        ref=config.task.metric,
    )
    calibration, labels = _load_calibration(config)
    candidates = load_factories(config, model, example)
    runtime, reason = resolve_runtime(config, model, example)
    return Task(
        config,
        model,
        data,
        example,
        metric,
        device,
        calibration,
        labels,
        candidates,
        runtime=runtime,
        runtime_reason=reason,
    )


ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


def resolve_runtime(config: StudyConfig, model: nn.Module, example: Any) -> tuple[str, str]:
    """The runtime a study measures in, and why: ``budgets.runtime`` as set, or for
    ``auto`` ONNX Runtime where it can judge the model (a CPU, no memory budget, its
    packages installed, the original exporting and running alike there: what a user who
    ships to a CPU runs), torch otherwise. ``onnxruntime`` asked for a model that cannot
    ship there is the user's error, named."""
    import importlib.util

    asked = config.budgets.runtime
    if asked == "torch":
        return "torch", "set in budgets.runtime"
    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if asked == "onnxruntime" and missing:
        raise UserError(
            f"budgets.runtime: onnxruntime needs {', '.join(missing)}: "
            f"pip install {' '.join(missing)}"
        )
    if asked == "auto":
        if config.budgets.device != "cpu":
            return (
                "torch",
                f"auto: ONNX Runtime is measured on the CPU, not {config.budgets.device}",
            )
        if config.budgets.max_memory_mb is not None or "memory_mb" in config.objectives:
            return "torch", "auto: memory (a budget or an objective) is measured in torch"
        if missing:
            return "torch", f"auto: ONNX Runtime is not installed (pip install {' '.join(missing)})"
    from autosqueeze.artifacts.export import onnx_refusal

    refusal = onnx_refusal(model, example)
    if refusal is None:
        why = "the model exports to ONNX and runs alike in ONNX Runtime on the CPU"
        return "onnxruntime", f"auto: {why}" if asked == "auto" else "set in budgets.runtime"
    if asked == "auto":
        return "torch", f"auto: {refusal}"
    raise UserError(
        f"budgets.runtime: onnxruntime, but the model cannot ship there: {refusal}. Set "
        "runtime: torch, or auto (which measures in torch where ONNX Runtime cannot)."
    )


def degenerate_warnings(task: Task, metric: float) -> list[str]:
    """What makes the original a poor reference: a metric of 0, or the same output for every
    sample (a randomly initialised or collapsed model), against which any drop budget is
    meaningless."""
    warnings = []
    if metric == 0:
        warnings.append(
            f"task.metric: the original model scores 0 ({task.config.task.metric}): every "
            "compressed model is then 'within budget'; check the metric and the data"
        )
    key = task.config.task.output
    with torch.inference_mode():
        outputs = torch.cat(
            [
                pooled(call_model(task.model, to_device(x, task.device)), x, key).cpu()
                for x, _ in task.data[:2]
            ]
        )
    if len(outputs) > 1 and bool((outputs - outputs[0]).abs().max() == 0):
        warnings.append(
            "the original model gives the same output for every sample: a metric comparing "
            "outputs cannot tell a good compressed model from a broken one"
        )
    return warnings


def _first_samples(inputs: Any, target: Any, held: int, wanted: int) -> tuple[Any, Any]:
    """The first ``wanted`` of a batch's ``held`` samples, where every tensor in it has them
    along dim 0 (otherwise the whole batch: its layout is the user's)."""
    if not all(t.dim() and t.shape[0] == held for t in tensors(inputs) + tensors(target)):
        return inputs, target
    return batch_of(inputs, wanted), batch_of(target, wanted) if target is not None else None


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"budgets.device: {name!r} is not available on this machine (no CUDA).")
    return device


def _load_model(config: StudyConfig) -> nn.Module:
    ref = config.model.factory
    factory = load_callable(ref, field="model.factory", search_dir=config.folder)
    model = call_user(factory, field="model.factory", ref=ref)
    if not isinstance(model, nn.Module):
        raise UserError(
            f"model.factory: {ref!r} returned {type(model).__name__}, not a torch.nn.Module."
        )
    if config.model.checkpoint is not None:
        _load_checkpoint(model, config.model.checkpoint)
    return fold_parametrizations(model.cpu().eval())


def _load_checkpoint(model: nn.Module, path: Any) -> None:
    from autosqueeze.artifacts.artifact import load_state

    if not path.is_file():
        raise UserError(f"model.checkpoint: file {path} {file_problem(path)}.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        load_state(model, state)
    except Exception as exc:  # noqa: BLE001 - any load failure, named for the user
        raise UserError(
            f"model.checkpoint: {path} cannot be loaded into the model: "
            f"{str(exc).strip().splitlines()[0]}"
        ) from None


def _load_calibration(config: StudyConfig) -> tuple[list[Any] | None, list[Any] | None]:
    """Input batches from ``task.calibration``, and their targets where it gave (inputs,
    targets) pairs (None where it gave inputs alone)."""
    ref = config.task.calibration
    if ref is None:
        if config.recovery.labels:
            raise UserError("recovery.labels: there is no task.calibration to take labels from.")
        return None, None
    fn = load_callable(ref, field="task.calibration", search_dir=config.folder)
    batches = call_user(lambda: list(fn()), field="task.calibration", ref=ref)
    if not batches:
        raise UserError(f"task.calibration: {ref!r} returned no batches.")
    pairs = [isinstance(b, (tuple, list)) and len(b) == 2 for b in batches]
    if config.recovery.labels and not all(pairs):
        raise UserError(
            f"recovery.labels: task.calibration ({ref!r}) yields input batches, not the "
            "(inputs, targets) pairs labels come from."
        )
    cpu = torch.device("cpu")
    inputs = [to_device(b[0] if pair else b, cpu) for b, pair in zip(batches, pairs)]
    labels = [to_device(b[1], cpu) if pair else None for b, pair in zip(batches, pairs)]
    return inputs, labels if any(pairs) else None


def _load_data(config: StudyConfig) -> list[tuple[Any, Any]]:
    ref = config.task.data
    fn = load_callable(ref, field="task.data", search_dir=config.folder)
    batches = call_user(lambda: list(fn()), field="task.data", ref=ref)
    if not batches:
        raise UserError(f"task.data: {ref!r} returned no batches.")
    for batch in batches[:1]:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise UserError(
                f"task.data: {ref!r} must yield (inputs, targets) pairs; "
                f"its first item is a {type(batch).__name__}."
            )
    return [(to_device(x, torch.device("cpu")), y) for x, y in batches]
