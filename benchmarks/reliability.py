"""Reliability table (issue 17): what a crash, a stranger's file or a hostile client costs.

    python benchmarks/reliability.py [--cycles 6] [--random-artifacts 200]

Rows:
- kill cycles: a digits search (in-process and with 2 Ray evaluators, in turn) is sent
  SIGKILL, SIGTERM or SIGINT at a random moment, then resumed; finished trials must never
  disappear, nothing may stay RUNNING once the study ends, no process may outlive the search.
- hostile artifacts: the forged variants of tests/test_hostile_artifacts.py (a metadata
  field of 60 MB deflated to ~100 kB, JSON nested 20,000 deep among them), randomly damaged
  copies (bytes flipped, cut short), a folder, a FIFO and /dev/zero, through ``evaluate``.
- hostile configs: the cases of tests/test_config.py and more, through ``validate``: none
  may exit 0 (a module calling os._exit(0) while imported once did, with no report).
- journal: appends lost while readers read and a repair rewrites the file (the concurrency
  test of tests/test_journal.py, counted).
- dashboard: requests a stranger could send; each must be refused or answered harmlessly,
  and the server must print no traceback. Then 200 clients trickle a header a byte every
  3 s (reconnecting when dropped) while a normal poll is sent every 0.5 s for 20 s: each
  must be answered within 1 s.
- secrets: a storage URL with a password, through validate, front, report and the dashboard.
Targets: 0 lost, 0 tracebacks, 0 wrong answers, 0 secrets shown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the hostile inputs live with the tests that use them

from conftest import study_config, write_yaml  # noqa: E402

SECRET = "s3cretPW"


def autosqueeze(*args: object, timeout: float = 300, **env: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "autosqueeze", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **env},
    )
    return done.returncode, done.stdout, done.stderr


def _finished(config: Path) -> set[int]:
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.study import open_study

    try:
        study = open_study(load_config(config), create=False)
    except Exception:  # noqa: BLE001 - not created yet
        return set()
    return {t.number for t in study.trials if t.state.is_finished()}


def _ours() -> set[int]:
    """Processes a search may leave behind: Ray's and autosqueeze's own."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    marks = ("ray::", "raylet", "gcs_server", "autosqueeze search", "-m autosqueeze")
    return {int(line.split()[0]) for line in out.splitlines() if any(m in line for m in marks)}


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80]
    except OSError:
        return f"pid {pid} (gone)"


