"""The ``policy`` and ``algorithm`` sections of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

from policies.advantages import ADVANTAGES
from policies.losses import KL_ESTIMATORS, OBJECTIVES, LossAgg


RANGES: dict[str, tuple[Callable[[float], bool], str]] = {
    ">0": (lambda v: v > 0, "> 0"),
    ">=0": (lambda v: v >= 0, ">= 0"),
    ">=1": (lambda v: v >= 1, ">= 1"),
    "[0,1]": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "(0,1]": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "[0,1)": (lambda v: 0 <= v < 1, "in [0, 1)"),
}


def check_ranges(section: str, obj: Any, rules: dict[str, str]) -> None:
    """Each field named in ``rules`` lies in its range (a key of ``RANGES``); ``None`` passes (an optional field)."""
    for name, rule in rules.items():
        value = getattr(obj, name)
        ok, what = RANGES[rule]
        if value is not None and not ok(value):
            optional = "None" in str(obj.__dataclass_fields__[name].type)  # e.g. "float | None"
            raise ValueError(f"{section}.{name} must be {what}{' or null' if optional else ''}; got {value}")


@dataclass(frozen=True)
class PolicyConfig:
    """The Transformer policy: a local Hugging Face checkpoint, or a tiny model built from these sizes."""

    model_path: str | None = None  # a local HF causal-LM directory; None builds a tiny model for the task
    arch: Literal["llama", "qwen2", "gpt2"] = "llama"  # the tiny model's architecture (without model_path)
    hidden_size: int = 128  # the tiny model's sizes (without model_path)
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # must divide hidden_size
    intermediate_size: int = 256  # the MLP's inner width
    value_head: bool = True  # a critic (actor-critic); False for critic-free algorithms
    critic: Literal["value_head", "separate"] = "value_head"  # value_head: a linear head on the policy's last
    #   hidden state; separate: a linear head on its own transformer (policy.critic_model_path or the policy's weights)
    critic_model_path: str | None = None  # critic=separate: the critic's HF directory (None: the policy's)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (peft) instead of the full model
    lora_alpha: float = 16.0  # LoRA's scale is lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_target_modules: list[str] | None = None  # default: every linear layer of the transformer blocks

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ValueError(f"policy.lora_rank must be >= 0 (0 turns LoRA off); got {self.lora_rank}")
        check_ranges("policy", self, {"hidden_size": ">=1", "num_layers": ">=1", "num_heads": ">=1",
                                      "intermediate_size": ">=1", "lora_alpha": ">0", "lora_dropout": "[0,1)"})
        if self.hidden_size % self.num_heads:
            raise ValueError(f"policy.hidden_size ({self.hidden_size}) must be divisible by policy.num_heads ({self.num_heads})")


    def lora_spec(self) -> dict | None:
        """What the RLModule needs to wrap the model with LoRA (None: full fine-tuning)."""
        if self.lora_rank == 0:
            return None
        return {"r": self.lora_rank, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": self.lora_target_modules}


@dataclass(frozen=True)
class AlgorithmConfig:
    """The update: which advantage estimator and objective (by registered name), and their settings."""

    advantage: str = "gae"  # gae | grpo | rloo | reinforce
    objective: str = "ppo_clip"  # ppo_clip | vanilla_pg
    credit: Literal["sequence", "token"] = "sequence"  # grpo/rloo: one advantage per sequence (the papers' form), or
    #   per token: each token's reward-to-go against the same position in its group (for per-token rewards)
    lr: float = 3e-4  # Adam's learning rate (the start of lr_schedule when that is set)
    lr_schedule: list[list[float]] | None = None  # [[iteration, lr], ...] piecewise linear from iteration 0
    adam_eps: float = 1e-5  # Adam's epsilon
    num_epochs: int = 4  # passes over each iteration's batch
    minibatch_size: int = 64  # sequences per optimizer step (per learner with several)
    clip_ratio: float = 0.2  # ppo_clip: the ratio is clipped to [1 - clip_ratio, 1 + clip_ratio]
    clip_ratio_high: float | None = None  # ppo_clip's upper bound 1 + this (None: clip_ratio); higher keeps entropy
    value_clip: float | None = 0.2  # the value loss's clip around the old values (None: unclipped)
    vf_coef: float = 0.5  # weight of the value loss
    entropy_coef: float = 0.01  # weight of the entropy bonus
    gamma: float = 1.0  # discount per token
    lam: float = 0.95  # GAE's lambda
    normalize_advantages: bool = True  # whiten the advantages over the batch's response tokens
    grad_clip: float | None = 1.0  # the gradients' global norm is clipped to this (None: no clipping)
    micro_batch_tokens: int | None = None  # gradient accumulation: split each minibatch into micro-batches of
    #                                        at most this many (padded) tokens; the gradient is unchanged
    logits_chunk_tokens: int | None = 512  # the (tokens, vocab) float32 log-softmax exists for at most this many
    #                                        tokens at a time (recomputed in the backward pass); null: all at once
    share_prompts: bool = True  # forward each distinct prompt of a minibatch once and share its keys/values with every
    #   sample of it (exact): with samples_per_prompt > 1, in the pre-update pass and the first epoch (RLlib keeps it in
    #   batch order), and in every epoch with group_minibatches
    group_minibatches: bool = False  # minibatches of whole groups (the samples_per_prompt samples of a prompt),
    #   shuffled by group each epoch, instead of single sequences: with share_prompts each minibatch forwards its
    #   prompts once; needs minibatch_size (per learner) and each learner's rows to be multiples of samples_per_prompt
    bf16: Literal["auto", "on", "off"] = "auto"  # autocast the forward pass to bf16; auto: on GPU learners only
    loss_agg: LossAgg = "token_mean"  # token_mean: every response token weighs the same; seq_mean: every sequence
    kl_coef: float = 0.0  # KL to a frozen reference policy; 0 loads no reference at all
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # see policies/losses.py for what each estimates
    kl_in: Literal["reward", "loss"] = "loss"  # the KL penalty goes into the per-token reward or into the loss
    off_policy: Literal["none", "truncated_is", "decoupled"] = "none"  # correction for samples drawn by other
    #   weights than the learner's (rollout.max_staleness > 0; also the engines' numerics), with w = pi_learner /
    #   pi_sampling per token: truncated_is scales each token's loss by min(w, is_cap); decoupled (decoupled PPO:
    #   behaviour = the sampling policy, proximal = the learner's) scales it by w and drops tokens with w > is_cap
    is_cap: float = 2.0  # off_policy's bound on the importance weight (truncated_is: cap; decoupled: drop above)

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"algorithm.advantage must be one of {sorted(ADVANTAGES)}; got {self.advantage!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"algorithm.objective must be one of {sorted(OBJECTIVES)}; got {self.objective!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator must be one of {sorted(KL_ESTIMATORS)}; got {self.kl_estimator!r}")
        check_ranges("algorithm", self, {
            "lr": ">0", "adam_eps": ">0", "num_epochs": ">=1", "minibatch_size": ">=1", "clip_ratio": ">0", "clip_ratio_high": ">0",
            "value_clip": ">0", "vf_coef": ">=0", "entropy_coef": ">=0", "gamma": "[0,1]", "lam": "[0,1]",
            "grad_clip": ">0", "micro_batch_tokens": ">=1", "logits_chunk_tokens": ">=1", "kl_coef": ">=0", "is_cap": ">0",
        })
        if self.objective == "vanilla_pg" and self.num_epochs > 1:
            raise ValueError(
                f"algorithm.objective=vanilla_pg has no importance ratio, so epochs after the first are off-policy: "
                f"use num_epochs=1 or objective=ppo_clip; got num_epochs={self.num_epochs}"
            )
        if self.lr_schedule is not None:
            steps = [pair[0] for pair in self.lr_schedule]
            if (any(len(pair) != 2 or pair[1] < 0 for pair in self.lr_schedule) or steps[:1] != [0]
                    or steps != sorted(steps)):
                raise ValueError(
                    f"algorithm.lr_schedule must be [[0, lr0], [iteration, lr], ...] with rising iterations and lr >= 0; "
                    f"got {self.lr_schedule}"
                )
        if self.kl_coef > 0 and self.kl_in == "loss" and self.kl_estimator == "k1":
            raise ValueError(
                "algorithm.kl_estimator=k1 has zero expected gradient in the loss: use k2 (gradient of KL(pi||ref)) "
                "or k3 with kl_in=loss, or kl_in=reward for k1"
            )

    @property
    def clip_range(self) -> float | tuple[float, float]:
        """What ppo_clip takes: ``clip_ratio``, or ``(clip_ratio, clip_ratio_high)`` when they differ."""
        if self.clip_ratio_high is None or self.clip_ratio_high == self.clip_ratio:
            return self.clip_ratio
        return (self.clip_ratio, self.clip_ratio_high)
