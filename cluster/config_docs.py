"""The config documents itself: each field's help text, the commented YAML that ``tokengym config`` prints, and the
reference ``docs/configuration.md`` (``python -m cluster.config_docs > docs/configuration.md``).

A field's help text is the comment written beside it in its dataclass: the ``# ...`` on its line and any comment
lines right below it. The source stays the one place a field is explained.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any, Iterator, Literal

import yaml

from cluster.config import ExperimentConfig

WIDTH = 116  # comment lines of the printed YAML


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Field name -> its help text, for each field of dataclass ``cls`` that has a comment beside it."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments: dict[int, str] = {}  # line number (1-based) -> the comment's text
    alone: set[int] = set()  # lines that hold nothing but a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            comments[row] = tok.string.lstrip("#").strip()
            if not lines[row - 1][:col].strip():
                alone.add(row)
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id in names):
            continue
        rows = [r for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments]
        row = stmt.end_lineno + 1
        while row in alone:  # the comment continues on the lines below the field
            rows.append(row)
            row += 1
        text = " ".join(comments[r] for r in rows if not comments[r].startswith("noqa"))
        if text:
            out[stmt.target.id] = text
    return out


def summary(cls: type) -> str:
    """The first paragraph of a class's docstring, on one line."""
    return " ".join(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].split())


def flow(value: Any) -> str:
    """``value`` as one line of YAML (flow style): ``null``, ``3.0e-4``, ``{length: 5}``, ``[[0, 0.001]]``."""
    return yaml.safe_dump([value], default_flow_style=True, width=float("inf")).strip()[1:-1]


# -------------------------------------------------------------------------------------- tokengym config
def commented_yaml(cfg: ExperimentConfig, header: str = "") -> str:
    """The resolved ``cfg`` as YAML, each section and field preceded by its help text as a comment."""
    lines = [f"# {ln}" for ln in textwrap.wrap(header, WIDTH)] + [""] if header else []
    lines += list(_yaml_lines(cfg, ""))
    return "\n".join(lines).strip("\n") + "\n"


def _yaml_lines(obj: Any, pad: str) -> Iterator[str]:
    help_text = field_help(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield ""
            yield from _comment(summary(type(value)), pad)
            yield f"{pad}{f.name}:"
            yield from _yaml_lines(value, pad + "  ")
        else:
            yield from _comment(help_text.get(f.name, ""), pad)
            yield f"{pad}{f.name}: {flow(value)}"


def _comment(text: str, pad: str) -> Iterator[str]:
    for line in textwrap.wrap(text, WIDTH - len(pad)):
        yield f"{pad}# {line}"


# -------------------------------------------------------------------------------------- docs/configuration.md
INTRO = """# Configuration reference

Generated from the config dataclasses (`cluster/config.py`, `policies/config.py`, `textenv/config.py`) by
`python -m cluster.config_docs > docs/configuration.md`; a test fails when it is out of date. The help text of a
field is the comment beside it in the source.

A config file sets any of these keys; a key it leaves out takes the default below (not default.yaml's value, unless
the file says `defaults: [default.yaml]`). `tokengym config CONFIG [section.key=value ...]` prints a config with
every value resolved and these help texts as comments; `tokengym train --dry-run ...` checks it the same way
without training. Config files compose: `defaults: [base.yaml, ...]` (relative to the file) are read first, in
order, then the file's own keys on top; sections merge key by key, any other value replaces.
"""


def reference_markdown() -> str:
    """docs/configuration.md: every section, field, type, default and help text."""
    parts = [INTRO]
    for title, cls in _sections(ExperimentConfig, ""):
        doc = _markdown(inspect.cleandoc(cls.__doc__ or "").replace("``", "`"))
        rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        help_text = field_help(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                continue
            cells = [f"`{f.name}`", type_name(typing.get_type_hints(cls)[f.name]), f"`{flow(_default(f))}`",
                     _markdown(help_text.get(f.name, ""))]
            rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append(f"## {title}\n\n{doc}\n\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


def _markdown(text: str) -> str:
    """``text`` with ``<`` escaped outside code spans, so that ``<name>`` shows instead of vanishing as HTML."""
    parts = text.split("`")
    return "`".join(p.replace("<", "\\<") if i % 2 == 0 else p for i, p in enumerate(parts))


def _sections(cls: type, prefix: str) -> Iterator[tuple[str, type]]:
    yield (f"`{prefix.rstrip('.')}`" if prefix else "Top level"), cls
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _sections(hints[f.name], f"{prefix}{f.name}.")


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def type_name(tp: Any) -> str:
    """A type as a reader writes it: ``int | null``, ``"float32" | "bfloat16"``, ``list[str]``, ``mapping``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin is list:
        return f"list[{type_name(args[0])}]" if args else "list"
    if origin is dict or tp is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


if __name__ == "__main__":
    print(reference_markdown(), end="")
