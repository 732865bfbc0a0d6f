"""Pipeline-level facts: step tracking, guidance wrappers, CLI runners."""
from .steps import StepTracker

__all__ = ["StepTracker"]
