"""The ``policy`` and ``algorithm`` sections of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from policies.advantages import ADVANTAGES
from policies.losses import KL_ESTIMATORS, OBJECTIVES, LossAgg


@dataclass(frozen=True)
class PolicyConfig:
    """The Transformer policy: a local Hugging Face checkpoint, or a tiny model built from these sizes."""

    model_path: str | None = None  # a local HF causal-LM directory; None builds a tiny model for the task
    arch: Literal["llama", "qwen2", "gpt2"] = "llama"
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    value_head: bool = True  # a linear value head on the last hidden state (actor-critic)

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"policy.hidden_size ({self.hidden_size}) must be divisible by policy.num_heads ({self.num_heads})")


@dataclass(frozen=True)
class AlgorithmConfig:
    """The update: which advantage estimator and objective (by registered name), and their settings."""

    advantage: str = "gae"  # gae | grpo | rloo | reinforce
    objective: str = "ppo_clip"  # ppo_clip | vanilla_pg
    lr: float = 3e-4
    adam_eps: float = 1e-5
    num_epochs: int = 4
    minibatch_size: int = 64
    clip_ratio: float = 0.2
    value_clip: float | None = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    normalize_advantages: bool = True
    grad_clip: float | None = 1.0
    loss_agg: LossAgg = "token_mean"
    kl_coef: float = 0.0  # KL to a frozen reference policy; 0 loads no reference at all
    kl_estimator: Literal["k1", "k3"] = "k3"
    kl_in: Literal["reward", "loss"] = "loss"

    def __post_init__(self) -> None:
        if self.advantage not in ADVANTAGES:
            raise ValueError(f"algorithm.advantage must be one of {sorted(ADVANTAGES)}; got {self.advantage!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"algorithm.objective must be one of {sorted(OBJECTIVES)}; got {self.objective!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator must be one of {sorted(KL_ESTIMATORS)}; got {self.kl_estimator!r}")
        for name in ("lr", "num_epochs", "minibatch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"algorithm.{name} must be > 0; got {getattr(self, name)}")
        if not 0.0 <= self.gamma <= 1.0 or not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"algorithm.gamma and algorithm.lam must lie in [0, 1]; got {self.gamma}, {self.lam}")
        if self.kl_coef < 0:
            raise ValueError(f"algorithm.kl_coef must be >= 0; got {self.kl_coef}")
