"""The plan: a plain, serializable value (``Plan``: ``{layer: LayerPlan}``) that says what one
trial does to each layer, and the knob values it is built from. Everything downstream takes a
plan, never an Optuna trial; the plan imports no technique.
"""
