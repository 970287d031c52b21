"""``autosqueeze``: search, inspect and export compressed models.

Exit status: 0 on success, 2 on a user error (the message names the field or file),
1 on an internal error (a bug: please report it with the traceback), 130 on Ctrl-C, 143 on
SIGTERM (both stop a search cleanly: running trials failed and re-queued).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosqueeze.common.errors import Terminated, UserError, terminate
from autosqueeze.settings.config import StudyConfig, file_problem, load_config

if TYPE_CHECKING:  # the commands import what they use, so --help starts fast
    from autosqueeze.plans.plan import Plan
    from autosqueeze.problem.task import Task
    from autosqueeze.results.front import Front
    from autosqueeze.studies.records import TrialRecord

EPILOG = """\
examples:
  autosqueeze validate studies/digits-cnn.yaml
  autosqueeze sensitivity studies/digits-cnn.yaml
  autosqueeze search studies/digits-cnn.yaml --trials 40
  autosqueeze front studies/digits-cnn.yaml --json
  autosqueeze export studies/digits-cnn.yaml --trial 17 -o model.safetensors
  autosqueeze export studies/digits-cnn.yaml --trial 17 --format pt2 -o model.pt2
  autosqueeze evaluate studies/digits-cnn.yaml --artifact model.safetensors
  autosqueeze finetune studies/digits-cnn.yaml --trial 17 -o tuned.safetensors
  autosqueeze dashboard studies/digits-cnn.yaml          # http://127.0.0.1:8080/
  autosqueeze report studies/digits-cnn.yaml -o report.html

