"""Move autosqueeze's flat modules into subpackages by stage, and rewrite every reference.

Run from the repository root, on a clean git tree:

    python tools/restructure.py            # move, rewrite, write the import contract
    python tools/restructure.py --dry-run  # say what it would do, change nothing

It works by module path, not by line, so it can be run again on a tree whose modules gained
or lost functions since it was written: ``MAPPING`` names each old module (or package) and
its new place; the script ``git mv``s the files that exist, gives each stage an
``__init__.py`` (its docstring says what the stage holds), rewrites every ``autosqueeze.x``
(imports, ``"autosqueeze.x:attr"`` strings, monkeypatch targets, logger names, package data)
and every ``autosqueeze/x.py`` path in the code, tests, benchmarks, docs and configs, then
writes the import-linter contract (``CONTRACT``) into pyproject.toml and ``lint-imports`` into
the README's CI lint command, and runs ``ruff check --fix`` and ``ruff format`` (import order
changes with the new names).

It refuses, changing nothing, when a top-level module is in neither ``MAPPING`` nor ``KEEP``
(someone added one: give it a stage), when the tree is half moved, or when git has
uncommitted changes. Run on a tree it has already moved, it says so and exits 0.
Standard library only.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

PACKAGE = "autosqueeze"
LINE_LENGTH = 100  # ruff's line-length in pyproject.toml

# Each stage, bottom to top of the import order, with what it holds and why (its
# __init__.py docstring). A stage imports only the stages below it (CONTRACT).
STAGES: dict[str, str] = {
    "common": (
        "Plain utilities that know nothing of models, plans or studies: the error types, "
        "silencing a library's output, time limits, the one walk over nested batches and "
        "outputs, and content hashes for caches. Every stage may import this one; it "
        "imports none of them."
    ),
    "settings": (
        "The study config as the user writes it (``config.StudyConfig``: pydantic, strict, "
        "paths resolved) and the objectives it may name (``objectives.OBJECTIVES``: each "
        "measured quantity's direction, budget and constraint, written once). Facts, no "
        "computation: the config validates against the objectives, and every later stage "
        "reads both, so they sit low."
    ),
    "usercode": (
        "Calling the user's code: importing ``module:callable`` references with time limits "
        "and clear errors, calling a model on a batch, and the task's metric (built-in or the "
        "user's). Techniques, measurements and the task all call models, so this stage sits "
        "below them all."
    ),
    "plans": (
        "The plan: a plain, serializable value (``Plan``: ``{layer: LayerPlan}``) that says "
        "what one trial does to each layer, and the knob values it is built from. Everything "
        "downstream takes a plan, never an Optuna trial; the plan imports no technique."
    ),
    "compression": (
        "From a plan to a compressed model: the techniques (one module each, in the registry "
        "``techniques.TECHNIQUES``), the codecs that pack weights into bits, the kernels a "
        "loaded layer runs in, recovery (distillation after structural steps) and the size "
        "model (a layer's bytes per plan, without compressing)."
    ),
    "artifacts": (
        "The file formats a compressed model ships as: the artifact (one safetensors file, "
        "the plan in its JSON header, no pickle), and the exported forms (a torch.export "
        "program, an ONNX file with ONNX Runtime's integer kernels and fused operators)."
    ),
    "problem": (
        "The problem a study compresses, resolved from the config: the user's model, data, "
        "example input, metric and calibration (``task.Task``: the only place a factory is "
        "called), the runtime it ships to, and the student models distilled from it."
    ),
    "searchspace": (
        "Which knobs apply to which layers: the space file's rules matched on the model's "
        "anatomy, offered per layer by the techniques, as named Optuna distributions; and "
        "turning a trial's choices (or a uniform setting) into a plan."
    ),
    "measuring": (
        "Measurements of a plan: the evaluator (compress, pack the artifact's bytes, load them "
        "back, measure that), latency beside the original, memory, the metric, the timing "
        "cache, and the device lock that keeps measurements off each other's device."
    ),
    "studies": (
        "The Optuna study: its directions, sampler and constraints, where it is stored (the "
        "journal file, SQLite, PostgreSQL), trials read back as records, and several drivers "
        "sharing one study. Only the driver writes here; workers compute."
    ),
    "results": (
        "What a study leaves: the front (feasible non-dominated trials, front.csv, one folder "
        "per front model, hypervolume), and the fine-tuning of a front model."
    ),
    "searching": (
        "The controller: the ask/tell loop with its baselines, warm starts and resume; the "
        "sensitivity pass and the knapsack proposals built on it; the executors that run "
        "trials in-process or on Ray; the budgets' reachability check and a config's "
        "validation. It drives every stage below and writes the front when it ends."
    ),
    "views": (
        "What people read: tables and summary lines, a study's view for pages, and the live "
        "dashboard. Read-only: nothing below imports a view."
    ),
}

# old module (or package) -> its stage. The module keeps its name inside the stage.
MAPPING: dict[str, str] = {
    # common
    "errors": "common",
    "quiet": "common",
    "time_limit": "common",
    "nested": "common",
    "content_cache": "common",
    # settings
    "config": "settings",
    "objectives": "settings",
    # usercode
    "user_code": "usercode",
    "metrics": "usercode",
    # plans
    "plan": "plans",
    "knobs": "plans",
    "knob_facts": "plans",  # branch house-facts
    # compression
    "techniques": "compression",  # package
    "codecs": "compression",
    "kernels": "compression",
    "recovery": "compression",
    "size_model": "compression",
    # artifacts
    "artifact": "artifacts",
    "export": "artifacts",
    "onnx_forms": "artifacts",
    # problem
    "task": "problem",
    "students": "problem",
    # searchspace
    "space": "searchspace",
    "anatomy": "searchspace",
    # measuring
    "evaluator": "measuring",
    "measure": "measuring",
    "timing_cache": "measuring",
    "device_lock": "measuring",
    # studies
    "study": "studies",
    "storage": "studies",
    "journal": "studies",
    "records": "studies",
    "drivers": "studies",
    "samplers": "studies",
    # results
    "front": "results",
    "finetune": "results",
    "shipping": "results",
    # searching
    "search": "searching",
    "sensitivity": "searching",
    "proposals": "searching",
    "probe": "searching",
    "budgets": "searching",
    "validation": "searching",  # branch thin-cli
    "executors": "searching",  # package
    # views
    "tables": "views",
    "study_view": "views",
    "dashboard": "views",  # package
}

# Top-level entries that stay where they are: the package's public API and entry points, and
# the examples (study configs name ``autosqueeze.examples.x:y`` factories).
KEEP = {"__init__", "__main__", "cli", "examples"}

# Where references are rewritten: these folders (recursively) and files, when present.
REWRITE_DIRS = ["autosqueeze", "tests", "benchmarks", "docs", "studies", "search_spaces", ".ci"]
REWRITE_FILES = [
    "README.md",
    "CONTRIBUTING.md",
    "SECURITY.md",
    "pyproject.toml",
]  # not CHANGELOG: history
TEXT_SUFFIXES = {
    ".py",
    ".md",
    ".yaml",
    ".yml",
    ".toml",
    ".txt",
    ".cfg",
    ".ini",
    ".js",
    ".html",
    ".sh",
    ".json",
    "",
}

CONTRACT = """\
[tool.importlinter]
root_package = "autosqueeze"
# lint-imports (README's CI lint command). Imports inside functions and TYPE_CHECKING blocks
# count: a lazy import is still a dependency. docs/architecture.md draws these layers.

