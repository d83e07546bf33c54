"""Placement: the bundles a config asks for (pure, no Ray), the one-line reasons a group is not placed, a run on a
cluster of three Ray nodes with its engines and learner pinned to node pools, and colocated engines that sleep on a
GPU while the learner updates."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from cluster.config import ConfigError, ExperimentConfig, build_config, load_config
from cluster.placement import Bundle, plan_placement, unplaced_reason
from cluster.run import required_resources
from tests.ports import free_ports


def config(**sections: dict) -> ExperimentConfig:
    return build_config(sections)


# ------------------------------------------------------------------------------------------------- bundles
def test_disaggregated_gives_each_engine_learner_and_the_reward_model_a_bundle_with_its_pool() -> None:
    cfg = config(rollout={"num_actors": 2, "num_cpus_per_actor": 2, "resources": {"rollout_node": 1}},
                 cluster={"num_learners": 2, "num_gpus_per_learner": 1, "learner_resources": {"learner_node": 1},
                          "placement_strategy": "SPREAD"},
                 reward_model={"path": "rm", "num_gpus": 0.5, "resources": {"rm_node": 1}})
    plan = plan_placement(cfg)
    assert plan.bundles == (
        Bundle(("rollout actor 0",), {"CPU": 2, "rollout_node": 1}),
        Bundle(("rollout actor 1",), {"CPU": 2, "rollout_node": 1}),
        Bundle(("learner 0",), {"GPU": 1, "learner_node": 1}),  # RLlib: no CPU for a learner with a GPU
        Bundle(("learner 1",), {"GPU": 1, "learner_node": 1}),
        Bundle(("reward model",), {"CPU": 1, "GPU": 0.5, "rm_node": 1}),
    )
    assert plan.strategy == "SPREAD" and plan.engine_bundles == (0, 1) and plan.reward_model_bundle == 4
    assert required_resources(cfg) == {"CPU": 5, "GPU": 2.5, "rollout_node": 2, "learner_node": 2, "rm_node": 1}
    # tokengym eval starts engines (and the reward model) only
    assert [b.members for b in plan_placement(cfg, learners=False).bundles] == [
        ("rollout actor 0",), ("rollout actor 1",), ("reward model",)]


def test_the_default_run_reserves_what_its_actors_asked_for_before_placement_groups() -> None:
    plan = plan_placement(load_config())  # 2 engines, the learner in the driver: no bundle for it
    assert [b.resources for b in plan.bundles] == [{"CPU": 1}, {"CPU": 1}]
    assert required_resources(load_config(overrides=["cluster.num_learners=2"])) == {"CPU": 4, "GPU": 0}


def test_colocated_puts_each_learner_with_its_share_of_the_engines_on_one_gpu() -> None:
    cfg = config(rollout={"num_actors": 4, "num_gpus_per_actor": 0.25, "resources": {"gpu_node": 1}},
                 cluster={"num_learners": 2, "num_gpus_per_learner": 0.5, "placement": "colocated"})
    plan = plan_placement(cfg)
    assert plan.bundles == (
        Bundle(("learner 0", "rollout actors 0-1"), {"CPU": 2, "GPU": 1.0, "gpu_node": 2}),
        Bundle(("learner 1", "rollout actors 2-3"), {"CPU": 2, "GPU": 1.0, "gpu_node": 2}),
    )
    assert plan.engine_bundles == (0, 0, 1, 1)
    assert plan.engine == {"CPU": 1, "GPU": 0.25, "gpu_node": 1} and plan.learner == {"GPU": 0.5}
    assert plan.describe(1) == "learner 1 + rollout actors 2-3 {CPU: 2, GPU: 1, gpu_node: 2}"


@pytest.mark.parametrize("sections, message", [
    ({"rollout": {"resources": {"CPU": 2}}}, "'CPU' is Ray's own: set rollout.num_cpus_per_actor instead"),
    ({"reward_model": {"resources": {"GPU": 1}}}, "'GPU' is Ray's own: set reward_model.num_gpus instead"),
    ({"rollout": {"resources": {"rollout_node": 0}}}, "rollout.resources.rollout_node must be a number > 0; got 0"),
    ({"rollout": {"resources": {"rollout_node": 1.5}}}, "must be at most 1 or a whole number"),
    ({"cluster": {"learner_resources": {"learner_node": 1}}}, "cluster.learner_resources needs cluster.num_learners"),
    ({"cluster": {"placement": "colocated"}}, "cluster.placement=colocated puts engines in the learners' bundles"),
    ({"cluster": {"placement_strategy": "pack"}}, "cluster.placement_strategy must be one of 'PACK'"),
    ({"rollout": {"num_actors": 3}, "cluster": {"num_learners": 2, "placement": "colocated"},
      "algorithm": {"minibatch_size": 32}}, "rollout.num_actors (3) must be a multiple of cluster.num_learners (2)"),
    ({"rollout": {"num_actors": 2, "num_gpus_per_actor": 0.5},
      "cluster": {"num_learners": 1, "num_gpus_per_learner": 0.5, "placement": "colocated"}},
     "share cluster.num_gpus_per_learner + 2 x rollout.num_gpus_per_actor = 1.5 GPUs"),
])
def test_placement_settings_that_cannot_work_are_one_line_errors(sections: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(sections, source="exp.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_an_unplaced_group_says_what_is_missing() -> None:
    cfg = config(rollout={"num_actors": 2, "resources": {"rollout_node": 1}},
                 cluster={"num_learners": 1, "learner_resources": {"learner_node": 1}})
    plan = plan_placement(cfg)
    pools = [{"CPU": 4, "rollout_node": 4}, {"CPU": 2, "learner_node": 1}]
    assert unplaced_reason(plan, pools[:1], {}) == (
        "learner 0 {CPU: 1, learner_node: 1} fits on no node: no node has learner_node (start one with ray start "
        "--resources)")
    assert unplaced_reason(plan, [{"CPU": 1, "rollout_node": 1}, pools[1]], {}) == (
        "the cluster is too small: it has rollout_node 1 of 2 needed")
    assert unplaced_reason(plan, pools, {"CPU": 1, "rollout_node": 4, "learner_node": 1}) == (
        "other work holds the resources: free now CPU 1 of 3 needed")
    spread = plan_placement(build_config({**cfg.to_dict(), "cluster": {**cfg.to_dict()["cluster"],
                                                                        "placement_strategy": "STRICT_SPREAD"}}))
    assert unplaced_reason(spread, pools, {}) == "STRICT_SPREAD needs 3 nodes, one per bundle; the cluster has 2"


# -------------------------------------------------------------------------------------------- on Ray nodes
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_a_run_on_three_nodes_places_engines_and_learner_in_their_pools_and_frees_the_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A head with no CPUs (the driver only), a rollout node and a learner node, each with its custom resource: the
    run's engines and its learner actor run on their pool's node, inside the run's placement group, which is gone
    once the run has finished."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from cluster.checkpoint import latest_checkpoint
    from cluster.run import train
    from cluster.tracking import read_metrics

    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # Ray's state client would take it over the address given below
    # Its own temp dir (short: Ray's socket paths have a length limit) and ports: other Rays may run on this machine.
    gcs, dashboard, client, agent, runtime_env, metrics, export = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="tgpg-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=0, temp_dir=temp_dir, include_dashboard=True,  # the dashboard serves the state API
        gcs_server_port=gcs, dashboard_port=dashboard, ray_client_server_port=client, dashboard_agent_listen_port=agent,
        runtime_env_agent_port=runtime_env, metrics_agent_port=metrics, metrics_export_port=export,
    ))
    rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 2})
    learner_node = cluster.add_node(num_cpus=1, resources={"learner_node": 1})
    try:
        ray.init(address=cluster.address, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING", "TOKENIZERS_PARALLELISM": "false"}})
        cfg = load_config(overrides=[
            "name=pools", f"runs_dir={tmp_path}", "iterations=3", "checkpoint_every=3", "tracking.wandb=false",
            "tracking.progress_bar=false", "rollout.prompts_per_iteration=64", "algorithm.minibatch_size=32",
            "algorithm.lr=1e-3", "cluster.num_learners=1", "rollout.resources={rollout_node: 1}",
            "cluster.learner_resources={learner_node: 1}",
        ])
        run = train(cfg)

        rows = read_metrics(run)
        assert [r["iteration"] for r in rows] == [1, 2, 3] and [r["weights/version"] for r in rows] == [2, 3, 4]
        (group,) = [g for g in ray.util.placement_group_table().values() if g["name"] == f"tokengym:{run.name}"]
        assert group["state"] == "REMOVED" and group["strategy"] == "PACK"
        actors = list_actors(address=f"http://127.0.0.1:{dashboard}", detail=True, limit=1000,
                             filters=[("placement_group_id", "=", group["placement_group_id"])])
        engines = [a for a in actors if a.class_name == "VLLMRolloutActor"]
        learners = [a for a in actors if a.class_name != "VLLMRolloutActor"]
        assert len(engines) == 2 and {a.node_id for a in engines} == {rollout_node.node_id}
        # Ray asks for a resource reserved in bundle i of group G as "<name>_group_<i>_<G>" (any bundle of G:
        # "<name>_group_<G>"): each engine in a bundle of its own, the learner (RLlib gives no index) in the group.
        pg = group["placement_group_id"]

        def bundles(actor: Any) -> tuple[int, ...]:
            found = (re.fullmatch(rf"\w+_group_(\d+)_{pg}", name) for name in actor.required_resources)
            return tuple(sorted({int(m.group(1)) for m in found if m}))

        assert sorted(bundles(a) for a in engines) == [(0,), (1,)]
        assert all(f"rollout_node_group_{pg}" in a.required_resources for a in engines)
        assert len(learners) == 1 and learners[0].node_id == learner_node.node_id, [a.class_name for a in actors]
        assert f"learner_node_group_{pg}" in learners[0].required_resources and bundles(learners[0]) == ()
        assert all(a.state == "DEAD" for a in actors)
        # It learned, across nodes: every update moved the policy, and the engines sampled with the learner's weights.
        assert all(r["losses/approx_kl"] > 0 for r in rows) and max(r["rollout/logprob_gap"] for r in rows) < 1e-3
        assert latest_checkpoint(run / "checkpoints").name == "iter_000003"
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ colocated
@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_colocated_engines_sleep_on_a_gpu_and_wake_with_the_pushed_weights(ray_session, tiny_model_dir: Path) -> None:
    """An engine that sleeps frees its KV cache (and weights) on the GPU; the next weight push wakes it, and it
    samples exactly as before with the same weights."""
    from dataclasses import replace

    import numpy as np
    from safetensors.numpy import load_file

    from cluster.rollout import RolloutGroup
    from policies.models import weight_names
    from tests.cluster.test_rollout import ENV, engine

    group = RolloutGroup(1, ENV, replace(engine(tiny_model_dir), sleep_mode=True), 0.3)
    try:
        before = group.sample(8, 1, seed=5, version=0)
        free, total = torch.cuda.mem_get_info()
        group.sleep()
        assert torch.cuda.mem_get_info()[0] - free > 0.1 * total  # most of its 0.3 of the GPU is back
        names = set(weight_names(tiny_model_dir).names)
        weights = {k: v for k, v in load_file(tiny_model_dir / "model.safetensors").items() if k in names}
        group.load_weights(weights, version=1)  # wakes it, with these weights
        after = group.sample(8, 1, seed=5, version=1)
        np.testing.assert_array_equal(after["response_ids"], before["response_ids"])
    finally:
        group.shutdown()