Every command finds the study from CONFIG (search.output_dir, search.storage);
--study-dir and --storage override them. See docs/config.md for the config fields.
"""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)
    try:
        return int(args.run(args) or 0)
    except UserError as exc:
        print(f"autosqueeze: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("autosqueeze: terminated (SIGTERM).", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("autosqueeze: interrupted.", file=sys.stderr)
        return 130
    except Exception:  # noqa: BLE001 - any bug: one line and a report, not a traceback
        print(
            "autosqueeze: internal error (a bug in autosqueeze, not in your config; "
            "please report it with this traceback):",
            file=sys.stderr,
        )
        traceback.print_exc()
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosqueeze",
        description="Search per-layer compression plans (bit-width or weight sharing, "
        "pruning of weights, channels and heads, low-rank, execution kernel) for a trained "
        "PyTorch model under latency, size and metric budgets; keep the Pareto front of real "
        "compressed artifacts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from autosqueeze import __version__

    parser.add_argument("--version", action="version", version=f"autosqueeze {__version__}")
    sub = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    def command(name: str, run: object, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("config", metavar="CONFIG", type=Path, help="the study's YAML config")
        p.add_argument("--study-dir", type=Path, help="output folder (default: search.output_dir)")
        p.add_argument(
            "--storage",
            help="database URL (sqlite:///f.db, postgresql://...) or journal file path "
            "(default: study.log in the study dir)",
        )
        if name in ("search", "sensitivity", "export", "finetune", "evaluate", "validate"):
            p.add_argument(  # the commands that measure
                "--runtime",
                choices=("auto", "torch", "onnxruntime"),
                help="where the model ships and is measured (default: budgets.runtime, auto: "
                "ONNX Runtime on a CPU where the model exports there, else torch)",
            )
        p.set_defaults(run=run)
        return p

    p = command("search", _search, "Run the search, or resume it; print and write the front.")
    p.add_argument(
        "--trials", type=int, help="total trials the study should hold (default: search.trials)"
    )
    p.add_argument(
        "--workers",
        type=_workers,
        help="Ray evaluators (default: compute.workers, 'auto' = one per CPU or GPU); "
        "0 evaluates in this process",
    )
    p.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    p.add_argument(
        "--sampler",
        help="tpe, nsga2, gp, random or 'module:callable' (default: search.sampler); "
        "its options come from search.sampler_options",
    )
    p.add_argument(
        "--no-sensitivity",
        action="store_true",
        help="no sensitivity pass: the sampler alone over the whole space, after the fixed "
        "uniform warm starts (sensitivity.enabled: false)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object when the search ends (front, summary, notes) instead of "
        "tables; the progress bar and messages go to stderr",
    )
    p = command(
        "sensitivity",
        _sensitivity,
        "Measure (or read back) the study's per-layer sensitivity table and print it: the "
        "metric lost and the output distortion when one knob of one layer takes one value. "
        "The search measures it first and reuses it; this command stores it in the study.",
    )
    p.add_argument("--workers", type=_workers, help="Ray evaluators, as for search; 0: in-process")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = command("front", _front, "Print the Pareto front of a finished or running study.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = command(
        "export",
        _export,
        "Write any trial's compressed model to a file: its artifact (the search's file, "
        "loaded with autosqueeze and the model factory), a torch.export program that plain "
        "PyTorch runs (torch.export.load(path).module()), or an ONNX model that ONNX Runtime "
        "runs (integer weights kept as integers).",
    )
    p.add_argument("--trial", type=int, required=True, help="the trial number")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write it")
    p.add_argument(
        "--format",
        choices=("artifact", "pt2", "onnx"),
        default="artifact",
        help="artifact (default: .safetensors, the bytes the search measured), pt2 (the "
        "deployed model as a torch.export program; weights held as the kernels run them) or "
        "onnx (opset 21: integer weights as int8/int4 with DequantizeLinear, run in fp32; "
        "checked in ONNX Runtime before it is written; needs pip install onnx onnxruntime "
        "onnxscript)",
    )
    p = command(
        "finetune",
        _finetune,
        "Distill one trial's compressed model from the original for longer than the search "
        "could, each weight trained on the grid it is stored on (straight-through: integers "
        "stay integers, shared values are trained, pruned weights stay pruned), on "
        "task.calibration; write the new artifact and print the metric and size before and "
        "after, each measured from its file.",
    )
    p.add_argument("--trial", type=int, required=True, help="the trial number")
    p.add_argument("-o", "--output", type=Path, required=True, help="the artifact to write")
    p.add_argument(
        "--steps",
        type=int,
        default=500,
        help="optimizer steps, one calibration batch each "
        "(default: 500; the weights kept are those that matched the original best on held-out "
        "calibration batches)",
    )
    p.add_argument("--lr", type=float, help="learning rate (default: recovery.lr)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = command(
        "evaluate",
        _evaluate,
        "Measure an artifact or an exported ONNX model: metric, size on disk, latency beside "
        "the original.",
    )
    p.add_argument(
        "--artifact",
        type=Path,
        required=True,
        help="an exported artifact (.safetensors), an ONNX model (.onnx, measured in ONNX "
        "Runtime on the CPU) or a torch.export program (.pt2, only with --trust-pickle)",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="load a .pt2 program: torch.export.load unpickles parts of it, so it runs "
        "whatever code its author put there. Only for programs you made (SECURITY.md)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = command("validate", _validate, "Check a config, its model factory and data; no search.")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p = command("dashboard", _dashboard, "Serve live Pareto plots of the study (read-only).")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: 127.0.0.1); beyond loopback needs --allow-remote",
    )
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="serve on a non-loopback --host; requests must carry the printed URL's token",
    )
    p.add_argument("--port", type=int, default=8080, help="port (default: 8080; 0 = any free)")
    p = command(
        "doctor",
        _doctor,
        "Check the study's journal file for lines Optuna cannot replay (a foreign line, a "
        "record cut by a killed writer) and count its trials; changes nothing unless --repair.",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="move the bad lines out of the journal, keeping the whole original as a backup "
        "beside it (safe while a search runs: it holds the writers' lock)",
    )
    p = command("report", _report, "Write the dashboard's figures as one self-contained HTML.")
    p.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    return parser


def _workers(text: str) -> int | str:
    """``--workers``: a count (0 = in-process) or ``auto``."""
    if text == "auto":
        return text
    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto', got {text!r}") from None
    if workers < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {workers}")
    return workers


def _config(args: argparse.Namespace) -> StudyConfig:
    from pydantic import ValidationError

    config = load_config(args.config)
    trials = getattr(args, "trials", None)
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}.")
    workers = getattr(args, "workers", None)
    try:
        return config.with_overrides(
            trials=trials,
            study_dir=args.study_dir,
            storage=args.storage,
            workers=workers,
            ray_address=getattr(args, "ray_address", None),
            sampler=getattr(args, "sampler", None),
            sensitivity=False if getattr(args, "no_sensitivity", False) else None,
            runtime=getattr(args, "runtime", None),
        )
    except ValidationError as exc:  # --runtime against the file's budgets
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UserError(f"--runtime {args.runtime}: {reason}") from None


def _search(args: argparse.Namespace) -> int:
    from autosqueeze.searching.budgets import explain_empty_front
    from autosqueeze.searching.search import run_search
    from autosqueeze.views.tables import front_table, summary

    config = _config(args)
    # with --json, stdout holds the JSON alone (Ray reports a dead worker on stdout)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        result = run_search(config, progress=not args.no_progress)
    name = config.metric_name
    interrupted = (
        f"Interrupted after {result.ran} trial(s); the study is kept in "
        f"{config.storage_shown}. Run the same command again to resume."
    )
    empty = None if result.front.members else explain_empty_front(config, result.front)
    line = summary(result.front, name, config.budgets.max_metric_drop, result.task.runtime)
    if args.json:
        print(
            json.dumps(
                {
                    "trials_run": result.ran,
                    "interrupted": result.interrupted,
                    "notes": result.notes,
                    "front_csv": str(result.front_csv) if result.front_csv else None,
                    **_front_json(config, result.front),
                    "summary": line,
                },
                indent=2,
            )
        )
    else:
        for note in result.notes:
            print(f"note: {note}")
        print(front_table(result.front, name))
    if result.interrupted:
        print(interrupted, file=sys.stderr if args.json else sys.stdout)
        return 143 if result.terminated else 130
    if empty is not None:
        raise UserError(empty)
    if not args.json:
        print(
            f"\nWrote {result.front_csv} and {len(result.front.members)} model folder(s) "
            f"under {config.output_dir / 'front'}."
        )
        print(line)
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from autosqueeze.searching.search import run_sensitivity
    from autosqueeze.views.tables import sensitivity_text

    config = _config(args)
    # Ray reports a dead worker on stdout; what this command prints there is the table alone
    with contextlib.redirect_stdout(sys.stderr):
        done = run_sensitivity(config, progress=not args.no_progress)
    if args.json:
        print(json.dumps(done.table.report(done.space), indent=2))
    else:
        print(sensitivity_text(done.table, done.space, config.metric_name))
    return 0


def _front(args: argparse.Namespace) -> int:
    from autosqueeze.results.front import compute_front
    from autosqueeze.studies.study import open_study
    from autosqueeze.views.tables import front_table

    config = _config(args)
    front = compute_front(open_study(config, create=False), config.objectives)
    if args.json:
        print(json.dumps(_front_json(config, front), indent=2))
    else:
        print(front_table(front, config.metric_name))
    return 0


def _front_json(config: StudyConfig, front: Front) -> dict[str, Any]:
    """The front as ``front --json`` and ``search --json`` print it: the original's
    measurements, and a row per member with its artifact's path where it was written."""
    folder = config.output_dir / "front"
    rows = []
    for member in front.members:
        artifact = folder / f"trial-{member.number:04d}" / "model.safetensors"
        rows.append(front.row(member, str(artifact) if artifact.exists() else ""))
    return {"reference": front.reference.to_dict() if front.reference else None, "front": rows}