[[tool.importlinter.contracts]]
name = "stages import only the stages below them (data flows one way)"
type = "layers"
containers = ["autosqueeze"]
layers = [
    "__main__",
    "cli | examples",
    "views",
    "searching",
    "results",
    "studies",
    "searchspace | measuring",
    "problem",
    "artifacts",
    "compression",
    "plans | usercode",
    "settings",
    "common",
]
exhaustive = true
ignore_imports = [
    # TEMPORARY, until branch house-facts is merged (its knob_facts: the plan reads each
    # knob's facts there, and no longer imports the techniques); then delete these lines.
    "autosqueeze.plans.plan -> autosqueeze.compression.techniques",
    "autosqueeze.plans.knob_facts -> autosqueeze.compression.techniques.base",
]
unmatched_ignore_imports_alerting = "none"

[[tool.importlinter.contracts]]
name = "no cycles among the modules of a stage, nor among the stages"
type = "acyclic_siblings"
ancestors = ["autosqueeze"]
ignore_imports = [
    # TEMPORARY, as above (house-facts)
    "autosqueeze.plans.plan -> autosqueeze.compression.techniques",
    "autosqueeze.plans.knob_facts -> autosqueeze.compression.techniques.base",
]
unmatched_ignore_imports_alerting = "none"

[[tool.importlinter.contracts]]
name = "a technique is one module, importing only the base and the dependency graph"
type = "independence"
modules = [
    "autosqueeze.compression.techniques.channels",
    "autosqueeze.compression.techniques.cluster",
    "autosqueeze.compression.techniques.factorize",
    "autosqueeze.compression.techniques.heads",
    "autosqueeze.compression.techniques.kernel",
    "autosqueeze.compression.techniques.prune",
    "autosqueeze.compression.techniques.quantize",
    "autosqueeze.compression.techniques.separable",
]
ignore_imports = [
    # TEMPORARY, as above (house-facts)
    "autosqueeze.plans.plan -> autosqueeze.compression.techniques",
]
unmatched_ignore_imports_alerting = "none"