def kill_cycles(folder: Path, cycles: int, rng: random.Random) -> dict[str, int]:
    config = write_yaml(
        folder / "study.yaml",
        study_config(folder, search={"trials": 14, "seed": 0, "output_dir": str(folder / "run")}),
    )
    before = _ours()
    lost = left = 0
    names: list[str] = []
    slowest = 0.0  # seconds the last of a search's processes outlived it
    finished: set[int] = set()
    signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
    for cycle in range(cycles):
        workers = 2 if cycle % 2 else 0
        proc = subprocess.Popen(
            [sys.executable, "-m", "autosqueeze", "search", config, "--workers", str(workers)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        time.sleep(rng.uniform(6, 30))
        proc.send_signal(signals[cycle % 3])
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        gone = time.monotonic()
        while True:  # Ray's processes end on their own once their driver is gone
            leftovers = _ours() - before
            if not leftovers or time.monotonic() - gone > 120:
                break
            time.sleep(1)
        slowest = max(slowest, time.monotonic() - gone)
        left += len(leftovers)
        names += [
            f"{_command(pid)} (cycle {cycle}, signal {signals[cycle % 3].name})"
            for pid in leftovers
        ]
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        now = _finished(config)
        lost += len(finished - now)
        finished |= now
    code, _, err = autosqueeze("search", config, "--workers", 0, "--no-progress", timeout=1800)
    from autosqueeze.settings.config import load_config
    from autosqueeze.studies.study import open_study

    trials = open_study(load_config(config), create=False).trials
    lost += len(finished - {t.number for t in trials if t.state.is_finished()})
    running = sum(t.state.name == "RUNNING" for t in trials)
    return {
        "cycles": cycles,
        "trials lost": lost,
        "left RUNNING": running,
        "processes left": left,
        "final search exit": code,
        "finished": sum(t.state.is_finished() for t in trials),
        "left": names,
        "slowest exit s": slowest,
        "config": config,
    }


def hostile_artifacts(folder: Path, random_count: int, rng: random.Random) -> dict[str, int]:
    from test_hostile_artifacts import _variants

    from autosqueeze.artifacts.artifact import save_artifact, stored_bytes
    from autosqueeze.cli import main
    from autosqueeze.compression.techniques import compress
    from autosqueeze.examples.digits import pretrained_cnn
    from autosqueeze.plans.plan import Plan

    model = pretrained_cnn()
    names = [n for n, m in model.named_modules() if type(m).__name__ in ("Conv2d", "Linear")]
    good = folder / "good.safetensors"
    save_artifact(compress(model, Plan.uniform(names, bits=4, prune=0.5)), good)
    data = good.read_bytes()  # shipped deflated; the forgeries edit the file it holds
    cases = list(_variants(stored_bytes(good), padding=60_000_000).values())
    for _ in range(random_count):
        damaged = bytearray(data)
        for at in rng.sample(range(len(data)), rng.randint(1, 4)):
            damaged[at] ^= rng.randint(1, 255)
        if rng.random() < 0.3:
            damaged = damaged[: rng.randrange(len(damaged))]
        cases.append(bytes(damaged))
    config = write_yaml(folder / "artifacts.yaml", study_config(folder))
    outcome = {"tried": 0, "exit 2": 0, "traceback": 0, "wrong answer": 0}
    paths = []
    for i, case in enumerate(cases):
        paths.append(folder / f"case-{i}.safetensors")
        paths[-1].write_bytes(case)
    (folder / "a-folder.safetensors").mkdir()
    os.mkfifo(folder / "a-fifo.safetensors")
    (folder / "endless.safetensors").symlink_to("/dev/zero")
    paths += [folder / f"{n}.safetensors" for n in ("a-folder", "a-fifo", "endless")]
    for path in paths:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(["evaluate", str(config), "--artifact", str(path)])
        outcome["tried"] += 1
        outcome["exit 2"] += code == 2
        outcome["traceback"] += "Traceback" in err.getvalue()
        outcome["wrong answer"] += code == 0  # every case differs from the file it came from
    return outcome


def hostile_configs(folder: Path) -> dict[str, int]:
    from test_config import BOMB

    (folder / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
    (folder / "sleeps_on_import.py").write_text("import time\ntime.sleep(3600)\n")
    (folder / "interrupts.py").write_text("raise KeyboardInterrupt\n")
    (folder / "quits_on_import.py").write_text("import os\nos._exit(0)\n")
    (folder / "killed_on_import.py").write_text("import os\nos.kill(os.getpid(), 9)\n")
    (folder / "a-file").write_text("")
    os.mkfifo(folder / "a-fifo.yaml")
    texts = {
        "alias bomb": BOMB + "name: *i\n",
        "deep nesting": "name: " + "[" * 50_000 + "]" * 50_000 + "\n",
        "huge value": "name: x\nbudgets: {max_size_mb: '" + "x" * 100_000 + "'}\n",
        "empty": "",
        "a list": "- 1\n- 2\n",
        "binary": "\x00\x01\x02\xff",
        "tabs": "name:\tx\n\tmodel: 1\n",
        "unclosed": "name: [1, 2\n",
        "duplicate keys": "name: a\nname: b\n",
        "python tag": "name: !!python/object/apply:os.system ['echo hacked']\n",
        "10 MB": "name: " + "x" * 10_000_000 + "\n",
    }
    overrides = {
        "seed -1": {"search": {"seed": -1}},
        "seed 2^80": {"search": {"seed": 2**80}},
        "batch 10^9": {"budgets": {"batch_size": 10**9}},
        "threads 10^6": {"measure": {"threads": 10**6}},
        "NUL in output_dir": {"search": {"output_dir": "runs/a\x00b"}},
        "storage in memory": {"search": {"storage": "sqlite:///:memory:"}},
        "factory builtins:exit": {"model": {"factory": "builtins:exit"}},
        "factory exits at import": {"model": {"factory": "exits_on_import:build"}},
        "factory sleeps at import": {"model": {"factory": "sleeps_on_import:build"}},
        "metric interrupts at import": {"task": {"metric": "interrupts:metric"}},
        "trials 0": {"search": {"trials": 0}},
        "trials 10^12": {"search": {"trials": 10**12}},
        "negative budget": {"budgets": {"max_metric_drop": -1}},
        "NaN budget": {"budgets": {"max_size_mb": float("nan")}},
        "inf latency": {"budgets": {"max_latency_ms": float("inf")}},
        "device tpu": {"budgets": {"device": "tpu"}},
        "objective unknown": {"objectives": ["metric", "happiness"]},
        "objectives empty": {"objectives": []},
        "workers -3": {"compute": {"workers": -3}},
        "space missing": {"space": "nowhere.yaml"},
        "space a folder": {"space": str(folder)},
        "storage a folder": {"search": {"storage": str(folder)}},
        "storage bad URL": {"search": {"storage": "mysql+nothing://x"}},
        "name 10k chars": {"name": "n" * 10_000},
        "name with slash": {"name": "../../etc"},
        "repeats 0": {"measure": {"repeats": 0}},
        "samples 10^9": {"sensitivity": {"samples": 10**9}},
        "factory not a ref": {"model": {"factory": "torch"}},
        "metric os:system": {"task": {"metric": "os:system"}},
        "data returns nothing": {"task": {"data": "builtins:print"}},
        "factory os._exit(0) at import": {"model": {"factory": "quits_on_import:build"}},
        "factory SIGKILLed at import": {"model": {"factory": "killed_on_import:build"}},
        "SQLite under a file": {"search": {"storage": f"sqlite:///{folder}/a-file/s.db"}},
        "journal under a file": {"search": {"storage": str(folder / "a-file" / "s.log")}},
        "workers 10^6": {"compute": {"workers": 10**6}},
        "max_metric_drop 1e308": {"budgets": {"max_metric_drop": 1e308}},
    }
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{len(paths)}.yaml"
        paths[name].write_text(text, encoding="utf-8", errors="surrogateescape")
    for name, override in overrides.items():
        paths[name] = write_yaml(folder / f"{len(paths)}.yaml", study_config(folder, **override))
    paths |= {"config /dev/zero": Path("/dev/zero"), "config a FIFO": folder / "a-fifo.yaml"}
    outcome = {"tried": 0, "exit 2": 0, "traceback": 0, "other": []}
    for name, path in paths.items():
        code, out, err = autosqueeze("validate", path, AUTOSQUEEZE_IMPORT_TIMEOUT="5")
        outcome["tried"] += 1
        outcome["exit 2"] += code == 2
        outcome["traceback"] += "Traceback" in err or "Traceback" in out
        if code != 2:
            outcome["other"].append(f"{name}: exit {code}")
    return outcome


def journal_appends(folder: Path, total: int = 3000) -> dict[str, int]:
    from test_journal import READER, REPAIRER, WRITER

    from autosqueeze.studies.journal import JournalReader

    path = folder / "study.log"
    path.touch()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(path), str(total)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for code in (WRITER, READER, READER, REPAIRER)
    ]
    failed = sum(p.wait(timeout=900) != 0 for p in procs)
    found = {int(next(iter(r["user_attr"]))) for r in JournalReader(str(path)).read_logs(0)}
    return {"appends": total, "lost": total - len(found), "helpers failed": failed}


def dashboard_probes(config: Path) -> dict[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "autosqueeze", "dashboard", config, "--port", str(port)],
        stderr=subprocess.PIPE,
        text=True,
    )

    def raw(request: bytes, wait: bool = True) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(request)
            if not wait:
                return b""
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    deadline = time.monotonic() + 120
    while True:
        try:
            raw(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    host = b"Host: 127.0.0.1:%d\r\n" % port
    probes = {  # request -> a status it must answer (anything else counts as not refused)
        b"GET /api/study HTTP/1.0\r\nHost: evil.example\r\n\r\n": (b" 403 ", b" 400 "),
        b"GET /api/study HTTP/1.0\r\nHost: localhost.evil.example\r\n\r\n": (b" 403 ", b" 400 "),
        b"GET /../../../etc/passwd HTTP/1.0\r\n" + host + b"\r\n": (b" 404 ", b" 400 "),
        b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.0\r\n" + host + b"\r\n": (b" 404 ", b" 400 "),
        b"GET /api/study HTTP/1.0\r\n" + host + b"Host: evil.example\r\n\r\n": (b" 400 ",),
        b"POST /api/study HTTP/1.0\r\n" + host + b"Content-Length: 3\r\n\r\nabc": (b" 405 ",),
        b"DELETE / HTTP/1.0\r\n" + host + b"\r\n": (b" 405 ",),
        b"GET / HTTP/1.0\r\n" + host + b"X: " + b"a" * 70_000 + b"\r\n\r\n": (b" 431 ", b" 400 "),
        b"GET /" + b"a" * 70_000 + b" HTTP/1.0\r\n" + host + b"\r\n": (
            b" 414 ",
            b" 404 ",
            b" 400 ",
        ),
        b"HEAD / HTTP/1.0\r\n" + host + b"\r\n": (b" 200 ",),
        b"GARBAGE\r\n\r\n": (b" 400 ",),
    }
    refused = 0
    for request, expected in probes.items():
        with contextlib.suppress(OSError):
            answer = raw(request)
            refused += any(code in answer[:20] for code in expected)
    # 300 half-sent requests, then one whole: it is still answered
    held = []
    for _ in range(300):
        with contextlib.suppress(OSError):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"GET / HTTP/1.0\r\n")
            held.append(conn)
    with contextlib.suppress(OSError):
        refused += b" 200 " in raw(b"GET /api/study HTTP/1.0\r\n" + host + b"\r\n")[:20]
    for conn in held:
        conn.close()
    slow = slow_clients(port)
    for _ in range(20):  # clients that leave before the answer
        with contextlib.suppress(OSError):
            raw(b"GET /api/study HTTP/1.0\r\n" + host + b"\r\n", wait=False)
    time.sleep(1)
    server.send_signal(signal.SIGTERM)  # what a service manager sends (SIGINT may be ignored)
    try:
        _, err = server.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        _, err = server.communicate()
        err += "\n(did not stop on SIGTERM within 60 s)"
    remote, _, remote_err = autosqueeze("dashboard", config, "--host", "0.0.0.0")
    return {
        "probes": len(probes) + 2,
        "handled": refused + (remote == 2),
        "tracebacks": ("Traceback" in err) + ("Traceback" in remote_err),
        **slow,
    }


def slow_clients(port: int, clients: int = 200, seconds: float = 20) -> dict[str, float]:
    """Normal polls, one every 0.5 s, while ``clients`` connections each send a header a
    byte every 3 s and reconnect when the server drops them (as an attacker would)."""
    host = b"Host: 127.0.0.1:%d\r\n" % port

    def connect() -> socket.socket | None:
        with contextlib.suppress(OSError):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            conn.sendall(b"GET / HTTP/1.1\r\n" + host + b"X-Slow: ")
            return conn
        return None

    slow = [connect() for _ in range(clients)]
    dropped = 0
    stop = threading.Event()

    def trickle() -> None:
        nonlocal dropped
        while not stop.wait(3):
            for i, conn in enumerate(slow):
                try:
                    conn.sendall(b"x")  # a closed peer shows on the second send after it
                except (OSError, AttributeError):
                    dropped += conn is not None
                    if conn is not None:
                        conn.close()
                    slow[i] = connect()

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    latencies = []  # seconds to a whole 200 answer; inf: none within 5 s
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.monotonic()
        answer = b""
        with contextlib.suppress(OSError):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(b"GET /api/study HTTP/1.0\r\n" + host + b"\r\n")
                while chunk := conn.recv(65536):
                    answer += chunk
        ok = b" 200 " in answer[:20] and answer.rstrip().endswith(b"}")
        latencies.append(time.monotonic() - started if ok else float("inf"))
        time.sleep(0.5)
    stop.set()
    trickler.join()
    for conn in slow:
        if conn is not None:
            conn.close()
    return {
        "slow clients": clients,
        "polls": len(latencies),
        "polls within 1 s": sum(t <= 1 for t in latencies),
        "worst poll s": max(latencies),
        "slow dropped": dropped,
    }


def secrets_shown(folder: Path, config: Path) -> dict[str, int]:
    import yaml

    data = yaml.safe_load(config.read_text())
    data["search"]["storage"] = f"postgresql://alice:{SECRET}@127.0.0.1:9/studies?sslpassword=x"
    leaky = write_yaml(folder / "leaky.yaml", data)
    shown = 0
    commands = [
        ["validate", leaky],
        ["front", leaky],
        ["report", leaky, "-o", folder / "r.html"],
        ["doctor", leaky],
        ["search", leaky, "--workers", 0, "--trials", 1],
    ]
    for command in commands:
        _, out, err = autosqueeze(*command)
        shown += SECRET in out or SECRET in err
    report = folder / "r.html"
    shown += report.exists() and SECRET in report.read_text(errors="replace")
    return {"places": len(commands) + 1, "shown": int(shown)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=6)
    parser.add_argument("--random-artifacts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        root = Path(tmp)
        for name in ("kill", "artifacts", "configs", "journal", "secrets"):
            (root / name).mkdir()
        started = time.monotonic()
        print("| check | tried | outcome | target |\n|---|---|---|---|", flush=True)
        kills = kill_cycles(root / "kill", args.cycles, rng)
        print(
            f"| kill cycles (SIGKILL/SIGTERM/SIGINT, in-process and 2 Ray evaluators) | "
            f"{kills['cycles']} | {kills['trials lost']} finished trials lost, "
            f"{kills['left RUNNING']} left RUNNING, {kills['processes left']} processes left "
            f"after 120 s (the last gone {kills['slowest exit s']:.0f} s after the search); "
            f"resumed to {kills['finished']} finished (exit {kills['final search exit']}) | 0 |",
            flush=True,
        )
        for name in kills["left"]:
            print(f"left: {name}", file=sys.stderr)
        artifacts = hostile_artifacts(root / "artifacts", args.random_artifacts, rng)
        print(
            f"| hostile artifacts through `evaluate` | {artifacts['tried']} | "
            f"{artifacts['exit 2']} exit 2, {artifacts['traceback']} tracebacks, "
            f"{artifacts['wrong answer']} wrong answers | all exit 2 |",
            flush=True,
        )
        configs = hostile_configs(root / "configs")
        other = "; ".join(configs["other"]) or "none"
        print(
            f"| hostile configs through `validate` | {configs['tried']} | {configs['exit 2']} "
            f"exit 2, {configs['traceback']} tracebacks (not exit 2: {other}) | all exit 2 |",
            flush=True,
        )
        journal = journal_appends(root / "journal")
        print(
            f"| journal appends with 2 readers and 3 repairs beside the writer | "
            f"{journal['appends']} | {journal['lost']} lost | 0 |",
            flush=True,
        )
        dashboard = dashboard_probes(kills["config"])
        print(
            f"| dashboard probes (rebinding, two Hosts, traversal, methods, oversized, "
            f"300 half-sent, disconnects, remote bind) | {dashboard['probes']} | "
            f"{dashboard['handled']} refused or answered as they should, "
            f"{dashboard['tracebacks']} tracebacks | all |",
            flush=True,
        )
        worst = dashboard["worst poll s"]
        print(
            f"| dashboard polls answered within 1 s while {dashboard['slow clients']} clients "
            f"trickle a byte every 3 s | {dashboard['polls']} | {dashboard['polls within 1 s']} "
            f"| all |\n| worst poll latency under that load ({dashboard['slow dropped']} slow "
            f"connections cut off and reconnected) | {dashboard['polls']} | "
            + (f"{worst:.3f} s" if worst != float("inf") else "some unanswered in 5 s")
            + " | under 1 s |",
            flush=True,
        )
        secrets = secrets_shown(root / "secrets", kills["config"])
        print(
            f"| storage password through validate, front, report, doctor, search | "
            f"{secrets['places']} | shown {secrets['shown']} times | 0 |"
        )
        print(f"\n{time.monotonic() - started:.0f} s in all.")


if __name__ == "__main__":
    main()
