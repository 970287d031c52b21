"""Measurements of a plan: the evaluator (compress, pack the artifact's bytes, load them back,
measure that), latency beside the original, memory, the metric, the timing cache, and the device
lock that keeps measurements off each other's device.
"""
