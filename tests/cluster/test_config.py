"""The typed config: YAML + overrides -> ExperimentConfig, and one-line errors before Ray starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cluster.config import DEFAULT_CONFIG, ConfigError, ExperimentConfig, build_config, dump_config, load_config

REPO = Path(__file__).resolve().parents[2]


def test_default_config_loads_and_matches_the_issue() -> None:
    cfg = load_config()
    assert cfg.env.id == "textenv/Reverse-v0" and cfg.env.task_kwargs == {"length": 5, "letters": "abcdefgh"}
    assert cfg.policy.arch == "llama" and cfg.policy.model_path is None and cfg.policy.value_head
    assert (cfg.algorithm.advantage, cfg.algorithm.objective) == ("gae", "ppo_clip")
    assert cfg.rollout.num_actors >= 2


def test_overrides_are_typed_and_nested() -> None:
    cfg = load_config(DEFAULT_CONFIG, ["algorithm.lr=1e-3", "rollout.num_actors=3", "name=x", "cluster.address=auto"])
    assert cfg.algorithm.lr == 1e-3 and isinstance(cfg.algorithm.lr, float)
    assert cfg.rollout.num_actors == 3 and cfg.name == "x" and cfg.cluster.address == "auto"


def test_on_and_off_as_yaml_reads_them_are_the_choices_they_name(tmp_path: Path) -> None:
    """YAML 1.1 (PyYAML) reads a bare on / off as true / false; the on | auto | off settings take them as written."""
    cfg = load_config(overrides=["algorithm.bf16=on", "rollout.chunked_prefill=off"])
    assert (cfg.algorithm.bf16, cfg.rollout.chunked_prefill) == ("on", "off")
    path = tmp_path / "c.yaml"
    path.write_text("defaults: [" + str(DEFAULT_CONFIG) + "]\nalgorithm: {bf16: off}\nrollout: {chunked_prefill: on}\n")
    cfg = load_config(path)
    assert (cfg.algorithm.bf16, cfg.rollout.chunked_prefill) == ("off", "on")
    with pytest.raises(ConfigError, match="algorithm.loss_agg must be one of"):  # other choices: a bool is no choice
        load_config(overrides=["algorithm.loss_agg=true"])


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(DEFAULT_CONFIG, ["iterations=7"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"algorithm": {"lrr": 1}}, "unknown key 'algorithm.lrr'"),
        ({"nope": 1}, "unknown key 'nope'"),
        ({"algorithm": {"lr": "fast"}}, "algorithm.lr must be a number; got 'fast'"),
        ({"rollout": {"num_actors": 1.5}}, "rollout.num_actors must be an integer"),
        ({"policy": {"value_head": "yes"}}, "policy.value_head must be true or false"),
        ({"algorithm": {"loss_agg": "sum"}}, "algorithm.loss_agg must be one of"),
        ({"algorithm": {"advantage": "magic"}}, "algorithm.advantage must be one of"),
        ({"algorithm": {"advantage": "grpo"}}, "samples_per_prompt must be >= 2 for grpo"),
        ({"policy": {"value_head": False}}, "needs a critic: set policy.value_head=true"),
        ({"rollout": {"prompts_per_iteration": 100}}, "must be divisible by"),
        ({"env": {"id": "textenv/Nope-v0"}}, "env.id 'textenv/Nope-v0' is not registered"),
        ({"rollout": 3}, "rollout must be a mapping"),
        # ranges: one line naming the key and its valid range
        ({"algorithm": {"clip_ratio": 0}}, "algorithm.clip_ratio must be > 0; got 0"),
        ({"algorithm": {"lr": -1e-3}}, "algorithm.lr must be > 0; got -0.001"),
        ({"algorithm": {"adam_eps": 0}}, "algorithm.adam_eps must be > 0"),
        ({"algorithm": {"gamma": 1.5}}, "algorithm.gamma must be in [0, 1]; got 1.5"),
        ({"algorithm": {"lam": -0.1}}, "algorithm.lam must be in [0, 1]"),
        ({"algorithm": {"vf_coef": -0.5}}, "algorithm.vf_coef must be >= 0"),
        ({"algorithm": {"entropy_coef": -0.01}}, "algorithm.entropy_coef must be >= 0"),
        ({"algorithm": {"value_clip": 0}}, "algorithm.value_clip must be > 0 or null; got 0"),
        ({"algorithm": {"grad_clip": -1}}, "algorithm.grad_clip must be > 0 or null"),
        ({"algorithm": {"num_epochs": 0}}, "algorithm.num_epochs must be >= 1"),
        ({"algorithm": {"minibatch_size": 0}}, "algorithm.minibatch_size must be >= 1"),
        ({"algorithm": {"micro_batch_tokens": 0}}, "algorithm.micro_batch_tokens must be >= 1 or null"),
        ({"algorithm": {"kl_coef": -1}}, "algorithm.kl_coef must be >= 0"),
        ({"algorithm": {"lr_schedule": [[0, 1e-3], [10, -1e-4]]}}, "lr >= 0"),
        ({"policy": {"hidden_size": 0}}, "policy.hidden_size must be >= 1"),
        ({"policy": {"num_layers": 0}}, "policy.num_layers must be >= 1"),
        ({"policy": {"lora_alpha": 0}}, "policy.lora_alpha must be > 0"),
        ({"policy": {"lora_dropout": 1.0}}, "policy.lora_dropout must be in [0, 1)"),
        ({"rollout": {"temperature": 0}}, "rollout.temperature must be > 0"),
        ({"rollout": {"gpu_memory_utilization": 1.2}}, "rollout.gpu_memory_utilization must be in (0, 1]"),
        ({"rollout": {"gpu_memory_utilization": 0}}, "rollout.gpu_memory_utilization must be in (0, 1]"),
        ({"rollout": {"num_gpus_per_actor": -1}}, "rollout.num_gpus_per_actor must be >= 0"),
        ({"rollout": {"kv_cache_gib": 0}}, "rollout.kv_cache_gib must be >= 1"),
        ({"cluster": {"num_cpus": 0}}, "cluster.num_cpus must be >= 1 or null"),
        ({"cluster": {"num_gpus_per_learner": -1}}, "cluster.num_gpus_per_learner must be >= 0"),
        ({"reward_model": {"batch_size": 0}}, "reward_model.batch_size must be >= 1"),
        ({"env": {"max_response_tokens": 0}}, "env.max_response_tokens must be >= 1 or null"),
        ({"env": {"max_prompt_tokens": -3}}, "env.max_prompt_tokens must be >= 1 or null"),
        ({"keep_checkpoints": 0}, "keep_checkpoints must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        # combinations that cannot be right name the fix
        ({"algorithm": {"objective": "vanilla_pg", "num_epochs": 2}}, "use num_epochs=1 or objective=ppo_clip"),
        ({"algorithm": {"kl_coef": 0.1, "kl_estimator": "k1", "kl_in": "loss"}}, "use k2"),
        # rollout.lora_weights=adapters: adapters to ship, that vLLM serves, through the object store
        ({"rollout": {"lora_weights": "adapters"}}, "policy.lora_rank is 0"),
        ({"rollout": {"lora_weights": "bundle"}}, "rollout.lora_weights must be one of"),
        ({"policy": {"lora_rank": 1024}, "rollout": {"lora_weights": "adapters"}}, "vLLM serves LoRA ranks up to 512"),
        ({"policy": {"lora_rank": 4, "lora_target_modules": ["q_proj", "lm_head"]},
          "rollout": {"lora_weights": "adapters"}}, "policy.lora_target_modules has ['lm_head']"),
        ({"policy": {"lora_rank": 4, "arch": "gpt2"}, "rollout": {"lora_weights": "adapters"}}, "no LoRA support for GPT-2"),
        ({"policy": {"lora_rank": 4}, "rollout": {"lora_weights": "adapters", "weight_transport": "collective"}},
         "set rollout.weight_transport=object_store"),
        ({"policy": {"lora_rank": 4}, "rollout": {"lora_weights": "adapters"},
          "cluster": {"placement": "colocated", "num_learners": 1, "num_gpus_per_learner": 1}},
         "use cluster.placement=disaggregated"),
    ],
)
def test_bad_config_names_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(raw, source="exp.yaml")
    text = str(err.value)
    assert text.startswith("exp.yaml: ") and message in text and "\n" not in text


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(DEFAULT_CONFIG, ["algorithm.lr"])


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["train", "algorithm.lrr=1"], "unknown key 'algorithm.lrr'"),
        (["train", "rollout.num_actors=two"], "rollout.num_actors must be an integer"),
        (["train", "no/such/file.yaml"], "config file 'no/such/file.yaml' does not exist"),
        (["train", "policy.model_path=/no/such/model"], "policy.model_path '/no/such/model' is not a local Hugging Face"),
        (["train", "--resume", "/no/such/run"], "no config.yaml there"),
    ],
)
def test_cli_bad_input_is_one_line_before_ray(args: list[str], needle: str, tmp_path: Path) -> None:
    result = _cli(*args, cwd=REPO)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tokengym: error: ") and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "ray" not in result.stdout.lower()


def test_every_shipped_config_loads() -> None:
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, ExperimentConfig), path
        assert yaml.safe_load(path.read_text())  # not empty
