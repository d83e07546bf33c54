"""Weight sync from learner 0 into the vLLM engines (cluster/weight_sync.py), by each transport: the engines then
sample with exactly the learner's weights, in the engines' dtype, whatever the bucket size, and with remote
learners the bytes come from the learner's process, not the driver."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cluster.config import ConfigError, build_config, load_config
from cluster.rollout import EngineOptions, RolloutGroup
from cluster.run import prepare_policy
from cluster.trainer import Trainer
from cluster.evaluation import heldout_problems
from cluster.weight_sync import AdapterSync, CollectiveSync, ObjectStoreSync
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group, hf_weights
from policies.models import load_tokenizer, weight_names
from tests.conftest import TINY
from textenv import EnvConfig, HFTokenizerAdapter, make_env

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
TIMEOUT_S = 120.0


def trainer_for(tmp_path: Path, **sections: dict[str, Any]) -> Trainer:
    """A real Trainer of the default task on a tiny policy: 2 engines, 32 prompts per iteration."""
    cfg = build_config({
        "policy": {**{k: v for k, v in TINY.items() if k != "max_positions"}, **sections.get("policy", {})},
        "algorithm": {"minibatch_size": 16, "num_epochs": 1, **sections.get("algorithm", {})},
        "rollout": {"num_actors": 2, "prompts_per_iteration": 32, **sections.get("rollout", {})},
        "cluster": sections.get("cluster", {}),
    })
    policy_dir = prepare_policy(cfg, tmp_path)
    env = make_env(cfg.env, tokenizer=HFTokenizerAdapter(load_tokenizer(policy_dir))).unwrapped
    return Trainer(cfg, policy_dir, env.max_prompt_tokens, env.max_response_tokens, name=f"wsync-{tmp_path.name}")


def engine_state(group: RolloutGroup, index: int = 0) -> dict[str, torch.Tensor]:
    """Every parameter of engine ``index``'s vLLM model (its own names and layout: fused q/k/v, gate/up)."""
    import ray

    (state,) = ray.get(group.actors[index].__ray_call__.remote(lambda actor: actor.llm.apply_model(
        lambda model: {k: v.detach().clone() for k, v in model.state_dict().items()})))
    return state


@pytest.mark.parametrize("transport,learners", [("object_store", 1), ("collective", 0)])
def test_each_transport_gives_every_engine_the_learners_weights(ray_session, tmp_path: Path, transport: str,
                                                                learners: int) -> None:
    trainer = trainer_for(tmp_path, rollout={"weight_transport": transport}, cluster={"num_learners": learners})
    try:
        trainer.sync_weights()
        rows = [trainer.run_iteration(i)[0] for i in (1, 2)]
        # Iteration 2 sampled with the weights the update of iteration 1 made and the sync pushed.
        assert [r["weights/version"] for r in rows] == [2, 3]
        assert max(r["rollout/logprob_gap"] for r in rows) < 1e-3, rows
        names = weight_names(trainer.policy_files)
        n_params = sum(p.size for p in hf_weights(trainer.learners.get_weights()[MODULE_ID], PolicyConfig(),
                                                     names).values())
        assert rows[-1]["weights/sync_bytes"] == 4 * n_params  # float32 engines: every stored parameter, once
        if transport == "object_store":
            import ray

            layouts, refs = trainer.weight_sync.publish()
            learner_owner = [r.get() for r in trainer.learners.foreach_learner(
                lambda learner: ray.put(0).owner_address())][0]
            # Put by the learner's process: the driver only holds the refs (never ray.get here).
            assert {ref.owner_address() for ref in refs} == {learner_owner} != {ray.put(0).owner_address()}
            assert sorted(n for layout in layouts for n in layout.names) == sorted(names.names)
            # The collective transport from the remote learner's process (rank 0 in learner 0's actor).
            trainer.weight_sync = CollectiveSync(trainer.learners, trainer.rollouts, "float32", 1 << 20, TIMEOUT_S)
            trainer.sync_weights()
            row = trainer.run_iteration(3)[0]
            assert row["weights/version"] == 5 and row["rollout/logprob_gap"] < 1e-3, row
    finally:
        trainer.shutdown()


