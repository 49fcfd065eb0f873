"""Evaluation: the metrics and calibration (`metrics`), scoring trained heads on an
evaluation set (`evaluate`) and the compact per-head summaries DVC shows (`summary`).

Import the modules themselves; this package imports nothing, so that the heads can use
`metrics` without loading the evaluate stage's code (which imports the heads).
"""
