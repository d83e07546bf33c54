"""A task read from a local data file: JSONL, CSV, Parquet, or a directory saved by ``datasets.save_to_disk``.

Each row gives a prompt, a reference answer, and metadata (its other columns)::

    {"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\\n#### 7", "id": 17}

    gym.make("textenv/File-v0", task_kwargs={"path": "data/gsm8k.jsonl", "prompt_field": "question",
                                             "prompt_template": "Q: {prompt}\\nA:"})
"""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from textenv.tasks import DIGITS, TASKS, DatasetTask, TaskSample
from textenv.verifiers import VERIFIERS

# Characters every file task's alphabet holds, so that a numeric final answer ("#### -1,234.5") can be written
# even when the file's own text lacks some of them.
NUMERIC_CHARS = DIGITS + ".-,# "

Row = dict[str, Any]
Rows = list[tuple[str, Row]]  # (where the row is, for error messages: "line 3" or "row 2"; the row)


class DataFileError(ValueError):
    """A data file that cannot be read as a task; the message names the file and what to fix."""


# ------------------------------------------------------------------------------------------------ readers
def _read_jsonl(path: Path) -> tuple[list[str], Rows]:
    rows: Rows = []
    with path.open(encoding="utf-8-sig") as f:  # tolerates a byte-order mark
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(f"{path} line {number} is not valid JSON ({err.msg} at column {err.colno}); "
                                    "fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataFileError(f"{path} line {number} is a JSON {type(row).__name__}, not an object; "
                                    'each line must be one object such as {"prompt": ..., "answer": ...}')
            rows.append((f"line {number}", row))
    columns = list(dict.fromkeys(key for _, row in rows for key in row))
    return columns, rows


def _read_csv(path: Path) -> tuple[list[str], Rows]:
    # Every CSV value stays a string: inferring types would turn an answer such as "007" into 7.
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        rows: Rows = []
        for row in reader:
            if None in row:
                raise DataFileError(f"{path} line {reader.line_num} has more values than the header's "
                                    f"{len(columns)} columns; quote values that contain commas")
            rows.append((f"line {reader.line_num}", row))
    return columns, rows


def _read_parquet(path: Path) -> tuple[list[str], Rows]:
    import pyarrow as pa  # imported here so that importing textenv stays light
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise DataFileError(f"{path} is not a readable Parquet file ({err}); rewrite it, e.g. with "
                            "pandas.DataFrame.to_parquet") from None
    return table.column_names, [(f"row {i}", row) for i, row in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path) -> tuple[list[str], Rows]:
    try:
        import datasets
    except ImportError:
        raise DataFileError(f"{path} is a directory; reading a dataset saved by datasets.save_to_disk needs the "
                            "'datasets' package, or give a .jsonl, .csv or .parquet file instead") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except FileNotFoundError as err:
        raise DataFileError(f"{path} is not a dataset saved by datasets.save_to_disk ({err}); give that directory "
                            "or a .jsonl, .csv or .parquet file") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataFileError(f"{path} holds several splits {sorted(dataset)}; set path to one split's directory, "
                            f"e.g. {path / sorted(dataset)[0]}")
    return list(dataset.column_names), [(f"row {i}", row) for i, row in enumerate(dataset.to_list())]


