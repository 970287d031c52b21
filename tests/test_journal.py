"""The study journal survives what users and other programs do to it: foreign lines are
skipped and can be moved out, readers never write, and no append is ever lost while readers
and a repair run beside the writer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from optuna.storages import JournalStorage

from autosqueeze.cli import main
from autosqueeze.studies.journal import JournalReader, JournalWriter, diagnose, repair

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _journal(path: Path, trials: int = 6) -> None:
    """A real study journal: a two-objective study of ``trials`` trials, one of them failed."""
    study = optuna.create_study(
        study_name="digits-test",
        storage=JournalStorage(JournalWriter(str(path))),
        directions=["maximize", "minimize"],
        sampler=optuna.samplers.RandomSampler(seed=0),
    )

    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0, 1)
        trial.suggest_categorical("kernel", ["fp32", "int8"])
        trial.set_user_attr("plan", {"x": x})
        if trial.number == 3:
            raise ValueError("a failed trial")
        return x, 1 - x

    study.optimize(objective, n_trials=trials, catch=(ValueError,))


def _trials(path: Path) -> list[tuple]:
    storage = JournalStorage(JournalReader(str(path)))
    study = optuna.load_study(study_name="digits-test", storage=storage)
    return [(t.number, t.state, t.values, t.params, t.user_attrs) for t in study.trials]


FOREIGN = [
    b"garbage-not-json\n",
    b'{"op_code": 99, "worker_id": "x"}\n',
    b'{"op_code": 5, "worker_id": "x", "trial_id": 0, "param_name": "y", '
    b'"param_value_internal": 7, "distribution": "not json"}\n',
    b'{"op_code": 6, "worker_id": "x", "trial_id": 0, "state": 42, "values": null}\n',
    b'{"op_code": 0, "worker_id": "x", "study_name": "s", "directions": ["up"]}\n',
    b"[1, 2, 3]\n",
    b"\xff\xfe\x00binary\n",
]


def test_foreign_lines_are_skipped_shown_by_doctor_and_moved_out_by_repair(
    tmp_path, make_config, capsys
):
    journal = tmp_path / "study.log"
    _journal(journal)
    clean = journal.read_bytes()
    expected = _trials(journal)
    lines = clean.splitlines(keepends=True)
    # a writer killed mid-append, glued to the next writer's record: the whole record is kept
    lines[10] = lines[9][:25] + lines[10]
    for at, line in zip((3, 12, 20, 25, 26, 28, 29), FOREIGN, strict=True):
        lines.insert(at, line)
    journal.write_bytes(b"".join(lines))
    damaged = journal.read_bytes()

    assert _trials(journal) == expected  # read as if the lines were not there
    config = make_config()
    code, out = main(["doctor", str(config), "--storage", str(journal)]), capsys.readouterr().out
    assert code == 1 and journal.read_bytes() == damaged  # doctor alone changes nothing
    for number in (4, 13, 21, 26, 27, 29, 30):
        assert f"line {number}: " in out
    assert "a torn record glued to a whole one" in out and "6 trials" in out

    # a search resumes on the damaged journal: it appends after the foreign lines
    storage = JournalStorage(JournalWriter(str(journal)))
    study = optuna.load_study(study_name="digits-test", storage=storage)
    study.optimize(lambda t: (t.suggest_float("x", 0, 1), 0.5), n_trials=2)
    expected = _trials(journal)
    assert len(expected) == 8
    before = journal.read_bytes()

    assert main(["doctor", str(config), "--storage", str(journal), "--repair"]) == 0
    out = capsys.readouterr().out
    backup = Path(out.split("the original is kept as ")[1].split("\n")[0].rstrip("."))
    assert backup.read_bytes() == before
    assert _trials(journal) == expected
    assert all(json.loads(line) for line in journal.read_bytes().splitlines())
    assert main(["doctor", str(config), "--storage", str(journal)]) == 0
    assert "8 trials" in capsys.readouterr().out


def test_a_file_that_is_not_a_journal_is_refused_by_doctor_untouched(tmp_path, make_config, capsys):
    stranger = tmp_path / "model.safetensors"
    stranger.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    for extra in ([], ["--repair"]):
        assert main(["doctor", str(make_config()), "--storage", str(stranger), *extra]) == 2
        assert "is not an Optuna journal file" in capsys.readouterr().err
    assert stranger.read_bytes() == b"\x08\x00\x00\x00\x00\x00\x00\x00{}      "
    assert not list(tmp_path.glob("*.bak-*"))


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_FIELDS = [
    "study_id", "trial_id", "study_name", "directions", "user_attr", "system_attr", "state",
    "values", "param_name", "param_value_internal", "distribution", "distributions", "params",
    "datetime_start", "datetime_complete", "step", "intermediate_value", "intermediate_values",
    "user_attrs", "system_attrs",
]  # fmt: skip
_records = st.fixed_dictionaries(
    {"op_code": st.integers(-1, 12) | _values, "worker_id": st.text(max_size=4) | _values},
    optional={field: _values | st.integers(0, 8) for field in _FIELDS},
)
_lines = st.one_of(
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b" ")),
    _records.map(lambda r: json.dumps(r).encode()),
)


@pytest.fixture(scope="module")
def real_journal(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("journal") / "study.log"
    _journal(path)
    return path.read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inserted=st.lists(st.tuples(st.integers(1, 200), _lines), min_size=1, max_size=4))
def test_any_inserted_line_is_replayed_or_skipped_never_fatal(
    tmp_path_factory, real_journal, inserted
):
    """Whatever line lands in a journal, a reader opens the study and a doctor reads it."""
    path = tmp_path_factory.mktemp("fuzz") / "study.log"
    lines = real_journal.splitlines(keepends=True)
    for at, line in inserted:
        lines.insert(min(at, len(lines)), line + b"\n")
    path.write_bytes(b"".join(lines))
    trials = _trials(path)
    assert len(trials) >= 6  # what a foreign line can add, it cannot take away
    found = diagnose(path)
    foreign = [s for s in found.skipped if not s.recovered]
    assert found.records + len(foreign) == path.read_bytes().count(b"\n")
    repair(path)
    assert diagnose(path).healthy and _trials(path) == trials


def test_a_foreign_line_that_would_delete_the_study_is_skipped(tmp_path_factory, real_journal):
    """Found by the fuzz test above: Optuna replays a delete-study record, and every later
    reader lost the study. autosqueeze never deletes a study, so such a line is foreign."""
    path = tmp_path_factory.mktemp("delete") / "study.log"
    lines = real_journal.splitlines(keepends=True)
    lines.insert(1, b'{"op_code": 1, "worker_id": "", "study_id": 0}\n')
    path.write_bytes(b"".join(lines))
    assert len(_trials(path)) >= 6
    assert any("never deletes a study" in s.why for s in diagnose(path).skipped)


WRITER = """
import json, sys
from autosqueeze.studies.journal import JournalWriter
import glob, time
w = JournalWriter(sys.argv[1])
while len(glob.glob(sys.argv[1] + ".ready-*")) < 3:  # readers and repairer started
    time.sleep(0.01)
