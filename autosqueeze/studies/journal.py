"""The study journal file: Optuna's append-only log, read so that no line can break it.

Optuna replays a journal line by line and stops at the first line it cannot replay: one
foreign line (an editor's stray keystroke, a file appended to by mistake, a record from
another program) used to make every later command fail. Here every line is checked against
what Optuna's replay needs before it is handed over; a line that fails is skipped, in memory
only, and remembered with its line number and the reason, so that ``autosqueeze doctor``
can show it and ``--repair`` can move it out (keeping a backup of the whole file).

Records are numbered by the records alone, skipped lines not counted: the numbering is the
same before and after a repair, and a reader or writer that sees the file replaced (a new
inode) starts reading it again from the top without replaying anything twice.

Readers never write. Writers only append, holding Optuna's lock; the one change a writer
makes beyond that is to cut a torn last line (never acknowledged to anyone) when it opens
the file, under the same lock.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import shutil
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution, json_to_distribution
from optuna.storages.journal import (
    BaseJournalBackend,
    JournalFileBackend,
    JournalFileSymlinkLock,
)
from optuna.trial import TrialState

from autosqueeze.common.errors import UserError


class JournalOperation(enum.IntEnum):
    """The op codes of Optuna's journal format (a file format: they cannot change)."""

    CREATE_STUDY = 0
    DELETE_STUDY = 1
    SET_STUDY_USER_ATTR = 2
    SET_STUDY_SYSTEM_ATTR = 3
    CREATE_TRIAL = 4
    SET_TRIAL_PARAM = 5
    SET_TRIAL_STATE_VALUES = 6
    SET_TRIAL_INTERMEDIATE_VALUE = 7
    SET_TRIAL_USER_ATTR = 8
    SET_TRIAL_SYSTEM_ATTR = 9
    DISCARD_TRIALS = 10


RECORD_START = b'{"op_code"'  # how every record Optuna (and this module) writes begins
EXCERPT = 60  # characters of a skipped line shown


@dataclass(frozen=True)
class Skipped:
    """A line of the journal that is not a record Optuna can replay."""

    line: int  # 1-based line number in the file
    why: str
    excerpt: str
    recovered: bool = False  # a torn record glued to a whole one: the whole one was kept


def check_is_journal(path: Path) -> None:
    """Refuse, untouched, what cannot be a journal: something that is not a regular file, or
    a file whose first line is not a journal record (a model file given as ``--storage`` by
    mistake). An empty or absent file is a new journal."""
    if not path.exists():
        return
    if not path.is_file():
        raise UserError(f"search.storage: {path} is not a regular file (a journal file)")
    with path.open("rb") as f:
        first = f.readline(64 * 1024)
    torn_first = not first.endswith(b"\n") and first.startswith(RECORD_START)
    if first and not torn_first and _parse(first)[0] is None:
        raise UserError(
            f"search.storage: {path} is not an Optuna journal file; nothing was changed"
        )


class _Lines:
    """Reads the records of a journal file from where the last read ended: complete lines
    only (a record being appended is not read yet), foreign lines skipped and remembered."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._identity: tuple[int, int] | None = None
        self.skipped: dict[int, Skipped] = {}
        self._reset()

    def _reset(self) -> None:
        self._offsets = {0: (0, 0)}  # record number -> (byte offset, lines before it)

    def read_logs(self, log_number_from: int) -> Generator[dict[str, Any], None, None]:
        with open(self._path, "rb") as f:
            stat = os.fstat(f.fileno())  # of the file opened: a repair may replace the path
            if (stat.st_dev, stat.st_ino) != self._identity:  # replaced: read it anew
                self._identity = (stat.st_dev, stat.st_ino)
                self._reset()
            number = (  # read on from the last read (a dict hit), else the nearest before
                log_number_from
                if log_number_from in self._offsets
                else max(n for n in self._offsets if n <= log_number_from)
            )
            offset, line_number = self._offsets[number]
            f.seek(offset)
            data = f.read()
        for line in data[: data.rfind(b"\n") + 1].split(b"\n")[:-1]:
            line += b"\n"
            line_number += 1
            offset += len(line)
            record, skipped = _parse(line, line_number)
            if skipped is not None:
                self.skipped[line_number] = skipped
            if record is None:
                continue
            if number >= log_number_from:
                yield record
            number += 1
            self._offsets[number] = (offset, line_number)


class JournalWriter(_Lines, JournalFileBackend):
    """Optuna's journal file, minus the fsync after every append, plus checked reads.

    The driver appends ~25 records per trial (one per parameter, attribute, state); syncing
    each cost half of its time per trial (24 -> 13 ms at trial 320, benchmarks/scaling.py).
    A killed process loses nothing (its writes are done); a power cut may lose the last trials.
    """

    def __init__(self, path: str) -> None:
        self._writers_lock = JournalFileSymlinkLock(path)  # the lock Optuna's writers take
        JournalFileBackend.__init__(self, path, lock_obj=self._writers_lock)
        _Lines.__init__(self, path)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        text = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
        with self.locked(), open(self._path, "ab") as f:
            f.write(text.encode("utf-8"))

    def drop_torn_tail(self) -> None:
        """A run killed mid-append can leave half a line; it was never acknowledged: drop it,
        holding the writers' lock (another search may be appending to the same file)."""
        with self.locked():
            _drop_torn_tail(Path(self._path))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Held as Optuna's own writers hold it, for appends and repairs alike."""
        self._writers_lock.acquire()
        try:
            yield
        finally:
            self._writers_lock.release()


