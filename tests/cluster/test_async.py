"""Asynchronous rollouts (rollout.max_staleness): the engines generate the next batch while the learner updates, no
sample is used more than k versions after the weights it was sampled with, the off-policy correction is applied and
logged, and the policy still learns."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, build_config
from cluster.tracking import read_metrics
from test_e2e import only_run, tokengym  # noqa: E402  (same folder)


def test_async_settings_that_cannot_work_are_one_line_errors() -> None:
    for sections, message in (
        ({"rollout": {"max_staleness": -1}}, "rollout.max_staleness must be >= 0"),
        ({"rollout": {"chunks_per_actor": 0}}, "rollout.chunks_per_actor must be >= 1"),
        ({"algorithm": {"off_policy": "vtrace"}}, "algorithm.off_policy must be one of"),
        ({"algorithm": {"is_cap": 0}}, "algorithm.is_cap must be > 0"),
        ({"rollout": {"max_staleness": 1, "num_gpus_per_actor": 0.25},
          "cluster": {"num_learners": 1, "num_gpus_per_learner": 0.5, "placement": "colocated"}},
         "rollout.max_staleness=1 generates during the update, but colocated GPU engines sleep then"),
    ):
        with pytest.raises(ConfigError) as err:
            build_config(sections, source="exp.yaml")
        assert message in str(err.value) and "\n" not in str(err.value), err.value


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_one_step_stale_rollouts_overlap_the_update_stay_in_bound_and_learn(tmp_path) -> None:
    result = tokengym("train", "iterations=24", "checkpoint_every=24", "name=async", "tracking.wandb=false",
                      "rollout.max_staleness=1", "rollout.chunks_per_actor=2", "algorithm.off_policy=decoupled",
                      runs=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(only_run(tmp_path))
    assert [r["iteration"] for r in rows] == list(range(1, 25))
    assert [r["weights/version"] for r in rows] == list(range(2, 26))  # one push per update, as when synchronous
    # Iteration 1's batch is sampled with the first weights. From then on each engine starts its first chunk of the
    # next batch as soon as it is free, before the update: every batch has one-version-old samples. How many of its
    # chunks start before the sync depends on how long a chunk takes against the update (the machine), so not asserted.
    assert rows[0]["rollout/staleness"] == 0
    assert all(r["rollout/staleness_max"] == 1 and r["rollout/staleness"] > 0 for r in rows[1:]), \
        [(r["rollout/staleness"], r["rollout/staleness_max"]) for r in rows]
    # The generation overlapped the learner's phase (pre-update log-probs, update, sync): of the engines' work on a
    # batch, what the driver did not wait for was done during that phase; it covers most of whichever is shorter.
    overlap = sum(r["timing/engines_busy_s"] - r["timing/rollout_s"] for r in rows[1:])
    learner = [r["timing/iteration_s"] - r["timing/rollout_s"] for r in rows[:-1]]  # the phase before batch i + 1
    bound = sum(min(busy, phase) for busy, phase in zip((r["timing/engines_busy_s"] for r in rows[1:]), learner))
    assert overlap > 0.5 * bound, (overlap, bound)
    # The correction saw one-version-old samples: weights around 1, some of them off it.
    assert all(0.5 < r["rollout/is_weight_mean"] < 1.5 for r in rows)
    assert any(abs(r["rollout/is_weight_mean"] - 1) > 1e-3 for r in rows[1:])
    first, last = rows[0]["reward/mean"], sum(r["reward/mean"] for r in rows[-3:]) / 3
    assert first <= 0.3 and last >= first + 0.1, f"reward did not rise: {first:.3f} -> {last:.3f}"
