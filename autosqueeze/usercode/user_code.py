"""Calling the user's code ("module:callable" references) with errors that name the field."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from autosqueeze.common.errors import UserError
from autosqueeze.common.time_limit import time_limit

if TYPE_CHECKING:
    from autosqueeze.settings.config import StudyConfig

IMPORT_TIME_LIMIT_S = 300.0
"""How long importing a config's module may take (AUTOSQUEEZE_IMPORT_TIMEOUT overrides): an
import that builds a model or waits on a network that is not there should fail, named."""


class _TimeLimit(BaseException):  # not an Exception: user code's `except Exception` passes it
    pass


def _import_time_limit() -> float:
    text = os.environ.get("AUTOSQUEEZE_IMPORT_TIMEOUT", "")
    try:
        return max(float(text), 0.1) if text else IMPORT_TIME_LIMIT_S
    except ValueError:
        raise UserError(
            f"AUTOSQUEEZE_IMPORT_TIMEOUT: expected seconds, got {text[:40]!r}"
        ) from None


def load_callable(ref: str, *, field: str, search_dir: Path | None = None) -> Callable[..., Any]:
    """Import ``"package.module:attr"``, looking in ``search_dir`` (the config's folder) first."""
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{field}: expected 'module:callable', got {ref!r}.")
    added = search_dir is not None and str(search_dir) not in sys.path
    if added:
        sys.path.insert(0, str(search_dir))
    limit = _import_time_limit()
    try:
        with time_limit(limit, _TimeLimit):
            module = importlib.import_module(module_name)
    except _TimeLimit:
        raise _too_slow(field, module_name, limit) from None
    except KeyboardInterrupt:
        raise UserError(f"{field}: importing {module_name!r} was interrupted") from None
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            where = f"the config's folder {search_dir} or " if search_dir else ""
            raise UserError(
                f"{field}: cannot import module {module_name!r}; it is not in {where}PYTHONPATH."
            ) from None
        raise UserError(f"{field}: importing {module_name!r} failed: {describe(exc)}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module raised while importing
        raise UserError(f"{field}: importing {module_name!r} failed: {describe(exc)}") from None
    except SystemExit as exc:
        raise UserError(
            f"{field}: importing {module_name!r} called sys.exit({exc.code!r})"
        ) from None
    finally:
        if added:
            sys.path.remove(str(search_dir))
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"{field}: module {module_name!r} has no attribute {attr!r}.")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{field}: {ref!r} is not callable.")
    return target


def _too_slow(field: str, module_name: str, limit: float) -> UserError:
    return UserError(
        f"{field}: importing {module_name!r} took more than {limit:g} s "
        "(AUTOSQUEEZE_IMPORT_TIMEOUT); does the module do slow work when imported?"
    )


def _user_refs(config: StudyConfig) -> dict[str, str]:
    """Field -> "module:callable" for every reference to user code in the task's fields (a
    built-in metric is a bare name)."""
    refs = {
        "model.factory": config.model.factory,
        **{f"model.candidates.{n}": ref for n, ref in config.model.candidates.items()},
        "model.example_input": config.model.example_input,
        "task.data": config.task.data,
        "task.metric": config.task.metric,
        "task.calibration": config.task.calibration,
    }
    return {field: ref for field, ref in refs.items() if ref and ":" in ref}


def import_user_modules(config: StudyConfig) -> None:
    """Import every module the config names (model, its candidates, data, metric,
    calibration), as the driver did when it loaded the task: what they register on import
    (a kernel, say: docs/extending.md) is then known in this process too. An evaluator gets
    the model and data pickled, which imports only the modules their classes live in."""
    for field, ref in _user_refs(config).items():
        load_callable(ref, field=field, search_dir=config.folder)


CHILD_START_S = 60.0
"""Time the child that tries the imports may take beyond their own limits: to start Python,
and to end."""

# Run by ``python -c``: it imports nothing of autosqueeze's (whose package imports torch).
# Before each import it writes the import's index on its stdout; the modules' own output goes
# to stderr. It ends with "done" whether an import raised or not (the import in the driver
# then says what was raised), and with os._exit: a thread a module started cannot hold it.
_IMPORT_CHILD = """\
import importlib, json, os, signal, sys
modules, path, limit = json.loads(sys.argv[1])
sys.path[:0] = path
report = os.dup(1)
os.dup2(2, 1)
for i, module in enumerate(modules):
    os.write(report, b"%d\\n" % i)
    signal.setitimer(signal.ITIMER_REAL, limit)  # SIGALRM's default action ends the process
    try:
        importlib.import_module(module)
    except BaseException:
        break
    signal.setitimer(signal.ITIMER_REAL, 0)
os.write(report, b"done\\n")
os._exit(0)
"""


def check_imports(config: StudyConfig) -> None:
    """Import the modules the config names in a child Python first: one that ends the process
    while it is imported (``os._exit``, a signal, a crash) or hangs past the import time
    limit is then named in a UserError, where in this process it would end the command, or
    end it with status 0 and no report (``validate`` would look passed). Autosqueeze's own
    modules are not user code, and are not tried."""
    refs = dict(_user_refs(config))
    if ":" in config.search.sampler:
        refs["search.sampler"] = config.search.sampler
    first: dict[str, str] = {}  # module -> the first field naming it
    for field, ref in refs.items():
        if not ref.startswith("autosqueeze."):
            first.setdefault(ref.partition(":")[0], field)
    tried = [(field, module) for module, field in first.items()]
    if not tried:
        return
    limit = _import_time_limit()
    args = json.dumps([[module for _, module in tried], [str(config.folder), *sys.path], limit])
    try:
        done = subprocess.run(
            [sys.executable, "-c", _IMPORT_CHILD, args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=limit * len(tried) + CHILD_START_S,
        )
        out, err, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = exc.stdout or b"", exc.stderr or b"", None
    steps = out.split()
    if steps[-1:] == [b"done"]:
        return
    said = next((line.strip() for line in reversed(err.splitlines()) if line.strip()), b"")
    last = f" (its last output: {said.decode(errors='replace')[:200]!r})" if said else ""
    if not steps or not steps[-1].isdigit():
        raise UserError(
            f"a new Python process ({sys.executable}) could not try importing the config's "
            f"modules: {_ending(code)}{last}"
        )
    field, module_name = tried[int(steps[-1])]
    if code is None or code == -signal.SIGALRM:
        raise _too_slow(field, module_name, limit)
    raise UserError(
        f"{field}: importing {module_name!r} ended the process ({_ending(code)}) before the "
        f"import finished{last}"
    )


def _ending(code: int | None) -> str:
    """How a process ended, from its return code: ``exit status 0``, ``killed by SIGKILL``."""
    if code is None:
        return "it did not end, and was killed"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def call_user(fn: Callable[..., Any], *args: Any, field: str, ref: str) -> Any:
    """Call user code; anything it raises becomes a UserError naming the field and the line,
    and so does a call of ``os._exit`` in this process, which would otherwise end the
    command at once, with whatever status it gives (0: ``validate`` would look passed)."""
    real_exit, pid = os._exit, os.getpid()

    def refused_exit(status: int) -> NoReturn:
        if os.getpid() != pid:  # a forked child (a DataLoader's worker) ends as it means to
            real_exit(status)
        raise _ProcessExit(status)

    os._exit = refused_exit
    try:
        return fn(*args)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code raised
        raise UserError(f"{field}: {ref!r} raised {describe(exc)}") from None
    except SystemExit as exc:
        raise UserError(f"{field}: {ref!r} called sys.exit({exc.code!r})") from None
    except _ProcessExit as exc:
        raise UserError(f"{field}: {ref!r} called os._exit({exc.status})") from None
    finally:
        os._exit = real_exit


class _ProcessExit(BaseException):
    """``os._exit`` called by user code (a BaseException: its own ``except Exception``
    does not swallow it)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def describe(exc: BaseException) -> str:
    """``ValueError: message (at file.py:12)``: the innermost frame, no traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"