[[tool.importlinter.contracts]]
name = "executors are plug-ins, neither knows the other"
type = "independence"
modules = [
    "autosqueeze.searching.executors.inprocess",
    "autosqueeze.searching.executors.ray",
]
"""


def die(message: str) -> None:
    print(f"restructure: {message}", file=sys.stderr)
    sys.exit(1)


def git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout


def top_level(pkg: Path) -> set[str]:
    """The top-level modules and packages of the package, by name."""
    names = set()
    for entry in pkg.iterdir():
        if entry.name.startswith(".") or entry.name == "__pycache__":
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif entry.is_dir() and (entry / "__init__.py").exists():
            names.add(entry.name)
    return names


def old_path(name: str, pkg: Path) -> Path:
    return pkg / name if (pkg / name).is_dir() else pkg / f"{name}.py"


def text_files(root: Path) -> list[Path]:
    files: list[Path] = []
    tracked = set(git("ls-files", "-co", "--exclude-standard").splitlines())
    for d in REWRITE_DIRS:
        if (root / d).is_dir():
            files += [p for p in (root / d).rglob("*") if p.is_file()]
    files += [root / f for f in REWRITE_FILES if (root / f).is_file()]
    return sorted(
        p
        for p in set(files)
        if p.suffix in TEXT_SUFFIXES
        and str(p.relative_to(root)) in tracked
        and "__pycache__" not in p.parts
    )


def absolutize_relative_imports(path: Path, module: str, is_pkg: bool) -> str | None:
    """``from .x import y`` -> ``from autosqueeze.x import y``, resolved where the file is
    now (before it moves). None when the file has none."""
    text = path.read_text()
    base = module.split(".") if is_pkg else module.split(".")[:-1]

    def resolve(m: re.Match[str]) -> str:
        dots, rest = m.group(2), m.group(3)
        parts = base[: len(base) - (len(dots) - 1)]
        target = ".".join(parts + ([rest] if rest else []))
        return f"{m.group(1)}from {target} import"

    new = re.sub(r"(?m)^(\s*)from (\.+)([\w.]*) import", resolve, text)
    return None if new == text else new


def split_package_imports(text: str, moved: dict[str, str]) -> str:
    """``from autosqueeze import x`` where x is a moved module -> ``from autosqueeze.stage
    import x`` (other names stay in the original statement)."""

    def fix(m: re.Match[str]) -> str:
        indent, body = m.group(1), m.group(2) or m.group(3)
        names = [n.strip() for n in body.replace("\n", " ").split(",") if n.strip()]
        stay, lines = [], []
        for n in names:
            base = n.split(" as ")[0].strip()
            if base in moved:
                lines.append(f"{indent}from {PACKAGE}.{moved[base]} import {n}")
            else:
                stay.append(n)
        if not lines:
            return m.group(0)
        if stay:
            lines.insert(0, f"{indent}from {PACKAGE} import {', '.join(stay)}")
        return "\n".join(lines)

    return re.sub(rf"(?m)^([ \t]*)from {PACKAGE} import (?:\(([^)]*)\)|([^\n(]+))$", fix, text)


def rewrite(text: str, moved: dict[str, str]) -> str:
    """Every dotted ``autosqueeze.old`` and every path ``autosqueeze/old`` -> the new place."""
    text = split_package_imports(text, moved)
    names = "|".join(sorted(moved, key=len, reverse=True))
    dotted = re.compile(rf"(?<![\w.]){PACKAGE}\.({names})(?!\w)")
    text = dotted.sub(lambda m: f"{PACKAGE}.{moved[m.group(1)]}.{m.group(1)}", text)
    path = re.compile(rf"(?<![\w./]){PACKAGE}/({names})(?=\.py\b|/|(?![\w.]))")
    return path.sub(lambda m: f"{PACKAGE}/{moved[m.group(1)]}/{m.group(1)}", text)


def _docstring_lines(tree: ast.AST) -> set[int]:
    """The lines (1-based) that hold a docstring's text."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                lines.update(range(first.lineno, (first.end_lineno or first.lineno) + 1))
    return lines


