"""The README's Ray Jobs recipe, run for real: token authentication on, a head started with `ray start --head`, a
short `tokengym train` submitted with `ray job submit`, SUCCEEDED, its metrics written; then only that head stopped.

The test runs the README's own lines. For isolation it adds only what a shared machine needs: its own HOME (so the
token it generates is its own), temp dir and free ports, and `--block`, so that it stops its head by ending that
process tree instead of `ray stop` (which stops every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from cluster.tracking import read_metrics
from tests.ports import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.e2e]
REPO = Path(__file__).resolve().parents[2]
MARKER = "<!-- ray-jobs-recipe"
DASHBOARD = "http://127.0.0.1:8265"
RUNS = "runs_dir=$PWD/runs"


def readme_recipe() -> list[list[str]]:
    """The commands of the README's Ray Jobs recipe (continuation lines joined, comments dropped)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index(MARKER):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def http(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


class Head:
    """A Ray head of this test's own: `ray start --head --block` in its own temp dir and ports; stopped by ending
    exactly the processes it started."""

    def __init__(self, argv: list[str], env: dict[str, str], tmp: Path) -> None:
        self.argv, self.env, self.tmp = argv, env, tmp
        self.proc: subprocess.Popen | None = None
        self.dashboard, self.temp_dir = "", Path()

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            gcs, dash, client, agent, agent_grpc, runtime_env, metrics, node, objects = free_ports(9)
            # Short: Ray's socket paths have a length limit. Its logs: kept in head-N.log, the temp dir goes.
            temp_dir = self.temp_dir = Path(f"/tmp/tgjob-{os.getpid()}-{attempt}")
            argv = [a for a in self.argv if not a.startswith("--dashboard-port")] + [
                f"--dashboard-port={dash}", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
                f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
                f"--metrics-export-port={metrics}", f"--node-manager-port={node}", f"--object-manager-port={objects}",
                "--object-store-memory=300000000", "--disable-usage-stats",
            ]
            log = open(self.tmp / f"head-{attempt}.log", "w")
            self.proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
            self.dashboard = f"http://127.0.0.1:{dash}"
            deadline = time.time() + 180
            while time.time() < deadline and self.proc.poll() is None:
                if "Ray runtime started" in (self.tmp / f"head-{attempt}.log").read_text():
                    return
                time.sleep(1)
            # On a busy machine the raylet may give up on the dashboard agent (a fixed 15 s): try again.
            self.stop()
        raise AssertionError(f"ray start failed {attempts} times; see {self.tmp}/head-*.log")

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL to anything of its tree left."""
        if self.proc is None:
            return
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=30)
        for p in alive:
            p.kill()
        psutil.wait_procs(alive, timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.proc = None


def test_readme_ray_jobs_recipe_runs_a_short_training_job(tmp_path: Path) -> None:
    recipe = readme_recipe()
    export, generate, start, submit, stop = recipe
    # The recipe's shape, which the substitutions below rely on.
    assert export == ["export", "RAY_AUTH_MODE=token"]
    assert generate == ["ray", "get-auth-token", "--generate"]
    assert start[:3] == ["ray", "start", "--head"] and "--dashboard-host=127.0.0.1" in start
    assert submit[:7] == ["ray", "job", "submit", "--address", DASHBOARD, "--working-dir", "."]
    assert submit[7:10] == ["--", "tokengym", "train"] and "cluster.address=auto" in submit and RUNS in submit
    assert stop == ["ray", "stop"]

    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "RAY_memory_monitor_refresh_ms": "0",
           "WANDB_MODE": "offline", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("WANDB_API_KEY", None)
    key, value = export[1].split("=", 1)
    env[key] = value

    subprocess.run(generate, env=env, check=True, capture_output=True, text=True, timeout=120)
    token = (home / ".ray" / "auth_token").read_text().strip()
    head = Head(start, env, tmp_path)
    try:
        head.start()
        assert http(f"{head.dashboard}/api/version")[0] == 401  # no token, no answer
        assert http(f"{head.dashboard}/api/version", token)[0] == 200

        argv = [a.replace(DASHBOARD, head.dashboard) for a in submit]
        argv[argv.index(RUNS)] = f"runs_dir={tmp_path / 'runs'}"
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        (job_id,) = re.findall(r"Job '(raysubmit_\w+)' succeeded", output)
        status, body = http(f"{head.dashboard}/api/jobs/{job_id}", token)
        assert status == 200 and json.loads(body)["status"] == "SUCCEEDED", body
    finally:
        head.stop()
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    assert [r["iteration"] for r in read_metrics(run)] == [1, 2]
    assert (run / "checkpoints" / "latest").is_file()
