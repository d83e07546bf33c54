"""A dataset task in training: the driver's EpochOrder hands each iteration's rows to two vLLM rollout actors, and
every row is served exactly once per epoch (file order without shuffle, a new permutation per epoch with it)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cluster.rollout import EngineOptions, RolloutGroup
from policies.models import load_tokenizer
from textenv import EnvConfig, EpochOrder, make_env

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
N_ROWS, PROMPTS_PER_ITERATION, SAMPLES_PER_PROMPT = 10, 4, 2  # 4 does not divide 10: epochs end mid-iteration


def env_config(path: Path, shuffle: bool) -> EnvConfig:
    return EnvConfig(id="textenv/File-v0", task_kwargs={"path": str(path), "shuffle": shuffle},
                     max_prompt_tokens=6, max_response_tokens=5)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """N_ROWS distinct prompts over the tiny model's alphabet (``abcdefgh=``), row i's answer is ``str(i)``."""
    rng = np.random.default_rng(0)
    prompts: set[str] = set()
    while len(prompts) < N_ROWS:
        prompts.add("".join(rng.choice(list("abcdefgh"), size=5)) + "=")
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "answer": str(i)}) + "\n" for i, p in enumerate(sorted(prompts))))
    return path


@pytest.fixture(scope="module")
def group(ray_session, tiny_model_dir: Path, data_file: Path):
    engine = EngineOptions(model_dir=str(tiny_model_dir), dtype="float32", max_model_len=11, max_num_seqs=64,
                           temperature=1.0, kv_cache_gib=1, gpu_memory_utilization=0.3, seeded_sampling=True, seed=0)
    g = RolloutGroup(2, env_config(data_file, shuffle=False), engine, 0)
    yield g
    g.shutdown()


def served_epochs(
    group: RolloutGroup, order: EpochOrder, model_dir: Path, data_file: Path, epochs: int
) -> list[list[int]]:
    """Run iterations as the trainer does and read back, from the prompts the actors posed, which rows they served."""
    tok = load_tokenizer(model_dir)
    row_of = {json.loads(line)["prompt"]: i for i, line in enumerate(data_file.read_text().splitlines())}
    served: list[int] = []
    for iteration in range(epochs * N_ROWS // PROMPTS_PER_ITERATION):
        given = order.take(PROMPTS_PER_ITERATION).tolist()
        out = group.sample(PROMPTS_PER_ITERATION, SAMPLES_PER_PROMPT, seed=iteration, version=0, rows=given)
        P = out["prompt_ids"].shape[1]
        prompts = [tok.decode(ids[P - n :].tolist()) for ids, n in zip(out["prompt_ids"], out["prompt_length"])]
        rows = [row_of[p] for p in prompts]
        assert rows == out["row"].tolist(), "the actors posed the rows they report"
        assert rows[::SAMPLES_PER_PROMPT] == rows[1::SAMPLES_PER_PROMPT], "a prompt's samples are consecutive"
        # Results come back in actor order: actor 0 posed the first half of the given rows, actor 1 the second.
        assert rows[::SAMPLES_PER_PROMPT] == given
        served += given
    return [served[e * N_ROWS : (e + 1) * N_ROWS] for e in range(epochs)]


def test_file_order_without_shuffle(group, tiny_model_dir: Path, data_file: Path) -> None:
    order = EpochOrder.for_task(make_env(env_config(data_file, shuffle=False)).unwrapped.task, seed=0)
    assert order is not None and not order.shuffle
    # The actors' warm-up moved no cursor: the first epoch starts at row 0.
    assert served_epochs(group, order, tiny_model_dir, data_file, epochs=2) == [list(range(N_ROWS))] * 2


def test_shuffled_rows_once_per_epoch_in_a_new_order(group, tiny_model_dir: Path, data_file: Path) -> None:
    order = EpochOrder.for_task(make_env(env_config(data_file, shuffle=True)).unwrapped.task, seed=7)
    assert order is not None and order.shuffle
    epochs = served_epochs(group, order, tiny_model_dir, data_file, epochs=2)
    assert [sorted(e) for e in epochs] == [list(range(N_ROWS))] * 2, "each row exactly once per epoch"
    assert epochs[0] != epochs[1] and epochs[0] != list(range(N_ROWS))

