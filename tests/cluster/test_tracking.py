"""Tracking without Ray: W&B mode resolution, the offline W&B run read back with W&B's own reader (history equal to
metrics.jsonl, the samples table, artifacts), a resumed run's new W&B run, and the end-of-run summary."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from cluster.checkpoint import STATE
from cluster.config import ConfigError, TrackingConfig
from cluster.run import run_summary
from cluster.tracking import SAMPLES_FILE, WANDB_ID_FILE, Tracker, read_metrics, wandb_mode
from tests.wandb_log import config, history, read_records, read_table, run_record, wandb_runs

KEY = "k" * 40  # W&B checks the format of a key (40+ word characters), never its validity here: no network


@pytest.fixture
def no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home, working directory and W&B config directory of this test's own, with no W&B variables set."""
    import wandb

    home = tmp_path / "home"
    home.mkdir()
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.chdir(home)
    wandb.teardown()  # W&B caches its settings and credentials per process
    yield home
    wandb.teardown()


def auto(**kw: object) -> str:
    import wandb

    wandb.teardown()
    return wandb_mode(TrackingConfig(**kw))


def test_auto_mode_is_online_exactly_when_wandb_finds_credentials(no_credentials: Path, monkeypatch) -> None:
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    assert auto() == "offline"
    assert auto(mode="online") == "online" and auto(wandb=False) == "disabled" and auto(mode="disabled") == "disabled"

    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert auto() == "online"
    assert auto(mode="offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch wins over the credentials
    assert auto() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY")
    assert auto() == "offline"

    # `wandb login` saves the key in ~/.netrc for the server W&B is set to; W&B's own writer does the same here.
    base_url = wandb_setup.singleton().settings.base_url
    wbauth.write_netrc_auth(host=base_url, api_key=KEY)
    assert (no_credentials / ".netrc").is_file()
    assert auto() == "online"
    (no_credentials / ".netrc").unlink()
    assert auto() == "offline"

    monkeypatch.setenv("WANDB_API_KEY", "short")
    with pytest.raises(ConfigError, match="tracking.mode=auto: W&B credentials .* are invalid"):
        auto()


def rows(n: int, scale: float = 1.0, start: int = 1) -> list[dict]:
    return [{"iteration": i, "reward/mean": scale * i / 10, "losses/policy_loss": -0.01 * i, "timing/update_s": 0.5,
             "rollout/logprob_gap": math.nan if i == 2 else 1e-8} for i in range(start, n + 1)]


SAMPLES = [{"prompt": "abcde=", "response": "edcba", "reward": 1.0}, {"prompt": "hgfed=", "response": "de", "reward": 0.4}]


def matches(logged: list[dict], expected: list[dict]) -> None:
    """W&B's history rows hold exactly metrics.jsonl's rows, step = iteration (null in the file: NaN logged)."""
    assert [h["_step"] for h in logged] == [r["iteration"] for r in expected]
    for h, r in zip(logged, expected):
        for key, value in r.items():
            if value is None:
                assert h[key] == "NaN" or (isinstance(h[key], float) and math.isnan(h[key])), (key, h[key])
            else:
                assert h[key] == value, (key, h[key], value)


def test_offline_run_resume_and_samples_read_back_with_wandbs_reader(no_credentials: Path, tmp_path: Path,
                                                                     monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "runs" / "exp-1"
    run.mkdir(parents=True)
    cfg = TrackingConfig(progress_bar=False, name="my-run", group="sweep", tags=["ppo", "tiny"], notes="a test")
    tracker = Tracker(cfg, run, run.name, {"seed": 3}, start_iteration=0, total_iterations=6)
    first_id = tracker.wandb_id
    for row in rows(6):
        if row["iteration"] == 3:
            tracker.log_samples(3, "train", SAMPLES)
        tracker.log(row)
    (run / "ckpt").mkdir()
    (run / "ckpt" / STATE).write_text("{}")
    tracker.log_artifact(run / "ckpt", "exp 1/checkpoint", "checkpoint")
    tracker.close()

    assert (run / WANDB_ID_FILE).read_text() == first_id
    samples = [json.loads(ln) for ln in (run / SAMPLES_FILE).read_text().splitlines()]
    assert samples == [{"iteration": 3, "kind": "train", **s} for s in SAMPLES]
    (wandb_run,) = wandb_runs(run)
    records = read_records(wandb_run)
    info = run_record(records)
    assert (info["run_id"], info["display_name"], info["run_group"]) == (first_id, "my-run", "sweep")
    assert info["tags"] == ["ppo", "tiny"] and info["notes"] == "a test"
    assert config(records)["seed"] == 3
    matches(history(records), read_metrics(run))
    (at3,) = [h for h in history(records) if h["_step"] == 3]
    assert read_table(wandb_run, at3, "samples/train") == [{**s, "iteration": 3} for s in SAMPLES]
    artifacts = [r["artifact"] for r in records if r["type"] == "artifact" and r["artifact"]["type"] == "checkpoint"]
    assert [a["name"] for a in artifacts] == ["exp-1-checkpoint"]

    # Resume from a checkpoint at iteration 4: iterations 5 and 6 run again (with other numbers this time). The new
    # W&B run replays iterations 1-4 first, so its history is metrics.jsonl exactly, old samples table included.
    resumed = Tracker(replace(cfg, group=None), run, run.name, {"seed": 3}, start_iteration=4, total_iterations=7)
    assert resumed.wandb_id != first_id and (run / WANDB_ID_FILE).read_text() == resumed.wandb_id
    for row in rows(7, scale=2.0, start=5):
        resumed.log(row)
    resumed.close()

    expected = read_metrics(run)
    assert [r["iteration"] for r in expected] == list(range(1, 8))
    assert [r["reward/mean"] for r in expected] == pytest.approx([0.1, 0.2, 0.3, 0.4, 1.0, 1.2, 1.4])
    first, second = wandb_runs(run)
    records = read_records(second)
    matches(history(records), expected)
    info = run_record(records)
    assert (info["run_id"], info["display_name"], info["run_group"]) == (resumed.wandb_id, "my-run-resume-4", run.name)
    assert config(records)["resumed_from"] == {"wandb_id": first_id, "iteration": 4}
    (at3,) = [h for h in history(records) if h["_step"] == 3]
    assert read_table(second, at3, "samples/train") == [{**s, "iteration": 3} for s in SAMPLES]
    # The first W&B run is left as it was: all six of its iterations.
    assert [h["_step"] for h in history(read_records(first))] == list(range(1, 7))


def test_run_summary_names_reward_eval_phases_and_files(tmp_path: Path) -> None:
    run = tmp_path / "exp"
    (run / "checkpoints" / "iter_000008").mkdir(parents=True)
    (run / "checkpoints" / "iter_000008" / STATE).write_text(json.dumps({"iteration": 8}))
    (run / "plots").mkdir()
    (run / "plots" / "summary.png").write_bytes(b"png")
    (run / WANDB_ID_FILE).write_text("abcd1234")
    (run / "wandb" / "offline-run-20261130_010203-abcd1234").mkdir(parents=True)
    metrics = [{"iteration": 0, "eval/accuracy": 0.1}]
    metrics += [{"iteration": i, "reward/mean": float(i), "timing/rollout_s": 1.0, "timing/update_s": 2.0 + i % 2,
                 "timing/iteration_s": 4.0, **({"eval/accuracy": 0.1 * i} if i % 4 == 0 else {})}
                for i in range(1, 9)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    text = run_summary(run)
    lines = text.splitlines()
    assert lines[0] == f"run finished: {run}"
    assert "6 (mean reward/mean of iterations 4-8)" in text
    assert "0.8 (best, at iteration 8" in text
    assert "rollout 1s, update 2.5s, iteration 4s (mean per iteration)" in text
    assert str(run / "metrics.jsonl") in text and str(run / "checkpoints" / "iter_000008") in text
    assert str(run / "plots" / "summary.png") in text
    assert f"wandb sync {run / 'wandb' / 'offline-run-20261130_010203-abcd1234'}" in text
