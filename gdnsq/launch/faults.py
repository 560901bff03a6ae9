"""Fault injection for the recovery tests: a seam the run path carries but never uses on its own."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KillWorker:
    """SIGKILL rank ``rank``'s worker process once it reaches global step ``step``, on the first attempt only
    (the ``marker`` file records that it happened, so the restarted attempt trains on)."""

    step: int
    marker: str
    rank: int = 0

    def step_hook(self, rank: int) -> Callable[[int, dict], None] | None:
        """The ``on_step`` hook that kills this process, for the rank it targets (None for the others)."""
        if rank != self.rank:
            return None

        def on_step(step: int, parts: dict) -> None:
            if step < self.step:
                return
            try:
                Path(self.marker).open("x").close()
            except FileExistsError:
                return  # killed once already: this is the restarted attempt
            os.kill(os.getpid(), signal.SIGKILL)

        return on_step
