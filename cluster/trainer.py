"""The training driver. One iteration reads top to bottom:

    generate + score (rollout actors) -> old/ref log-probs (learner) -> advantages -> update -> sync weights

and ``train`` wraps it with logging and checkpoints.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cluster.checkpoint import read_rng, read_state, save_checkpoint
from cluster.config import ExperimentConfig
from cluster.console import timed
from cluster.evaluation import Evaluator
from cluster.files import ship, ship_task_files
from cluster.placement import Placement, plan_placement
from cluster.reward_model import RewardModelServer
from cluster.dispatch import RolloutJob
from cluster.rollout import (
    STARTUP_PARTS as ACTOR_STARTUP_PARTS, EngineOptions, RolloutGroup, StaleWeightsError, derive_seed, unwrap_ray_errors,
)
from cluster.supervision import Supervisor
from cluster.weight_sync import make_weight_sync
from policies.advantages import ADVANTAGES, AdvantageParams, whiten
from policies.columns import (
    ADVANTAGES as ADV, ATTENTION_MASK, INPUT_IDS, OLD_LOGP, OLD_VALUES, POSITION_IDS, REF_LOGP, RESPONSE_MASK,
    RETURNS, REWARDS, SAMPLING_LOGP,
)
from policies.learner import (
    MODULE_ID, build_learner_group, group_rollout_stats, learner_rng_states, set_learner_rng_states,
)
from policies.losses import KL_ESTIMATORS, behaviour_weights
from policies.rng import get_rng_state, seed_all, set_rng_state
from textenv import EpochOrder


class Trainer:
    """The Ray side of one run: the vLLM rollout actors and the RLlib LearnerGroup, and the iteration over them.

    ``data`` (for a dataset task) is the run's cursor over the rows: the driver hands each iteration's rows to the
    actors, so the run serves its data in epochs, and the cursor is part of every checkpoint. Every actor runs in
    the run's placement group (``cluster/placement.py``), named ``name`` on Ray.
    """

    def __init__(
        self, cfg: ExperimentConfig, model_dir: Path, prompt_tokens: int, response_tokens: int,
        data: EpochOrder | None = None, name: str = "tokengym",
    ) -> None:
        self.cfg, self.data = cfg, data
        self.weights_version = 0
        self.adv_params = AdvantageParams(
            cfg.algorithm.gamma, cfg.algorithm.lam, cfg.rollout.samples_per_prompt, credit=cfg.algorithm.credit
        )
        seed_all(cfg.seed)  # RLlib shuffles minibatches with numpy's global generator: runs repeat per seed
        self.startup: dict[str, float] = {}  # where this trainer's start went (startup/* of the first logged row)
        # Actors read model and data files from copies on their own nodes, shipped once through Ray (cluster/files.py).
        # Held for the run: their objects must outlive every actor (a restarted one on a new node copies again).
        storage = cfg.cluster.node_storage
        self.policy_files = ship(model_dir, storage)
        self.actor_env = ship_task_files(cfg.env, storage)
        # Every actor's resources reserved at once (or a PlacementError naming what is missing).
        self.placement = Placement(plan_placement(cfg), cfg.cluster.actor_timeout_s, name=name)
        try:
            self._start_actors(cfg, engine_options(cfg, self.policy_files, prompt_tokens, response_tokens), model_dir)
        except BaseException:
            self.placement.remove()  # else a Ray session that outlives this trainer keeps the resources reserved
            raise
        # Batches queued on the engines: (iteration, job, the data cursor before its rows), oldest first.
        self.pending: deque[tuple[int, RolloutJob, dict[str, Any] | None]] = deque()
        # Problems drawn before training starts, from a seed stream of their own (cluster/evaluation.py).
        self.evaluator = Evaluator(cfg.env, cfg.eval, cfg.seed) if cfg.eval.every > 0 else None

    def _start_actors(self, cfg: ExperimentConfig, engine: EngineOptions, model_dir: Path) -> None:
        """The reward model, the rollout actors and the learners, each in its bundle of the placement group.

        The reward model starts first: every rollout actor's environment calls it. The learners start last: RLlib
        puts each learner in any bundle with room, which is a learner's own only once the others hold theirs.
        """
        storage = cfg.cluster.node_storage
        # Deadlines and restarts of the rollout and reward-model actors; the loop below stays free of them.
        self.supervisor = supervisor_for(cfg)
        with timed(self.startup, "actors", "startup"):  # until every engine is built and warm
            self.reward_model = (RewardModelServer(cfg.reward_model, self.supervisor, self.placement, storage)
                                 if cfg.reward_model.path is not None else None)
            self.rollouts = RolloutGroup(
                cfg.rollout.num_actors, self.actor_env, engine, cfg.rollout.num_gpus_per_actor,
                batch_reward=self.reward_model.reward if self.reward_model is not None else None,
                num_cpus_per_actor=cfg.rollout.num_cpus_per_actor, supervisor=self.supervisor, placement=self.placement,
            )
        for part in ACTOR_STARTUP_PARTS:  # inside each rollout actor: the slowest one's
            self.startup[f"startup/actor_{part}_s"] = max(info[f"{part}_s"] for info in self.rollouts.info)
        remote = cfg.cluster.num_learners > 0  # a learner in this process reads the driver's paths
        critic = cfg.policy.critic_model_path
        with timed(self.startup, "learners", "startup"):
            self.learners = build_learner_group(
                cfg.algorithm, cfg.policy, self.policy_files if remote else str(model_dir), cfg.cluster.num_learners,
                cfg.cluster.num_gpus_per_learner, temperature=cfg.rollout.temperature, seed=cfg.seed,  # learner k: +k
                critic_model_path=ship(critic, storage) if remote and critic is not None else None,
                placement_group=self.placement.group, resources_per_learner=cfg.cluster.learner_resources,
            )
            # From learner 0 to the engines (rollout.weight_transport); a collective one builds its group here.
            self.weight_sync = make_weight_sync(cfg, self.learners, self.rollouts)

    # ------------------------------------------------------------------------------------------ one iteration
    def run_iteration(self, iteration: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """One iteration; its metrics, and a few of its rollouts (prompt, response, reward) for the samples table.

        With ``rollout.max_staleness = k > 0`` the batches of the next ``k`` iterations are queued on the engines
        with this one (:meth:`submit_rollouts`), so they generate while this iteration's update runs.
        """
        t: dict[str, float] = {}
        start = time.perf_counter()
        k = self.cfg.rollout.max_staleness
        self.submit_rollouts(iteration)
        queued, job, _ = self.pending.popleft()
        assert queued == iteration, (queued, iteration)
        with timed(t, "rollout"):  # with k > 0: only the wait for a batch that was mostly generated already
            rollouts = self.rollouts.collect(job, exact=k == 0)
        staleness = self.weights_version - rollouts["sample_version"]
        if int(staleness.max()) > k:  # the dispatch order makes this impossible; a batch must never break the bound
            raise StaleWeightsError(f"iteration {iteration}: samples {int(staleness.max())} versions old, "
                                    f"more than rollout.max_staleness={k}")
        batch = build_batch(rollouts)
        self.rollouts.sleep()  # colocated on GPUs: the engines free their memory for the learners until the sync
        with timed(t, "logprobs"):
            batch.update(self.rollout_stats(batch))
        with timed(t, "advantages"):
            adv_metrics = self.add_advantages(batch)
        adv_metrics.update({"rollout/staleness": float(staleness.mean()), "rollout/staleness_max": int(staleness.max())})
        with timed(t, "update"):
            losses = self.update(batch, iteration)
        with timed(t, "weight_sync"):
            self.sync_weights()
        t["timing/iteration_s"] = time.perf_counter() - start
        trained = float(batch[ATTENTION_MASK].sum()) * self.cfg.algorithm.num_epochs
        data = {"data/epoch": self.data.progress} if self.data is not None else {}
        t["timing/engines_busy_s"] = rollouts["busy_s"] / self.cfg.rollout.num_actors  # per engine, this batch's
        metrics = {"iteration": iteration, **rollout_metrics(rollouts, batch, t), **adv_metrics, **losses, **t, **data,
                   "throughput/update_tokens_per_s": trained / t["timing/update_s"],
                   "weights/version": self.weights_version, "weights/sync_bytes": self.weight_sync.bytes_per_engine,
                   "faults/actor_restarts": self.supervisor.take_restarts()}
        return metrics, rollouts["examples"]

    def submit_rollouts(self, iteration: int) -> None:
        """Queue the batches of ``iteration`` up to ``iteration + rollout.max_staleness`` (not past the run's last)
        that are not queued yet, in order. Each is sampled with the weights the engines hold when a chunk starts:
        at least the version pushed now, which the learner will be at most ``max_staleness`` versions past when it
        uses the batch. A dataset task's rows are taken now; the cursor from before them is kept for checkpoints.
        """
        n, rollout = self.cfg.rollout.prompts_per_iteration, self.cfg.rollout
        last = min(iteration + rollout.max_staleness, self.cfg.iterations)
        nxt = self.pending[-1][0] + 1 if self.pending else iteration
        for it in range(max(nxt, iteration), last + 1):
            cursor = self.data.state() if self.data is not None else None
            rows = self.data.take(n) if self.data is not None else None
            job = self.rollouts.submit(n, rollout.samples_per_prompt, iteration_seed(self.cfg.seed, it),
                                       self.weights_version, rows, chunks_per_actor=rollout.chunks_per_actor,
                                       newer_ok=rollout.max_staleness > 0)
            self.pending.append((it, job, cursor))

    def evaluate(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The ``eval/`` metrics of the policy the engines hold now (greedy accuracy and reward, pass@k), and its
        greedy response to every held-out problem (prompt, response, answer, score)."""
        return self.evaluator.run(self.rollouts, self.weights_version)

    def rollout_stats(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Pre-update log-probs (and values, reference log-probs) from the learners: one forward per sequence."""
        return unwrap_ray_errors(lambda: group_rollout_stats(self.learners, batch, self.cfg.algorithm.minibatch_size),
                                 where="learner")

    def add_advantages(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
        """Advantages and returns from the registered estimator, written into ``batch``."""
        algo = self.cfg.algorithm
        mask = torch.from_numpy(batch[RESPONSE_MASK])
        rewards = torch.from_numpy(batch[REWARDS])
        metrics: dict[str, float] = {}
        if algo.kl_coef > 0 and algo.kl_in == "reward":
            kl = KL_ESTIMATORS[algo.kl_estimator](torch.from_numpy(batch[OLD_LOGP]), torch.from_numpy(batch[REF_LOGP]))
            rewards = rewards - algo.kl_coef * kl * mask
            metrics["rollout/kl_ref"] = float((kl * mask).sum() / mask.sum())
        values = torch.from_numpy(batch[OLD_VALUES]) if OLD_VALUES in batch else torch.zeros_like(rewards)
        batch.setdefault(OLD_VALUES, values.numpy())
        adv, returns = ADVANTAGES[algo.advantage](rewards, values, mask, self.adv_params)
        if algo.normalize_advantages:
            adv = whiten(adv, mask)
        # Off-policy correction (algorithm.off_policy): each token's policy term weighted by pi_old / pi_sampling.
        weights, stats = behaviour_weights(torch.from_numpy(batch[OLD_LOGP]), torch.from_numpy(batch[SAMPLING_LOGP]),
                                           mask, algo.off_policy, algo.is_cap)
        if algo.off_policy != "none":
            adv = adv * weights
        metrics.update({"rollout/is_weight_mean": stats["is_weight_mean"], "rollout/is_clipfrac": stats["is_clipfrac"]})
        batch[ADV], batch[RETURNS] = adv.float().numpy(), returns.float().numpy()
        if self.cfg.policy.value_head:
            m = mask.bool()
            var = returns[m].var()
            metrics["losses/explained_variance"] = float(1 - (returns[m] - values[m]).var() / var) if var > 0 else 0.0
        return metrics

    def update(self, batch: dict[str, np.ndarray], iteration: int) -> dict[str, float]:
        """The RLlib LearnerGroup update: num_epochs x minibatches, shuffled, sharded over the learners."""
        from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch
        from ray.rllib.utils.metrics import NUM_ENV_STEPS_SAMPLED_LIFETIME

        algo = self.cfg.algorithm
        n = len(batch[RESPONSE_MASK])
        epochs, shuffle = algo.num_epochs, True
        if algo.group_minibatches:  # the epochs laid out here, whole groups per minibatch; RLlib takes them in order
            order = group_epoch_order(n, self.cfg.rollout.samples_per_prompt, epochs, max(1, self.cfg.cluster.num_learners))
            batch = {k: v[order] for k, v in batch.items()}
            epochs, shuffle = 1, False
        mab = MultiAgentBatch({MODULE_ID: SampleBatch(batch)}, env_steps=n)
        results = unwrap_ray_errors(lambda: self.learners.update(
            batch=mab, num_epochs=epochs, minibatch_size=algo.minibatch_size, shuffle_batch_per_epoch=shuffle,
            timesteps={NUM_ENV_STEPS_SAMPLED_LIFETIME: iteration},  # the clock of algorithm.lr_schedule
        ), where="learner")
        stats = results[0][MODULE_ID]
        names = {"policy_loss": "policy_loss", "value_loss": "value_loss", "entropy": "entropy",
                 "approx_kl": "approx_kl", "clipfrac": "clipfrac", "kl_ref": "kl_ref",
                 "gradients_default_optimizer_global_norm": "grad_norm", "default_optimizer_learning_rate": "lr"}
        out = {f"losses/{ours}": float(stats[theirs]) for theirs, ours in names.items() if theirs in stats}
        out.setdefault("losses/value_loss", 0.0)
        return out

    def sync_weights(self) -> None:
        """Push learner 0's weights into every vLLM engine and bump the version the next rollouts must carry."""
        self.weights_version += 1
        self.weight_sync.push(self.weights_version)

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, root: Path, iteration: int, extra: dict[str, Any]) -> Path:
        """A checkpoint: learner state, counters, the data cursor, and every process's random generator states."""
        state = {"weights_version": self.weights_version, **extra}
        if self.data is not None:  # before the rows of batches already queued (rollout.max_staleness > 0)
            state["data"] = self.pending[0][2] if self.pending else self.data.state()
        rng = {"driver": get_rng_state(), "learners": learner_rng_states(self.learners)}
        return save_checkpoint(root, iteration, self.learners, state, self.cfg.keep_checkpoints, rng=rng)

    def restore(self, checkpoint: Path) -> dict[str, Any]:
        """Learner weights, optimizer state, counters, data cursor and random streams from ``checkpoint``; the
        engines get its weights. The run then continues exactly as if it had not stopped."""
        state = read_state(checkpoint)
        self.learners.restore_from_path(str((checkpoint / "learner").resolve()))
        self.weights_version = int(state["weights_version"]) - 1
        self.sync_weights()  # brings the engines to the checkpoint's weights and version
        if self.data is not None and "data" in state:
            self.data.load_state(state["data"])
        rng = read_rng(checkpoint)
        if rng is not None:  # a checkpoint from before random states were saved resumes re-seeded
            set_rng_state(rng["driver"])
            set_learner_rng_states(self.learners, rng["learners"])
        return state

    def shutdown(self) -> None:
        self.weight_sync.shutdown()
        self.rollouts.shutdown()
        if self.reward_model is not None:
            self.reward_model.shutdown()
        self.learners.shutdown()
        self.placement.remove()


def engine_options(
    cfg: ExperimentConfig, model_dir: str | os.PathLike[str], prompt_tokens: int, response_tokens: int
) -> EngineOptions:
    """The rollout actors' vLLM engine settings for ``model_dir`` (shipped: a :class:`cluster.files.ShippedPath`)."""
    return EngineOptions(
        model_dir=model_dir, dtype=cfg.rollout.dtype, max_model_len=prompt_tokens + response_tokens,
        max_num_seqs=min(256, cfg.batch_size), temperature=cfg.rollout.temperature,
        kv_cache_gib=cfg.rollout.kv_cache_gib, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
        seeded_sampling=cfg.rollout.seeded_sampling, seed=cfg.seed, chunked_prefill=cfg.rollout.chunked_prefill,
        max_num_batched_tokens=cfg.rollout.max_num_batched_tokens,
        sleep_mode=cfg.cluster.placement == "colocated" and cfg.cluster.num_gpus_per_learner > 0,
        lora_rank=cfg.policy.lora_rank if cfg.rollout.lora_weights == "adapters" else 0,
        lora_alpha=cfg.policy.lora_alpha,
    )


def supervisor_for(cfg: ExperimentConfig) -> Supervisor:
    """The run's actor supervision: ``cluster.actor_timeout_s`` and ``cluster.max_actor_restarts``."""
    return Supervisor(cfg.cluster.actor_timeout_s, cfg.cluster.max_actor_restarts)


def iteration_seed(seed: int, iteration: int) -> int:
    """The rollout seed of ``iteration`` (each actor derives its own from it: :func:`cluster.rollout.actor_seed`)."""
    return derive_seed(seed, iteration)


# ---------------------------------------------------------------------------------------------- batch helpers
def group_epoch_order(rows: int, group: int, epochs: int, shards: int) -> np.ndarray:
    """Row indices for ``algorithm.group_minibatches``: each learner's shard of the batch, every epoch of it in turn.

    The batch's rows come in groups of ``group`` (a prompt's samples, consecutive). RLlib gives learner ``k`` the
    ``k``-th contiguous shard and takes its minibatches in order; so shard ``k`` keeps its groups (as with row
    shuffling, a learner trains on its own shard) and lists them ``epochs`` times, each time in a new order drawn
    from numpy's global generator (the one RLlib shuffles rows with: seeded per run, saved with checkpoints). A
    minibatch whose size is a multiple of ``group`` then holds whole groups only.
    """
    groups = np.arange(rows // group).reshape(shards, -1)  # the groups of each learner's shard
    order = [np.random.permutation(mine) for mine in groups for _ in range(epochs)]
    return (np.concatenate(order)[:, None] * group + np.arange(group)).reshape(-1)


def build_batch(rollouts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Token rows for the learner: the prompt left-padded and the response right-padded, (B, P + R).

    ``RESPONSE_MASK`` marks the action tokens (all generated tokens, or, with ``rollouts["action_mask"]``, only the
    policy's tokens of a multi-turn episode); the attention mask covers every real token.
    """
    prompt_ids, response_ids = rollouts["prompt_ids"], rollouts["response_ids"]
    P, R = prompt_ids.shape[1], response_ids.shape[1]
    prompt_mask = np.arange(P)[None, :] >= (P - rollouts["prompt_length"])[:, None]  # (B, P)
    real = np.arange(R)[None, :] < rollouts["response_length"][:, None]  # (B, R) generated or replied tokens
    # Actions are the tokens the policy chose; a multi-turn environment's replies are context, not actions.
    response_mask = real & rollouts["action_mask"].astype(bool) if "action_mask" in rollouts else real
    attention = np.concatenate([prompt_mask, real], axis=1).astype(np.int64)  # (B, P + R)
    positions = np.clip(np.cumsum(attention, axis=1) - 1, 0, None)
    return {
        INPUT_IDS: np.concatenate([prompt_ids, response_ids], axis=1),
        ATTENTION_MASK: attention,
        POSITION_IDS: positions.astype(np.int64),
        RESPONSE_MASK: response_mask.astype(np.float32),
        REWARDS: rollouts["rewards"],
        SAMPLING_LOGP: rollouts["sampling_logp"],
    }


def rollout_metrics(rollouts: dict[str, Any], batch: dict[str, np.ndarray], t: dict[str, float]) -> dict[str, float]:
    mask = batch[RESPONSE_MASK]
    returns = (batch[REWARDS] * mask).sum(axis=1)
    return {
        "reward/mean": float(returns.mean()),
        "reward/std": float(returns.std()),
        "reward/score_mean": float(rollouts["score"].mean()),
        "reward/errors": int(rollouts["reward_errors"]),
        "rollout/response_length": float(mask.sum(axis=1).mean()),
        "rollout/terminated_frac": float(rollouts["terminated"].mean()),
        "rollout/logprob_gap": float(np.abs(batch[SAMPLING_LOGP] - batch[OLD_LOGP])[mask > 0].mean()),
        "timing/generate_s": float(rollouts["generate_s"]),
        "timing/replay_s": float(rollouts["replay_s"]),
        "timing/batch_reward_s": float(rollouts["batch_reward_s"]),
        "throughput/rollout_tokens_per_s": rollouts["generated_tokens"] / max(t["timing/rollout_s"], 1e-9),
    }