def _cut(text: str, start: int, limit: int) -> int | None:
    """Where to break ``text`` (a space after ``start``, at or before ``limit``)."""
    cut = text.rfind(" ", start + 1, limit + 1)
    return cut if cut > start else None


def _wrap_once(text: str, limit: int, keep: set[str]) -> str | None:
    """One long line made to fit: a comment or a docstring's line pushes its last words
    down (into the next line of the same paragraph, or a new one); a string literal inside
    brackets is split in two adjacent literals (kept only where the module's AST is
    unchanged). None when no line could be fixed."""
    lines = text.split("\n")
    try:
        tree = ast.parse(text)
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, tokenize.TokenError):
        return None
    docs = _docstring_lines(tree)
    for i, line in enumerate(lines):
        if len(line) <= limit or line in keep or "# noqa" in line:
            continue
        n = i + 1
        comment = next((t for t in tokens if t.type == tokenize.COMMENT and t.start[0] == n), None)
        if comment is not None and comment.start[1] < limit:
            col = comment.start[1]
            cut = _cut(line, col + 2, limit)
            if cut is None:
                continue
            rest = line[cut + 1 :]
            nxt = lines[i + 1] if i + 1 < len(lines) else ""
            lines[i] = line[:cut]
            own = line[:col].strip() == ""
            if own and nxt[:col].strip() == "" and nxt[col:].startswith("# ") and nxt[col + 2 :]:
                lines[i + 1] = nxt[:col] + "# " + rest + " " + nxt[col + 2 :]
            else:
                indent = col if own else len(line) - len(line.lstrip())
                lines.insert(i + 1, " " * indent + "# " + rest)
            return "\n".join(lines)
        if n in docs and n + 1 in docs:
            indent = len(line) - len(line.lstrip())
            cut = _cut(line, indent, limit)
            if cut is None:
                continue
            rest, nxt = line[cut + 1 :], lines[i + 1]
            lines[i] = line[:cut]
            joinable = (
                nxt.strip()
                and len(nxt) - len(nxt.lstrip()) == indent
                and not nxt.strip().startswith(('"""', "- ", "* ", ">>>", "|"))
                and not rest.endswith('"""')
            )
            if joinable:
                lines[i + 1] = " " * indent + rest + " " + nxt.lstrip()
            else:
                lines.insert(i + 1, " " * indent + rest)
            return "\n".join(lines)
        for t in tokens:
            if t.type != tokenize.STRING or t.start[0] != n or t.end[0] != n:
                continue
            quote = t.string.lstrip("rbufRBUF")[:1]
            if t.string.lstrip("rbufRBUF").startswith(quote * 3) or t.start[1] >= limit - 10:
                continue
            prefix = t.string[: len(t.string) - len(t.string.lstrip("rbufRBUF"))]
            cut = _cut(line, t.start[1] + len(prefix) + 1, limit - 1)
            if cut is None or cut >= t.end[1] - 1:
                continue
            indent = len(line) - len(line.lstrip()) + 4
            new = f"{line[: cut + 1]}{quote}\n{' ' * indent}{prefix}{quote}{line[cut + 1 :]}"
            candidate = "\n".join([*lines[:i], new, *lines[i + 1 :]])
            try:
                if ast.dump(ast.parse(candidate)) == ast.dump(tree):
                    return candidate
            except SyntaxError:
                pass
    return None


def fit_lines(path: Path, keep: set[str], limit: int = LINE_LENGTH) -> list[int]:
    """Wrap the lines the rewrite made too long (not those in ``keep``: long before it, which
    ruff allows, such as a URL); the line numbers still too long."""
    text = path.read_text()
    for _ in range(200):
        new = _wrap_once(text, limit, keep)
        if new is None:
            break
        text = new
    path.write_text(text)
    return [
        i + 1
        for i, line in enumerate(text.split("\n"))
        if len(line) > limit and line not in keep and "# noqa" not in line
    ]


def write_contract(pyproject: Path) -> None:
    text = pyproject.read_text()
    # drop any earlier [tool.importlinter] tables (a re-run writes the current one)
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        header = re.match(r"^\[\[?([^\]]+)\]\]?\s*$", line)
        if header:
            skipping = header.group(1).strip().startswith("tool.importlinter")
        if not skipping:
            kept.append(line)
    text = "".join(kept).rstrip("\n") + "\n\n" + CONTRACT
    pyproject.write_text(text)


