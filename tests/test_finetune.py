"""Distillation with each weight on its stored grid: the ``finetune`` command on a front
model, and the search stage (``recovery.on_grid``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import study_config, write_yaml

from autosqueeze.artifacts.artifact import artifact_bytes, load_artifact, stored_integers
from autosqueeze.cli import main
from autosqueeze.compression.recovery import Recovery
from autosqueeze.compression.techniques import Target, compress
from autosqueeze.examples import digits
from autosqueeze.plans.plan import LayerPlan, Plan


def _accuracy(model: torch.nn.Module) -> float:
    data = digits.loaders()
    with torch.no_grad():
        right = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    return right / sum(len(y) for _, y in data)


@pytest.mark.parametrize(
    "knobs",
    [
        {"bits": 3, "prune": 0.7},
        {"cluster": 3, "prune": 0.8},
        {"cluster": 2, "prune": 0.8, "cluster_rows": 4},
    ],
    ids=["int3", "shared", "shared-per-4-rows"],
)
def test_training_on_the_grid_recovers_and_the_file_holds_what_was_trained(knobs):
    model = digits.pretrained_cnn()
    weighted = (torch.nn.Linear, torch.nn.Conv2d)
    layers = [n for n, m in model.named_modules() if isinstance(m, weighted)]
    plan = Plan({name: LayerPlan(**knobs) for name in layers})
    compressed = compress(model, plan, Target())
    zeros = {k: compressed.module.get_parameter(k) == 0 for k in compressed.codecs}
    before = _accuracy(load_artifact(artifact_bytes(compressed), digits.pretrained_cnn(), Target()))

    steps = Recovery(digits.calibration(), steps=150, lr=1e-3).run(
        compressed.module, model, compressed.codecs
    )
    assert steps == 150
    data = artifact_bytes(compressed)
    loaded = load_artifact(data, digits.pretrained_cnn(), Target())
    for key in compressed.codecs:  # the weights trained are the weights stored, bit for bit
        trained = compressed.module.get_parameter(key)
        assert torch.equal(trained, loaded.get_parameter(key)), key
        assert bool((trained[zeros[key]] == 0).all()), key  # pruned stay pruned
        if "cluster" in knobs:  # each group of rows on its own codebook's values
            rows = knobs.get("cluster_rows") or trained.shape[0]
            for group in trained.split(rows):
                assert group.unique().numel() <= 2 ** knobs["cluster"]
    if "bits" in knobs:
        assert set(stored_integers(data)) == set(compressed.codecs)
    after = _accuracy(loaded)
    assert after > before + 0.02, (before, after)


def _harsh_space(folder: Path) -> Path:
    """Every layer at 3 bits with 70% of its weights pruned: a plan that loses accuracy."""
    rule = {"types": ["Linear", "Conv2d"], "names": ["*"], "knobs": {"bits": 3, "prune": 0.7}}
    return write_yaml(folder / "space.yaml", {"rules": [rule]})


def test_finetune_a_trial_from_the_cli(tmp_path, capsys):
    space = _harsh_space(tmp_path)
    config = write_yaml(
        tmp_path / "study.yaml",
        study_config(
            tmp_path,
            space=str(space),
            task={"calibration": "autosqueeze.examples.digits:calibration"},
            budgets={"max_metric_drop": 0.5},
            search={"trials": 3},
        ),
    )
    assert main(["search", str(config), "--no-progress"]) == 0
    capsys.readouterr()
    tuned = tmp_path / "tuned.safetensors"
    finetune = ["finetune", str(config), "--trial", "1", "--steps", "150", "-o", str(tuned)]
    assert main([*finetune, "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["steps"] == 150 and got["after"]["metric"] > got["before"]["metric"] + 0.02, got
    assert got["after"]["size_bytes"] == tuned.stat().st_size

    assert main(["evaluate", str(config), "--artifact", str(tuned), "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["metric"] == got["after"]["metric"]  # what it printed comes from the file

    assert main([*finetune[:-2], "-o", str(tmp_path / "no-such-folder" / "m.safetensors")]) == 2
    assert "-o/--output" in capsys.readouterr().err
    assert main(["finetune", str(config), "--trial", "99", "-o", str(tuned)]) == 2
    assert "no trial 99" in capsys.readouterr().err
    bare = write_yaml(
        tmp_path / "bare.yaml", study_config(tmp_path, space=str(space), search={"trials": 3})
    )
    assert main(["finetune", str(bare), "--trial", "1", "-o", str(tuned)]) == 2
    assert "task.calibration" in capsys.readouterr().err


def test_a_search_can_train_every_plan_on_its_grid(tmp_path, capsys):
    """``recovery.on_grid``: the trial's artifact is the distilled one, and it reproduces."""
    space = _harsh_space(tmp_path)
    runs = {}
    for on_grid in (False, True):
        folder = tmp_path / str(on_grid)
        folder.mkdir()
        config = write_yaml(
            folder / "study.yaml",
            study_config(
                folder,
                space=str(space),
                task={"calibration": "autosqueeze.examples.digits:calibration"},
                recovery={"on_grid": on_grid, "steps": 150, "min_gain": 0.0},
                budgets={"max_metric_drop": 0.5},
                search={"trials": 3},
                sensitivity={"enabled": False},
            ),
        )
        assert main(["search", str(config), "--no-progress", "--json"]) == 0
        capsys.readouterr()
        artifact = folder / "trial-1.safetensors"
        assert main(["export", str(config), "--trial", "1", "-o", str(artifact)]) == 0
        capsys.readouterr()
        assert main(["evaluate", str(config), "--artifact", str(artifact), "--json"]) == 0
        runs[on_grid] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["metric"]
    assert runs[True] > runs[False] + 0.02, runs


