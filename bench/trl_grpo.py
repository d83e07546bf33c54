"""TRL's GRPOTrainer on the task bench/vs_trl.py gives it: the TRL side of that benchmark.

Runs in the benchmark's own environment (bench/.venv-trl: the pinned TRL, the CPU build of torch, no tokengym and
no vLLM), so it imports nothing from this repository. It reads a JSON job file written by bench/vs_trl.py: the model
directory (the tiny policy tokengym's default run builds, with its character tokenizer), the prompts and answers
(drawn from textenv's Reverse task), reward checks (responses scored by textenv's own verifier, which this script's
reward must reproduce before training starts) and the GRPOConfig keyword arguments. It trains until it is stopped
(bench/vs_trl.py ends it at its bar or its budget) and appends one JSON line per generation to the progress file,
written when the last optimizer step on that generation's completions ends (as tokengym's metrics row of an
iteration is written after its update):

    {"step": k, "completions": N, "reward_mean": ..., "step_s": seconds since the previous row (or the start of
     training), "train_s": seconds since the start of training}

    bench/.venv-trl/bin/python bench/trl_grpo.py JOB.json PROGRESS.jsonl
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any


def positional_reward(answer: str, response: str) -> float:
    """Fraction of the answer's positions the response gets right (textenv's ``_positional``, which cannot be
    imported here: the checks in the job file hold the two to the same numbers)."""
    if not answer:
        return 0.0
    return sum(a == b for a, b in zip(answer, response)) / len(answer)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    progress = Path(sys.argv[2])
    for check in job["reward_checks"]:
        got = positional_reward(check["answer"], check["response"])
        if abs(got - check["score"]) > 1e-9:
            raise SystemExit(f"reward disagrees with textenv on {check}: {got}")

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(job["seed"])
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    # The character tokenizer has no chat template and needs none: the prompts are plain text ("abcde=").
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    dataset = Dataset.from_list([{"prompt": p, "answer": a} for p, a in job["problems"]])
    pending: list[tuple[int, float]] = []  # (completions, sum of rewards) of the generation being trained on

    def reward(prompts: list[str], completions: list[str], answer: list[str], **_: Any) -> list[float]:
        scores = [positional_reward(a, c) for a, c in zip(answer, completions)]
        pending.append((len(scores), sum(scores)))
        return scores

    args = GRPOConfig(**job["grpo_config"])
    steps_per_row = args.steps_per_generation * args.num_iterations  # optimizer steps on one generation

    class Progress(TrainerCallback):
        """One row per generation, after its last optimizer step."""

        def on_train_begin(self, *_: Any, **__: Any) -> None:
            self.began = self.last = time.perf_counter()
            self.file = progress.open("a")

        def on_step_end(self, _args: Any, state: Any, *__: Any, **___: Any) -> None:
            if state.global_step % steps_per_row or not pending:
                return
            (n, total), now = pending.pop(), time.perf_counter()
            row = {"step": state.global_step // steps_per_row, "completions": n, "reward_mean": total / n,
                   "step_s": now - self.last, "train_s": now - self.began}
            self.last = now
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Progress()])
    trainer.train()


if __name__ == "__main__":
    main()
