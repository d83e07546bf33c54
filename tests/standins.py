"""Stand-ins for Ray actors, for tests of something else than the actor they stand in for (importable by Ray's
workers, unlike a test module)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np


class StandIn:
    """A stand-in for a rollout actor (no engine): ``sample`` sleeps ``delay`` s and returns the chunk's seed as
    every row's score, its own index as ``served``, and when it started and ended."""

    def __init__(self, index: int, delay: float, die_once: str | None = None) -> None:
        self.index, self.delay, self.die_once = index, delay, die_once

    def ready(self) -> dict:
        return {"pid": os.getpid(), "node": "local"}

    def sample(self, n: int, seed: int, version: int) -> dict:
        start = time.monotonic()
        if self.die_once is not None and not os.path.exists(self.die_once):
            Path(self.die_once).touch()
            os._exit(1)  # lost mid-call, once
        time.sleep(self.delay)
        return {"score": np.full(n, float(seed)), "served": np.full(n, self.index), "weights_version": version,
                "generated_tokens": n, "reward_errors": 0, "generate_s": self.delay, "replay_s": 0.0,
                "batch_reward_s": 0.0, "examples": [], "start": start, "end": time.monotonic()}
