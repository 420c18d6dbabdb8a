"""Measurements and reports of runs: what a run cost and bought, side by side."""
