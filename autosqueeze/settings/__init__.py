"""The study config as the user writes it (``config.StudyConfig``: pydantic, strict, paths
resolved) and the objectives it may name (``objectives.OBJECTIVES``: each measured quantity's
direction, budget and constraint, written once). Facts, no computation: the config validates
against the objectives, and every later stage reads both, so they sit low.
"""
