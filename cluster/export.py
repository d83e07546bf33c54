"""``tokengym export``: a run's latest policy as a Hugging Face model directory (safetensors, config, tokenizer)."""

from __future__ import annotations

import shutil
from pathlib import Path

from cluster.checkpoint import latest_checkpoint
from cluster.config import ConfigError, load_config
from policies.learner import MODULE_ID


def export_policy(run_dir: Path, out: Path) -> Path:
    """Write the policy of ``run_dir``'s latest checkpoint to ``out``; loadable by ``transformers`` and vLLM.

    The module is rebuilt from the run's config and initial model (``prepare_policy``, paths on this machine) and
    its checkpointed state loaded into it: the model paths pickled inside the checkpoint are those of the learner
    that saved it, on its own node (with remote learners, a copy shipped there: ``cluster.files``).
    """
    from cluster.run import prepare_policy
    from policies.learner import TokenGymRLlibConfig
    from policies.models import load_tokenizer

    checkpoint = latest_checkpoint(Path(run_dir) / "checkpoints")
    if checkpoint is None:
        raise ConfigError(f"{str(run_dir)!r} has no complete checkpoint to export (is it a tokengym run directory?)")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {str(out)!r} exists and is not empty; choose a new directory")
    cfg = load_config(Path(run_dir) / "config.yaml")
    source = prepare_policy(cfg, Path(run_dir))  # the initial weights (overwritten below) and the tokenizer
    spec = TokenGymRLlibConfig(algo=cfg.algorithm, policy=cfg.policy, policy_model_path=str(source),
                               temperature=cfg.rollout.temperature).get_default_rl_module_spec()
    module = spec.build()
    module.restore_from_path((checkpoint / "learner" / "learner" / "rl_module" / MODULE_ID).resolve())
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    module.merged_hf_model().save_pretrained(tmp, safe_serialization=True)  # LoRA adapters folded in
    load_tokenizer(source).save_pretrained(tmp)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
