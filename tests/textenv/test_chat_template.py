"""Prompts in a model's chat template (env.chat_template / system_prompt), the addition task's templates and
verifiers, and pulled-model names as model paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from cluster.config import ConfigError, build_config
from cluster.pull import MARKER, MODELS_ENV, resolve_model_dir
from cluster.run import check_before_ray
from policies.models import CHATML_TEMPLATE, build_bpe_tokenizer, task_corpus
from textenv import EnvConfig, HFTokenizerAdapter, TokenEnv, make_env
from textenv.tasks import AdditionTask, TaskSample

ADDITION = {"digits": 1, "template": "Calculate {a} + {b}.", "verifier": "numeric"}


@pytest.fixture(scope="module")
def chat_tokenizer() -> HFTokenizerAdapter:
    """A byte-level BPE tokenizer with a ChatML template, as instruct models ship (built locally)."""
    return HFTokenizerAdapter(build_bpe_tokenizer(task_corpus(50) + ["Calculate", "Answer with the number only."], 512))


def addition_env(tokenizer, **kwargs) -> TokenEnv:
    cfg = EnvConfig(id="textenv/Addition-v0", task_kwargs=ADDITION, reward_mode="terminal", **kwargs)
    return make_env(cfg, tokenizer=tokenizer).unwrapped


def test_prompt_is_the_chat_template_with_the_system_turn(chat_tokenizer) -> None:
    env = addition_env(chat_tokenizer, chat_template=True, system_prompt="Answer with the number only.")
    obs, info = env.reset(seed=3)
    a, b = info["prompt"].removeprefix("Calculate ").removesuffix(".").split(" + ")
    expected = ("<|im_start|>system\nAnswer with the number only.<|im_end|>\n<|im_start|>user\n"
                f"Calculate {a} + {b}.<|im_end|>\n<|im_start|>assistant\n")
    assert env.prompt_text(info["prompt"]) == expected
    # The markers are the tokenizer's special tokens, one id each, not their characters spelled out.
    assert env.prompt_ids == chat_tokenizer._tok.encode(expected, add_special_tokens=False)
    start = chat_tokenizer._tok.convert_tokens_to_ids("<|im_start|>")
    assert env.prompt_ids.count(start) == 3
    assert int(obs["prompt_length"]) == len(env.prompt_ids)


def test_without_a_system_prompt_the_template_decides(chat_tokenizer) -> None:
    env = addition_env(chat_tokenizer, chat_template=True)
    _, info = env.reset(seed=0)
    assert env.prompt_text(info["prompt"]) == f"<|im_start|>user\n{info['prompt']}<|im_end|>\n<|im_start|>assistant\n"


def test_chat_env_passes_check_env_and_fits_its_longest_prompt(chat_tokenizer) -> None:
    env = addition_env(chat_tokenizer, chat_template=True, system_prompt="Answer with the number only.")
    check_env(env)
    longest = env.prompt_text(AdditionTask(**ADDITION).template.format(a=9, b=9))
    assert len(chat_tokenizer.encode(longest)) <= env.max_prompt_tokens  # the default limit counts the template


def test_chat_env_scores_the_response_not_the_template(chat_tokenizer) -> None:
    env = addition_env(chat_tokenizer, chat_template=True, system_prompt="Answer with the number only.")
    env.reset(options={"sample": TaskSample("Calculate 7 + 5.", "12")})
    total, done = 0.0, False
    for token in chat_tokenizer.encode("12") + [chat_tokenizer.eos_token_id]:
        _, reward, terminated, truncated, info = env.step(token)
        total += reward
        done = terminated or truncated
        if done:
            break
    assert done and total == 1.0 and info["response"] == "12"


def test_chat_template_refusals(chat_tokenizer) -> None:
    with pytest.raises(ValueError, match="env.system_prompt needs env.chat_template=true"):
        EnvConfig(id="textenv/Addition-v0", system_prompt="Be brief.")
    with pytest.raises(ValueError, match="needs a Hugging Face tokenizer with a chat template"):
        addition_env(None, chat_template=True)  # the character tokenizer has no template
    with pytest.raises(ValueError, match="multi-turn task 'guess_number'"):
        make_env(EnvConfig(id="textenv/GuessNumber-v0", chat_template=True), tokenizer=chat_tokenizer)
    plain = build_bpe_tokenizer(task_corpus(20), 300)
    plain.chat_template = None
    with pytest.raises(ValueError, match="this model's tokenizer has none"):
        addition_env(HFTokenizerAdapter(plain), chat_template=True).reset(seed=0)


def test_config_with_chat_template_needs_a_model_path() -> None:
    cfg = build_config({"env": {"id": "textenv/Addition-v0", "chat_template": True}})
    with pytest.raises(ConfigError, match="env.chat_template=true needs policy.model_path"):
        check_before_ray(cfg)


# ------------------------------------------------------------------------------------------ the addition task
@pytest.mark.parametrize("response, exact, numeric", [
    ("12", 1.0, 1.0), (" 12 ", 1.0, 1.0), ("The answer is 12.", 0.0, 1.0), ("7 + 5 = 12", 0.0, 1.0),
    ("12 apples, not 13", 0.0, 0.0), ("", 0.0, 0.0), ("twelve", 0.0, 0.0),
])
def test_addition_verifiers(response: str, exact: float, numeric: float) -> None:
    sample = TaskSample("Calculate 7 + 5.", "12")
    assert AdditionTask(digits=1, verifier="exact").score(sample, response) == exact
    assert AdditionTask(digits=1, verifier="numeric").score(sample, response) == numeric


def test_addition_template_and_its_alphabet() -> None:
    task = AdditionTask(digits=2, template="What is {a} + {b}?")
    s = task.sample(np.random.default_rng(0))
    a, b = s.metadata["a"], s.metadata["b"]
    assert s.prompt == f"What is {a} + {b}?" and s.answer == str(a + b)
    assert task.max_prompt_chars == len("What is 99 + 99?")
    assert set(s.prompt) <= set(task.alphabet)  # the character tokenizer of a tiny model can spell every prompt
    assert AdditionTask().sample(np.random.default_rng(0)).prompt.endswith("=")  # the default is unchanged
    with pytest.raises(ValueError, match="verifier must be 'exact' or 'numeric'"):
        AdditionTask(verifier="fuzzy")
    with pytest.raises(ValueError, match="must name only"):
        AdditionTask(template="{a} plus {c}")


# ------------------------------------------------------------------------------------------ pulled models by name
def test_model_path_may_name_a_pulled_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MODELS_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="run `tokengym pull smollm2-135m-instruct` once"):
        resolve_model_dir("policy.model_path", "smollm2-135m-instruct")
    done = tmp_path / "smollm2-135m-instruct"
    done.mkdir()
    (done / MARKER).write_text(json.dumps({"name": "smollm2-135m-instruct"}))
    assert resolve_model_dir("policy.model_path", "smollm2-135m-instruct") == str(done)
    # A directory or an unknown name is a path, with ~ expanded.
    assert resolve_model_dir("policy.model_path", "~/models/x") == str(Path.home() / "models" / "x")
    assert resolve_model_dir("policy.model_path", str(tmp_path)) == str(tmp_path)


def test_addition_eval_fraction_keeps_evaluation_problems_out_of_training() -> None:
    task = AdditionTask(digits=2, eval_fraction=0.1)
    rng = np.random.default_rng(0)
    train = {(s.metadata["a"], s.metadata["b"]) for s in (task.sample(rng) for _ in range(3000))}
    held = task.heldout()
    evals = {(s.metadata["a"], s.metadata["b"]) for s in (held.sample(rng) for _ in range(300))}
    assert not train & evals
    assert all(task.is_heldout(a, b) for a, b in evals) and not any(task.is_heldout(a, b) for a, b in train)
    share = np.mean([task.is_heldout(a, b) for a in range(100) for b in range(100)])
    assert 0.08 < share < 0.12  # about the fraction asked for
    assert AdditionTask(digits=2).heldout().sample(np.random.default_rng(1)) == AdditionTask(digits=2).sample(
        np.random.default_rng(1))  # without a split, evaluation poses problems from its own seed stream
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        AdditionTask(eval_fraction=1.0)