class JournalReader(_Lines, BaseJournalBackend):
    """A journal file read, never written: no file created, no torn tail cut."""

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise RuntimeError("a command that only reads the study tried to write to it")


def skipped_warning(path: Path, skipped: dict[int, Skipped]) -> str | None:
    """One line for the user about the lines a read skipped, or None."""
    foreign = [s for s in skipped.values() if not s.recovered]
    if not foreign:
        return None
    lines = ", ".join(str(s.line) for s in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
    return (
        f"search.storage: {path}: {len(foreign)} line(s) are not study records and were "
        f"skipped (line {lines}: {foreign[0].why}); 'autosqueeze doctor' shows them and "
        "'--repair' moves them out."
    )


@dataclass(frozen=True)
class Diagnosis:
    """What ``autosqueeze doctor`` found in a journal file."""

    path: Path
    records: int
    skipped: list[Skipped]
    torn_tail: bool  # a last line without its newline: a writer killed mid-append

    @property
    def healthy(self) -> bool:
        return not self.torn_tail and all(s.recovered for s in self.skipped)


def diagnose(path: Path) -> Diagnosis:
    """Read the whole journal, change nothing."""
    check_is_journal(path)
    lines = JournalReader(str(path))
    records = sum(1 for _ in lines.read_logs(0))
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        torn = f.tell() > 0 and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n"
    return Diagnosis(path, records, sorted(lines.skipped.values(), key=lambda s: s.line), torn)


def repair(path: Path) -> tuple[Diagnosis, Path | None]:
    """Move the skipped lines and a torn tail out of the journal, holding the writers' lock.

    The whole original is kept beside it (``study.log.bak-20261129-221500``); the journal is
    rewritten with its records only, byte for byte, and swapped in atomically. Returns the
    diagnosis before the repair and the backup (None when nothing needed repairing).
    """
    writer = JournalWriter(str(path))
    with writer.locked():
        found = diagnose(path)
        if found.healthy:
            return found, None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        backup = path.with_name(f"{path.name}.bak-{stamp}")
        for n in range(2, 1000):  # two repairs in one second keep both originals
            if not backup.exists():
                break
            backup = path.with_name(f"{path.name}.bak-{stamp}-{n}")
        shutil.copy2(path, backup)
        temporary = path.with_name(f".{path.name}.repair")
        with path.open("rb") as source, temporary.open("wb") as target:
            for number, line in enumerate(source, start=1):
                if not line.endswith(b"\n"):
                    break  # the torn tail
                record, skipped = _parse(line, number)
                if record is not None:
                    start = 0 if skipped is None else line.rfind(RECORD_START)
                    target.write(line[start:])
            target.flush()
            os.fsync(target.fileno())
        shutil.copymode(path, temporary)
        os.replace(temporary, path)
    return found, backup


def _drop_torn_tail(path: Path) -> None:
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, 2)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)


def _parse(line: bytes, number: int = 0) -> tuple[dict[str, Any] | None, Skipped | None]:
    """The record on a line and, when the line is not exactly one record, why.

    A writer killed mid-append leaves half a record, and the next writer's record is glued to
    it on the same line: the whole record at the end is kept (it was acknowledged), the torn
    half dropped.
    """
    record, why = _record(line)
    if record is not None:
        return record, None
    excerpt = line[:EXCERPT].decode("utf-8", "replace").rstrip("\n")
    start = line.rfind(RECORD_START)
    if start > 0:
        glued, _ = _record(line[start:])
        if glued is not None:
            return glued, Skipped(number, "a torn record glued to a whole one", excerpt, True)
    return None, Skipped(number, why, excerpt)


def _record(line: bytes) -> tuple[dict[str, Any] | None, str]:
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    why = _invalid(record)
    return (None, why) if why else (record, "")


