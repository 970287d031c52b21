"""The device lock: shared work beside shared work, and a short timing inside shared work
(the sensitivity pass's layer timings, issue 10) that waits for the others' work."""

from __future__ import annotations

import multiprocessing

import torch

from autosqueeze.measuring.device_lock import DeviceLock


def hold_shared(folder, holding, release, released) -> None:
    with DeviceLock(torch.device("cpu"), folder).shared():
        holding.set()
        release.wait(60)
        released.value = 1  # written while still held: whoever gets in after must see it


def test_a_timing_inside_shared_work_waits_for_the_others_and_then_holds_shared_again(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    holding, release, released = ctx.Event(), ctx.Event(), ctx.Value("i", 0)
    other = ctx.Process(target=hold_shared, args=(tmp_path, holding, release, released))
    other.start()
    try:
        assert holding.wait(60)
        lock = DeviceLock(torch.device("cpu"), tmp_path)
        with lock.shared() as held:  # shared beside shared: no wait
            assert released.value == 0
            release.set()
            with held.exclusive():  # only once the other let go
                assert released.value == 1
            # shared again: a second process may hold it shared beside us
            release.clear()
            released.value = 0
            again = ctx.Process(target=hold_shared, args=(tmp_path, holding, release, released))
            holding.clear()
            again.start()
            assert holding.wait(60)
            release.set()
            again.join(60)
        assert again.exitcode == 0
    finally:
        release.set()
        other.join(60)
    assert other.exitcode == 0


def test_the_lock_files_are_shared_by_every_user_of_the_machine(tmp_path):
    """Made 0666 whatever the umask: a second user timing on the same device must be able to
    open them (and is, without O_CREAT, where protected_regular forbids it on others' files)."""
    with DeviceLock(torch.device("cpu"), tmp_path).exclusive():
        pass
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.glob("autosqueeze-cpu.*")}
    assert modes == {"autosqueeze-cpu.gate": 0o666, "autosqueeze-cpu.lock": 0o666}
