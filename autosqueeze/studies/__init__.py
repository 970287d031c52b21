"""The Optuna study: its directions, sampler and constraints, where it is stored (the journal file,
SQLite, PostgreSQL), trials read back as records, and several drivers sharing one study. Only
the driver writes here; workers compute.
"""
