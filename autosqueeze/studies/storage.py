"""Where a study lives: a journal file (the default) or a database URL, opened for a
command that writes or one that only reads, checked without opening for ``validate``, and
its journal file checked line by line (and repaired) for ``doctor``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.storages import JournalStorage

from autosqueeze.common.errors import UserError
from autosqueeze.settings.config import StudyConfig, file_problem, masked
from autosqueeze.studies.journal import (
    Diagnosis,
    JournalReader,
    JournalWriter,
    check_is_journal,
    diagnose,
    skipped_warning,
)
from autosqueeze.studies.journal import repair as repair_journal


def open_storage(config: StudyConfig, *, writable: bool = True) -> optuna.storages.BaseStorage:
    """A database URL (``sqlite:///``, ``postgresql://``) or a journal file path.

    The default is Optuna's journal file in the study folder: at 300 trials it costs the
    driver ~18 ms per trial against ~110 ms for SQLite (``benchmarks/scaling.py``). A
    command that only reads (``writable=False``) creates nothing, repairs nothing and never
    opens the file for writing: another user's study, or a file given by mistake, is left
    exactly as it was.
    """
    target = config.storage
    try:
        if "://" in target:
            if target.startswith("sqlite:///"):
                database = Path(target[len("sqlite:///") :])
                if not writable and not database.is_file():
                    raise UserError(_missing(config, database))
                database.parent.mkdir(parents=True, exist_ok=True)
            return optuna.storages.get_storage(target)
        path = Path(target)
        check_is_journal(path)
        if not writable and not path.is_file():
            raise UserError(_missing(config, path))
        backend: JournalReader | JournalWriter
        if writable:
            path.parent.mkdir(parents=True, exist_ok=True)
            backend = JournalWriter(str(path))
            backend.drop_torn_tail()
        else:
            backend = JournalReader(str(path))
        storage = JournalStorage(backend)
        _warn_once(skipped_warning(path, backend.skipped))
        return storage
    except UserError:
        raise
    except ImportError:
        raise UserError(
            f"search.storage: {masked(target)!r} needs a database driver that is not installed; "
            "for PostgreSQL: pip install 'autosqueeze[postgres]'."
        ) from None
    except Exception as exc:  # noqa: BLE001 - the database driver's own errors, named for the user
        raise UserError(
            f"search.storage: cannot open {masked(target)!r}: {type(exc).__name__}: "
            f"{masked(str(exc))}"
        ) from None


_warned: set[str] = set()


def _warn_once(warning: str | None) -> None:
    """A skipped journal line is told once per process, not at every dashboard poll."""
    if warning and warning not in _warned:
        _warned.add(warning)
        print(f"autosqueeze: warning: {warning}", file=sys.stderr)


STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")  # what Optuna's RDB storage supports


def check_storage(config: StudyConfig) -> None:
    """What ``validate`` can say about the storage without connecting or writing: a URL's
    database is known, a journal path is a journal file or not there yet."""
    target = config.storage
    if "://" in target:
        scheme = target.split("://", 1)[0].split("+", 1)[0]
        if scheme not in STORAGE_SCHEMES:
            raise UserError(
                f"search.storage: {scheme!r} is not a database Optuna can use "
                f"({', '.join(STORAGE_SCHEMES)}), nor a journal file path"
            )
        try:
            from sqlalchemy.engine import make_url

            make_url(target).get_dialect()
        except Exception as exc:  # noqa: BLE001 - SQLAlchemy's parse errors, named for the user
            raise UserError(
                f"search.storage: {masked(target)!r} is not a usable database URL: "
                f"{type(exc).__name__}: {masked(str(exc))[:200]}"
            ) from None
        return
    path = Path(target)
    check_is_journal(path)


@dataclass(frozen=True)
class JournalCheck:
    found: Diagnosis  # the journal as it was read, before any repair
    backup: Path | None  # the whole original, kept beside it where a repair moved lines out

    @property
    def healthy(self) -> bool:
        """Nothing left that Optuna skips: nothing found, or moved out."""
        return self.found.healthy or self.backup is not None


def check_journal(config: StudyConfig, *, repair: bool = False) -> JournalCheck | None:
    """Read the study's journal file for lines Optuna cannot replay (a foreign line, a
    record cut by a killed writer), and with ``repair`` move them out (safe while a search
    runs: it holds the writers' lock): ``autosqueeze doctor``'s first half, since commands
    only skip such lines. None where the study lives in a database."""
    if "://" in config.storage:
        return None
    path = Path(config.storage)
    if not path.is_file():
        raise UserError(f"search.storage: {path} {file_problem(path)}.")
    try:
        found, backup = repair_journal(path) if repair else (diagnose(path), None)
    except OSError as exc:
        why = exc.strerror or exc
        raise UserError(f"search.storage: cannot repair {path}: {why}") from None
    return JournalCheck(found, backup)


def _missing(config: StudyConfig, path: Path) -> str:
    return (
        f"no study named {config.name!r}: {path} does not exist; run 'autosqueeze search' "
        "first (or check --study-dir / --storage)."
    )
