"""search.sampler: a built-in by name with options, or the user's "module:callable"; a wrong
name, option or return value is an error naming the field."""

from __future__ import annotations

import optuna
import pytest
from conftest import study_config, write_yaml

from autosqueeze.cli import main
from autosqueeze.common.errors import UserError
from autosqueeze.studies.samplers import create_sampler


def test_built_ins_take_options_and_the_user_may_bring_one(tmp_path):
    tpe = create_sampler("tpe", seed=0, options={"n_startup_trials": 3})
    assert isinstance(tpe, optuna.samplers.TPESampler) and tpe._n_startup_trials == 3
    assert isinstance(create_sampler("gp", seed=0), optuna.samplers.GPSampler)
    (tmp_path / "my_sampler.py").write_text(
        "import optuna\n"
        "def build(seed, population):\n"
        "    return optuna.samplers.NSGAIIISampler(seed=seed, population_size=population)\n"
        "def not_a_sampler(seed):\n    return 42\n"
    )
    mine = create_sampler(
        "my_sampler:build", seed=1, options={"population": 8}, search_dir=tmp_path
    )
    assert isinstance(mine, optuna.samplers.NSGAIIISampler)
    for name, options, said in [
        ("tpe", {"warp_speed": 9}, "search.sampler_options: tpe does not take"),
        ("cmaes-ish", {}, "search.sampler: 'cmaes-ish' is not one of"),
        ("my_sampler:not_a_sampler", {}, "returned int, not an Optuna sampler"),
        ("my_sampler:build", {}, "search.sampler: 'my_sampler:build' raised TypeError"),
    ]:
        with pytest.raises(UserError, match=said):
            create_sampler(name, seed=0, options=options, search_dir=tmp_path)


def test_validate_and_search_use_the_configured_sampler(tmp_path, capsys):
    config = write_yaml(
        tmp_path / "study.yaml",
        study_config(tmp_path, search={"trials": 2, "sampler": "random", "sampler_options": {}}),
    )
    assert main(["validate", str(config)]) == 0
    assert "sampled by RandomSampler" in capsys.readouterr().out
    config = write_yaml(
        tmp_path / "study.yaml",
        study_config(tmp_path, search={"trials": 2, "sampler_options": {"nope": 1}}),
    )
    assert main(["validate", str(config)]) == 2
    assert "search.sampler_options: tpe does not take {'nope': 1}" in capsys.readouterr().err
