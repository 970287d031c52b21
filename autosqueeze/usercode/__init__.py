"""Calling the user's code: importing ``module:callable`` references with time limits and clear
errors, calling a model on a batch, and the task's metric (built-in or the user's). Techniques,
measurements and the task all call models, so this stage sits below them all.
"""
