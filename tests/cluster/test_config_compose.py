"""Configs compose: ``defaults: [file, ...]`` and the file's own keys on top; a mistyped key gets a suggestion."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cluster.config import ConfigError, build_config, closest_key, load_config

REPO = Path(__file__).resolve().parents[2]
# load_config(path).to_dict() of these shipped configs, taken before they were rewritten with `defaults:` on top of
# default.yaml: the rewrite changed no setting. A config changed on purpose updates its entry here.
RESOLVED = REPO / "tests" / "cluster" / "data" / "resolved_configs.json"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", sorted(json.loads(RESOLVED.read_text())))
def test_shipped_configs_resolve_as_before_composition(name: str) -> None:
    expected = json.loads(RESOLVED.read_text())[name]
    assert json.loads(json.dumps(load_config(REPO / "configs" / name).to_dict())) == expected


def test_defaults_apply_in_order_then_the_files_own_keys(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "name: a\nseed: 1\nalgorithm: {lr: 1.0e-3, num_epochs: 2}\n")
    write(tmp_path / "b.yaml", "name: b\nalgorithm: {lr: 2.0e-3}\n")
    top = write(tmp_path / "top.yaml", "defaults: [a.yaml, b.yaml]\nalgorithm: {minibatch_size: 32}\n")
    cfg = load_config(top)
    assert cfg.name == "b" and cfg.seed == 1  # b after a; a's keys that b leaves alone stay
    assert (cfg.algorithm.lr, cfg.algorithm.num_epochs, cfg.algorithm.minibatch_size) == (2e-3, 2, 32)  # sections merge
    assert load_config(top, ["algorithm.lr=5e-4", "seed=3"]).algorithm.lr == 5e-4  # overrides come last
    write(tmp_path / "name.yaml", "defaults: [a.yaml]\nname: mine\n")
    assert load_config(tmp_path / "name.yaml").name == "mine"


def test_a_mapping_value_replaces_rather_than_merges(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "env: {id: textenv/Reverse-v0, task_kwargs: {length: 5, letters: abc}}\n")
    top = write(tmp_path / "top.yaml", "defaults: [base.yaml]\nenv: {id: textenv/Count-v0, task_kwargs: {length: 4}}\n")
    assert load_config(top).env.task_kwargs == {"length": 4}  # another task's knobs would not fit


def test_nested_defaults_are_relative_to_each_file(tmp_path: Path) -> None:
    write(tmp_path / "base" / "root.yaml", "seed: 7\niterations: 9\n")
    write(tmp_path / "base" / "mid.yaml", "defaults: [root.yaml]\niterations: 11\n")
    top = write(tmp_path / "exp" / "top.yaml", "defaults: [../base/mid.yaml]\nname: top\n")
    cfg = load_config(top)
    assert (cfg.seed, cfg.iterations, cfg.name) == (7, 11, "top")


def test_a_cycle_is_an_error_naming_the_files(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    write(tmp_path / "b.yaml", "defaults: [a.yaml]\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "a.yaml")
    text = str(err.value)
    assert "cycle" in text and "a.yaml -> " in text and "b.yaml -> " in text and "\n" not in text
    write(tmp_path / "self.yaml", "defaults: [self.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_the_same_file_twice_is_not_a_cycle(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "seed: 2\n")
    write(tmp_path / "left.yaml", "defaults: [base.yaml]\n")
    top = write(tmp_path / "top.yaml", "defaults: [base.yaml, left.yaml]\n")
    assert load_config(top).seed == 2


def test_missing_or_malformed_defaults(tmp_path: Path) -> None:
    top = write(tmp_path / "top.yaml", "defaults: [nope.yaml]\n")
    with pytest.raises(ConfigError, match=r"top.yaml: defaults entry 'nope.yaml' does not exist"):
        load_config(top)
    write(tmp_path / "str.yaml", "defaults: default.yaml\n")
    with pytest.raises(ConfigError, match="defaults must be a list of config files"):
        load_config(tmp_path / "str.yaml")
    write(tmp_path / "bad.yaml", "seed: [unclosed\n")
    write(tmp_path / "uses_bad.yaml", "defaults: [bad.yaml]\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(tmp_path / "uses_bad.yaml")


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"algorithm": {"lr_rate": 1}}, "unknown key 'algorithm.lr_rate'; did you mean 'algorithm.lr'?"),
        ({"algorithm": {"lrr": 1}}, "did you mean 'algorithm.lr'?"),
        ({"rollout": {"num_actor": 2}}, "did you mean 'rollout.num_actors'?"),
        ({"iteration": 3}, "unknown key 'iteration'; did you mean 'iterations'?"),
        ({"polciy": {}}, "did you mean 'policy'?"),
        ({"algorithm": {"learning_rate": 1}}, "valid keys under algorithm: adam_eps"),  # nothing close: the list
    ],
)
def test_unknown_key_suggests_the_closest(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(raw, source="exp.yaml")
    text = str(err.value)
    assert text.startswith("exp.yaml: unknown key") and message in text and "\n" not in text


def test_closest_key() -> None:
    names = ["lr", "lr_schedule", "clip_ratio", "clip_ratio_high"]
    assert closest_key("lr_rate", names) == "lr"
    assert closest_key("clip", names) == "clip_ratio"
    assert closest_key("zzz", names) is None
