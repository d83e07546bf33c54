"""Rollout throughput: tokengym's rollout path against raw vLLM and Hugging Face ``generate`` (issue 11, item 1).

Three systems generate the same batch, one after the other, round after round (the order rotates every round, so the
shared machine's noise hits each alike), and the medians of their generated tokens/s are compared:

  tokengym     ``RolloutGroup.sample`` + ``build_batch``, timed in the driver: the Ray call, the actor drawing the
               problems, vLLM's generate, the environment replaying every token (per-token rewards), packing into
               arrays, the transfer back to the driver and the learner batch. The engine settings come from
               ``cluster.trainer.engine_options`` of a run configured for this workload.
  raw vLLM     ``LLM.generate`` with the same engine settings and the same requests (per-request seeds, log-probs),
               timed around the call in its own process: what vLLM alone does, nothing tokengym adds.
  HF generate  ``model.generate`` (sampling, KV cache, the whole batch at once) plus each sampled token's log-prob
               (a log-softmax per step, kept one step at a time), timed in its own process.

Equal work: the same model files and dtype (bfloat16), the same prompt token ids (the task's problems as rollout
actor 0 draws them), temperature 1 with no top-k/top-p, the sampled token's log-prob from every system, and exactly
``new tokens`` per response for all (EOS masked until then: vLLM's ``min_tokens``, HF's ``min_new_tokens``;
``EngineOptions.fixed_length`` in the rollout path); the tokens each system actually generated are counted and must
match. Each system is a Ray actor with ``--threads`` CPUs (Ray sets its ``OMP_NUM_THREADS``), and the torch threads
each one really uses are printed. Rollout actors beyond the first use more threads: that row shows scaling, not a
like-for-like ratio. One warm-up round of every system is not timed.

Models: ``tiny``, the default config's policy (hidden 128, 2 layers, its character tokenizer of 11 tokens), and
``34m``, a random-init Llama of hidden 512, 8 layers, vocabulary 8,192 (a character tokenizer whose first letters
are the task's: the prompts are one token per letter). The task is ``textenv/Reverse-v0`` with ``--prompt-tokens``
tokens per prompt. Goals: tokengym >= 0.9x raw vLLM; >= 2.5x HF generate on the 34M model.

    .venv/bin/python bench/rollout.py [--models tiny 34m] [--shapes 64x32 128x128] [--rounds 3] [--record]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from cluster.config import load_config  # noqa: E402
from cluster.rollout import EngineOptions, RolloutGroup, actor_seed, derive_seed, draw_problems  # noqa: E402
from cluster.trainer import build_batch, engine_options  # noqa: E402
from policies.models import save_tiny_policy  # noqa: E402
from textenv import HFTokenizerAdapter, make_env  # noqa: E402

LETTERS = "abcdefgh"
MODELS = {  # name: (save_tiny_policy sizes, extra symbols beyond the task's alphabet "abcdefgh=")
    "tiny": (dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=256), 0),
    "34m": (dict(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1376), 8192 - 11),
}
USER_ENV = ("OMP_NUM_THREADS", "RAY_memory_monitor_refresh_ms")  # settings a user may give a benchmark (Ray sets others)
GOALS = {"vllm": 0.9, "hf": 2.5}  # tokengym / raw vLLM; tokengym / HF generate (the 34M model)


def build_model(name: str, out: Path, max_positions: int) -> Path:
    """A random-init Llama with a character tokenizer: pad, eos, ``abcdefgh=`` and, for a larger vocabulary, extra
    CJK symbols that the task never poses (so the prompts stay one token per letter)."""
    sizes, extra = MODELS[name]
    alphabet = LETTERS + "=" + "".join(chr(0x4E00 + k) for k in range(extra))
    return save_tiny_policy(out, alphabet=alphabet, seed=0, arch="llama", max_positions=max_positions, **sizes)


def engine_settings(llm: Any) -> dict[str, Any]:
    """What an engine was really built with, and the torch threads of its process: checked equal across systems."""
    import torch

    cfg = llm.llm_engine.vllm_config
    return {"dtype": str(cfg.model_config.dtype), "max_num_seqs": cfg.scheduler_config.max_num_seqs,
            "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
            "prefix_caching": cfg.cache_config.enable_prefix_caching, "threads": torch.get_num_threads()}


class RawVLLM:
    """vLLM's own API, in a Ray actor of its own, built as a rollout actor builds its engine from ``EngineOptions``."""

    def __init__(self, opts: EngineOptions) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM
        from vllm.platforms import current_platform

        from cluster.rollout import kv_cache_bytes, skip_sampler_compile, use_chunked_prefill

        skip_sampler_compile(current_platform.is_cpu())  # as a rollout actor's engine
        self.opts = opts
        self.llm = LLM(
            model=os.fspath(opts.model_dir), dtype=opts.dtype, enforce_eager=True, seed=opts.seed,
            max_model_len=opts.max_model_len,
            max_num_seqs=opts.max_num_seqs, gpu_memory_utilization=opts.gpu_memory_utilization,
            enable_chunked_prefill=use_chunked_prefill(opts.chunked_prefill, opts.seeded_sampling,
                                                       current_platform.is_cpu()),
            max_num_batched_tokens=opts.max_num_batched_tokens, logprobs_mode="raw_logprobs",
            kv_cache_memory_bytes=kv_cache_bytes(opts, os.fspath(opts.model_dir)) if current_platform.is_cpu() else None,
        )
        self.eos = self.llm.get_tokenizer().eos_token_id

    def settings(self) -> dict[str, Any]:
        return engine_settings(self.llm)

    def generate(self, prompts: list[list[int]], n: int, new_tokens: int, seed: int) -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        start = time.perf_counter()
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts for _ in range(n)]
        params = [SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=1.0, logprobs=0,
                                 stop_token_ids=[self.eos], detokenize=False,
                                 seed=derive_seed(seed, i, j) if self.opts.seeded_sampling else None)
                  for i in range(len(prompts)) for j in range(n)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
                "logprobs": sum(len(o.outputs[0].logprobs) for o in outputs)}


