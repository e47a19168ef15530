"""Sweeps: each trial's run with its failures recorded (trials.py) and `cnnlab report` (report.py)."""
