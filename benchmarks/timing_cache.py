"""What the layer timing cache saves: the sensitivity pass's timing phase without it, with
an empty cache (layers of one shape timed once) and with the cache a first study left.

    python benchmarks/timing_cache.py [CONFIG ...]

Default configs: a 4-layer BERT from transformers' classes (random weights) and MiniLM.
Each pass runs on the config's executor (Ray, one evaluator per core) into a fresh study in
a temporary folder, with a temporary cache folder. Columns: probes timed, timings taken,
the timing phase's wall seconds (the metric probes not counted), and the latency model's
prediction for the space's int8-dynamic plan (the same plan each way: how far reused
timings move it). Prints one markdown
table (kept in docs/results.md).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = [REPO / "benchmarks" / "studies" / "bert-small.yaml", REPO / "studies" / "minilm.yaml"]
WAYS = ["off", "empty cache", "warm cache"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path, default=DEFAULT)
    args = parser.parse_args()
    rows = []
    for path in args.configs:
        rows += measure(path)
        print(table(rows), flush=True)


def measure(path: Path) -> list[dict]:
    import optuna

    from autosqueeze.problem.task import load_task
    from autosqueeze.searching.executors import create_executor
    from autosqueeze.searching.search import sensitivity_table
    from autosqueeze.searchspace.space import build_space
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.study import open_study

    warnings.filterwarnings("ignore")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.path.insert(0, str(path.parent))
    base = load_config(path)
    task = load_task(base)
    space = build_space(task.model, base.space, task.target)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        os.environ["AUTOSQUEEZE_CACHE_DIR"] = str(Path(folder) / "cache")
        executor = create_executor(base, task)
        try:
            for i, way in enumerate(WAYS):
                config = base.with_overrides(study_dir=Path(folder) / f"study-{i}")
                data = config.model_dump()
                data["sensitivity"]["timing_cache"] = way != "off"
                data["objectives"] = ["metric", "size_bytes", "latency_ms"]
                config = type(config).model_validate({**data, "source": config.source})
                counted = _Counted(executor)
                study = open_study(config, create=True)
                table = sensitivity_table(study, config, space, counted, task=task, progress=False)
                plan = space.plan(space.nearest_params(kernel="int8_dynamic"))
                rows.append(
                    {
                        "model": config.name,
                        "way": way,
                        "probes": len(table.speeds) + len(table.untimed),
                        "timed": counted.timed,
                        "seconds": counted.seconds,
                        "predicted": table.predicted_latency(space, plan),
                    }
                )
        finally:
            executor.close()
    return rows


class _Counted:
    """An executor whose timings are counted and timed (its probes pass through)."""

    def __init__(self, executor):
        self.executor, self.timed, self.seconds = executor, 0, 0.0

    def probes(self, plans):
        return self.executor.probes(plans)

    def timings(self, plans):
        self.timed += len(plans)
        start = time.monotonic()
        yield from self.executor.timings(plans)
        self.seconds += time.monotonic() - start


def table(rows: list[dict]) -> str:
    lines = [
        "| model | timing cache | probes timed | timings taken | timing phase s "
        "| predicted latency, int8 dynamic |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        predicted = "-" if r["predicted"] is None else f"{r['predicted']:.3f}"
        lines.append(
            f"| {r['model']} | {r['way']} | {r['probes']} | {r['timed']} "
            f"| {r['seconds']:.1f} | {predicted} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
