"""The controller: the ask/tell loop with its baselines, warm starts and resume; the sensitivity
pass and the knapsack proposals built on it; the executors that run trials in-process or on Ray;
the budgets' reachability check and a config's validation. It drives every stage below and
writes the front when it ends.
"""