class HFGenerate:
    """Hugging Face ``generate`` in a Ray actor of its own, with ``threads`` torch threads."""

    def __init__(self, model_dir: str, dtype: str, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()

    def settings(self) -> dict[str, Any]:
        import torch

        return {"dtype": str(next(self.model.parameters()).dtype), "threads": torch.get_num_threads(),
                "params": sum(p.numel() for p in self.model.parameters())}

    def generate(self, prompts: list[list[int]], n: int, new_tokens: int, seed: int) -> dict[str, Any]:
        import torch
        from transformers import LogitsProcessorList

        ids = torch.tensor(prompts, dtype=torch.long)  # (N, P): the prompts have equal lengths, no padding
        cfg = self.model.config
        torch.manual_seed(seed)
        logp = SampledLogprobs()
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_return_sequences=n,
                logits_processor=LogitsProcessorList([logp]), pad_token_id=cfg.pad_token_id,
                eos_token_id=cfg.eos_token_id,
            )
            logprobs = logp.finish(out)  # (N * n, new tokens)
        seconds = time.perf_counter() - start
        new = out[:, ids.shape[1]:]  # (N * n, new tokens)
        eos = (new == cfg.eos_token_id).int()
        padding = (eos.cumsum(dim=1) - eos) > 0  # after a row's EOS, generate pads it until the batch ends
        return {"seconds": seconds, "tokens": int((~padding).sum()), "logprobs": int(logprobs.numel())}


class SampledLogprobs:
    """A logits processor that keeps the log-prob of each sampled token, one step at a time.

    HF's ``output_logits`` would hold a (batch, vocabulary) float32 tensor per step (GBs at 1,024 x 128 x 8,192);
    the token sampled at step t is known at step t + 1 (the last input id), so only one step's log-softmax is kept.
    """

    def __init__(self) -> None:
        self.last: Any = None
        self.picked: list[Any] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if self.last is not None:
            self.picked.append(self.last.gather(1, input_ids[:, -1:]))  # (B, 1)
        self.last = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
        return scores

    def finish(self, sequences: Any) -> Any:
        import torch

        self.picked.append(self.last.gather(1, sequences[:, -1:]))
        return torch.cat(self.picked, dim=1)  # (B, new tokens)


