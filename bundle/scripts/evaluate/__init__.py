"""Evaluate: ANHIR landmark scores, registration quality figures and `run evaluate`."""

from .evaluation import ResultsEvaluation

__all__ = ["ResultsEvaluation"]