for i in range(int(sys.argv[2])):
    pad = "x" * (9000 if i % 7 == 0 else 10)  # some records larger than a page
    w.append_logs([{"op_code": 2, "worker_id": "w", "study_id": 0, "user_attr": {str(i): pad}}])
"""
READER = """
import sys, os
from autosqueeze.studies.journal import JournalReader
path, total = sys.argv[1], int(sys.argv[2])
kept = JournalReader(path)  # one reader kept open (its offsets cached), fresh ones beside it
open(f"{path}.ready-{os.getpid()}", "w").close()
seen, reads = 0, 0
while seen < total:
    for reader in (kept, JournalReader(path)):
        numbers = [int(next(iter(r["user_attr"]))) for r in reader.read_logs(0)]
        assert numbers == list(range(len(numbers))), numbers[:20]
        seen = max(seen, len(numbers))
    reads += 1
print(reads)
"""
REPAIRER = """
import sys, time
from pathlib import Path
from autosqueeze.studies.journal import JournalWriter, repair
path = Path(sys.argv[1])
w = JournalWriter(str(path))
open(f"{path}.ready-repairer", "w").close()
for size in (200_000, 1_000_000, 2_000_000):  # foreign lines, moved out while the writer appends
    while path.stat().st_size < size:
        time.sleep(0.01)
    with w.locked(), path.open("ab") as f:
        f.write(b"garbage from another program\\n")
    found, backup = repair(path)
    assert backup is not None, found
    time.sleep(0.2)
print("repaired")
"""


def test_no_append_is_lost_with_readers_and_a_repair_beside_the_writer(tmp_path):
    """The writer believes every append it made; readers and a repair run at the same time.
    Every append is in the file at the end, once and in order, and every read saw a prefix."""
    path, total = tmp_path / "study.log", 3000
    path.touch()
    run = [sys.executable, "-c"]
    procs = [
        subprocess.Popen(
            [*run, textwrap.dedent(code), str(path), str(total)], stdout=subprocess.PIPE
        )
        for code in (WRITER, READER, READER, REPAIRER)
    ]
    outputs = [p.communicate(timeout=600)[0].decode().strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outputs
    numbers = [int(next(iter(r["user_attr"]))) for r in JournalReader(str(path)).read_logs(0)]
    assert numbers == list(range(total))
    assert diagnose(path).healthy
    assert len(list(tmp_path.glob("study.log.bak-*"))) == 3, outputs


def test_check_journal_finds_then_moves_out_foreign_lines_and_counts_the_trials(
    tmp_path, make_config
):
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.records import trial_states
    from autosqueeze.studies.storage import check_journal
    from autosqueeze.studies.study import open_study

    journal = tmp_path / "study.log"
    _journal(journal)
    with journal.open("ab") as f:
        f.write(FOREIGN[0])
    config = load_config(make_config(search={"storage": str(journal)}))

    checked = check_journal(config)
    assert checked is not None and not checked.healthy and checked.backup is None
    assert [s.line for s in checked.found.skipped] == [checked.found.records + 1]
    repaired = check_journal(config, repair=True)
    assert repaired is not None and repaired.healthy and repaired.backup is not None
    assert repaired.backup.read_bytes().endswith(FOREIGN[0])
    again = check_journal(config)
    assert again is not None and again.healthy and again.found.skipped == []

    counts = trial_states(open_study(config, create=False))
    assert (counts["complete"], counts["fail"], counts["running"]) == (5, 1, 0)
    database = config.with_overrides(storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert check_journal(database) is None  # a database has no journal to check
