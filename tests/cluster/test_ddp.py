"""Data-parallel RLlib learners: two learners (DDP over gloo) make the same update as one on the same batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from cluster.trainer import build_batch
from policies.columns import ADVANTAGES, OLD_LOGP, OLD_VALUES, RESPONSE_MASK, RETURNS
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group

pytestmark = [pytest.mark.ray]


def full_length_batch(n: int = 8, P: int = 6, R: int = 5, vocab: int = 11) -> dict:
    rng = np.random.default_rng(0)
    batch = build_batch({
        "prompt_ids": rng.integers(2, vocab, (n, P)), "prompt_length": np.full(n, P),
        "response_ids": rng.integers(2, vocab, (n, R)), "response_length": np.full(n, R),
        "rewards": rng.random((n, R)).astype(np.float32), "sampling_logp": np.zeros((n, R), np.float32),
    })
    batch[OLD_LOGP] = np.full((n, R), -2.4, np.float32)
    batch[OLD_VALUES] = np.zeros((n, R), np.float32)
    batch[ADVANTAGES] = rng.standard_normal((n, R)).astype(np.float32)
    batch[RETURNS] = rng.random((n, R)).astype(np.float32)
    return batch


def grads(group) -> dict[str, np.ndarray]:
    fetch = lambda learner: {  # noqa: E731
        n: p.grad.detach().cpu().numpy() for n, p in learner.module[MODULE_ID].unwrapped().named_parameters()
    }
    return list(group.foreach_learner(fetch))[0].get()


def test_two_learners_match_one(ray_session, tiny_model_dir: Path) -> None:
    batch = full_length_batch()
    n = len(batch[RESPONSE_MASK])
    algo = AlgorithmConfig(grad_clip=None)
    one = build_learner_group(algo, PolicyConfig(), str(tiny_model_dir), 0, 0)
    two = build_learner_group(algo, PolicyConfig(), str(tiny_model_dir), 2, 0)
    assert len(two) == 2
    mab = lambda: MultiAgentBatch({MODULE_ID: SampleBatch(dict(batch))}, env_steps=n)  # noqa: E731
    one.update(batch=mab(), num_epochs=1, minibatch_size=n, shuffle_batch_per_epoch=False)
    two.update(batch=mab(), num_epochs=1, minibatch_size=n // 2, shuffle_batch_per_epoch=False)
    g1, g2 = grads(one), grads(two)
    assert g1.keys() == g2.keys()
    for k in g1:  # DDP's all-reduced mean of two half-batch gradients == the full-batch gradient
        np.testing.assert_allclose(g2[k], g1[k], rtol=1e-4, atol=1e-7, err_msg=k)
    w1, w2 = one.get_weights()[MODULE_ID], two.get_weights()[MODULE_ID]
    for k in w1:
        np.testing.assert_allclose(w2[k], w1[k], atol=5e-5, err_msg=k)
    one.shutdown()
    two.shutdown()