def _invalid(record: dict[str, Any]) -> str | None:
    """Why Optuna's replay would fail on (or misread) this record; None when it would not."""
    op = record.get("op_code")
    if type(op) is not int or op not in JournalOperation._value2member_map_:
        return f"unknown op_code {str(op)[:20]!r}"
    if not isinstance(record.get("worker_id"), str):
        return "no worker_id"
    for field, kind in _FIELDS[JournalOperation(op)].items():
        if not _is(record.get(field), kind):
            return f"op_code {op}: {field!r} is not {kind}"
    op = JournalOperation(op)
    try:
        if op == JournalOperation.CREATE_STUDY:
            if not record["directions"] or any(d not in (1, 2) for d in record["directions"]):
                return "op_code 0: bad directions"
        elif op == JournalOperation.DELETE_STUDY:  # what a foreign line adds, it cannot take
            return "op_code 1: autosqueeze never deletes a study (remove the file to start over)"
        elif op == JournalOperation.CREATE_TRIAL:
            return _invalid_trial(record)
        elif op == JournalOperation.SET_TRIAL_PARAM:
            distribution = json_to_distribution(record["distribution"])
            _external(distribution, record["param_value_internal"])
        elif op == JournalOperation.SET_TRIAL_STATE_VALUES:
            state = TrialState(record["state"])
            if state == TrialState.RUNNING:
                datetime.fromisoformat(record["datetime_start"])
            if state.is_finished():
                datetime.fromisoformat(record["datetime_complete"])
            if not _is(record.get("values", 0), "numbers or null"):
                return "op_code 6: bad values"
        elif op in _ONE_ATTR and len(record[_ONE_ATTR[op]]) != 1:
            return f"op_code {op.value}: not one attribute"
    except Exception as exc:  # noqa: BLE001 - anything Optuna's replay would have raised on
        return f"op_code {op.value}: {type(exc).__name__}"
    return None


def _invalid_trial(record: dict[str, Any]) -> str | None:
    for field in ("distributions", "params", "intermediate_values", "user_attrs", "system_attrs"):
        if not isinstance(record.get(field, {}), dict):
            return f"op_code 4: {field!r} is not an object"
    if "datetime_start" not in record:
        return "op_code 4: no datetime_start"
    distributions = {k: json_to_distribution(v) for k, v in record.get("distributions", {}).items()}
    for name, value in record.get("params", {}).items():
        _external(distributions[name], value)
    for field in ("datetime_start", "datetime_complete"):
        if record.get(field) is not None:
            datetime.fromisoformat(record[field])
    TrialState(record.get("state", TrialState.RUNNING.value))
    for step, value in record.get("intermediate_values", {}).items():
        int(step)
        if not _is(value, "number"):
            return "op_code 4: bad intermediate value"
    value, values = record.get("value"), record.get("values")
    if not _is(values, "numbers or null") or not (value is None or _is(value, "number")):
        return "op_code 4: bad values"
    if value is not None and values is not None:
        return "op_code 4: both value and values"
    return None


def _external(distribution: Any, internal: Any) -> None:
    if not _is(internal, "number"):
        raise ValueError("not a number")
    if isinstance(distribution, CategoricalDistribution) and internal not in range(
        len(distribution.choices)
    ):
        raise ValueError("choice out of range")
    distribution.to_external_repr(internal)


def _is(value: Any, kind: str) -> bool:
    if kind == "int":
        return type(value) is int
    if kind == "number":
        return type(value) in (int, float)
    if kind == "numbers or null":
        return value is None or (
            isinstance(value, list) and all(type(v) in (int, float) for v in value)
        )
    return isinstance(value, {"str": str, "object": dict, "list": list}[kind])


_STUDY, _TRIAL = {"study_id": "int"}, {"trial_id": "int"}
_FIELDS: dict[JournalOperation, dict[str, str]] = {
    JournalOperation.CREATE_STUDY: {"study_name": "str", "directions": "list"},
    JournalOperation.DELETE_STUDY: _STUDY,
    JournalOperation.SET_STUDY_USER_ATTR: {**_STUDY, "user_attr": "object"},
    JournalOperation.SET_STUDY_SYSTEM_ATTR: {**_STUDY, "system_attr": "object"},
    JournalOperation.CREATE_TRIAL: _STUDY,
    JournalOperation.SET_TRIAL_PARAM: {
        **_TRIAL,
        "param_name": "str",
        "param_value_internal": "number",
        "distribution": "str",
    },
    JournalOperation.SET_TRIAL_STATE_VALUES: {**_TRIAL, "state": "int"},
    JournalOperation.SET_TRIAL_INTERMEDIATE_VALUE: {
        **_TRIAL,
        "step": "int",
        "intermediate_value": "number",
    },
    JournalOperation.SET_TRIAL_USER_ATTR: {**_TRIAL, "user_attr": "object"},
    JournalOperation.SET_TRIAL_SYSTEM_ATTR: {**_TRIAL, "system_attr": "object"},
    JournalOperation.DISCARD_TRIALS: {},
}
_ONE_ATTR = {
    JournalOperation.SET_STUDY_USER_ATTR: "user_attr",
    JournalOperation.SET_STUDY_SYSTEM_ATTR: "system_attr",
    JournalOperation.SET_TRIAL_USER_ATTR: "user_attr",
    JournalOperation.SET_TRIAL_SYSTEM_ATTR: "system_attr",
}
