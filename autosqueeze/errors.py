"""Errors a user can fix. The CLI prints them as one paragraph and exits with status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's config, files, code or budgets; the message says what and where."""


class TrialError(Exception):
    """A trial that cannot produce valid measurements (NaN metric, a technique that fails)."""
