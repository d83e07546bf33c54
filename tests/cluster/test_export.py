"""``tokengym export``: the run's policy as a HF model directory that transformers and vLLM load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.checkpoint import save_checkpoint
from cluster.config import ConfigError, build_config, dump_config
from cluster.export import export_policy
from cluster.rollout import RolloutGroup
from cluster.trainer import build_batch
from policies.columns import OLD_LOGP, RESPONSE_MASK, SAMPLING_LOGP
from policies.config import AlgorithmConfig, PolicyConfig
from policies.learner import MODULE_ID, build_learner_group, group_rollout_stats
from test_rollout import ENV, engine  # noqa: E402  (same folder)


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A run directory whose checkpoint holds weights that differ from the initial model."""
    run = tmp_path_factory.mktemp("run")
    cfg = build_config({"policy": {"model_path": str(tiny_model_dir)}})
    dump_config(cfg, run / "config.yaml")
    group = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(tiny_model_dir), 0, 0)
    weights = group.get_weights()[MODULE_ID]
    rng = np.random.default_rng(0)
    weights = {k: (v + rng.normal(0, 0.3, v.shape)).astype(v.dtype) for k, v in weights.items()}
    group.set_weights({MODULE_ID: weights})
    save_checkpoint(run / "checkpoints", 3, group, {"weights_version": 4}, keep=1)
    group.shutdown()
    return run, weights


def greedy(lm: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(lm(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_export_writes_the_trained_policy(trained_run, tmp_path: Path) -> None:
    run, weights = trained_run
    out = export_policy(run, tmp_path / "exported")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value.numpy(), weights["lm." + name], err_msg=name)
    tok = AutoTokenizer.from_pretrained(out)
    prompts = [tok.encode(p, add_special_tokens=False) for p in ("abcde=", "hgfed=", "aaaah=")]
    # Greedy outputs: HF generate on the export == step-by-step argmax of the run's own RLModule (its checkpoint).
    from ray.rllib.core.rl_module.rl_module import RLModule

    module = RLModule.from_checkpoint(
        str((run / "checkpoints" / "iter_000003" / "learner" / "learner" / "rl_module" / MODULE_ID).resolve())
    )
    module.lm.eval()
    for p in prompts:
        generated = model.generate(torch.tensor([p]), max_new_tokens=5, do_sample=False, pad_token_id=0)[0, len(p):]
        assert generated.tolist() == greedy(module.lm, p, len(generated))

    with pytest.raises(ConfigError, match="exists and is not empty"):
        export_policy(run, out)
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        export_policy(tmp_path, tmp_path / "other")


@pytest.mark.ray
@pytest.mark.vllm
def test_vllm_serves_the_export_with_matching_logprobs(ray_session, trained_run, tmp_path: Path) -> None:
    run, weights = trained_run
    out = export_policy(run, tmp_path / "exported")
    group = RolloutGroup(1, ENV, engine(out), 0)
    try:
        rollouts = group.sample(32, 1, seed=4, version=0)
    finally:
        group.shutdown()
    learner = build_learner_group(AlgorithmConfig(), PolicyConfig(), str(out), 0, 0)
    batch = build_batch(rollouts)
    stats = group_rollout_stats(learner, batch, 64)
    learner.shutdown()
    mask = batch[RESPONSE_MASK] > 0
    assert np.abs(stats[OLD_LOGP] - batch[SAMPLING_LOGP])[mask].mean() < 1e-3
