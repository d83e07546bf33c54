"""LoRA through peft: wrapping the policy, merging adapters into plain weights for vLLM and export, and the adapters
alone as an inference engine loads them (peft's saved-adapter names)."""

from __future__ import annotations

from typing import Any, Collection

import numpy as np
import torch

PEFT_PREFIX = "base_model.model."


def wrap_with_lora(lm: torch.nn.Module, spec: dict[str, Any]) -> torch.nn.Module:
    """``lm`` as a peft model with LoRA adapters; only the adapters are trainable."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError("policy.lora_rank > 0 needs peft: pip install 'tokengym[lora]'") from None
    from transformers.pytorch_utils import Conv1D

    config = LoraConfig(
        r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
        target_modules=spec["target_modules"] or "all-linear", bias="none",
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in lm.modules()),  # GPT-2 stores its weights (in, out)
    )
    return get_peft_model(lm, config)


def merge_lora_state(
    state: dict[str, np.ndarray], scaling: float, transposed: Collection[str] = ()
) -> dict[str, np.ndarray]:
    """Hugging Face weights with every adapter folded in: ``W + scaling * B @ A`` under the base model's names.

    ``state`` is the peft model's state dict (names under ``base_model.model.``, with ``.base_layer.weight`` and
    ``.lora_A.<adapter>.weight`` / ``.lora_B.<adapter>.weight``); names without adapters pass through unchanged.
    Weights named in ``transposed`` are stored (in, out) (GPT-2's Conv1D; peft's ``fan_in_fan_out``): they get
    ``W + scaling * (B @ A).T``.
    """
    merged: dict[str, np.ndarray] = {}
    adapters: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state.items():
        name = name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name
        if ".lora_A." in name or ".lora_B." in name:
            layer, kind = name.split(".lora_")[0], name.split(".lora_")[1][0]
            adapters.setdefault(layer, {})[kind] = np.asarray(value)
        else:
            merged[name.replace(".base_layer.", ".")] = np.asarray(value)
    for layer, ab in adapters.items():
        key = f"{layer}.weight"
        delta = ab["B"] @ ab["A"]  # (out, in)
        merged[key] = (merged[key] + scaling * (delta.T if key in transposed else delta)).astype(merged[key].dtype)
    return merged


def adapter_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters alone, under the names peft's ``save_pretrained`` gives them and vLLM loads:
    ``base_model.model.<layer>.lora_A.weight`` / ``.lora_B.weight`` (peft's live state dict names the adapter,
    ``.lora_A.default.weight``; a saved adapter file does not). The base weights are left out."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        for kind in (".lora_A.", ".lora_B."):
            if kind in name:
                layer, rest = name.split(kind)
                out[f"{layer}{kind}{rest.split('.', 1)[1]}"] = value
    return out
