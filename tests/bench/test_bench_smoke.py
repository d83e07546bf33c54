"""The benchmarks at their smallest settings, so none rots (the full runs are not part of the suite)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.ray
@pytest.mark.vllm
def test_rollout_bench_prints_its_ratio_table() -> None:
    """bench/rollout.py on the tiny model, 4 prompts x 8 samples x 8 tokens, one round: every system generated
    exactly that many tokens (the script refuses otherwise) and the table compares them."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_memory_monitor_refresh_ms": "0"}
    # A session of its own: on a timeout the Ray processes the script started (GCS, raylet, actors) go too.
    proc = subprocess.Popen(
        [sys.executable, "bench/rollout.py", "--models", "tiny", "--shapes", "4x8", "--rounds", "1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    assert "4 prompts x 8 samples, 16 prompt + 8 new tokens (256 generated per batch)" in out
    for system in ("tokengym, 1 actor", "raw vLLM", "HF generate"):
        rate = re.search(rf"^  {re.escape(system)} +([\d,]+) tokens/s", out, re.M)
        assert rate and int(rate.group(1).replace(",", "")) > 0, out
    for other in ("raw vLLM", "HF generate"):
        assert re.search(rf"tokengym, 1 actor / {other}: \d+\.\d\dx", out), out
    assert re.search(r"^\| tiny \| 4x8 \| [\d,]+ \| [\d,]+ \| [\d,]+ \| \d+\.\d\dx \| \d+\.\d\dx \|$", out, re.M), out
