"""The study config: one YAML file, validated by pydantic, paths resolved against its folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from autosqueeze.common.errors import UserError
from autosqueeze.settings.objectives import OBJECTIVES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: object) -> object:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL character")
        return value


class ModelConfig(_Strict):
    factory: str = Field(description="'module:callable' returning the trained torch.nn.Module")
    checkpoint: Path | None = Field(None, description="optional state dict loaded into it")
    example_input: str | None = Field(None, description="'module:callable' returning one batch")
    candidates: dict[str, str] = Field(
        {},
        description="name -> 'module:callable' returning a smaller student (fewer channels or "
        "blocks; its layers named as the model's where they match): each is distilled from the "
        "model on task.calibration once (cached) and the search chooses which model to compress",
    )
    distill_steps: int = Field(1000, ge=1, description="optimizer steps distilling a candidate")
    distill_lr: float = Field(1e-3, gt=0, description="Adam's learning rate distilling one")

    @field_validator("candidates")
    @classmethod
    def _candidate_names(cls, candidates: dict[str, str]) -> dict[str, str]:
        for name in candidates:
            if name == "original" or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]{0,63}", name):
                raise ValueError(
                    f"{name[:80]!r} is not a candidate name (letters, digits, _ and -, not "
                    "'original', which is the model itself)"
                )
        return candidates


class TaskConfig(_Strict):
    data: str = Field(description="'module:callable' returning validation (inputs, targets)")
    metric: str = Field("accuracy", description="built-in name or 'module:callable'")
    output: str | None = Field(
        None,
        max_length=200,
        description="the part of the model's output that built-in metrics and the sensitivity "
        "pass compare: a key, field or attribute (logits, last_hidden_state, pooler_output) or "
        "a tuple index (0); default: sentence_embedding, last_hidden_state, logits, else the "
        "first tensor",
    )
    calibration: str | None = Field(
        None,
        description="'module:callable' returning unlabeled input batches (or (inputs, targets) "
        "pairs) kept apart from the validation data; enables recovery training",
    )


class RecoveryConfig(_Strict):
    """Distillation after structural changes; runs only when task.calibration is given."""

    on_grid: bool = Field(
        False,
        description="distill every plan, quantized and clustered ones too, each weight trained "
        "on the grid it is stored on (straight-through); every trial then trains, so a search "
        "costs more. `autosqueeze finetune` does this for one front model after the search",
    )

    labels: bool = Field(
        False,
        description="add the cross-entropy with task.calibration's targets (class indices, "
        "where it yields (inputs, targets) pairs) to matching the original's outputs; off: "
        "on the digits CNN it gained nothing over the original's outputs alone",
    )
    steps: int = Field(200, ge=0, description="optimizer steps at most, one calibration batch each")
    lr: float = Field(1e-3, gt=0)
    min_gain: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="stop when 25 steps lower the distillation loss by less than this fraction",
    )


class Budgets(_Strict):
    max_metric_drop: float | None = Field(None, ge=0)
    max_latency_ms: float | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0, description="1 MB = 1,000,000 bytes")
    max_memory_mb: float | None = Field(
        None, gt=0, description="peak memory of one forward at batch_size, weights included"
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?)$")
    batch_size: int = Field(1, ge=1, le=65536)
    runtime: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="where the shipped model runs, and so where trials are timed: onnxruntime "
        "(each trial exported to ONNX and timed in ONNX Runtime on the CPU beside the "
        "original's export; torch's kernels are not searched, and memory is not measured), "
        "torch (the artifact in its kernels), or auto: onnxruntime on a CPU where the original "
        "exports to ONNX and runs alike there, torch otherwise (validate says which and why)",
    )

    @model_validator(mode="after")
    def _runtime_fits(self) -> Budgets:
        if self.runtime == "onnxruntime":
            if self.device != "cpu":
                raise ValueError("runtime onnxruntime runs on the CPU: set device: cpu")
            if self.max_memory_mb is not None:
                raise ValueError(
                    "max_memory_mb: memory is measured in torch, not in ONNX Runtime (runtime "
                    "onnxruntime)"
                )
        return self


class MeasureConfig(_Strict):
    warmup: int = Field(20, ge=0)
    repeats: int = Field(100, ge=1)
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads; default: all usable")
    attempts: int = Field(3, ge=1, description="timings taken at most when one is disturbed")
    max_spread: float = Field(
        0.5, gt=0, description="rounds disagreeing more than this mark a timing disturbed"
    )


class SensitivityConfig(_Strict):
    """The pass before the search: each knob value tried alone on each layer (docs/search.md)."""

    enabled: bool = Field(
        True, description="false: search the whole space with the sampler alone, no candidates"
    )
    samples: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="validation samples a probe (and a trial's first look) is judged on",
    )
    margin: float = Field(
        1.5,
        gt=0,
        description="a knob value whose effect alone passes max_metric_drop times this is not "
        "offered to the sampler",
    )
    candidates: int = Field(
        6, ge=0, description="knapsack plans tried first, on a ladder of predicted distortion"
    )
    speed_candidates: int = Field(
        3,
        ge=0,
        description="knapsack plans that weigh the latency model's time over bytes, on the "
        "same ladder's middle levels (in place of the kernel warm starts)",
    )
    refine: int = Field(
        4,
        ge=0,
        description="knapsack plans tried next, between the ladder's last that met "
        "the metric budget and its first that did not",
    )
    knapsack_share: float = Field(
        0.8,
        ge=0,
        le=1,
        description="the share of sampled trials proposed as knapsack plans on perturbed "
        "costs, at levels the measured trials calibrate (the rest: search.sampler)",
    )
    timing_cache: bool = Field(
        True,
        description="keep the layer timings in the user's cache folder, by layer shape and "
        "device, and time only what it lacks (false: time every probe, keep nothing)",
    )
    early_stop: float = Field(
        3.0,
        gt=0,
        description="a trial whose drop on the first samples passes max_metric_drop times this "
        "stops there (0 < early_stop; large values never stop)",
    )
    by: Literal["auto", "model", "layer"] = Field(
        "auto",
        description="how a probe is judged: model (the whole model on the first samples), "
        "layer (the changed layers alone on the inputs they took, a few whole-model checks "
        "scaling their error), auto (layer for models of more than by_layer_above parameters)",
    )
    by_layer_above: int = Field(
        50_000_000,
        ge=0,
        description="with by: auto, the parameters above which a model is probed by layer "
        "(a whole-model probe costs a forward pass; hundreds of them take hours there)",
    )
    checks: int = Field(
        8,
        ge=2,
        le=1000,
        description="the pass by layer's whole-model checks, which scale layer error into the "
        "model's distortion and metric",
    )


class SearchConfig(_Strict):
    trials: int = Field(150, ge=1, le=1_000_000)
    seed: int | None = Field(0, ge=0, lt=2**32, description="NumPy's seeds are 32-bit")
    timeout_s: float | None = Field(None, gt=0)
    sampler: str = Field(
        "tpe",
        max_length=200,
        description="tpe, nsga2, gp, random, or 'module:callable' returning an Optuna sampler "
        "(called with seed=... and the options)",
    )
    sampler_options: dict[str, Any] = Field(
        default_factory=dict, description="keywords for the sampler, e.g. {n_startup_trials: 20}"
    )
    output_dir: Path | None = Field(None, description="default: runs/<name> beside the config")
    storage: str | None = Field(
        None, description="database URL or journal file; default: output_dir/study.log"
    )
    trial_timeout_s: float | None = Field(None, gt=0, description="fail a trial that runs longer")
    warm_starts: bool = Field(
        True,
        description="queue the hand anchors (uniform int6 and int4, kernels, channel pruning, "
        "separation) before the sampler; false: only the original and int8 baselines and "
        "the knapsack plans",
    )

    @field_validator("storage")
    @classmethod
    def _keeps_the_study(cls, storage: str | None) -> str | None:
        if storage is not None and ":memory:" in storage:
            raise ValueError("an in-memory database keeps nothing: the study would be lost")
        return storage


class ComputeConfig(_Strict):
    executor: str | None = Field(
        None,
        max_length=64,
        description="where trials run: inprocess or ray "
        "(autosqueeze.searching.executors.EXECUTORS); "
        "default: inprocess when workers is 0, else ray",
    )
    workers: int | Literal["auto"] = Field("auto", description="0: in-process; auto: from Ray")
    ray_address: str | None = Field(None, description="join this Ray cluster; default: local Ray")
    gpus_per_worker: float = Field(1.0, gt=0, le=1)

    @field_validator("workers")
    @classmethod
    def _not_negative(cls, workers: int | str) -> int | str:
        if isinstance(workers, int) and workers < 0:
            raise ValueError("workers must be 0 (in-process), a positive count, or 'auto'")
        return workers


METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),  # a share of the samples
    "neighbour_overlap": (0.0, 1.0),  # a share of the neighbours
    "fidelity": (-1.0, 1.0),  # a mean cosine similarity
}
"""The values each built-in metric (autosqueeze.usercode.metrics) can take: a ``max_metric_drop``
past the whole range is no budget at all, most likely a slip. A metric of the user's has
no known range; its budget need only be finite."""


class StudyConfig(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    model: ModelConfig
    task: TaskConfig
    space: Path
    objectives: list[str] = Field(
        default=["metric", "size_bytes", "latency_ms"],
        min_length=1,
        description="what the study optimizes: names from "
        "autosqueeze.settings.objectives.OBJECTIVES",
    )
    budgets: Budgets = Budgets()
    measure: MeasureConfig = MeasureConfig()
    recovery: RecoveryConfig = RecoveryConfig()
    sensitivity: SensitivityConfig = SensitivityConfig()
    search: SearchConfig = SearchConfig()
    compute: ComputeConfig = ComputeConfig()
    source: Path = Field(Path("."), exclude=True, description="the config file itself")

    @field_validator("objectives")
    @classmethod
    def _known_objectives(cls, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in OBJECTIVES]
        if unknown:
            raise ValueError(
                f"unknown objective {unknown[0]!r}; the objectives are {', '.join(OBJECTIVES)}"
            )
        if len(set(names)) != len(names):
            raise ValueError("an objective is listed twice")
        return names

    @model_validator(mode="after")
    def _measurable_in_runtime(self) -> StudyConfig:
        if self.budgets.runtime == "onnxruntime" and "memory_mb" in self.objectives:
            raise ValueError(
                "objectives: memory_mb is measured in torch, not in ONNX Runtime "
                "(budgets.runtime onnxruntime)"
            )
        return self

    @model_validator(mode="after")
    def _drop_within_the_metric(self) -> StudyConfig:
        drop, known = self.budgets.max_metric_drop, METRIC_RANGES.get(self.task.metric)
        if drop is not None and known is not None and drop > known[1] - known[0]:
            raise ValueError(
                f"field 'budgets.max_metric_drop': {drop:g} is more than {self.task.metric} "
                f"can drop at all (it runs from {known[0]:g} to {known[1]:g})"
            )
        return self

    @property
    def folder(self) -> Path:
        return self.source.parent

    @property
    def output_dir(self) -> Path:
        return self.search.output_dir or self.folder / "runs" / self.name

    @property
    def storage(self) -> str:
        """A database URL, or the path of an Optuna journal file (the default)."""
        return self.search.storage or str((self.output_dir / "study.log").resolve())

    @property
    def storage_file(self) -> Path | None:
        """The file the study is kept in when it is local (a journal, a SQLite database)."""
        if "://" not in self.storage:
            return Path(self.storage)
        if self.storage.startswith("sqlite:///"):
            return Path(self.storage[len("sqlite:///") :])
        return None

    @property
    def metric_name(self) -> str:
        """The metric as tables and axes name it: ``accuracy`` for ``...metrics:accuracy``."""
        return self.task.metric.rpartition(":")[2]

    @property
    def storage_shown(self) -> str:
        """``storage`` as messages, the dashboard and reports show it: secrets masked."""
        return masked(self.storage)

    def with_overrides(
        self,
        *,
        trials: int | None = None,
        study_dir: Path | None = None,
        storage: str | None = None,
        workers: int | str | None = None,
        sampler: str | None = None,
        ray_address: str | None = None,
        sensitivity: bool | None = None,
        runtime: str | None = None,
    ) -> StudyConfig:
        """Command-line options win over the file (a runtime checked against the budgets
        as the file's own is: pydantic's ValidationError where they do not fit)."""
        search = self.search.model_copy(
            update={
                k: v
                for k, v in {
                    "trials": trials,
                    "output_dir": study_dir,
                    "storage": storage,
                    "sampler": sampler,
                }.items()
                if v is not None
            }
        )
        compute = self.compute.model_copy(
            update={
                k: v
                for k, v in {"workers": workers, "ray_address": ray_address}.items()
                if v is not None
            }
        )
        update = {"search": search, "compute": compute}
        if runtime is not None:
            update["budgets"] = Budgets.model_validate(
                self.budgets.model_dump() | {"runtime": runtime}
            )
        if sensitivity is not None:
            update["sensitivity"] = self.sensitivity.model_copy(update={"enabled": sensitivity})
        return self.model_copy(update=update)


def load_config(path: str | Path) -> StudyConfig:
    """Read and validate a study config; relative paths in it are relative to its folder."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} {file_problem(path)}.")
    try:
        text = path.read_text()
        _check_bounded(text, path)
        raw = yaml.safe_load(text)
    except (UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"config file {path} is not a text file: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise UserError(f"{path} is not valid YAML{where}: {problem}.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of fields (name, model, task, space, ...).")
    try:
        config = StudyConfig.model_validate({**raw, "source": path.resolve()})
    except ValidationError as exc:
        raise UserError(f"{path} is not a valid study config: {_explain(exc)}") from None
    folder = config.folder
    search = config.search
    return config.model_copy(
        update={
            "space": folder / config.space,
            "model": config.model.model_copy(
                update={"checkpoint": folder / config.model.checkpoint}
            )
            if config.model.checkpoint
            else config.model,
            "search": search.model_copy(
                update={
                    "output_dir": folder / search.output_dir if search.output_dir else None,
                    "storage": _relative_to(folder, search.storage),
                }
            ),
        }
    )


def file_problem(path: Path) -> str:
    """Why ``path`` is not a file to read: it is not there, or it is something else (a
    folder, a FIFO, /dev/zero: reading one would block or never end)."""
    return "is not a regular file" if path.exists() else "does not exist"


def check_storage_writable(config: StudyConfig) -> None:
    """Refuse a local storage (journal or SQLite file) that a search could not write, found
    without writing anything: the file, if there, must be a writable regular file, and its
    folder (or the nearest one there: the rest is made) writable, as SQLite and the journal's
    lock put files beside it."""
    path = config.storage_file
    if path is None:
        return  # a database server: only connecting could tell
    field = "search.storage" if config.search.storage else "search.output_dir"
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if path.exists() and not path.is_file():
        problem = f"{path} {file_problem(path)}"
    elif path.exists() and not os.access(path, os.W_OK):
        problem = f"{path} is not writable"
    elif not folder.is_dir():
        problem = f"{folder} is not a folder"
    elif not os.access(folder, os.W_OK | os.X_OK):
        problem = f"the folder {folder} is not writable"
    else:
        return
    raise UserError(f"{field}: the study cannot be written to {path}: {problem}.")


def _relative_to(folder: Path, storage: str | None) -> str | None:
    """A journal file path in the config is relative to the config's folder; URLs are kept."""
    if storage is None or "://" in storage:
        return storage
    return str(folder / storage)


MAX_CONFIG_BYTES = 1 << 20
MAX_NODES = 100_000  # values once YAML aliases are expanded
MAX_DEPTH = 64


def _check_bounded(text: str, path: Path) -> None:
    """What a config can cost is bounded before it is built: its size, the values its YAML
    aliases expand to (a 'billion laughs' turns ten lines into billions of values) and its
    nesting (deep nesting overflows the parser's recursion)."""
    if len(text) > MAX_CONFIG_BYTES:
        raise UserError(
            f"config file {path} is {len(text):,} characters; a config is at most 1 MB."
        )
    sizes: dict[str, int] = {}  # anchor -> values it expands to
    open_: list[tuple[str | None, int]] = [(None, 0)]  # collections being read: anchor, values
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                open_.append((event.anchor, 1))
            elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
                size = sizes.get(event.anchor, 1) if isinstance(event, yaml.AliasEvent) else 1
                if isinstance(event, yaml.ScalarEvent) and event.anchor:
                    sizes[event.anchor] = 1
                open_[-1] = (open_[-1][0], open_[-1][1] + size)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                anchor, size = open_.pop()
                if anchor:
                    sizes[anchor] = size
                open_[-1] = (open_[-1][0], open_[-1][1] + size)
            if len(open_) - 1 > MAX_DEPTH or open_[-1][1] > MAX_NODES:
                what = (
                    f"nesting deeper than {MAX_DEPTH} levels"
                    if len(open_) - 1 > MAX_DEPTH
                    else f"more than {MAX_NODES:,} values once its aliases are expanded"
                )
                raise UserError(f"config file {path} has {what}; a study config is far smaller.")
    except yaml.YAMLError:
        return  # reported with its line by the loader


def _excerpt(value: object, limit: int = 80) -> str:
    """A short quote of a wrong value: a message must not grow with the input."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


MAX_PROBLEMS = 8  # listed in one message; the rest are counted


def _explain(exc: ValidationError) -> str:
    parts = []
    errors = exc.errors()
    for error in errors[:MAX_PROBLEMS]:
        if not error["loc"] and error["type"] == "value_error":  # names its fields itself
            parts.append(error["msg"].removeprefix("Value error, "))
            continue
        field = ".".join(_short(str(p)) for p in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown field (check its spelling; docs/config.md lists the fields)"
        elif error["type"] == "missing":
            message = "required field is missing"
        elif "input" in error and not isinstance(error["input"], dict):
            message += f" (got {_excerpt(error['input'])})"
        parts.append(f"field '{field}': {message}")
    if len(errors) > MAX_PROBLEMS:
        parts.append(f"and {len(errors) - MAX_PROBLEMS} more problem(s)")
    return "; ".join(parts) + "."


def _short(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else f"{name[:limit]}..."


_URL_PASSWORD = re.compile(r"(://[^/@:]*:)[^/@]*(@)")
_QUERY_SECRET = re.compile(r"([?&][^=&]*(?:pass|secret|token|key)[^=&]*=)[^&]*", re.IGNORECASE)


def masked(text: str) -> str:
    """``text`` with a URL's password and secret-looking query values replaced by ``***``:
    storage URLs are shown in terminals, on the dashboard and in reports that get shared."""
    return _QUERY_SECRET.sub(r"\1***", _URL_PASSWORD.sub(r"\1***\2", text))
