"""Built-in example models and data, made from packages only (no downloads)."""
