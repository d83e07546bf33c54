"""The reward-model reward: a tiny sequence-classification model built here scores responses in batches, as its own
Ray actor, and the rollout actors add weight x its score to each episode's last reward."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from cluster.config import ConfigError, RewardModelConfig, load_config
from cluster.reward_model import RewardModelScorer, RewardModelServer
from cluster.rollout import EngineOptions, RolloutGroup
from cluster.run import check_before_ray
from policies.models import build_char_tokenizer, load_tokenizer, tiny_model_config
from tests.conftest import REVERSE_ALPHABET, TINY
from textenv import EnvConfig, HFTokenizerAdapter, TaskSample, make_env, replay

ENV = EnvConfig(id="textenv/Reverse-v0", task_kwargs={"length": 5, "letters": "abcdefgh"})
TEXTS = ["cafhb=bhfac", "abcde=", "h=", "ggg=ggg", "abcdefgh=hgfedcba", "d=d", "bbba=abbb"]  # lengths differ: padding
README = Path(__file__).resolve().parents[2] / "README.md"


def save_tiny_reward_model(out: Path, arch: str, num_labels: int, seed: int = 0) -> Path:
    """A random-init tiny sequence classifier with the reverse task's character tokenizer, in HF format."""
    tokenizer = build_char_tokenizer(REVERSE_ALPHABET)
    config = tiny_model_config(arch, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                               eos_token_id=tokenizer.eos_token_id, **TINY)
    config.num_labels = num_labels
    if num_labels == 2:
        config.id2label, config.label2id = {0: "bad", 1: "good"}, {"bad": 0, "good": 1}
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config)
    torch.nn.init.normal_(model.score.weight, std=1.0)  # the default init gives every text nearly the same score
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def one_at_a_time(model_dir: Path, texts: list[str], label: int | None) -> list[float]:
    """The reference: each text alone (no padding) through the model; softmax[label], or the raw regression output."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for text in texts:
            logits = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits[0]  # (num_labels,)
            out.append(float(logits[0]) if label is None else float(torch.softmax(logits, -1)[label]))
    return out


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_reward_model(tmp_path_factory.mktemp("rm-llama"), "llama", num_labels=2)


# ------------------------------------------------------------------------------------------------ the scorer
@pytest.mark.parametrize("arch, num_labels, label, index", [
    ("llama", 2, 1, 1), ("llama", 2, "bad", 0), ("gpt2", 2, "good", 1), ("llama", 1, 1, None), ("gpt2", 1, 0, None),
])
def test_batched_scores_equal_one_text_at_a_time(tmp_path: Path, arch: str, num_labels: int, label, index) -> None:
    model_dir = save_tiny_reward_model(tmp_path / "rm", arch, num_labels)
    scorer = RewardModelScorer(str(model_dir), label=label, batch_size=3)  # 7 texts: batches of 3, 3 and 1
    assert scorer.ready()["label"] == index
    scores = scorer.score(TEXTS)
    expected = one_at_a_time(model_dir, TEXTS, index)
    np.testing.assert_allclose(scores, expected, atol=1e-5)
    assert np.std(expected) > 0.01  # the texts really score differently
    if index is not None:
        assert all(0.0 < s < 1.0 for s in scores)
    assert scorer.stats()["calls"] == 1 and scorer.stats()["texts"] == len(TEXTS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype, atol", [("float32", 1e-4), ("bfloat16", 3e-2)])
def test_scorer_on_gpu_agrees_with_cpu(classifier_dir: Path, dtype: str, atol: float) -> None:
    cpu = RewardModelScorer(str(classifier_dir), label=1, batch_size=4).score(TEXTS)
    gpu = RewardModelScorer(str(classifier_dir), label=1, batch_size=4, dtype=dtype, device="cuda")
    assert gpu.ready()["device"].startswith("cuda")
    np.testing.assert_allclose(gpu.score(TEXTS), cpu, atol=atol)


def test_scorer_errors_name_the_path_and_label(tmp_path: Path, classifier_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"reward_model.path '.*nowhere' is not a local Hugging Face model"):
        RewardModelScorer(str(tmp_path / "nowhere"), label=1, batch_size=4)
    with pytest.raises(ValueError, match=r"reward_model.label 'great' is not a label of .*: \['bad', 'good'\]"):
        RewardModelScorer(str(classifier_dir), label="great", batch_size=4)
    with pytest.raises(ValueError, match="reward_model.label 2 is out of range"):
        RewardModelScorer(str(classifier_dir), label=2, batch_size=4)


# ------------------------------------------------------------------------------------------------ the config
def test_config_section_and_its_checks(tmp_path: Path) -> None:
    cfg = load_config(None, ["reward_model.path=/rm", "reward_model.label=good", "reward_model.weight=0.5"])
    assert cfg.reward_model == RewardModelConfig(path="/rm", label="good", weight=0.5)
    assert load_config(None).reward_model.path is None  # off by default
    assert load_config(None, ["reward_model.label=0"]).reward_model.label == 0
    for override, message in [
        ("reward_model.batch_size=0", "reward_model.batch_size must be >= 1"),
        ("reward_model.template='{prompt}'", "reward_model.template must contain {response}"),
        ("reward_model.template='{response}{reply}'", "may use only {prompt} and {answer}"),
        ("reward_model.template='{response'", "is not a format string"),
        ("reward_model.label=true", "reward_model.label must be"),
        ("reward_model.num_gpu=1", "unknown key 'reward_model.num_gpu'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            load_config(None, [override])
        assert "\n" not in str(err.value)


def test_a_missing_or_wrong_reward_model_fails_before_ray(tmp_path: Path, classifier_dir: Path, monkeypatch) -> None:
    import cluster.run

    monkeypatch.setattr(cluster.run, "init_ray", lambda cfg: pytest.fail("Ray must not start"))
    missing = load_config(None, [f"reward_model.path={tmp_path / 'nowhere'}", f"runs_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^reward_model.path '.*nowhere' is not a local Hugging Face model") as err:
        cluster.run.train(missing, run_dir=tmp_path / "run")
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()
    wrong_label = load_config(None, [f"reward_model.path={classifier_dir}", "reward_model.label=great"])
    with pytest.raises(ConfigError, match=r"reward_model.label 'great' is not a label of"):
        check_before_ray(wrong_label)
    check_before_ray(load_config(None, [f"reward_model.path={classifier_dir}", "reward_model.label=good"]))


def test_readme_example_is_a_valid_config(tmp_path: Path) -> None:
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S) if "reward_model:" in b)
    (tmp_path / "rm.yaml").write_text(block)
    cfg = load_config(tmp_path / "rm.yaml")
    assert cfg.reward_model.path is not None and cfg.reward_model.weight > 0


# ------------------------------------------------------------------------------------------------ on Ray + vLLM
def engine(model_dir: Path) -> EngineOptions:
    return EngineOptions(model_dir=str(model_dir), dtype="float32", max_model_len=11, max_num_seqs=64, temperature=1.0,
                         kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=True, seed=0)


@pytest.mark.ray
@pytest.mark.vllm
def test_rollouts_add_the_weighted_reward_model_score(ray_session, tiny_model_dir: Path, classifier_dir: Path) -> None:
    weight = 0.5
    server = RewardModelServer(RewardModelConfig(path=str(classifier_dir), label="good", weight=weight, batch_size=8))
    group = RolloutGroup(2, ENV, engine(tiny_model_dir), 0, batch_reward=server.reward)
    try:
        calls = server.stats()["calls"]
        out = group.sample(8, 2, seed=3, version=0)
        assert server.stats()["calls"] == calls + 2  # one batched call per actor per sample()
        group.sample(2, 1, seed=4, version=0)
        assert server.stats()["calls"] == calls + 4
    finally:
        group.shutdown()
        server.shutdown()

    tok = load_tokenizer(tiny_model_dir)
    env = make_env(ENV, tokenizer=HFTokenizerAdapter(tok)).unwrapped  # no reward model: the task's reward alone
    rm_scores = []
    for n in range(16):
        prompt = tok.decode(out["prompt_ids"][n, 6 - out["prompt_length"][n]:].tolist())
        L = out["response_length"][n]
        tokens = out["response_ids"][n, :L].tolist()
        task = replay(env, TaskSample(prompt, prompt[:-1][::-1]), tokens)
        (rm,) = one_at_a_time(classifier_dir, [prompt + tok.decode(tokens, skip_special_tokens=True)], label=1)
        rm_scores.append(rm)
        expected = task["rewards"].copy()
        expected[-1] += weight * rm
        np.testing.assert_allclose(out["rewards"][n, :L], expected, atol=1e-5)
        assert out["score"][n] == pytest.approx(task["score"])  # the score stays the task's verifier
    assert np.std(rm_scores) > 0.01 and out["reward_errors"] == 0


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_training_run_with_a_reward_model(tmp_path: Path, classifier_dir: Path) -> None:
    import os
    import subprocess
    import sys

    from cluster.tracking import read_metrics

    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    args = ["iterations=2", "checkpoint_every=2", "rollout.prompts_per_iteration=64", f"runs_dir={tmp_path}",
            f"reward_model.path={classifier_dir}", "reward_model.weight=0.5", "tracking.wandb=false",
            "tracking.progress_bar=false"]
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "train", *args], cwd=README.parent, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    rows = read_metrics(run)
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:  # every episode gains 0.5 x a probability > 0 on top of the verifier's score
        assert r["reward/mean"] > r["reward/score_mean"] and r["timing/batch_reward_s"] > 0
    assert load_config(run / "config.yaml").reward_model == RewardModelConfig(path=str(classifier_dir), weight=0.5)
