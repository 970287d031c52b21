"""Text tables the CLI prints: the front, the one-line summary of a search, the
sensitivity table, and what the space offers each layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import SupportsInt, cast

from autosqueeze.results.front import Front
from autosqueeze.searching.sensitivity import SensitivityTable
from autosqueeze.searchspace.space import LayerCoverage, SearchSpace
from autosqueeze.settings.objectives import extra_objectives

DEFAULT_DROP = 0.01


def table(rows: Sequence[Mapping[str, object]], columns: list[str], *, right: set[str]) -> str:
    """A plain aligned table; the ``right`` columns are right-aligned."""
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(
            v.rjust(w) if c in right else v.ljust(w) for v, w, c in zip(values, widths, columns)
        ).rstrip()

    return "\n".join([line(columns)] + [line(r) for r in cells])


def front_table(front: Front, metric_name: str) -> str:
    if not front.members:
        return "The front is empty: no trial met every budget yet."
    rows = []
    shown = [front.row(member) for member in front.members]
    shown += [front.baseline_row(name) for name in front.one_call]  # last, for comparison
    for row in shown:
        rows.append(
            {
                "trial": row["trial"],
                "baseline": row["baseline"],
                "model": row["model"],
                metric_name: f"{row['metric']:.4f}",
                "drop": f"{row['metric_drop']:+.4f}" if row["metric_drop"] != "" else "",
                "size_kB": f"{int(cast(SupportsInt, row['size_bytes'])) / 1e3:,.1f}",
                "smaller": f"{row['compression']:.1f}x" if row["compression"] != "" else "",
                "latency_ms": f"{row['latency_ms']:.3f}",
                "speedup": f"{row['speedup']:.2f}x" if row["speedup"] != "" else "",
                "memory_MB": f"{row['memory_mb']:.2f}" if row["memory_mb"] != "" else "",
                **{o.name: f"{row[o.name]:.4g}" for o in extra_objectives() if row[o.name] != ""},
            }
        )
    for column, unused in (
        ("model", all(row["model"] == "original" for row in rows)),  # a study without students
        ("memory_MB", all(row["memory_MB"] == "" for row in rows)),  # not measured (ORT)
    ):
        if unused:
            for row in rows:
                del row[column]
    return table(rows, list(rows[0]), right=set(rows[0]) - {"baseline", "model"})


def summary(front: Front, metric_name: str, max_drop: float | None, runtime: str = "torch") -> str:
    """The smallest front model within the metric budget, against the uncompressed one (in
    ONNX Runtime, as ONNX files: what ``budgets.runtime`` measured)."""
    ref = front.reference
    if ref is None:
        return "No reference measurement yet."
    drop = DEFAULT_DROP if max_drop is None else max_drop
    within = [m for m in front.members if ref.metric - m.measurements.metric <= drop + 1e-12]  # type: ignore[union-attr]
    if not within:
        return f"No front model is within {drop:g} {metric_name} of the original."
    best = min(within, key=lambda m: m.measurements.size_bytes)  # type: ignore[union-attr]
    got = best.measurements
    assert got is not None
    return (
        f"Smallest model within {drop:g} {metric_name} of the original: trial {best.number}, "
        f"{metric_name} {got.metric:.4f} (original {ref.metric:.4f}), "
        f"{got.size_bytes:,} bytes on disk = {ref.size_bytes / got.size_bytes:.1f}x smaller "
        f"than the fp32 {'artifact' if runtime == 'torch' else 'ONNX file'} "
        f"({ref.size_bytes:,} bytes), {got.latency_ms:.3f} ms vs {ref.latency_ms:.3f} ms at "
        f"the budget's batch size{'' if runtime == 'torch' else ' in ONNX Runtime'}."
        + "".join(_against(front, name) for name in front.one_call)
    )


def _against(front: Front, name: str) -> str:
    """A sentence on whether a front model beats ONNX Runtime's one-call quantizer ``name``
    on every objective at once, and by how much it is then faster."""
    baseline = front.one_call[name]
    best = front.dominating(baseline)
    if best is None:
        return f" No front model is at least as good as ONNX Runtime's {name} on every objective."
    got = best.measurements
    assert got is not None
    faster = baseline.latency_ms / got.latency_ms if got.latency_ms and baseline.latency_ms else 0
    return (
        f" Trial {best.number} is at least as good as ONNX Runtime's {name} on every objective "
        f"({baseline.size_bytes / got.size_bytes:.2f}x smaller, {faster:.2f}x as fast)."
    )


def sensitivity_text(table_: SensitivityTable, space: SearchSpace, metric_name: str) -> str:
    """The sensitivity table, one line per layer (or group) and knob: each value with the
    metric it lost alone, its output distortion and, where timed, its layers' time as a
    multiple of the original's."""
    head = (
        f"{metric_name} on the first {table_.samples} samples: {table_.base:.6g} "
        f"(probes took {table_.seconds:.0f} s). Each value: {metric_name} lost / distortion"
        " [/ x its layers' time, where it changes how they run]; skipped: not probed, a"
        " weaker value of the knob already broke the layer."
        if table_.base is not None
        else "The model could not be judged on its first samples."
    )
    if table_.by == "layer":
        head += (
            f"\nBy layer ({table_.why_by}): a value marked ~ is predicted from its layers' own "
            f"error, scaled by {len(table_.checks)} whole-model checks; the rest are measured."
        )
    rows: dict[tuple[str, str], list[str]] = {}
    for row in table_.rows(space):
        if row["skipped"]:
            cell = "skipped"
        elif row["drop"] is None:
            cell = "failed"
        else:
            cell = f"{row['drop']:+.4f}/{_short(row['distortion'])}"
            cell = f"~{cell}" if row["predicted"] else cell
        if row["speed"] is not None:
            cell += f"/x{row['speed']:.2f}"
        rows.setdefault((row["group"], row["knob"]), []).append(f"{row['value']}:{cell}")
    lines = [
        {"layer": group, "knob": knob, "values": "  ".join(cells)}
        for (group, knob), cells in rows.items()
    ]
    return head + "\n" + table(lines, ["layer", "knob", "values"], right=set())


def _short(value: float | None) -> str:
    return "-" if value is None else f"{value:.1e}"


def coverage_table(rows: list[LayerCoverage]) -> str:
    """``validate``'s per-layer table: every module with parameters, its knobs or why none."""
    return table(
        [
            {
                "layer": r.name,
                "type": r.kind,
                "parameters": f"{r.parameters:,}",
                "knobs": ", ".join(r.knobs) or "-",
                "why not more": r.why,
            }
            for r in rows
        ],
        ["layer", "type", "parameters", "knobs", "why not more"],
        right={"parameters"},
    )
