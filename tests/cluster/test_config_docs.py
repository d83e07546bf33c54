"""The docs cannot drift: help texts from the comments beside the config fields, the commented YAML that
`tokengym config` prints, docs/configuration.md (must match what the code generates), and docs/metrics.md (must
describe every key the code logs)."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from cluster.config import ExperimentConfig, build_config, load_config
from cluster.config_docs import _sections, commented_yaml, field_help, flow, reference_markdown, type_name
from cluster.plot import PANELS, PHASES
from cluster.run import STARTUP_KEYS
from policies.config import AlgorithmConfig
from textenv.config import EnvConfig

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Example:
    """A dataclass with every way of writing a comment."""

    plain: int = 1
    inline: int = 2  # on its line
    continued: str = "x"  # starts here,
    #   and goes on below
    spanning: dict = dataclasses.field(  # a field written over
        default_factory=dict)  # two lines
    # a comment line above a field belongs to the field before it only when it follows directly
    last: bool = True  # noqa: E501

    def method(self) -> None:  # not a field
        pass


def test_field_help_reads_the_comments_beside_each_field() -> None:
    assert field_help(Example) == {
        "inline": "on its line",
        "continued": "starts here, and goes on below",
        "spanning": "a field written over two lines a comment line above a field belongs to the field before it only "
                    "when it follows directly",
    }
    assert field_help(AlgorithmConfig)["micro_batch_tokens"].endswith("at most this many (padded) tokens; the gradient "
                                                                      "is unchanged")
    assert field_help(EnvConfig)["task"].startswith("a built-in task name")


def test_every_config_field_has_help_text() -> None:
    missing = [f"{title}.{f.name}" for title, cls in _sections(ExperimentConfig, "") for f in dataclasses.fields(cls)
               if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]) and f.name not in field_help(cls)]
    assert not missing, f"write a '# ...' comment beside these fields (it is their help text): {missing}"


def test_commented_yaml_round_trips_and_carries_the_help() -> None:
    cfg = load_config(REPO / "configs" / "grpo.yaml", ["algorithm.lr_schedule=[[0, 1.0e-3], [10, 1.0e-4]]"])
    text = commented_yaml(cfg, header="configs/grpo.yaml")
    assert build_config(yaml.safe_load(text)) == cfg
    lines = text.splitlines()
    assert lines[0] == "# configs/grpo.yaml"
    assert lines[lines.index("  advantage: grpo") - 1] == "  # gae | grpo | rloo | reinforce"
    assert lines[lines.index("algorithm:") - 1].startswith("# The update: which advantage estimator")
    assert "  lr_schedule: [[0.0, 0.001], [10.0, 0.0001]]" in lines
    assert "  task_kwargs: {length: 5, letters: abcdefgh}" in lines
    assert all(len(ln) <= 120 for ln in lines)


def test_flow_and_type_names() -> None:
    assert [flow(v) for v in (None, True, 3, "a: b", "", {"k": [1]})] == ["null", "true", "3", "'a: b'", "''", "{k: [1]}"]
    assert type_name(int | None) == "int | null"
    assert type_name(typing.Literal["a", "b"]) == '"a" | "b"'
    assert type_name(list[list[float]] | None) == "list[list[float]] | null"


def test_configuration_reference_is_up_to_date() -> None:
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == reference_markdown(), "regenerate: python -m cluster.config_docs > docs/configuration.md"
    for title, cls in _sections(ExperimentConfig, ""):
        assert f"## {title}" in committed
        for f in dataclasses.fields(cls):
            if not dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                assert f"| `{f.name}` |" in committed


def logged_keys() -> set[str]:
    """Every metric key the trainer and the evaluation log, read from their source."""
    trainer = (REPO / "cluster" / "trainer.py").read_text()
    evaluation = (REPO / "cluster" / "evaluation.py").read_text()
    namespaces = "reward|rollout|losses|timing|throughput|eval|data|weights|faults"
    keys = set(re.findall(rf'"((?:{namespaces})/[\w@]+)"', trainer + evaluation))
    keys |= {f"timing/{phase}_s" for phase in re.findall(r'timed\(t, "(\w+)"\)', trainer)}
    names = re.search(r"names = (\{.*?\})\n", trainer, flags=re.S).group(1)  # RLlib's stat name -> ours
    keys |= {f"losses/{ours}" for ours in ast.literal_eval(names).values()}
    return keys | set(STARTUP_KEYS)


def test_metrics_doc_names_every_logged_key() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `([\w/@]+)` \|", doc, flags=re.M))
    keys = logged_keys()
    assert {"reward/mean", "losses/grad_norm", "timing/update_s", "eval/pass@k", "weights/version"} <= keys
    assert keys - documented == set(), "describe these in docs/metrics.md"
    assert documented - keys == set(), "docs/metrics.md describes keys nothing logs"
    drawn = {k for panel in PANELS for k in panel.lines + panel.markers} | {f"timing/{p}_s" for p in PHASES}
    assert drawn <= keys  # tokengym plot draws real keys
