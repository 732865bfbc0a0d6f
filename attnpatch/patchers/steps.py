"""Denoising step tracking from the timestep the transformer receives."""
from __future__ import annotations

from ..handle import SharesMethod


class StepTracker(SharesMethod):
    """Counts denoising steps: a new noise level is a new step; a level above the last one is a
    new generation (``method.reset()``). Pipelines also call ``reset()`` at the start of a call.
    Classifier-free guidance run as two forwards at one timestep stays one step."""

    def __init__(self, method):
        self.method = method
        self.step = 0
        self.total: int | None = None  # the pipeline call's step count, when a pipeline says it
        self.last: float | None = None
        self.calls = 0  # denoiser calls at the current step (guidance: the first is the cond one)

    def reset(self, total: int | None = None) -> None:
        if total is not None:
            self.total = int(total)
        self.step, self.last, self.calls = 0, None, 0
        self.method.reset()

    def update(self, t: float) -> None:
        if self.last is not None and t > self.last + 1e-9:
            self.reset()
        elif self.last is not None and t != self.last:
            self.step += 1
            self.calls = 0
        self.last = t