def _study_task(config: StudyConfig) -> Task:
    """The study's task, measuring in the runtime its study was measured in where one exists
    (``runtime: auto`` decides afresh otherwise); the study is only read."""
    from autosqueeze.problem.task import load_task
    from autosqueeze.searching.search import in_study_runtime
    from autosqueeze.views.study_view import open_existing

    task = load_task(config)
    study = open_existing(config)
    return in_study_runtime(study, task) if study is not None else task


def _trial(config: StudyConfig, number: int) -> tuple[TrialRecord, Plan]:
    """The study's trial ``number``, which must hold a plan, and its plan."""
    from autosqueeze.studies.records import records
    from autosqueeze.studies.study import open_study

    study = open_study(config, create=False)
    found = [(r, r.plan) for r in records(study) if r.number == number and r.plan is not None]
    if not found:
        raise UserError(f"--trial: study {config.name!r} has no trial {number} with a plan.")
    return found[0]


def _export(args: argparse.Namespace) -> int:
    from autosqueeze.results.shipping import NotTraced, export_plan

    config = _config(args)
    record, plan = _trial(config, args.trial)
    task = _study_task(config)
    form, output = args.format, args.output
    if form != "artifact" and not output.parent.is_dir():
        raise UserError(f"-o/--output: cannot write {output}: {output.parent} is not a folder")
    if form == "onnx":
        _require("onnx", "onnxruntime", "onnxscript", why="--format onnx")
    try:
        done = export_plan(task, plan, output, form)
    except NotTraced as exc:
        if isinstance(exc.cause, ValueError):
            raise UserError(f"--format {form}: trial {record.number}: {exc.cause}") from None
        said = str(exc.cause).strip()
        first = said.splitlines()[0] if said else ""
        raise UserError(
            f"--format {form}: {exc.tracer} cannot trace trial {record.number}'s model: "
            f"{type(exc.cause).__name__}: {first[:300]}; ship its artifact (--format artifact)"
        ) from None
    except OSError as exc:
        raise UserError(f"-o/--output: cannot write {output}: {exc.strerror or exc}") from None
    if form == "artifact":
        size = done.size_bytes
        print(f"Wrote {output} ({size:,} bytes) from trial {record.number} ({record.state}).")
        if record.measurements and record.measurements.size_bytes != size:
            print(f"warning: the search measured {record.measurements.size_bytes:,} bytes for it.")
        return 0
    how = (
        "torch.export.load(path).module()"
        if form == "pt2"
        else "onnxruntime.InferenceSession(path)"
    )
    print(
        f"Wrote {output} ({done.size_bytes:,} bytes; the artifact: {done.artifact_bytes:,}) "
        f"from trial {record.number} ({record.state}). Load it with {how}."
    )
    for note in done.notes:
        print(f"  {note}")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from autosqueeze.results.finetune import finetune
    from autosqueeze.studies.records import reference
    from autosqueeze.views.study_view import open_existing

    config = _config(args)
    if args.steps < 1:
        raise UserError(f"--steps: {args.steps} is not a number of steps (1 or more).")
    if args.lr is not None and not args.lr > 0:
        raise UserError(f"--lr: {args.lr} is not a learning rate (above 0).")
    record, plan = _trial(config, args.trial)
    task = _study_task(config)
    if not args.output.parent.is_dir():
        raise UserError(
            f"-o/--output: cannot write {args.output}: {args.output.parent} is not a folder"
        )
    done = finetune(task, plan, args.output, args.steps, args.lr)
    study = open_existing(config)
    ref = reference(study) if study else None
    original = ref.metric if ref else None
    if args.json:
        print(
            json.dumps(
                {
                    "trial": record.number,
                    "steps": done.steps,
                    "output": str(args.output),
                    "original_metric": original,
                    "before": done.before.to_dict(),
                    "after": done.after.to_dict(),
                }
            )
        )
        return 0
    name = config.metric_name
    print(
        f"Fine-tuned trial {record.number} for {done.steps} steps (lr {done.lr:g}), each weight "
        f"on the grid it is stored on; both measured from their files:\n"
        f"  {name}: {done.before.metric:.6f} -> {done.after.metric:.6f}"
        + (f"  (the original: {original:.6f})" if original is not None else "")
        + f"\n  size_bytes: {done.before.size_bytes:,} -> {done.after.size_bytes:,}  (layers and "
        "kernels as they were: the speed is the trial's)\n"
        f"Wrote {args.output}. `autosqueeze evaluate CONFIG --artifact {args.output}` "
        "measures it again."
    )
    return 0


