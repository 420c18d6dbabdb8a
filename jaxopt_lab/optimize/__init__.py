"""`jaxopt-lab optimize`: a baseline, every compression candidate built from it and their
combinations, measured alike and reported as a Pareto front (see pipeline.py)."""

from jaxopt_lab.optimize.pipeline import optimize

__all__ = ["optimize"]
