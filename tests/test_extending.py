"""docs/extending.md's worked examples, run: a kernel and a technique registered from a
user's module (not the package) are offered by the space, probed (and the kernel timed) by
Ray evaluators, stored in plans, and rebuilt or deployed when an artifact is loaded."""

from __future__ import annotations

import contextlib
import copy
import shutil
import sys

import pytest
import torch
import yaml
from conftest import DEFAULT_SPACE, REPO, study_config, write_yaml
from torch import nn

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact
from autosqueeze.cli import main
from autosqueeze.compression.kernels import KERNELS, CastLayer
from autosqueeze.compression.techniques import TECHNIQUES, compress
from autosqueeze.plans.plan import LayerPlan, Plan
from autosqueeze.problem.task import load_task
from autosqueeze.settings.config import load_config
from autosqueeze.studies.records import records
from autosqueeze.studies.study import SENSITIVITY, open_study

EXAMPLE = REPO / "docs" / "examples" / "fp16_cpu_kernel.py"
TECHNIQUE_EXAMPLE = REPO / "docs" / "examples" / "weight_sharing.py"


def _searched_with(tmp_path, capsys, example, knob: str, values: list, trials: int):
    """The docs' example file copied beside a config (as a user has it), ``knob`` searched
    over ``values``, a search run with one Ray evaluator (a process that must learn what the
    example registers by importing it); the config, loaded."""
    shutil.copy(example, tmp_path / example.name)
    space = yaml.safe_load(DEFAULT_SPACE.read_text())
    space["rules"][0]["knobs"][knob] = values
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    config_path = write_yaml(
        tmp_path / "study.yaml",
        study_config(
            tmp_path,
            model={"factory": f"{example.stem}:model"},
            space="space.yaml",
            search={"trials": trials, "output_dir": str(tmp_path / "run")},
            compute={"workers": 1},
        ),
    )
    assert main(["search", str(config_path), "--no-progress"]) == 0
    capsys.readouterr()
    return load_config(config_path)


@contextlib.contextmanager
def _as_shipped(registry: dict, module: str):
    """An example registers into ``registry`` in this process too: gone again after."""
    before = dict(registry)
    try:
        yield
    finally:
        registry.clear()
        registry.update(before)
        sys.modules.pop(module, None)


@pytest.fixture
def kernels_as_shipped():
    with _as_shipped(KERNELS, "fp16_cpu_kernel"):
        yield


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_a_kernel_registered_outside_the_package_is_searched_and_deployed(
    tmp_path, capsys, kernels_as_shipped
):
    config = _searched_with(tmp_path, capsys, EXAMPLE, "kernel", ["fp32", "fp16_cpu"], trials=4)
    table = open_study(config, create=False).user_attrs[SENSITIVITY]
    probed = [k for k in table["drops"] if k.endswith('kernel="fp16_cpu"')]
    assert probed and not any("fp16_cpu" in k for k in table["failed"])
    assert [k for k in table["speeds"] if "fp16_cpu" in k]  # timed in the evaluator

    task = load_task(config)  # imports the module: the kernel is registered here too
    assert "fp16_cpu" in KERNELS
    layers = [n for n, m in task.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    plan = Plan.uniform(layers, kernel="fp16_cpu")
    data = artifact_bytes(compress(task.model, plan, task.target))
    loaded = load_artifact(data, copy.deepcopy(task.model), task.target)
    deployed = [loaded.get_submodule(n) for n in plan.layers]
    assert deployed and all(isinstance(m, CastLayer) and m.dtype == torch.float16 for m in deployed)


@pytest.fixture
def techniques_as_shipped():
    with _as_shipped(TECHNIQUES, "weight_sharing"):
        yield


@pytest.mark.slow  # the long tests: python -m pytest -m slow
def test_a_technique_registered_outside_the_package_is_searched_stored_and_loaded(
    tmp_path, capsys, techniques_as_shipped
):
    config = _searched_with(tmp_path, capsys, TECHNIQUE_EXAMPLE, "share", [0, 4, 16], trials=6)
    study = open_study(config, create=False)
    table = study.user_attrs[SENSITIVITY]
    probed = [k for k in table["drops"] if ".share=" in k]
    assert probed and not any(".share=" in k for k in table["failed"])  # in the evaluator
    plans = [r.plan for r in records(study) if r.plan is not None]
    assert plans and all("share" in lp.to_dict() for p in plans for lp in p.layers.values())

    task = load_task(config)  # imports the module: the technique is registered here too
    assert list(TECHNIQUES).index("share") == list(TECHNIQUES).index("bits") - 1
    layers = [n for n, m in task.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    shared = Plan.uniform(layers, bits=8, share=4)
    data = artifact_bytes(compress(task.model, shared, task.target))
    assert len(data) < 0.6 * len(artifact_bytes(compress(task.model, Plan.uniform(layers, bits=8))))
    loaded = load_artifact(data, copy.deepcopy(task.model), task.target)
    weight = loaded.get_submodule(layers[0]).weight
    assert all(len(row.unique()) <= 4 for row in weight)  # four shared values, per scale row
    assert Plan.from_json(shared.to_json()) == shared

    TECHNIQUES.pop("share")  # a reader that never imported the module still reads the plan
    assert Plan.from_json(shared.to_json()) == shared
    with pytest.raises(ValueError, match="no technique has the knob 'share'.*imported"):
        load_artifact(data, copy.deepcopy(task.model), task.target)  # never half-applied
    with pytest.raises(ValueError, match="no technique has the knob 'share'"):
        compress(task.model, shared, task.target)
    with pytest.raises(ValueError, match="unknown knob 'share'"):
        LayerPlan.of(share=4)
