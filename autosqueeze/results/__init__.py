"""What a study leaves: the front (feasible non-dominated trials, front.csv, one folder per front
model, hypervolume), and the fine-tuning of a front model.
"""
