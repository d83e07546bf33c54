"""EpochOrder: a dataset's rows served in epochs (each row once per epoch), and its cursor as checkpoint state."""

from __future__ import annotations

import json

import numpy as np
import pytest

from textenv import EpochOrder, FileTask, make_task


def epochs_of(order: EpochOrder, epochs: int, per_call: int) -> list[list[int]]:
    """Rows served by successive ``take(per_call)`` calls, regrouped into epochs."""
    served = np.concatenate([order.take(per_call) for _ in range(-(-epochs * order.num_rows // per_call))])
    return [served[e * order.num_rows : (e + 1) * order.num_rows].tolist() for e in range(epochs)]


@pytest.mark.parametrize("per_call", [1, 3, 7, 10, 23])
def test_file_order_without_shuffle(per_call):
    order = EpochOrder(10, shuffle=False, seed=0)
    assert epochs_of(order, 3, per_call) == [list(range(10))] * 3


@pytest.mark.parametrize("per_call", [1, 3, 7, 23])
def test_shuffled_epochs_are_permutations_that_differ(per_call):
    order = EpochOrder(10, shuffle=True, seed=0)
    epochs = epochs_of(order, 4, per_call)
    assert all(sorted(e) == list(range(10)) for e in epochs), "each row exactly once per epoch"
    assert len({tuple(e) for e in epochs}) == 4, "a different permutation every epoch"
    assert epochs == epochs_of(EpochOrder(10, shuffle=True, seed=0), 4, 5), "the order depends only on the seed"
    assert epochs != epochs_of(EpochOrder(10, shuffle=True, seed=1), 4, 5)


def test_cursor_state_round_trips_through_json():
    whole = EpochOrder(7, shuffle=True, seed=3)
    expected = whole.take(40).tolist()
    first = EpochOrder(7, shuffle=True, seed=3)
    head = first.take(17).tolist()
    state = json.loads(json.dumps(first.state()))
    assert (state["epoch"], state["position"]) == (2, 3)
    resumed = EpochOrder(7, shuffle=True, seed=3)
    resumed.load_state(state)
    assert head + resumed.take(23).tolist() == expected
    assert resumed.progress == pytest.approx(40 / 7)


def test_cursor_of_another_dataset_is_refused():
    order = EpochOrder(5, shuffle=False, seed=0)
    with pytest.raises(ValueError, match="same data file"):
        order.load_state(EpochOrder(6, shuffle=False, seed=0).state())


def test_negative_seed_and_empty_dataset():
    assert sorted(EpochOrder(4, shuffle=True, seed=-1).take(4).tolist()) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="at least one row"):
        EpochOrder(0, shuffle=True, seed=0)


def test_for_task_only_for_dataset_tasks(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "answer": str(i)}) + "\n" for i in range(5)))
    order = EpochOrder.for_task(FileTask(path, shuffle=False), seed=0)
    assert order is not None and (order.num_rows, order.shuffle) == (5, False)
    assert EpochOrder.for_task(make_task("reverse"), seed=0) is None
    task = FileTask(path)
    assert [task.row(i).answer for i in order.take(5)] == ["0", "1", "2", "3", "4"]
    task.row(0).metadata["x"] = 1  # a served row is a copy
    assert "x" not in task.row(0).metadata
