"""The RLlib Learner that updates the Transformer policy, and the RLlib config that builds its LearnerGroup."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

import numpy as np
import torch
from ray.rllib.algorithms.algorithm_config import AlgorithmConfig as RLlibAlgorithmConfig
from ray.rllib.core.learner.torch.torch_learner import TorchLearner
from ray.rllib.core.rl_module.rl_module import RLModuleSpec
from ray.rllib.utils.typing import ModuleID

from policies.columns import (
    ADVANTAGES, ATTENTION_MASK, ENTROPY, INPUT_IDS, LOGP, OLD_LOGP, OLD_VALUES, POSITION_IDS, REF_LOGP, RESPONSE_MASK,
    RETURNS, VALUES,
)
from policies.config import AlgorithmConfig, PolicyConfig
from policies.losses import KL_ESTIMATORS, OBJECTIVES, aggregate, value_loss
from policies.models import WeightNames, load_causal_lm, weight_names
from policies.rl_module import LM_PREFIX, TransformerPolicyRLModule, response_logp
from policies.rng import get_rng_state, seed_all, set_rng_state
from policies.weight_buckets import BucketLayout, pack_bucket, plan_buckets

MODULE_ID = "default_policy"
GRAD_NORM_KEY = "gradients_default_optimizer_global_norm"  # RLlib's name for it (the trainer logs losses/grad_norm)
logger = logging.getLogger(__name__)
MODEL_PATH_KEYS = ("model_path", "critic_model_path")  # the module's model_config entries naming HF directories


class TokenPolicyLearner(TorchLearner):
    """Computes the registered objective (+ value loss, entropy bonus, KL to the reference) on token batches.

    Also answers ``rollout_stats``: a no-grad pass that gives the pre-update log-probabilities, values and
    reference log-probabilities of a batch, which the driver turns into advantages.
    """

    def build(self) -> None:
        if self.config.learner_seed is not None:  # before the module is built: its value head draws from torch
            seed_all(self.config.learner_seed + self._learner_index)
        model_config = self._local_model_paths()
        super().build()
        self._weight_names = weight_names(model_config["model_path"])  # what the engines store (tied aliases)
        algo: AlgorithmConfig = self.config.algo
        self._ref_lm = None
        if algo.kl_coef > 0:  # a frozen copy of the starting policy; never loaded when the KL is off
            self._ref_lm = load_causal_lm(model_config["model_path"]).to(self._device).eval()
            self._ref_lm.requires_grad_(False)

    def _local_model_paths(self) -> dict[str, Any]:
        """The module's ``model_config``, its model directories turned into paths on this learner's node.

        The driver hands remote learners path-likes (``cluster.files.ShippedPath``: ``os.fspath`` copies the files
        to this node); plain paths stay as they are. Done before the module is built, so that the module, and the
        checkpoints that pickle its config, hold plain paths.
        """
        spec = self._module_spec
        spec = spec.rl_module_specs[MODULE_ID] if hasattr(spec, "rl_module_specs") else spec
        for key in MODEL_PATH_KEYS:
            if spec.model_config.get(key) is not None:
                spec.model_config[key] = os.fspath(spec.model_config[key])
        return spec.model_config

    def configure_optimizers_for_module(self, module_id: ModuleID, config: RLlibAlgorithmConfig = None) -> None:
        params = [p for p in self.get_parameters(self._module[module_id]) if p.requires_grad]  # LoRA: adapters only
        # foreach: each Adam op over all parameters at once (torch's default on CPU is a Python loop over them, a
        # tenth of a small policy's step), with the loop's arithmetic to the bit (the fused kernel rounds differently,
        # and the shipped configs' recorded runs would not repeat); bench/RESULTS.md, "Learner step". RLlib's lr
        # scheduler sets the learning rate as a tensor, which torch's foreach Adam refuses: the loop there.
        foreach = not config.algo.lr_schedule
        optimizer = torch.optim.Adam(params, eps=config.algo.adam_eps, foreach=foreach)
        schedule = [list(pair) for pair in config.algo.lr_schedule] if config.algo.lr_schedule else config.lr
        self.register_optimizer(module_id=module_id, optimizer=optimizer, params=params, lr_or_lr_schedule=schedule)

    def _uncompiled_update(self, batch: dict[str, Any], **kwargs: Any) -> tuple[Any, Any, Any]:
        """One optimizer step on a minibatch: split into micro-batches by token budget, gradients accumulated.

        Each micro-batch's loss is weighted by its share of the minibatch (tokens for ``token_mean``, sequences for
        ``seq_mean``), so the accumulated gradient equals the gradient of the whole minibatch. Under DDP only the last
        backward all-reduces.
        """
        micro = self._micro_batches(batch)
        if len(micro) == 1 and not self._autocast_enabled():
            return super()._uncompiled_update(batch, **kwargs)
        self._compute_off_policyness(batch)
        for optim in self._optimizer_parameters:
            optim.zero_grad(set_to_none=True)
        fwd_out = loss_per_module = None
        for i, (mb, weight) in enumerate(micro):
            with contextlib.ExitStack() as stack:
                if self.config.num_learners > 1 and i < len(micro) - 1:
                    self._enter_no_sync(stack)
                with self._autocast():
                    fwd_out = self.module.forward_train(mb)
                loss_per_module = self.compute_losses(fwd_out=fwd_out, batch=mb)
                (sum(loss_per_module.values()) * weight).backward()
        gradients = {pid: p.grad for pid, p in self._params.items()}
        with contextlib.ExitStack() as stack:
            if self.config.num_learners > 1:
                self._enter_no_sync(stack)
            self.apply_gradients(self.postprocess_gradients(gradients))
        return fwd_out, loss_per_module, {}

    def postprocess_gradients_for_module(
        self, *, module_id: ModuleID, config: RLlibAlgorithmConfig = None, module_gradients_dict: dict[str, Any]
    ) -> dict[str, Any]:
        """Clip by the global L2 norm (``algorithm.grad_clip``) and zero non-finite gradients, with one foreach norm
        over all gradients and one check.

        RLlib does the same with a norm per tensor and a finiteness check per tensor (each a synchronisation), twice
        (``torch_skip_nan_gradients`` turns its checks off: they are done here). Its outcome for a non-finite
        gradient is kept: the clipped gradients all become zero (a NaN norm scales every gradient to NaN, which it
        then sets to zero) and the optimizer still steps, with a warning.
        """
        grads = [g for g in module_gradients_dict.values() if g is not None]
        if not grads:
            return dict(module_gradients_dict)
        norm = torch.nn.utils.get_total_norm(grads, 2.0, error_if_nonfinite=False, foreach=True)
        if not bool(torch.isfinite(norm)):
            logger.warning("gradients of %s contain nan/inf values (global norm %s): set to zero for this step",
                           module_id, float(norm))
            torch._foreach_zero_(grads)
        elif config.grad_clip:
            torch._foreach_mul_(grads, torch.clamp(config.grad_clip / (norm + 1e-6), max=1.0))
        if config.grad_clip:
            self.metrics.log_value(key=(module_id, GRAD_NORM_KEY), value=norm, window=1)
        return dict(module_gradients_dict)

    def _enter_no_sync(self, stack: contextlib.ExitStack) -> None:
        for mod in self.module.values():  # DDP-wrapped modules: skip the gradient all-reduce for this backward
            if isinstance(mod, torch.nn.Module) and hasattr(mod, "no_sync"):
                stack.enter_context(mod.no_sync())

    def _micro_batches(self, batch: dict[str, Any]) -> list[tuple[dict[str, Any], float]]:
        budget = self.config.algo.micro_batch_tokens
        cols = batch[MODULE_ID]
        B, L = cols[INPUT_IDS].shape
        if budget is None or B * L <= budget:
            return [(batch, 1.0)]
        rows = max(1, budget // L)
        mask = cols[RESPONSE_MASK]
        per_seq = self.config.algo.loss_agg == "seq_mean"
        total = float((mask.sum(1) > 0).sum() if per_seq else mask.sum())
        out = []
        for start in range(0, B, rows):
            part = {k: v[start : start + rows] for k, v in cols.items()}
            m = part[RESPONSE_MASK]
            share = float((m.sum(1) > 0).sum() if per_seq else m.sum()) / max(total, 1.0)
            out.append(({MODULE_ID: part}, share))
        return out

    def _device_type(self) -> str:
        return torch.device(self._device).type if self._device is not None else "cpu"

    def _autocast_enabled(self) -> bool:
        mode = self.config.algo.bf16
        return mode == "on" or (mode == "auto" and self._device_type() == "cuda")

    def _autocast(self) -> Any:
        if self._autocast_enabled():
            return torch.autocast(self._device_type(), dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compute_loss_for_module(
        self, *, module_id: ModuleID, config: RLlibAlgorithmConfig, batch: dict[str, Any], fwd_out: dict[str, Any]
    ) -> torch.Tensor:
        algo: AlgorithmConfig = config.algo
        mask = batch[RESPONSE_MASK].float()
        logp = fwd_out[LOGP]
        pg_loss, stats = OBJECTIVES[algo.objective](
            logp, batch[OLD_LOGP], batch[ADVANTAGES], mask, algo.clip_range, algo.loss_agg
        )
        entropy = aggregate(fwd_out[ENTROPY], mask, algo.loss_agg)
        loss = pg_loss - algo.entropy_coef * entropy
        metrics = {"policy_loss": pg_loss, "entropy": entropy, **stats}
        if VALUES in fwd_out:
            vf_loss = value_loss(fwd_out[VALUES], batch[OLD_VALUES], batch[RETURNS], mask, algo.value_clip, algo.loss_agg)
            loss = loss + algo.vf_coef * vf_loss
            metrics["value_loss"] = vf_loss
        if algo.kl_coef > 0 and algo.kl_in == "loss":
            kl = aggregate(KL_ESTIMATORS[algo.kl_estimator](logp, batch[REF_LOGP]), mask, algo.loss_agg)
            loss = loss + algo.kl_coef * kl
            metrics["kl_ref"] = kl
        self.metrics.log_dict({k: float(v.detach()) for k, v in metrics.items()}, key=module_id, reduce="mean")
        return loss

    @torch.no_grad()
    def rollout_stats(self, batch: dict[str, np.ndarray], microbatch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Pre-update log-probabilities, values and reference log-probabilities of this learner's shard of ``batch``.

        With several learners, learner ``k`` of ``n`` takes the ``k``-th of ``n`` contiguous blocks of rows (so a
        group's samples stay together and share their prompt's forward pass); returns those row indices and the
        arrays. Forward passes take ``microbatch_size`` rows, fewer when ``algorithm.micro_batch_tokens`` allows fewer.
        """
        rank, world = self._rank_and_world()
        rows = np.array_split(np.arange(len(batch[RESPONSE_MASK])), world)[rank]
        budget = self.config.algo.micro_batch_tokens
        if budget is not None:  # the same token budget as the update's micro-batches
            microbatch_size = min(microbatch_size, max(1, budget // batch[INPUT_IDS].shape[1]))
        module = self.module[MODULE_ID].unwrapped()
        module.eval()
        outs: dict[str, list[np.ndarray]] = {}
        for start in range(0, len(rows), microbatch_size):
            idx = rows[start : start + microbatch_size]
            mb = {k: torch.from_numpy(v[idx]).to(self._device) for k, v in batch.items()}
            with self._autocast():  # the update's numerics, so that the first PPO ratio is exactly 1
                fwd = module.forward_train(mb)
                cols = {OLD_LOGP: fwd[LOGP]}
                if VALUES in fwd:
                    cols[OLD_VALUES] = fwd[VALUES]
                if self._ref_lm is not None:
                    cols[REF_LOGP] = response_logp(
                        self._ref_lm, mb, self.config.temperature, self.config.algo.logits_chunk_tokens,
                        self.config.algo.share_prompts,
                    )
            for k, v in cols.items():
                outs.setdefault(k, []).append(v.float().cpu().numpy())
        module.train()
        return rows, {k: np.concatenate(v) for k, v in outs.items()}

    # ------------------------------------------------------------------------------------------- weight sync
    def engine_weights(self, adapters: bool = False) -> dict[str, torch.Tensor]:
        """The policy's parameters as the inference engines store them: Hugging Face names, LoRA adapters merged,
        tied aliases left out. What :func:`hf_weights` makes of ``get_weights()``, but the module's own tensors
        (no copy; a LoRA merge makes new ones), so a weight sync never builds a NumPy copy of the whole state.

        ``adapters`` (``rollout.lora_weights: adapters``): only the LoRA adapters, under the names of a saved peft
        adapter (:func:`policies.lora.adapter_state`), which engines serving vLLM LoRA load on top of the base
        weights they already hold; the frozen base is never shipped."""
        state = self.module[MODULE_ID].unwrapped().state_dict()
        policy: PolicyConfig = self.config.policy
        if adapters:
            from policies.lora import adapter_state

            if policy.lora_rank == 0:
                raise ValueError("adapters were asked for, but the policy has none (policy.lora_rank is 0)")
            return adapter_state(lm_state(state))
        if policy.lora_rank > 0:  # the merge is NumPy's (policies/lora.py), so it runs on CPU copies
            state = {k: v.cpu().numpy() for k, v in state.items() if k.startswith(LM_PREFIX)}
        return {k: torch.as_tensor(v) for k, v in hf_weights(state, policy, self._weight_names).items()}

    def weight_buckets(
        self, dtype: str, bucket_bytes: int, device: str = "cpu", adapters: bool = False
    ) -> tuple[list[BucketLayout], Iterator[torch.Tensor]]:
        """The layouts of :meth:`engine_weights` in buckets of ``bucket_bytes`` in the engines' ``dtype``, and a
        generator packing each bucket's bytes on ``device`` when asked (one bucket in memory at a time)."""
        weights = self.engine_weights(adapters)
        layouts = plan_buckets(((k, v.shape) for k, v in weights.items()), dtype, bucket_bytes)
        return layouts, (pack_bucket(layout, weights, device) for layout in layouts)

    def put_weight_buckets(
        self, dtype: str, bucket_bytes: int, adapters: bool = False
    ) -> tuple[list[BucketLayout], list[Any]] | None:
        """Learner 0 only (others return None): :meth:`weight_buckets` put into Ray's object store from this
        process, one object per bucket; their layouts and ObjectRefs. The bytes never pass through the driver, and
        engines on one node map the node's single copy."""
        import ray

        if self._learner_index != 0:
            return None
        layouts, buckets = self.weight_buckets(dtype, bucket_bytes, adapters=adapters)
        return layouts, [ray.put(bucket.numpy()) for bucket in buckets]

    def get_rng_state(self) -> tuple[int, dict[str, Any]]:
        """This learner's index and its process's generator states (RLlib shuffles minibatches with numpy's)."""
        return self._learner_index, get_rng_state()

    def set_rng_state(self, states: dict[int, dict[str, Any]]) -> None:
        """Put back this learner's entry of ``states`` (learner index -> :meth:`get_rng_state` states)."""
        set_rng_state(states[self._learner_index])

    def _rank_and_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1


def group_rollout_stats(learner_group: Any, batch: dict[str, np.ndarray], microbatch_size: int) -> dict[str, np.ndarray]:
    """``TokenPolicyLearner.rollout_stats`` on every learner of ``learner_group``, shards put back in row order."""
    inputs = {k: batch[k] for k in (INPUT_IDS, ATTENTION_MASK, POSITION_IDS, RESPONSE_MASK)}
    shards = [r.get() for r in learner_group.foreach_learner(lambda learner: learner.rollout_stats(inputs, microbatch_size))]
    n = len(batch[RESPONSE_MASK])
    out = {k: np.zeros((n, *v.shape[1:]), v.dtype) for k, v in shards[0][1].items()}
    for rows, arrays in shards:
        for k, v in arrays.items():
            out[k][rows] = v
    return out


def learner_rng_states(learner_group: Any) -> dict[int, dict[str, Any]]:
    """Every remote learner's generator states by learner index ({} for a local learner: it is the caller's)."""
    if learner_group.is_local:
        return {}
    return dict(learner_results(learner_group.foreach_learner(lambda learner: learner.get_rng_state())))


def set_learner_rng_states(learner_group: Any, states: dict[int | str, dict[str, Any]]) -> None:
    """Put back states from :func:`learner_rng_states` (keys may be strings, as JSON gives them back)."""
    if learner_group.is_local or not states:
        return
    by_index = {int(k): v for k, v in states.items()}
    if sorted(by_index) != list(range(len(learner_group))):
        raise ValueError(f"the checkpoint holds random states of learners {sorted(by_index)} but the run has "
                         f"{len(learner_group)}; resume with the same cluster.num_learners")
    learner_results(learner_group.foreach_learner(lambda learner: learner.set_rng_state(by_index)))


def learner_results(results: Any) -> list[Any]:
    """The values of a ``foreach_learner`` call; a learner's exception is raised, not returned as a value."""
    values = [r.get() for r in results]
    for v in values:
        if isinstance(v, BaseException):
            raise v
    return values


def lm_state(module_state: dict[str, Any]) -> dict[str, Any]:
    """The Hugging Face model's entries of the RLModule's state, under the model's own names."""
    return {k[len(LM_PREFIX):]: v for k, v in module_state.items() if k.startswith(LM_PREFIX)}


def hf_weights(module_state: dict[str, Any], policy: PolicyConfig, names: WeightNames) -> dict[str, Any]:
    """The policy's weights under Hugging Face names, adapters merged: what vLLM's ``reload_weights`` takes.
    Arrays (``get_weights()``) or tensors (the module's own) pass through as they are; a LoRA merge gives arrays.

    ``names`` (``weight_names(policy directory)``) says which names are tied aliases of another parameter
    (``lm_head.weight`` with tied embeddings): they are left out, as ``save_pretrained`` leaves them out, since the
    engine has no tensor of their own; and which weights are stored transposed (GPT-2's Conv1D) for the LoRA merge.
    """
    lm = lm_state(module_state)
    if policy.lora_rank > 0:
        from policies.lora import merge_lora_state

        lm = merge_lora_state(lm, policy.lora_alpha / policy.lora_rank, transposed=names.transposed)
    return {k: v for k, v in lm.items() if k not in names.tied}


class TokenGymRLlibConfig(RLlibAlgorithmConfig):
    """RLlib's AlgorithmConfig carrying our typed sections to every Learner (local or remote)."""

    def __init__(self, algo: AlgorithmConfig | None = None, policy: PolicyConfig | None = None,
                 policy_model_path: str | os.PathLike[str] | None = None, temperature: float = 1.0,
                 learner_seed: int | None = None, critic_model_path: str | os.PathLike[str] | None = None):
        super().__init__()
        self.algo = algo or AlgorithmConfig()
        self.policy = policy or PolicyConfig()
        self.policy_model_path = policy_model_path
        # A separate critic's initial trunk: this path-like, else policy.critic_model_path, else the policy's.
        self.critic_model_path = critic_model_path or self.policy.critic_model_path or policy_model_path
        self.temperature = temperature  # the rollouts' sampling temperature: log-probs, entropy and KL use logits / T
        self.learner_seed = learner_seed  # learner k seeds its process with learner_seed + k (None: left as is)

    def get_default_learner_class(self) -> type[TokenPolicyLearner]:
        return TokenPolicyLearner

    def get_default_rl_module_spec(self) -> RLModuleSpec:
        import gymnasium as gym

        return RLModuleSpec(
            module_class=TransformerPolicyRLModule,
            # The spaces are nominal: the module reads token rows, not RLlib observations.
            observation_space=gym.spaces.Box(0, 1, (1,), np.float32),
            action_space=gym.spaces.Discrete(2),
            model_config={
                "model_path": self.policy_model_path, "value_head": self.policy.value_head, "lora": self.policy.lora_spec(),
                "critic": self.policy.critic, "critic_model_path": self.critic_model_path,
                "temperature": self.temperature, "logits_chunk_tokens": self.algo.logits_chunk_tokens,
                "share_prompts": self.algo.share_prompts,
            },
        )


def build_learner_group(
    algo: AlgorithmConfig, policy: PolicyConfig, model_path: str | os.PathLike[str], num_learners: int,
    num_gpus_per_learner: float, temperature: float = 1.0, seed: int | None = None,
    critic_model_path: str | os.PathLike[str] | None = None, placement_group: Any = None,
    resources_per_learner: dict[str, float] | None = None,
) -> Any:
    """An RLlib LearnerGroup of ``num_learners`` TokenPolicyLearners (0: one learner in this process).

    ``model_path`` (the policy, also the frozen reference) and ``critic_model_path`` (a separate critic's trunk;
    default ``policy.critic_model_path``, else the policy) are paths or path-likes that each learner resolves on its
    own node with ``os.fspath``: the driver ships them to remote learners (``cluster.files``).

    ``temperature`` is the rollouts' sampling temperature (``rollout.temperature``): the learner evaluates the policy
    vLLM samples from, softmax(logits / T), for the policy and the reference alike. With ``seed`` and remote
    learners, learner ``k`` seeds its process's generators with ``seed + k``; a local learner shares the caller's
    process, whose generators the caller seeds.

    ``placement_group`` (a Ray placement group) holds the learner actors, each in a bundle with room for it (RLlib
    gives no bundle index), and is removed by RLlib when the group shuts down; ``resources_per_learner`` are custom
    Ray resources each learner actor asks for (e.g. ``{"learner_node": 1}``).
    """
    learner_seed = seed if num_learners > 0 else None
    cfg = TokenGymRLlibConfig(algo=algo, policy=policy, policy_model_path=model_path, temperature=temperature,
                              learner_seed=learner_seed, critic_model_path=critic_model_path)
    # torch_skip_nan_gradients: RLlib's per-tensor nan/inf checks off; TokenPolicyLearner.postprocess_gradients_for_module
    # checks once and zeroes non-finite gradients, as RLlib would.
    cfg.training(lr=algo.lr, grad_clip=algo.grad_clip, grad_clip_by="global_norm")
    cfg.framework(torch_skip_nan_gradients=True)
    cfg.learners(num_learners=num_learners, num_gpus_per_learner=num_gpus_per_learner,
                 custom_resources_per_learner=resources_per_learner or {})
    return cfg.build_learner_group(rl_module_spec=cfg.get_default_rl_module_spec(), placement_group=placement_group)
