"""Calling the user's code ("module:callable" references) with errors that name the field."""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from autosqueeze.errors import UserError
from autosqueeze.time_limit import time_limit

if TYPE_CHECKING:
    from autosqueeze.config import StudyConfig

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
        raise UserError(
            f"{field}: importing {module_name!r} took more than {limit:g} s "
            "(AUTOSQUEEZE_IMPORT_TIMEOUT); does the module do slow work when imported?"
        ) from None
    except KeyboardInterrupt:
        raise UserError(f"{field}: importing {module_name!r} was interrupted") from None
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            where = f"the config's folder {search_dir} or " if search_dir else ""
            raise UserError(
                f"{field}: cannot import module {module_name!r}; it is not in {where}PYTHONPATH."
            ) from None
        raise UserError(f"{field}: importing {module_name!r} failed: {describe(exc)}") from None
    except Exception as exc:  # the user's module raised while importing
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


def import_user_modules(config: StudyConfig) -> None:
    """Import every module the config names (model, its candidates, data, metric,
    calibration), as the driver did when it loaded the task: what they register on import
    (a kernel, say: docs/extending.md) is then known in this process too. An evaluator gets
    the model and data pickled, which imports only the modules their classes live in."""
    refs = {
        "model.factory": config.model.factory,
        **{f"model.candidates.{n}": ref for n, ref in config.model.candidates.items()},
        "model.example_input": config.model.example_input,
        "task.data": config.task.data,
        "task.metric": config.task.metric,
        "task.calibration": config.task.calibration,
    }
    for field, ref in refs.items():
        if ref and ":" in ref:  # a built-in metric is a bare name
            load_callable(ref, field=field, search_dir=config.folder)


def call_user(fn: Callable[..., Any], *args: Any, field: str, ref: str) -> Any:
    """Call user code; anything it raises becomes a UserError naming the field and the line."""
    try:
        return fn(*args)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{field}: {ref!r} raised {describe(exc)}") from None
    except SystemExit as exc:
        raise UserError(f"{field}: {ref!r} called sys.exit({exc.code!r})") from None


def describe(exc: BaseException) -> str:
    """``ValueError: message (at file.py:12)``: the innermost frame, no traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {message}{where}" if message else f"{type(exc).__name__}{where}"
