"""The problem a study compresses, resolved from the config: the user's model, data, example input,
metric and calibration (``task.Task``: the only place a factory is called), the runtime it ships
to, and the student models distilled from it.
"""