def test_lora_adapters_alone_make_the_engine_sample_the_learners_policy_as_merged_weights_do(
        ray_session, tmp_path: Path) -> None:
    """rollout.lora_weights=adapters: each sync ships only the LoRA adapters (sync_bytes: their size, a small part of
    the model's), the engine applies them with vLLM's LoRA on its base weights, and it samples the learner's policy
    as closely as from merged weights: the same log-prob gap, the same greedy responses. A restarted engine serves
    the newest adapters again."""
    import ray

    trainer = trainer_for(tmp_path, policy={"lora_rank": 2}, algorithm={"lr": 5e-2},
                          rollout={"num_actors": 1, "lora_weights": "adapters"})
    try:
        assert isinstance(trainer.weight_sync, AdapterSync)
        problems = heldout_problems(trainer.cfg.env, 0, 16)
        trainer.sync_weights()  # version 1: adapters still zero (peft starts B at 0), the base model
        before = trainer.rollouts.sample(8, 1, seed=5, version=1)
        rows = [trainer.run_iteration(i)[0] for i in (1, 2)]  # iteration 2 samples with the adapters of update 1
        adapter_gap, adapter_bytes = rows[-1]["rollout/logprob_gap"], rows[-1]["weights/sync_bytes"]
        adapters = trainer.learners._learner.engine_weights(adapters=True)
        assert adapter_bytes == 4 * sum(v.numel() for v in adapters.values())  # float32 engine: the adapters only
        after = trainer.rollouts.sample(8, 1, seed=5, version=3)
        assert not np.allclose(after["sampling_logp"], before["sampling_logp"])  # the adapters changed the policy
        greedy = [r["response"] for r in trainer.rollouts.respond(problems, 0.0, 0, version=3)]

        ray.kill(trainer.rollouts.actors[0], no_restart=False)  # restarts with the base weights alone...
        restarted = [r["response"] for r in trainer.rollouts.respond(problems, 0.0, 0, version=3)]
        assert trainer.supervisor.take_restarts() == 1 and restarted == greedy  # ...and is given the adapters back

        # The same learner state as merged weights, into the same engine: its base weights are replaced and no
        # adapters apply on top of them.
        trainer.weight_sync = ObjectStoreSync(trainer.learners, trainer.rollouts, "float32", 64 << 20, TIMEOUT_S)
        trainer.sync_weights()
        assert [r["response"] for r in trainer.rollouts.respond(problems, 0.0, 0, version=4)] == greedy
        merged = trainer.run_iteration(4)[0]
        assert 10 * adapter_bytes < merged["weights/sync_bytes"], (adapter_bytes, merged["weights/sync_bytes"])
        assert adapter_gap < max(10 * merged["rollout/logprob_gap"], 1e-5), (adapter_gap, merged["rollout/logprob_gap"])
    finally:
        trainer.shutdown()


