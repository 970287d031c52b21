"""Trials on real Ray: a local pool, a two-node cluster, and evaluators that crash or hang."""

from __future__ import annotations

import csv
import json
import re

import pytest
import yaml
from conftest import study_config, write_yaml

from autosqueeze.cli import main
from autosqueeze.settings.config import load_config
from autosqueeze.studies.study import open_study

pytestmark = pytest.mark.slow  # Ray clusters started and stopped: python -m pytest -m slow

FAULTY_METRIC = """
import math, os, signal, time
from autosqueeze.usercode.metrics import accuracy

def metric(model, data, device):
    zeros = float((model.classifier[1].weight == 0).float().mean())
    if abs(zeros - 0.3) < 0.01:
        os.kill(os.getpid(), signal.SIGKILL)  # the evaluator process dies (os._exit is refused)
    if abs(zeros - 0.6) < 0.01:
        time.sleep(600)         # hangs past search.trial_timeout_s
    if abs(zeros - 0.9) < 0.01:
        return math.nan
    return accuracy(model, data, device)
"""


def trials_of(path):
    return open_study(load_config(path), create=False).trials


def node_of(trial) -> str:
    return re.search(r"node (\w+)", trial.user_attrs["worker"]).group(1)


def test_two_local_ray_workers_give_the_same_result_shape(tmp_path, capsys):
    path = write_yaml(
        tmp_path / "s.yaml",
        study_config(
            tmp_path,
            compute={"workers": 2},
            search={"trials": 10, "output_dir": str(tmp_path / "r")},
        ),
    )
    assert main(["search", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "Smallest model within" in out
    trials = trials_of(path)
    assert len(trials) == 10 and all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both evaluators worked
    rows = list(csv.DictReader((tmp_path / "r" / "front.csv").open()))
    assert rows and {"trial", "metric", "size_bytes", "latency_ms", "feasible", "artifact"} <= set(
        rows[0]
    )


def test_evaluators_are_placed_on_both_nodes_of_a_cluster(tmp_path, capsys):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        path = write_yaml(
            tmp_path / "s.yaml",
            study_config(
                tmp_path,
                compute={"workers": 2, "ray_address": cluster.address},
                search={"trials": 8, "output_dir": str(tmp_path / "r")},
            ),
        )
        assert main(["search", str(path), "--no-progress"]) == 0
    finally:
        cluster.shutdown()
    trials = trials_of(path)
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    assert len({node_of(t) for t in trials}) == 2
    capsys.readouterr()


def test_a_crash_a_hang_and_a_nan_fail_only_their_trials(tmp_path, capsys):
    (tmp_path / "faulty_metric.py").write_text(FAULTY_METRIC)
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {
                        "types": ["Linear"],
                        "names": ["classifier.1"],
                        "knobs": {"prune": [0.0, 0.3, 0.6, 0.9]},
                    }
                ]
            }
        )
    )
    config_path = write_yaml(
        tmp_path / "s.yaml",
        study_config(
            tmp_path,
            space=str(space),
            task={"metric": "faulty_metric:metric"},
            compute={"workers": 2},
            budgets={"max_size_mb": None},
            # 40 s: 100x what a healthy trial takes here, so a busy machine does not time it out
            search={"trials": 4, "trial_timeout_s": 40, "output_dir": str(tmp_path / "r")},
        ),
    )
    # the sensitivity pass meets them first: each probe fails alone, with its reason
    assert main(["sensitivity", str(config_path), "--json", "--no-progress"]) == 0
    rows = {r["value"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert "evaluator process died" in rows[0.3]["error"]
    assert "timed out after 40 s" in rows[0.6]["error"]
    assert "metric is nan" in rows[0.9]["error"]
    # trials: the pass would leave those values out of the space, so without it
    study = open_study(load_config(config_path), create=True)
    for prune in (0.3, 0.6, 0.9):  # then the "original" baseline, prune 0.0
        study.enqueue_trial({"classifier.1.prune": prune})
    assert main(["search", str(config_path), "--no-progress", "--no-sensitivity"]) == 0
    trials = {t.params["classifier.1.prune"]: t for t in trials_of(config_path)[:4]}
    reasons = {p: t.user_attrs.get("fail_reason", "") for p, t in trials.items()}
    assert trials[0.3].state.name == "FAIL" and "evaluator process died" in reasons[0.3]
    assert re.search(r"pid \d+; Worker unexpectedly exits", reasons[0.3])
    assert trials[0.6].state.name == "FAIL" and "timed out after 40 s" in reasons[0.6]
    assert trials[0.9].state.name == "FAIL" and "metric is nan" in reasons[0.9]
    assert trials[0.0].state.name in ("COMPLETE", "PRUNED")
    every = trials_of(config_path)
    assert len(every) == 4 and every[3].user_attrs["baseline"] == "original"
    capsys.readouterr()


def test_ray_that_cannot_be_reached_is_a_user_error(make_config, capsys):
    code = main(
        [
            "search",
            str(make_config()),
            "--workers",
            "1",
            "--ray-address",
            "127.0.0.1:1",
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "compute.ray_address: cannot join the Ray cluster" in err


@pytest.mark.parametrize("workers", [64])
def test_more_workers_than_cpus_is_a_user_error(make_config, capsys, workers):
    code = main(["search", str(make_config()), "--workers", str(workers), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"compute.workers: {workers} workers need {workers} CPUs" in err