def _require(*modules: str, why: str) -> None:
    """A UserError naming what to install when an optional package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{why} needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _evaluate(args: argparse.Namespace) -> int:
    from autosqueeze.measuring.evaluator import evaluate_file
    from autosqueeze.studies.records import reference
    from autosqueeze.views.study_view import open_existing

    config = _config(args)
    if not args.artifact.is_file():
        raise UserError(f"--artifact: {args.artifact} {file_problem(args.artifact)}.")
    task = _study_task(config)
    study = open_existing(config)
    try:
        done = evaluate_file(
            task,
            args.artifact,
            reference=reference(study) if study else None,
            trust_pickle=args.trust_pickle,
        )
    except (ValueError, OSError) as exc:
        raise UserError(f"--artifact: {args.artifact} cannot be loaded: {exc}") from None
    got, at_study = done.measurements, done.study_latency_ms
    stored, packed = done.stored_bytes, done.packed_bytes
    if args.json:
        sizes = {"stored_bytes": stored, "packed_bytes": packed}
        print(json.dumps({**got.to_dict(), "study_latency_ms": at_study, **sizes}))
        return 0
    coding = ""
    if packed is not None:
        saved = 1 - got.size_bytes / packed if packed else 0.0
        deflated = f"deflated from {stored} as safetensors; " if stored != got.size_bytes else ""
        coding = (
            f"  ({deflated}bit-packed without entropy coding: {packed}; coding saves {saved:.1%})"
        )
    print(
        f"{config.metric_name}: {got.metric:.6f}\nsize_bytes: {got.size_bytes}{coding}\n"
        f"latency_ms: {got.latency_ms:.4f}  (batch {config.budgets.batch_size} on "
        f"{config.budgets.device}, median of {config.measure.repeats})\n"
        f"speedup: {got.speedup:.2f}x  (over the original model, timed in interleaved rounds "
        f"beside it: {got.reference_latency_ms:.4f} ms; rounds agree within "
        f"{got.timing_spread:.0%}, {got.timing_attempts} timing(s))\n"
        + (
            f"memory_mb: {got.memory_mb:.3f}  (peak of one forward, weights included)"
            if got.memory_mb is not None
            else "memory_mb: not measured (ONNX Runtime's allocations are its own)"
        )
    )
    if at_study is not None:
        print(
            f"study_latency_ms: {at_study:.4f}  (this speedup applied to the study's robust "
            "latency of the original, as the search stores latency: compare this with the "
            "front's latency_ms)"
        )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from autosqueeze.searching.validation import validate
    from autosqueeze.views.tables import coverage_table

    config = _config(args)
    # with --json, stdout holds the JSON alone (a model factory may print)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        found = validate(config)
    task, space = found.task, found.space
    covered, total = found.parameters_reached, found.parameters_total
    share = found.knapsack_share
    if args.json:
        print(
            json.dumps(
                {
                    "config": str(config.source),
                    "model": {
                        "factory": config.model.factory,
                        "parameters": found.parameters,
                        "candidates": {
                            name: (s.factory, s.parameters, s.layers)
                            for name, s in found.students.items()
                        },
                    },
                    "data": {"source": config.task.data, "batches": len(task.data)},
                    "metric": {"name": config.task.metric, "original": found.metric},
                    "space": {
                        "file": str(config.space),
                        "layers": len(space.layers),
                        "searched_knobs": len(space.distributions),
                    },
                    "smallest_bytes": found.smallest_bytes,
                    "runtime": {"runtime": task.runtime, "why": task.runtime_reason},
                    "study": {
                        "name": config.name,
                        "storage": config.storage_shown,
                        "sampler": found.sampler,
                        "knapsack_share": share,
                        "executor": found.executor,
                    },
                    "coverage": [dataclasses.asdict(r) for r in found.coverage],
                    "parameters_reached": covered,
                    "parameters": total,
                    "warnings": found.warnings,
                },
                indent=2,
                default=str,
            )
        )
        return 0
    print(f"config    {config.source}: ok")
    print(f"model     {config.model.factory}: {found.parameters:,} parameters")
    for name, student in found.students.items():
        print(
            f"candidate {name} ({student.factory}): {student.parameters:,} parameters, "
            f"{student.layers} layers searched"
        )
    print(f"data      {config.task.data}: {len(task.data)} batches")
    print(f"metric    {config.task.metric} of the original model: {found.metric:.6f}")
    print(
        f"space     {config.space.name}: {len(space.layers)} layers, "
        f"{len(space.distributions)} searched knobs"
    )
    print(f"budgets   smallest model the space allows: {found.smallest_bytes:,} bytes")
    print(f"runtime   {task.runtime} ({task.runtime_reason})")
    proposed = f" ({share:.0%} of sampled trials: knapsack proposals)" if share else ""
    print(
        f"study     {config.name} in {config.storage_shown}, sampled by {found.sampler}{proposed}"
    )
    capacity = f" ({found.capacity})" if found.capacity else ""
    print(f"compute   {found.executor} executor, workers: {config.compute.workers}{capacity}")
    print()
    print(coverage_table(found.coverage))
    print(f"\nknobs reach {covered:,} of {total:,} parameters ({covered / max(total, 1):.0%})")
    for warning in found.warnings:
        print(f"warning: {warning}")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from autosqueeze.studies.records import trial_states
    from autosqueeze.studies.storage import check_journal
    from autosqueeze.studies.study import open_study

    config = _config(args)
    checked = check_journal(config, repair=args.repair)
    if checked is not None:
        found = checked.found
        print(f"{found.path}: {found.records} records")
        for skipped in found.skipped:
            kept = " (the whole record after it is kept)" if skipped.recovered else ""
            print(f"  line {skipped.line}: {skipped.why}{kept}: {skipped.excerpt!r}")
        if found.torn_tail:
            print("  last line: cut short (a writer killed mid-append; never acknowledged)")
        if checked.backup is not None:
            print(f"Repaired: moved the bad lines out; the original is kept as {checked.backup}.")
        elif not found.healthy:
            print(
                "Commands skip these lines. To move them out: autosqueeze doctor CONFIG "
                "--repair (the original is kept as a backup)."
            )
    counts = trial_states(open_study(config, create=False))
    shown = ", ".join(f"{n} {state}" for state, n in counts.items() if n)
    print(f"study {config.name!r}: {sum(counts.values())} trials ({shown or 'none yet'})")
    if counts["running"]:
        print("  running trials of a driver that is gone are queued again by the next search.")
    return 0 if checked is None or checked.healthy else 1


def _dashboard(args: argparse.Namespace) -> int:
    from autosqueeze.views.dashboard import serve

    serve(_config(args), args.config, args.host, args.port, remote=args.allow_remote)
    return 0


def _report(args: argparse.Namespace) -> int:
    from autosqueeze.views.dashboard import write_report

    config = _config(args)
    try:
        trials = write_report(config, args.config, args.output)
    except OSError as exc:
        raise UserError(f"-o/--output: cannot write {args.output}: {exc.strerror or exc}") from None
    size = args.output.stat().st_size
    print(f"Wrote {args.output} ({size / 1e6:.1f} MB, {trials} trials, works offline).")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