@pytest.mark.slow  # 1-2.5 min; the default tier's weight_sync bench smoke test syncs a bf16 model by every transport
def test_bfloat16_engines_get_identical_weights_by_every_transport_and_bucket_size(ray_session,
                                                                                   tiny_model_dir: Path) -> None:
    """One bfloat16 engine, its learner's weights perturbed: today's driver path (float32 arrays, cast by vLLM),
    the object store and the collective in one bucket or in buckets of 4 KiB (17) all leave the engine with
    bit-identical weights, which differ from the checkpoint's. A restarted engine gets them back, and rejoins."""
    env = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": 5, "letters": "abcdefgh"})
    options = EngineOptions(model_dir=str(tiny_model_dir), dtype="bfloat16", max_model_len=11, max_num_seqs=16,
                            temperature=1.0, kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=True, seed=0)
    group = RolloutGroup(1, env, options, 0)
    learners = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
    try:
        start = engine_state(group)
        rng = np.random.default_rng(0)
        state = learners.get_weights()[MODULE_ID]
        learners.set_weights({MODULE_ID: {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype)
                                          for k, v in state.items()}})
        group.load_weights(hf_weights(learners.get_weights()[MODULE_ID], PolicyConfig(),
                                      weight_names(tiny_model_dir)), version=1)
        reference = engine_state(group)
        assert any(not torch.equal(start[k], reference[k]) for k in start)
        assert reference["model.embed_tokens.weight"].dtype == torch.bfloat16
        version = 1
        for sync in (ObjectStoreSync(learners, group, "bfloat16", 1 << 20, TIMEOUT_S),
                     ObjectStoreSync(learners, group, "bfloat16", 4096, TIMEOUT_S),
                     CollectiveSync(learners, group, "bfloat16", 1 << 20, TIMEOUT_S),
                     CollectiveSync(learners, group, "bfloat16", 4096, TIMEOUT_S)):
            group.load_weights(hf_weights(state, PolicyConfig(), weight_names(tiny_model_dir)), version=0)
            assert any(not torch.equal(engine_state(group)[k], reference[k]) for k in reference)  # reset to start
            version += 1
            sync.push(version)
            sync.shutdown()
            after = engine_state(group)
            assert all(torch.equal(after[k], reference[k]) for k in reference), type(sync).__name__
            assert group.version == version
            assert sync.bytes_per_engine == 2 * sum(np.prod(v.shape) for v in hf_weights(
                state, PolicyConfig(), weight_names(tiny_model_dir)).values())  # bfloat16: 2 bytes a parameter
            assert (sync.num_buckets > 10) == (sync.bucket_bytes == 4096), sync.num_buckets
            group.sample(4, 1, seed=0, version=version)  # the engine runs with what it holds
        # A restarted engine has left the broadcast group: it gets the current weights from learner 0 by the object
        # store, and the next broadcast rebuilds the group.
        import ray

        sync = CollectiveSync(learners, group, "bfloat16", 1 << 20, TIMEOUT_S)
        group.load_weights(hf_weights(state, PolicyConfig(), weight_names(tiny_model_dir)), version=0)
        sync.push(version + 1)
        ray.kill(group.actors[0], no_restart=False)
        group.sample(4, 1, seed=0, version=version + 1)  # restarted with the checkpoint's weights, then restored
        assert group.pool.supervisor.take_restarts() == 1 and not sync.connected
        assert all(torch.equal(engine_state(group)[k], reference[k]) for k in reference)
        group.load_weights(hf_weights(state, PolicyConfig(), weight_names(tiny_model_dir)), version=0)
        sync.push(version + 2)
        assert sync.connected and group.version == version + 2
        assert all(torch.equal(engine_state(group)[k], reference[k]) for k in reference)
        sync.shutdown()
    finally:
        learners.shutdown()
        group.shutdown()


def test_an_unknown_weight_transport_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["rollout.weight_transport=nccl"])
    assert "rollout.weight_transport" in str(err.value) and "\n" not in str(err.value)
    assert "object_store" in str(err.value)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs 3 CUDA GPUs (NCCL: a learner and 2 engines, one each)")
def test_collective_transport_broadcasts_over_nccl_on_gpus(ray_session, tmp_path: Path) -> None:
    """Learner 0 and both engines on GPUs of their own: the collective transport's group is NCCL, and the engines
    sample with the learner's weights after each sync."""
    trainer = trainer_for(tmp_path, rollout={"weight_transport": "collective", "num_gpus_per_actor": 1},
                          cluster={"num_learners": 1, "num_gpus_per_learner": 1})
    try:
        assert trainer.weight_sync.backend == "nccl"
        trainer.sync_weights()
        rows = [trainer.run_iteration(i)[0] for i in (1, 2)]
        assert [r["weights/version"] for r in rows] == [2, 3]
        assert max(r["rollout/logprob_gap"] for r in rows) < 1e-2, rows  # bf16 autocast on CUDA learners
    finally:
        trainer.shutdown()
