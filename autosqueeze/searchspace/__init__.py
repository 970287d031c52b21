"""Which knobs apply to which layers: the space file's rules matched on the model's anatomy,
offered per layer by the techniques, as named Optuna distributions; and turning a trial's
choices (or a uniform setting) into a plan.
"""