def test_labels_add_their_cross_entropy_where_the_outputs_are_class_logits():
    """A student equal to its teacher has nothing to learn from the teacher's outputs: it
    moves only when the calibration's labels (here, not the teacher's answers) are used."""
    from autosqueeze.compression.recovery import Recovery

    teacher = digits.pretrained_cnn().eval()
    images = digits.calibration()[:6]
    wrong = [(teacher(x).argmax(1) + 1) % 10 for x in images]  # every label the teacher's + 1
    alone, labelled = digits.pretrained_cnn().eval(), digits.pretrained_cnn().eval()
    Recovery(images, steps=10, lr=1e-3).run(alone, teacher)
    Recovery(images, steps=10, lr=1e-3, labels=wrong).run(labelled, teacher)
    for (key, a), t in zip(alone.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(a, t), key  # no loss, no step away
    moved = [
        k for k, b in labelled.state_dict().items() if not torch.equal(b, teacher.state_dict()[k])
    ]
    assert moved  # the kept weights are those that matched best on held-out batches: changed
    not_classes = [torch.full((16,), 10)] * 6  # out of range: not class indices, left out
    untouched = digits.pretrained_cnn().eval()
    Recovery(images, steps=10, lr=1e-3, labels=not_classes).run(untouched, teacher)
    assert all(torch.equal(a, b) for a, b in zip(untouched.parameters(), teacher.parameters()))


def test_recovery_labels_need_calibration_pairs(tmp_path, capsys):
    config = study_config(
        tmp_path,
        task={"calibration": "autosqueeze.examples.digits:calibration"},  # images alone
        recovery={"labels": True},
    )
    path = write_yaml(tmp_path / "s.yaml", config)
    assert main(["validate", str(path)]) == 2
    assert "recovery.labels" in capsys.readouterr().err


def test_finetune_from_python_writes_the_trained_file_and_measures_it(tmp_path):
    """``finetune``, the command's procedure, called on a task and a plan: no study needed."""
    from autosqueeze import UserError, finetune, load_config, load_task

    calibration = {"calibration": "autosqueeze.examples.digits:calibration"}
    config = study_config(tmp_path, task=calibration)
    task = load_task(load_config(write_yaml(tmp_path / "study.yaml", config)))
    plan = Plan({"classifier.1": LayerPlan(bits=3, prune=0.7)})
    output = tmp_path / "tuned.safetensors"
    done = finetune(task, plan, output, steps=30, lr=1e-3)
    assert done.steps == 30 and done.lr == 1e-3  # no early stop: min_gain 0
    assert done.after.size_bytes == output.stat().st_size
    loaded = load_artifact(output, digits.pretrained_cnn(), Target())
    assert done.after.metric == task.evaluate_metric(loaded)  # measured from the file

    bare = load_task(load_config(write_yaml(tmp_path / "bare.yaml", study_config(tmp_path))))
    with pytest.raises(UserError, match="task.calibration"):
        finetune(bare, plan, tmp_path / "none.safetensors", steps=30)
    assert not (tmp_path / "none.safetensors").exists()