READERS: dict[str, Callable[[Path], tuple[list[str], Rows]]] = {
    ".jsonl": _read_jsonl,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_rows(path: str | os.PathLike[str]) -> tuple[list[str], Rows]:
    """The column names and the rows of a data file, each row with where it is in the file."""
    path = Path(path)
    if path.is_dir():
        columns, rows = _read_saved_dataset(path)
    elif not path.exists():
        raise DataFileError(f"data file {path} does not exist (looked for {path.resolve()}); fix the path")
    elif path.suffix.lower() not in READERS:
        raise DataFileError(f"data file {path} has the unsupported extension {path.suffix!r}; convert it to one of "
                            f"{sorted(READERS)} or a directory saved by datasets.save_to_disk")
    else:
        columns, rows = READERS[path.suffix.lower()](path)
    if not rows:
        raise DataFileError(f"data file {path} holds no rows; give a file with at least one prompt and answer")
    return columns, rows


# ------------------------------------------------------------------------------------------------ the task
class FileTask(DatasetTask):
    """Prompts and answers read from a local data file (JSONL, CSV, Parquet, or a ``save_to_disk`` directory).

    ``prompt_template`` is filled with the row's columns by name, and ``{prompt}`` with the ``prompt_field``
    column: ``"Q: {prompt}\\nA:"``. The answer is the ``answer_field`` column as text; the other columns are the
    sample's metadata. ``verifier`` is ``"numeric"`` (the final numbers agree; see
    :func:`textenv.verifiers.extract_final_answer`) or ``"exact"`` (equal up to case and whitespace).

    In training the driver serves the rows in epochs (:class:`textenv.epochs.EpochOrder`): every row once per
    epoch, shuffled per epoch by the run's seed, or in file order with ``shuffle=False``; the rollout actors pose
    the rows it assigns through :meth:`row`. Used on its own as a Gymnasium environment, the task's ``sample``
    decides: ``shuffle=True`` draws rows uniformly at random, with replacement, using only the given rng, so a
    seeded environment is deterministic; ``shuffle=False`` serves the rows in file order, cycling, and ignores the
    rng (a reseeded environment then does not repeat its prompts).

    Held-out rows for evaluation (:meth:`heldout`): ``eval_path``, a second file with the same columns, or
    ``eval_fraction``, that fraction of ``path``'s rows (a fixed choice, the same every run), which training then
    never draws.

    CSV values are read as strings; JSONL, Parquet and dataset values keep their types in the metadata.
    The alphabet holds every character of the templated prompts and the answers (held-out rows included), plus
    :data:`NUMERIC_CHARS`.
    """

    name = "file"

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        prompt_field: str = "prompt",
        answer_field: str = "answer",
        verifier: str = "numeric",
        shuffle: bool = True,
        max_response_tokens: int = 64,
        max_prompt_chars: int = 512,
        prompt_template: str = "{prompt}",
        eval_path: str | os.PathLike[str] | None = None,
        eval_fraction: float = 0.0,
    ) -> None:
        if path is None:
            raise ValueError("file: task_kwargs needs 'path', the .jsonl, .csv or .parquet file to read, "
                             "e.g. task_kwargs: {path: data/gsm8k.jsonl}")
        if verifier not in VERIFIERS:
            raise ValueError(f"file: verifier must be one of {sorted(VERIFIERS)}; got {verifier!r}")
        if max_response_tokens < 1 or max_prompt_chars < 1:
            raise ValueError(f"file: max_response_tokens and max_prompt_chars must be >= 1; "
                             f"got {max_response_tokens}, {max_prompt_chars}")
        self.path = Path(path)
        self.prompt_field, self.answer_field, self.prompt_template = prompt_field, answer_field, prompt_template
        self.verifier, self.shuffle = verifier, shuffle
        self.max_response_tokens, self.max_prompt_chars = max_response_tokens, max_prompt_chars
        self._verify = VERIFIERS[verifier]
        if not 0.0 <= eval_fraction < 1.0 or (eval_fraction > 0 and eval_path is not None):
            raise ValueError(f"file: eval_fraction must be in [0, 1) and not given together with eval_path; "
                             f"got eval_fraction={eval_fraction}, eval_path={eval_path!r}")

        self._samples = self._read_samples(self.path)
        self._heldout: tuple[TaskSample, ...] = ()
        if eval_path is not None:
            self._heldout = self._read_samples(Path(eval_path))
        elif eval_fraction > 0:
            n_eval = round(eval_fraction * len(self._samples))
            if not 0 < n_eval < len(self._samples):
                raise ValueError(f"file: eval_fraction={eval_fraction} of {len(self._samples)} rows holds out "
                                 f"{n_eval}; choose a fraction that leaves rows on both sides")
            held = set(np.random.default_rng(0).permutation(len(self._samples))[:n_eval].tolist())  # fixed split
            self._heldout = tuple(s for i, s in enumerate(self._samples) if i in held)
            self._samples = tuple(s for i, s in enumerate(self._samples) if i not in held)
        self._cursor = 0
        chars = {c for s in self._samples + self._heldout for c in s.prompt + s.answer}
        self.alphabet = "".join(sorted(chars | set(NUMERIC_CHARS)))

    def _read_samples(self, path: Path) -> tuple[TaskSample, ...]:
        columns, rows = read_rows(path)
        for name, field in (("prompt_field", self.prompt_field), ("answer_field", self.answer_field)):
            if field not in columns:
                raise DataFileError(f"{path} has no column {field!r} (its columns: {columns}); "
                                    f"set task_kwargs.{name} to one of them")
        return tuple(self._to_sample(path, where, row, columns) for where, row in rows)

    @property
    def samples(self) -> tuple[TaskSample, ...]:
        """Every row training draws from as a sample, in file order (held-out rows excluded)."""
        return self._samples

    @property
    def num_problems(self) -> int:
        return len(self._samples)

    def heldout(self) -> FileTask:
        """The held-out rows as a task that serves them in file order (``shuffle=False``)."""
        if not self._heldout:
            raise ValueError("file: evaluation needs held-out rows that training never sees: set "
                             "task_kwargs.eval_path (a file with the same columns) or task_kwargs.eval_fraction (e.g. 0.1)")
        task = copy.copy(self)
        task._samples, task._heldout, task.shuffle, task._cursor = self._heldout, (), False, 0
        return task

    def _to_sample(self, path: Path, where: str, row: Row, columns: list[str]) -> TaskSample:
        for field in (self.prompt_field, self.answer_field):
            if row.get(field) is None:
                raise DataFileError(f"{path} {where}: {field!r} is missing or null; fill it in or drop the row")
        try:
            prompt = self.prompt_template.format_map({**row, "prompt": row[self.prompt_field]})
        except KeyError as err:
            raise DataFileError(f"{path}: prompt_template {self.prompt_template!r} names {{{err.args[0]}}}, "
                                f"which {where} lacks (columns: {columns}); use {{prompt}} or a column") from None
        except (IndexError, ValueError) as err:
            raise DataFileError(f"prompt_template {self.prompt_template!r} is not a valid template for {path} "
                                f"({err}); write fields by column name, e.g. 'Q: {{prompt}}'") from None
        metadata = {k: v for k, v in row.items() if k not in (self.prompt_field, self.answer_field)}
        return TaskSample(prompt=prompt, answer=str(row[self.answer_field]), metadata=metadata)

    @property
    def num_rows(self) -> int:
        return len(self._samples)

    def row(self, index: int) -> TaskSample:
        s = self._samples[index]
        return TaskSample(s.prompt, s.answer, dict(s.metadata))  # a caller may edit its metadata, not ours

    def sample(self, rng: np.random.Generator) -> TaskSample:
        if self.shuffle:
            return self.row(int(rng.integers(len(self._samples))))
        index, self._cursor = self._cursor, (self._cursor + 1) % len(self._samples)
        return self.row(index)

    def score(self, sample: TaskSample, response: str) -> float:
        return self._verify(response, sample.answer)

    def __repr__(self) -> str:
        return (f"FileTask(path={str(self.path)!r}, rows={len(self._samples)}, verifier={self.verifier!r}, "
                f"prompt_field={self.prompt_field!r}, answer_field={self.answer_field!r})")


TASKS[FileTask.name] = FileTask
