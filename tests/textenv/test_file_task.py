"""FileTask: reading JSONL/CSV/Parquet files, sampling, the File-v0 environment, and every error it reports."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from gymnasium.utils.env_checker import check_env

import textenv
from textenv import CharTokenizer, DataFileError, EnvConfig, FileTask, TaskSample, make_env, make_task, replay
from textenv.file_task import NUMERIC_CHARS

README = Path(__file__).resolve().parents[2] / "README.md"

# String values only, so that all three formats (CSV has no types) hold the same rows.
ROWS = [
    {"question": "Tom has 40 apples and is given 2 more. So how many apples does he have now?",
     "answer": "40 + 2 = 42\n#### 42", "id": "q1", "level": "easy"},
    {"question": "A box holds 1,000 pens, and 250 are sold. How many are left?",
     "answer": "1000 - 250 = 750\n#### 750", "id": "q2", "level": "easy"},
    {"question": "What is half of 7?", "answer": "7 / 2 = 3.5\n#### 3.5", "id": "q3", "level": "hard"},
]
GSM8K = {"prompt_field": "question", "prompt_template": "Q: {prompt}\nA:"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


WRITERS = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}


@pytest.fixture
def gsm8k(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "gsm8k.jsonl", ROWS)


def file_env(path: Path, **kwargs) -> textenv.TokenEnv:
    return gym.make("textenv/File-v0", task_kwargs={"path": str(path), **GSM8K, **kwargs}).unwrapped


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(ValueError) as err:
        FileTask(path, **kwargs)
    message = str(err.value)
    assert "\n" not in message, "errors are one line"
    return message


# ------------------------------------------------------------------------------------------------ reading
def test_every_format_reads_the_same_rows(tmp_path):
    tasks = {ext: FileTask(write(tmp_path / f"data.{ext}", ROWS), **GSM8K) for ext, write in WRITERS.items()}
    expected = tuple(
        TaskSample(f"Q: {r['question']}\nA:", r["answer"], {"id": r["id"], "level": r["level"]}) for r in ROWS
    )
    for ext, task in tasks.items():
        assert task.samples == expected, ext
        assert task.alphabet == tasks["jsonl"].alphabet
        assert [task.sample(np.random.default_rng(3)) for _ in range(5)] == [
            tasks["jsonl"].sample(np.random.default_rng(3)) for _ in range(5)
        ]


def test_jsonl_and_parquet_keep_value_types_csv_gives_strings(tmp_path):
    rows = [{"prompt": "1+1=", "answer": 2, "n": 3, "tags": ["a", "b"]}]
    for ext in ("jsonl", "parquet"):
        s = FileTask(WRITERS[ext](tmp_path / f"t.{ext}", rows)).samples[0]
        assert (s.prompt, s.answer, dict(s.metadata)) == ("1+1=", "2", {"n": 3, "tags": ["a", "b"]}), ext
    s = FileTask(write_csv(tmp_path / "t.csv", [{"prompt": "1+1=", "answer": "007", "n": 3}])).samples[0]
    assert (s.answer, dict(s.metadata)) == ("007", {"n": "3"})  # "007" is not turned into 7


def test_jsonl_skips_blank_lines_and_takes_the_union_of_keys(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n   \n{"prompt": "b", "answer": "2", "extra": true}\n')
    task = FileTask(path, verifier="exact")
    assert [s.prompt for s in task.samples] == ["a", "b"]
    assert [dict(s.metadata) for s in task.samples] == [{}, {"extra": True}]


def test_template_fills_prompt_and_any_column(gsm8k):
    task = FileTask(gsm8k, prompt_field="question", prompt_template="[{level}] {prompt} ({id})")
    assert task.samples[2].prompt == "[hard] What is half of 7? (q3)"


def test_default_fields_and_template(tmp_path):
    task = FileTask(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "2+2=", "answer": "4"}]))
    assert task.samples == (TaskSample("2+2=", "4", {}),)
    assert (task.max_response_tokens, task.max_prompt_chars, task.verifier, task.shuffle) == (64, 512, "numeric", True)


def test_alphabet_covers_prompts_answers_and_numbers(gsm8k):
    task = FileTask(gsm8k, **GSM8K)
    assert list(task.alphabet) == sorted(set(task.alphabet))
    assert set(NUMERIC_CHARS) <= set(task.alphabet)
    tok = CharTokenizer(task.alphabet)
    for s in task.samples:
        assert tok.decode(tok.encode(s.prompt)) == s.prompt and tok.decode(tok.encode(s.answer)) == s.answer
    assert tok.encode("#### -1,234.5")  # any numeric final answer is expressible


# ------------------------------------------------------------------------------------------------ sampling
def test_sampling_is_seeded_uniform_and_with_replacement(gsm8k):
    task = FileTask(gsm8k, **GSM8K)

    def draws(seed: int) -> list[str]:
        rng = np.random.default_rng(seed)
        return [task.sample(rng).metadata["id"] for _ in range(300)]

    assert draws(0) == draws(0) and draws(0) != draws(1)
    counts = {i: draws(0).count(i) for i in ("q1", "q2", "q3")}
    assert all(70 < c < 130 for c in counts.values()), counts


def test_samples_do_not_share_metadata(gsm8k):
    task = FileTask(gsm8k, **GSM8K)
    task.sample(np.random.default_rng(0)).metadata["id"] = "changed"
    assert [s.metadata["id"] for s in task.samples] == ["q1", "q2", "q3"]


def test_no_shuffle_serves_file_order_and_cycles(gsm8k):
    task = FileTask(gsm8k, shuffle=False, **GSM8K)
    rng = np.random.default_rng(0)
    assert [task.sample(rng).metadata["id"] for _ in range(5)] == ["q1", "q2", "q3", "q1", "q2"]


# ------------------------------------------------------------------------------------------------ registration
def test_registered_as_task_and_env_id(gsm8k):
    assert textenv.TASKS["file"] is FileTask and "textenv/File-v0" not in textenv.ENV_IDS
    assert gym.spec("textenv/File-v0").kwargs == {"task": "file"}
    task = make_task("file", path=str(gsm8k), **GSM8K)
    assert isinstance(task, FileTask) and task.name == "file" and len(task.samples) == 3


def test_file_env_needs_a_path():
    with pytest.raises(ValueError, match="task_kwargs needs 'path'"):
        gym.make("textenv/File-v0")
    with pytest.raises(ValueError, match="needs env.task_kwargs.path"):
        EnvConfig(id="textenv/File-v0")


@pytest.mark.parametrize("ext", sorted(WRITERS))
def test_check_env(tmp_path, ext):
    path = WRITERS[ext](tmp_path / f"data.{ext}", ROWS)
    env = file_env(path)
    check_env(env, skip_render_check=True)
    assert isinstance(env.task, FileTask) and env.max_response_tokens == 64 and env.max_prompt_tokens == 512


def test_seeded_rollout_is_deterministic(gsm8k):
    def rollout(seed: int) -> list:
        env = file_env(gsm8k)
        obs, info = env.reset(seed=seed)
        out = [obs["tokens"].tolist(), info]
        actions = np.random.default_rng(seed).integers(2, env.action_space.n, size=20)
        for a in actions:
            obs, reward, terminated, truncated, step_info = env.step(int(a))
            out.append((obs["tokens"].tolist(), reward, terminated, truncated, step_info))
            if terminated or truncated:
                break
        return out

    assert rollout(7) == rollout(7)
    assert rollout(7)[1] != rollout(8)[1] or rollout(7)[2:] != rollout(8)[2:]


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("so the answer is #### 42", 1.0),
        ("40 + 2 = 42\n#### 42", 1.0),
        ("so the answer is 42.", 1.0),  # no mark: the last number
        ("so the answer is #### 42.0", 1.0),
        ("so the answer is #### 41", 0.0),
        ("so the answer is", 0.0),
    ],
)
def test_replay_scores_gsm8k_responses(gsm8k, response, score):
    env = file_env(gsm8k)
    sample = env.task.samples[0]
    ep = replay(env, sample, env.tokenizer.encode(response) + [env.tokenizer.eos_token_id])
    assert ep["score"] == score and ep["terminated"] and ep["rewards"].sum() == pytest.approx(score)


def test_exact_verifier_through_the_env(tmp_path):
    path = write_csv(tmp_path / "capitals.csv", [{"prompt": "Capital of France?", "answer": "Paris"}])
    env = gym.make("textenv/File-v0", task_kwargs={"path": str(path), "verifier": "exact"}).unwrapped
    eos = [env.tokenizer.eos_token_id]
    assert replay(env, env.task.samples[0], env.tokenizer.encode(" paris ") + eos)["score"] == 1.0
    assert replay(env, env.task.samples[0], env.tokenizer.encode("Pari") + eos)["score"] == 0.0


def test_readme_example_config(tmp_path, monkeypatch):
    blocks = re.findall(r"```yaml\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "textenv/File-v0" in b)
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "gsm8k.jsonl", ROWS)
    monkeypatch.chdir(tmp_path)
    env = make_env(EnvConfig(**yaml.safe_load(block)["env"])).unwrapped
    _, info = env.reset(seed=0)
    assert info["prompt"] in {r["question"] for r in ROWS} and isinstance(env.task, FileTask)


# ------------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    message = error_of(tmp_path / "nope.jsonl")
    assert "nope.jsonl does not exist" in message and "fix the path" in message


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("prompt,answer\n")
    message = error_of(path)
    assert "data.txt" in message and "unsupported extension '.txt'" in message and "'.parquet'" in message


@pytest.mark.parametrize("ext", sorted(WRITERS))
@pytest.mark.parametrize(
    ("kwargs", "field", "setting"),
    [({}, "prompt", "prompt_field"), ({"prompt_field": "question", "answer_field": "solution"}, "solution",
                                      "answer_field")],
)
def test_missing_field_names_it_and_the_columns(tmp_path, ext, kwargs, field, setting):
    message = error_of(WRITERS[ext](tmp_path / f"data.{ext}", ROWS), **kwargs)
    assert f"data.{ext} has no column {field!r}" in message and setting in message
    assert "['question', 'answer', 'id', 'level']" in message


@pytest.mark.parametrize(
    ("name", "write"),
    [
        ("empty.jsonl", lambda p: p.write_text("")),
        ("blank.jsonl", lambda p: p.write_text("\n  \n")),
        ("empty.csv", lambda p: p.write_text("")),
        ("header_only.csv", lambda p: p.write_text("prompt,answer\n")),
        ("empty.parquet", lambda p: pq.write_table(pa.table({"prompt": pa.array([], pa.string()),
                                                             "answer": pa.array([], pa.string())}), p)),
    ],
)
def test_empty_file(tmp_path, name, write):
    write(tmp_path / name)
    assert f"{name} holds no rows" in error_of(tmp_path / name)


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": \n')
    message = error_of(path)
    assert "bad.jsonl line 3 is not valid JSON" in message and "fix or remove that line" in message


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n["b", "2"]\n')
    assert "list.jsonl line 2 is a JSON list, not an object" in error_of(path)


@pytest.mark.parametrize("ext", ["jsonl", "parquet"])
def test_null_or_missing_value_in_a_row(tmp_path, ext):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": None}]
    message = error_of(WRITERS[ext](tmp_path / f"d.{ext}", rows))
    where = "line 2" if ext == "jsonl" else "row 1"
    assert f"d.{ext} {where}: 'answer' is missing or null" in message


def test_csv_row_with_too_many_values(tmp_path):
    path = tmp_path / "wide.csv"
    path.write_text("prompt,answer\na,1\nb,2,3\n")
    assert "wide.csv line 3 has more values than the header's 2 columns" in error_of(path)


def test_corrupt_parquet(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet at all")
    assert "broken.parquet is not a readable Parquet file" in error_of(path)


@pytest.mark.parametrize(
    ("template", "match"),
    [("{prompt} {difficulty}", r"names \{difficulty\}, which line 1 lacks"), ("{0}", "not a valid template"),
     ("{prompt", "not a valid template")],
)
def test_bad_prompt_template(gsm8k, template, match):
    assert re.search(match, error_of(gsm8k, prompt_field="question", prompt_template=template))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"verifier": "fuzzy"}, r"verifier must be one of \['exact', 'numeric'\]; got 'fuzzy'"),
     ({"max_response_tokens": 0}, "must be >= 1")],
)
def test_bad_arguments(gsm8k, kwargs, match):
    assert re.search(match, error_of(gsm8k, **kwargs))


def test_errors_are_value_errors_through_make_task(tmp_path):
    with pytest.raises(DataFileError, match="does not exist"):
        make_task("file", path=str(tmp_path / "missing.csv"))


def test_directory_without_datasets_package(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    message = error_of(tmp_path)
    assert "is a directory" in message and "'datasets' package" in message


def test_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "ds"))
    assert FileTask(tmp_path / "ds", **GSM8K).samples == FileTask(write_jsonl(tmp_path / "d.jsonl", ROWS),
                                                                  **GSM8K).samples


# ------------------------------------------------------------------------------------------- held-out rows
def test_eval_fraction_holds_out_a_fixed_set_of_rows_training_never_draws(tmp_path: Path) -> None:
    rows = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = FileTask(path, verifier="exact", eval_fraction=0.25)
    held = task.heldout()
    assert len(held.samples) == 10 and len(task.samples) == 30
    assert sorted(s.prompt for s in held.samples + task.samples) == sorted(r["prompt"] for r in rows)
    order = [r["prompt"] for r in rows]
    assert [order.index(s.prompt) for s in held.samples] == sorted(order.index(s.prompt) for s in held.samples)
    assert held.samples == FileTask(path, verifier="exact", eval_fraction=0.25).heldout().samples  # same every run
    rng = np.random.default_rng(0)
    drawn = {task.sample(rng).prompt for _ in range(2000)}
    assert drawn == {s.prompt for s in task.samples}  # every training row, and no held-out one
    assert [held.sample(rng).prompt for _ in range(10)] == [s.prompt for s in held.samples]  # file order
    assert held.num_problems == 10 and task.num_problems == 30


def test_eval_path_rows_are_the_held_out_set_and_join_the_alphabet(tmp_path: Path, gsm8k: Path) -> None:
    extra = write_jsonl(tmp_path / "eval.jsonl", [{"question": "Zed has 9 kiwis?", "answer": "#### 9"}])
    task = FileTask(gsm8k, **GSM8K, eval_path=extra)
    assert task.samples == FileTask(gsm8k, **GSM8K).samples
    assert [s.prompt for s in task.heldout().samples] == ["Q: Zed has 9 kiwis?\nA:"]
    assert {"Z", "k"} <= set(task.alphabet)  # the tiny policy's tokenizer can write held-out prompts


def test_held_out_split_errors(tmp_path: Path, gsm8k: Path) -> None:
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        FileTask(gsm8k, **GSM8K, eval_fraction=1.0)
    with pytest.raises(ValueError, match="not given together with eval_path"):
        FileTask(gsm8k, **GSM8K, eval_fraction=0.5, eval_path=gsm8k)
    with pytest.raises(ValueError, match="leaves rows on both sides"):
        FileTask(gsm8k, **GSM8K, eval_fraction=0.1)  # 3 rows: 0.3 rounds to none
    with pytest.raises(ValueError, match="eval_path .* or task_kwargs.eval_fraction"):
        FileTask(gsm8k, **GSM8K).heldout()
