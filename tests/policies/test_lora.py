"""LoRA through peft: only adapters train, and the merged weights are exactly the adapted model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ray.rllib.policy.sample_batch import MultiAgentBatch, SampleBatch

from cluster.trainer import build_batch
from policies.columns import ADVANTAGES, INPUT_IDS, LOGP, OLD_LOGP, OLD_VALUES, RESPONSE_MASK, RETURNS
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group, hf_weights
from policies.lora import adapter_state, merge_lora_state
from policies.models import load_causal_lm, weight_names

from test_learner import ragged_rollouts  # noqa: E402  (same folder)

LORA = PolicyConfig(lora_rank=4, lora_alpha=8.0)


def lora_batch() -> dict:
    batch = build_batch(ragged_rollouts(np.random.default_rng(0), n=8))
    mask = batch[RESPONSE_MASK]
    batch[OLD_LOGP] = np.full(mask.shape, -2.4, np.float32)
    batch[OLD_VALUES] = np.zeros(mask.shape, np.float32)
    batch[ADVANTAGES] = (np.random.default_rng(1).standard_normal(mask.shape) * mask).astype(np.float32)
    batch[RETURNS] = mask.copy()
    return batch


def test_only_adapters_and_value_head_train(tiny_model_dir: Path) -> None:
    group = build_learner_group(AlgorithmConfig(lr=1e-2), LORA, str(tiny_model_dir), 0, 0)
    module = group._learner.module[MODULE_ID]
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("value_head") for n in trainable)
    before = group.get_weights()[MODULE_ID]
    batch = lora_batch()
    mab = MultiAgentBatch({MODULE_ID: SampleBatch(batch)}, env_steps=8)
    group.update(batch=mab, num_epochs=2, minibatch_size=8)  # two steps: B starts at 0, so A moves from step 2
    after = group.get_weights()[MODULE_ID]
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert any("lora_B" in k for k in changed) and any("lora_A" in k for k in changed)
    assert all("lora_" in k or k.startswith("value_head") for k in changed), sorted(changed)[:5]

    # The merged plain weights are the adapted model: same names as the base checkpoint, same outputs.
    merged = hf_weights(after, LORA, weight_names(tiny_model_dir))
    base = load_causal_lm(tiny_model_dir)
    assert set(merged) == set(base.state_dict())
    assert not np.allclose(merged["model.layers.0.self_attn.q_proj.weight"],
                           base.state_dict()["model.layers.0.self_attn.q_proj.weight"].numpy())
    base.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    peft_merged = module.merged_hf_model().state_dict()
    for k, v in peft_merged.items():  # our numpy merge == peft's merge_and_unload
        np.testing.assert_allclose(merged[k], v.numpy(), atol=1e-6, err_msg=k)
    with torch.no_grad():
        out = module.forward_train({k: torch.from_numpy(v) for k, v in batch.items()})
        logits = base(input_ids=torch.from_numpy(batch[INPUT_IDS]), attention_mask=torch.from_numpy(batch["attention_mask"]),
                      position_ids=torch.from_numpy(batch["position_ids"])).logits[:, -6:-1]
    logp = torch.log_softmax(logits, -1).gather(-1, torch.from_numpy(batch[INPUT_IDS][:, -5:]).unsqueeze(-1)).squeeze(-1)
    mask = batch[RESPONSE_MASK] > 0
    np.testing.assert_allclose(logp.numpy()[mask], out[LOGP].numpy()[mask], atol=1e-5)
    group.shutdown()


def test_merge_lora_state_by_hand() -> None:
    A = np.array([[1.0, 2.0]], np.float32)  # (r=1, in=2)
    B = np.array([[1.0], [0.5]], np.float32)  # (out=2, r=1)
    state = {
        "base_model.model.layer.base_layer.weight": np.eye(2, dtype=np.float32),
        "base_model.model.layer.lora_A.default.weight": A,
        "base_model.model.layer.lora_B.default.weight": B,
        "base_model.model.norm.weight": np.ones(2, np.float32),
    }
    merged = merge_lora_state(state, scaling=2.0)
    # W + 2 * B @ A = I + 2 * [[1, 2], [0.5, 1]] = [[3, 4], [1, 3]]
    np.testing.assert_array_equal(merged["layer.weight"], np.array([[3.0, 4.0], [1.0, 3.0]], np.float32))
    np.testing.assert_array_equal(merged["norm.weight"], np.ones(2, np.float32))
    assert set(merged) == {"layer.weight", "norm.weight"}


def test_lora_rank_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="lora_rank must be >= 0"):
        PolicyConfig(lora_rank=-1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_merged_weights_match_peft_merge_and_unload(tmp_path: Path, arch: str) -> None:
    """GPT-2's Conv1D layers store weights (in, out) (peft's fan_in_fan_out): the merge must transpose B @ A. The
    weights a sync ships (``TokenPolicyLearner.engine_weights``) are the same merge."""
    from policies.models import save_tiny_policy
    from tests.conftest import REVERSE_ALPHABET, TINY

    model_dir = save_tiny_policy(tmp_path / arch, REVERSE_ALPHABET, seed=0, arch=arch, **TINY)
    group = build_learner_group(AlgorithmConfig(), LORA, str(model_dir), 0, 0)
    state = group.get_weights()[MODULE_ID]
    rng = np.random.default_rng(0)  # lora_B starts at zero: give every adapter a non-zero update
    group.set_weights({MODULE_ID: {k: (v + rng.normal(0, 0.1, v.shape)).astype(v.dtype) if "lora_B" in k else v
                                   for k, v in state.items()}})
    module = group._learner.module[MODULE_ID]
    names = weight_names(model_dir)
    assert bool(names.transposed) == (arch == "gpt2")
    merged = hf_weights(group.get_weights()[MODULE_ID], LORA, names)
    ours = load_causal_lm(model_dir).eval()
    ours.load_state_dict({k: torch.from_numpy(v) for k, v in merged.items()})
    peft = module.merged_hf_model().eval()  # peft's merge_and_unload
    ids = torch.from_numpy(np.random.default_rng(1).integers(2, 11, (4, 9)))
    with torch.no_grad():
        expected, got, unmerged = peft(input_ids=ids).logits, ours(input_ids=ids).logits, load_causal_lm(model_dir)(input_ids=ids).logits
    assert (expected - unmerged).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # What a weight sync ships, from the learner's own tensors, is the same merge.
    shipped = group._learner.engine_weights()
    assert set(shipped) == set(merged)
    for k, v in shipped.items():
        np.testing.assert_array_equal(v.numpy(), merged[k], err_msg=k)
    group.shutdown()


def test_adapter_state_is_what_peft_saves(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The adapters a sync ships (rollout.lora_weights=adapters) carry the names and values of peft's own saved
    adapter file, the format vLLM loads, and nothing of the base model."""
    from safetensors.torch import load_file

    group = build_learner_group(AlgorithmConfig(lr=1e-2), LORA, str(tiny_model_dir), 0, 0)
    learner = group._learner
    group.update(batch=MultiAgentBatch({MODULE_ID: SampleBatch(lora_batch())}, env_steps=8), num_epochs=2,
                 minibatch_size=8)
    shipped = learner.engine_weights(adapters=True)
    learner.module[MODULE_ID].unwrapped().lm.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(shipped) == sorted(saved) and len(saved) == 2 * 7 * 2  # A and B of 7 projections, 2 layers
    for name, value in saved.items():
        torch.testing.assert_close(shipped[name], value, rtol=0, atol=0, msg=name)
    assert any(shipped[n].abs().max() > 0 for n in shipped if "lora_B" in n)  # trained: B moved from 0
    assert adapter_state({"base_model.model.norm.weight": torch.ones(2)}) == {}
    group.shutdown()