def run_workload(model: str, model_dir: Path, prompts: int, new_tokens: int, args: argparse.Namespace) -> dict:
    """Every system on one (model, prompts x new tokens) workload; prints its table and returns its medians."""
    import ray

    P, n, T = args.prompt_tokens, args.samples, args.threads
    cfg = load_config(overrides=[
        f"env.task_kwargs={{length: {P - 1}, letters: {LETTERS}}}", f"env.max_response_tokens={new_tokens}",
        f"rollout.prompts_per_iteration={prompts}", f"rollout.samples_per_prompt={n}", "rollout.dtype=bfloat16",
        f"rollout.num_cpus_per_actor={T}", f"algorithm.minibatch_size={prompts * n}", f"policy.model_path={model_dir}",
        f"rollout.seeded_sampling={str(not args.unseeded).lower()}",
    ])
    opts = engine_options(cfg, model_dir, P, new_tokens)
    opts = replace(opts, fixed_length=True)
    from transformers import AutoTokenizer

    env = make_env(cfg.env, tokenizer=HFTokenizerAdapter(AutoTokenizer.from_pretrained(model_dir))).unwrapped
    groups = {a: RolloutGroup(a, cfg.env, opts, 0, num_cpus_per_actor=T) for a in args.actors}
    raw = ray.remote(num_cpus=T)(RawVLLM).remote(opts)
    hf = ray.remote(num_cpus=T)(HFGenerate).remote(str(model_dir), opts.dtype, T)
    settings = {f"tokengym x{a}": ray.get(g.actors[0].__ray_call__.remote(lambda actor: engine_settings(actor.llm)))
                for a, g in groups.items()}
    settings["raw vLLM"] = ray.get(raw.settings.remote())
    engines = {tuple(sorted(s.items())) for s in settings.values()}
    if len(engines) != 1:
        raise RuntimeError(f"the engines differ: {settings}")
    hf_settings = ray.get(hf.settings.remote())
    if hf_settings["threads"] != T or settings["raw vLLM"]["threads"] != T:
        raise RuntimeError(f"threads differ from --threads {T}: vLLM {settings}, HF {hf_settings}")

    def tokengym(group: RolloutGroup) -> Callable[[int], dict[str, Any]]:
        def run(seed: int) -> dict[str, Any]:
            start = time.perf_counter()
            out = group.sample(prompts, n, seed, version=0)
            build_batch(out)
            seconds = time.perf_counter() - start
            return {"seconds": seconds, "tokens": out["generated_tokens"], "logprobs": int(out["action_mask"].sum()),
                    "generate_s": out["generate_s"], "replay_s": out["replay_s"]}
        return run

    def remote(actor: Any) -> Callable[[int], dict[str, Any]]:
        def run(seed: int) -> dict[str, Any]:
            # The prompts rollout actor 0 draws for this seed (with one actor: the whole batch's).
            _, ids = draw_problems(env, actor_seed(seed, 0), prompts)
            return ray.get(actor.generate.remote(ids, n, new_tokens, seed))
        return run

    systems = {f"tokengym, {a} actor{'s' * (a > 1)}": tokengym(g) for a, g in groups.items()}
    systems.update({"raw vLLM": remote(raw), "HF generate": remote(hf)})
    names = list(systems)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    expected = prompts * n * new_tokens
    for r in range(args.rounds + 1):  # round 0 warms up and is not counted
        for name in names[r % len(names):] + names[: r % len(names)]:
            res = systems[name](r)
            if res["tokens"] != expected or res["logprobs"] != expected:
                raise RuntimeError(f"{name} generated {res['tokens']} tokens ({res['logprobs']} log-probs), "
                                   f"expected {expected}")
            if r:
                results[name].append(res)
    for g in groups.values():
        g.shutdown()
    ray.kill(raw)
    ray.kill(hf)

    tps = {name: [res["tokens"] / res["seconds"] for res in rs] for name, rs in results.items()}
    med = {name: statistics.median(v) for name, v in tps.items()}
    ours = names[0]
    lines = [f"model {model} ({hf_settings['params'] / 1e6:.1f}M params, vocab {env.action_space.n:,}, {opts.dtype}), "
          f"{prompts} prompts x {n} samples, {P} prompt + {new_tokens} new tokens ({expected:,} generated per batch), "
          f"{T} thread(s) per system, {'unseeded' if args.unseeded else 'seeded per request'}, "
          f"median of {args.rounds} rounds"]
    for name in names:
        secs = statistics.median(res["seconds"] for res in results[name])
        line = f"  {name:20s} {med[name]:>9,.0f} tokens/s  {secs:8.3f} s/batch"
        if name.startswith("tokengym"):
            gen, rep, rest = (statistics.median(part(res) for res in results[name]) for part in (
                lambda res: res["generate_s"], lambda res: res["replay_s"],
                lambda res: res["seconds"] - res["generate_s"] - res["replay_s"]))
            line += f"  (vLLM generate {gen:.3f} s, env replay {rep:.3f} s, rest {rest:.3f} s)"
        lines.append(line)
    ratios = {}
    for key, other in (("vllm", "raw vLLM"), ("hf", "HF generate")):
        paired = [a / b for a, b in zip(tps[ours], tps[other])]
        ratios[key] = med[ours] / med[other]
        goal = f"goal >= {GOALS[key]}" + (" on the 34M model" if key == "hf" else "")
        lines.append(f"  {ours} / {other}: {ratios[key]:.2f}x  (rounds {min(paired):.2f}-{max(paired):.2f}; {goal})")
    print("\n".join(lines), flush=True)
    return {"model": model, "shape": f"{prompts}x{new_tokens}", "tps": med, "ratios": ratios, "names": names,
            "report": lines}