def add_lint_imports(readme: Path) -> None:
    lines = readme.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() != "<!-- ci:lint -->":
            continue
        j = i + 1
        while j < len(lines) and not lines[j].startswith("```"):
            j += 1
        k = j + 1
        while k < len(lines) and not lines[k].strip():
            k += 1
        if k < len(lines) and "lint-imports" not in lines[k]:
            lines[k] = lines[k].rstrip("\n") + " && lint-imports\n"
        readme.write_text("".join(lines))
        return
    print("restructure: README has no <!-- ci:lint --> block; add lint-imports to CI yourself")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="say what it would do")
    parser.add_argument(
        "--allow-dirty", action="store_true", help="run on a tree with uncommitted changes"
    )
    args = parser.parse_args()

    root = Path.cwd()
    pkg = root / PACKAGE
    if not (pkg / "__init__.py").is_file() or not (root / "pyproject.toml").is_file():
        die(f"run me from the repository root (no {PACKAGE}/__init__.py or pyproject.toml here)")
    unknown = set(MAPPING.values()) - set(STAGES)
    if unknown:
        die(f"MAPPING names stages STAGES lacks: {sorted(unknown)}")
    clash = set(STAGES) & (set(MAPPING) | KEEP)
    if clash:
        die(f"a stage is named like a module, so a rewrite could not be told apart: {clash}")

    present = top_level(pkg)
    moved = {name: MAPPING[name] for name in sorted(present & set(MAPPING))}
    stages_here = present & set(STAGES)
    if not moved and stages_here:
        print(
            "restructure: already applied (no old module left, the stages are here); nothing to do"
        )
        return
    if stages_here:
        die(
            f"half applied: stages {sorted(stages_here)} exist beside old modules "
            f"{sorted(moved)}; reset the tree (git checkout/clean) and run again"
        )
    unmapped = present - set(MAPPING) - KEEP
    if unmapped:
        die(
            "top-level modules in neither MAPPING nor KEEP (give each a stage in "
            f"tools/restructure.py): {sorted(unmapped)}"
        )
    if not args.allow_dirty and git("status", "--porcelain", "--untracked-files=no").strip():
        die("git has uncommitted changes; commit or stash them (or pass --allow-dirty)")
    absent = sorted(set(MAPPING) - present)
    if absent:
        print(f"restructure: not in this tree, skipped: {', '.join(absent)}")

    if args.dry_run:
        for name, stage in moved.items():
            print(f"  {PACKAGE}.{name} -> {PACKAGE}.{stage}.{name}")
        return

    # 1. relative imports -> absolute ones, resolved where each file is now
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(root).with_suffix("")
        is_pkg = rel.name == "__init__"
        module = ".".join(rel.parts[:-1] if is_pkg else rel.parts)
        new = absolutize_relative_imports(path, module, is_pkg)
        if new is not None:
            path.write_text(new)

    # 2. the stages' packages, then the moves
    for stage in sorted(set(moved.values())):
        (pkg / stage).mkdir()
        init = pkg / stage / "__init__.py"
        body = textwrap.fill(STAGES[stage], LINE_LENGTH - 4)
        init.write_text(f'"""{body}\n"""\n')
        git("add", str(init.relative_to(root)))
    for name, stage in moved.items():
        git("mv", str(old_path(name, pkg).relative_to(root)), f"{PACKAGE}/{stage}/")
    for cache in pkg.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)

    # 3. every reference, by module path
    changed, long_lines = 0, []
    for path in text_files(root):
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        new = rewrite(text, moved)
        if new != text:
            path.write_text(new)
            changed += 1
            if path.suffix == ".py":
                keep = {
                    rewrite(line, moved) for line in text.split("\n") if len(line) > LINE_LENGTH
                }
                long_lines += [f"{path.relative_to(root)}:{n}" for n in fit_lines(path, keep)]
    print(
        f"restructure: moved {len(moved)} modules into {len(set(moved.values()))} stages; "
        f"rewrote references in {changed} files"
    )

    if long_lines:  # before ruff format, which wraps long import lines
        print(f"restructure: {len(long_lines)} lines over {LINE_LENGTH} columns left to ruff")

    # 4. the contract, and CI runs it
    write_contract(root / "pyproject.toml")
    add_lint_imports(root / "README.md")

    # 5. import order follows the new names; long import lines wrap
    ruff = shutil.which("ruff")
    if ruff:
        subprocess.run([ruff, "check", "--fix", "--quiet", "."], check=False)
        subprocess.run([ruff, "format", "--quiet", "."], check=False)
    else:
        print("restructure: ruff not found: run `ruff check --fix . && ruff format .` yourself")
    print(
        "restructure: done; now run: ruff check . && ruff format --check . && mypy && "
        "lint-imports && python -m pytest -q"
    )


if __name__ == "__main__":
    main()
