"""Errors a user can fix. The CLI prints them as one paragraph and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, files, code or budgets; the message says what and where."""


class TrialError(Exception):
    """A trial that cannot produce valid measurements (NaN metric, a technique that fails)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, Slurm, Kubernetes, systemd): stop as Ctrl-C does, exit 143."""


def terminate(_signum: int, _frame: object) -> None:
    """The SIGTERM handler the CLI installs."""
    raise Terminated