def summary_table(rows: list[dict]) -> str:
    """The markdown table of every workload's medians and ratios (for RESULTS.md and the README)."""
    names = rows[0]["names"]
    head = ["model", "prompts x new tokens", *[f"{n} tokens/s" for n in names], "tokengym / vLLM", "tokengym / HF"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], row["shape"], *[f"{row['tps'][n]:,.0f}" for n in names],
                 f"{row['ratios']['vllm']:.2f}x", f"{row['ratios']['hf']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def record(script: str, load_before: tuple[float, ...], report: str, table: str, note: str = "",
           results: Path = REPO / "bench" / "RESULTS.md") -> None:
    """Append a benchmark's run to bench/RESULTS.md: when, the command that repeats it (as this process was started:
    its niceness and the Ray settings it was given come first), the machine and its load before and after (``note``
    follows), the report and the table."""
    prefix = [f"{k}={os.environ[k]}" for k in USER_ENV if k in os.environ]
    niceness = os.nice(0)
    prefix += [f"nice -n {niceness}"] if niceness else []
    command = " ".join([*prefix, ".venv/bin/python", f"bench/{script}", *map(shlex.quote, sys.argv[1:])])
    load = f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after{note}"
    with open(results, "a") as f:
        f.write(f"\n### bench/{script}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
                f"Command: `{command}`; machine: {machine()}; {load}.\n\n```\n{report}\n```\n\n{table}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--shapes", nargs="+", default=["64x32", "128x128"], help="PROMPTSxNEW_TOKENS")
    parser.add_argument("--samples", type=int, default=8, help="responses per prompt (a group)")
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) of every system")
    parser.add_argument("--actors", type=int, nargs="+", default=[1], help="tokengym rows: rollout actors each")
    parser.add_argument("--unseeded", action="store_true",
                        help="rollout.seeded_sampling=false (tokengym and raw vLLM): no per-request generators")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    args = parser.parse_args()
    if args.actors[0] != 1:
        raise SystemExit("--actors must start with 1: one rollout actor against one engine is the compared row")
    import ray

    load_before = os.getloadavg()
    # A Ray of its own ("local"), never a cluster another process started on this machine; every system's actors
    # exist at once.
    ray.init(address="local", num_cpus=args.threads * (sum(args.actors) + 2), include_dashboard=False,
             logging_level="ERROR", log_to_driver=False, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for shape in args.shapes:
                prompts, new_tokens = (int(x) for x in shape.split("x"))
                model_dir = build_model(model, Path(tmp) / f"{model}-{shape}", args.prompt_tokens + new_tokens)
                rows.append(run_workload(model, model_dir, prompts, new_tokens, args))
    ray.shutdown()
    table = summary_table(rows)
    print(table)
    report = "\n".join(line for row in rows for line in row["report"])
    if args.record:
        record("rollout.py", load_before, report, table)


if __name__ == "__main__":
    main()
