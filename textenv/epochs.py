"""The order in which a training run serves a dataset task's rows: epoch after epoch, each row once per epoch."""

from __future__ import annotations

from typing import Any

import numpy as np

from textenv.tasks import DatasetTask, Task


class EpochOrder:
    """A cursor over ``num_rows`` rows that hands out row indices in epochs.

    Epoch ``e`` lists every row once: in index order, or with ``shuffle`` in a permutation drawn from a generator
    seeded with ``(seed, e)``. The whole sequence therefore follows from ``seed`` and the cursor ``(epoch,
    position)``, which is all a checkpoint keeps (:meth:`state` / :meth:`load_state`). ``take(n)`` continues into
    the next epoch when the current one runs out, so consecutive calls never repeat a row within an epoch.
    """

    def __init__(self, num_rows: int, shuffle: bool, seed: int) -> None:
        if num_rows < 1:
            raise ValueError(f"EpochOrder needs at least one row; got num_rows={num_rows}")
        self.num_rows, self.shuffle, self.seed = int(num_rows), bool(shuffle), int(seed)
        self.epoch, self.position = 0, 0
        self._order = self.epoch_order(0)

    @classmethod
    def for_task(cls, task: Task, seed: int) -> EpochOrder | None:
        """The order for ``task`` if it is a :class:`DatasetTask`; None for a task that generates its problems."""
        return cls(task.num_rows, task.shuffle, seed) if isinstance(task, DatasetTask) else None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The row indices of epoch ``epoch``, in the order they are served."""
        if not self.shuffle:
            return np.arange(self.num_rows, dtype=np.int64)
        # SeedSequence entropy must be non-negative: map a negative run seed to a distinct non-negative word.
        words = [self.seed % 2**64, int(epoch)]
        return np.random.default_rng(np.random.SeedSequence(words)).permutation(self.num_rows).astype(np.int64)

    def take(self, n: int) -> np.ndarray:
        """The next ``n`` row indices (crossing into the next epoch when this one is used up)."""
        out: list[np.ndarray] = []
        while n > 0:
            chunk = self._order[self.position : self.position + n]
            out.append(chunk)
            n -= len(chunk)
            self.position += len(chunk)
            if self.position == self.num_rows:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self.epoch_order(self.epoch)
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    @property
    def progress(self) -> float:
        """Epochs served so far, fractional (1.5: one full pass and half of the second)."""
        return self.epoch + self.position / self.num_rows

    def state(self) -> dict[str, Any]:
        """The cursor, JSON-ready; the order itself is recomputed from the seed."""
        return {"epoch": self.epoch, "position": self.position, "num_rows": self.num_rows, "shuffle": self.shuffle}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from a cursor saved by :meth:`state` (of a dataset with the same number of rows)."""
        if int(state["num_rows"]) != self.num_rows:
            raise ValueError(f"the saved data cursor is for {state['num_rows']} rows but the dataset now has "
                             f"{self.num_rows}; resume with the same data file")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.num_rows:
            raise ValueError(f"invalid saved data cursor epoch={epoch}, position={position}")
        self.epoch, self.position = epoch, position
        self._order = self.epoch_order(epoch)

    def __repr__(self) -> str:
        return (f"EpochOrder(num_rows={self.num_rows}, shuffle={self.shuffle}, seed={self.seed}, "
                f"epoch={self.epoch}, position={self.position})")
