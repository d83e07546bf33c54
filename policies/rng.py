"""The process-wide random generators a run draws from (Python ``random``, numpy's global generator, torch), as
JSON-ready state that a checkpoint keeps, so that a resumed run continues their streams instead of re-seeding."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """This process's generator states, as plain lists and numbers (JSON-ready)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    mt = np_state["state"]
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": {**np_state, "state": {"key": mt["key"].tolist(), "pos": int(mt["pos"])}},
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back states from :func:`get_rng_state` (a CUDA state is restored only where CUDA is in use)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({**np_state, "state": {"key": np.asarray(np_state["state"]["key"], np.uint32),
                                                "pos": np_state["state"]["pos"]}})
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["torch_cuda"]])
