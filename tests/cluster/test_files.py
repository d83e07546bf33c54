"""Model and data files reach actors through Ray into storage on their own node (cluster/files.py): copied once per
node (two processes racing make one copy), reused, never read from a half-written or damaged copy, and every
actor of a run (rollout engine, reward model, remote learner with its critic and reference, the task's data file)
loads from that copy rather than from the driver's path."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from cluster.files import ShippedPath, local_copy, ship
from tests.conftest import TINY

pytestmark = [pytest.mark.ray]


def write_tree(root: Path) -> dict[str, bytes]:
    """A directory of the shapes a model directory has: nested, empty and large binary files; returns its contents."""
    rng = np.random.default_rng(0)
    contents = {"config.json": b'{"a": 1}', "empty.txt": b"", "sub/deeper/tokenizer.json": "é\n".encode(),
                "model.safetensors": rng.integers(0, 256, 24 << 20, dtype=np.uint8).tobytes()}  # 24 MiB: copies race
    for rel, data in contents.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return contents


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_a_shipped_directory_is_copied_once_per_node_and_reused(ray_session, tmp_path: Path) -> None:
    ray = ray_session
    src, storage = tmp_path / "driver" / "model", tmp_path / "node"
    contents = write_tree(src)
    shipped = ship(src, str(storage))
    assert ship(src, str(storage)).digest == shipped.digest  # named by content: the next run reuses the copy
    (src / "config.json").write_bytes(b'{"a": 2}')
    assert ship(src).digest != shipped.digest
    shutil.rmtree(src)  # the driver's directory is gone; the receivers have only the handle

    @ray.remote(num_cpus=1)
    def remote(shipped: ShippedPath) -> tuple[str, int]:  # in a Ray worker: the node's copy, and the worker's pid
        return os.fspath(shipped), os.getpid()

    (first, pid1), (second, pid2) = ray.get([remote.remote(shipped), remote.remote(shipped)])  # two processes at once
    assert pid1 != pid2 and first == second == str(storage / shipped.digest)
    assert read_tree(Path(first)) == contents
    # One copy and its lock file; no temporary directory left behind.
    assert sorted(p.name for p in storage.iterdir()) == sorted([shipped.digest, f".{shipped.digest}.lock"])
    weights = Path(first) / "model.safetensors"
    before = weights.stat()
    assert local_copy(shipped) == Path(first)  # reused, not written again
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    data = tmp_path / "driver" / "rows.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    one = ship(data, str(storage))
    data.unlink()
    local = Path(ray.get(remote.remote(one))[0])
    assert local == storage / one.digest / "rows.jsonl" and local.read_text().startswith('{"prompt"')


def test_half_written_and_damaged_copies_are_never_used(ray_session, tmp_path: Path) -> None:
    src, storage = tmp_path / "model", tmp_path / "node"
    contents = write_tree(src)
    shipped = ship(src, str(storage))
    target = storage / shipped.digest
    # A writer that died mid-copy leaves a temporary directory with a truncated file: it is not the copy.
    dead = storage / f".{shipped.digest}.dead-writer.tmp"
    dead.mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(contents["model.safetensors"][:1000])
    assert local_copy(shipped) == target and read_tree(target) == contents
    # A copy damaged afterwards (a truncated file, a missing one) is replaced by a complete one.
    (target / "model.safetensors").write_bytes(contents["model.safetensors"][:1000])
    (target / "sub" / "deeper" / "tokenizer.json").unlink()
    assert local_copy(shipped) == target and read_tree(target) == contents


@pytest.mark.vllm
def test_every_actor_of_a_run_reads_its_node_copy_not_the_drivers_path(ray_session, tmp_path: Path) -> None:
    from test_reward_model import save_tiny_reward_model  # noqa: E402  (same folder)

    from cluster.config import build_config
    from cluster.run import prepare_policy
    from cluster.trainer import Trainer
    from policies.learner import MODULE_ID
    from policies.models import load_tokenizer
    from textenv import EpochOrder, HFTokenizerAdapter, make_env

    ray = ray_session
    driver, storage = tmp_path / "driver", tmp_path / "node"
    data = driver / "sums.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(4) for b in range(4)))
    reward_dir = save_tiny_reward_model(driver / "reward", "llama", num_labels=2)
    cfg = build_config({
        "env": {"id": "textenv/File-v0", "task_kwargs": {"path": str(data), "max_response_tokens": 3}},
        "policy": {"critic": "separate", **{k: v for k, v in TINY.items() if k != "max_positions"}},
        "algorithm": {"kl_coef": 0.1, "minibatch_size": 8, "num_epochs": 1},  # kl: the learner loads the reference
        "rollout": {"num_actors": 1, "prompts_per_iteration": 4, "samples_per_prompt": 2},
        "reward_model": {"path": str(reward_dir)},
        "cluster": {"num_learners": 1, "node_storage": str(storage)},
    })
    policy_dir = prepare_policy(cfg, driver)  # the run's policy_init, on the driver's disk
    env = make_env(cfg.env, tokenizer=HFTokenizerAdapter(load_tokenizer(policy_dir))).unwrapped
    trainer = Trainer(cfg, policy_dir, env.max_prompt_tokens, env.max_response_tokens,
                      data=EpochOrder.for_task(env.task, cfg.seed))
    try:
        node_copy = lambda path: Path(path).parent == storage and path != str(policy_dir)  # noqa: E731
        assert node_copy(trainer.rollouts.info[0]["model_dir"]), trainer.rollouts.info[0]
        assert node_copy(trainer.reward_model.info["model_dir"]), trainer.reward_model.info
        task_path = ray.get(trainer.rollouts.actors[0].__ray_call__.remote(lambda actor: str(actor.env.task.path)))
        assert Path(task_path) == storage / Path(task_path).parent.name / "sums.jsonl"
        (paths,) = [r.get() for r in trainer.learners.foreach_learner(
            lambda learner: {k: learner.module[MODULE_ID].unwrapped().model_config[k]
                             for k in ("model_path", "critic_model_path")})]
        assert all(node_copy(p) for p in paths.values()), paths
        shutil.rmtree(driver)  # nothing reads the driver's files once the actors are up
        trainer.sync_weights()
        metrics, _ = trainer.run_iteration(1)
        assert metrics["weights/version"] == 2 and np.isfinite(metrics["losses/policy_loss"])
        assert metrics["rollout/logprob_gap"] < 1e-3  # engine and learner hold the same shipped weights
    finally:
        trainer.shutdown()
