"""The launch files agree with what they run: the KubeRay RayJob asks for the GPUs and CPUs its config needs, keeps
runs on shared storage, retries with --resume auto, pins the project's Ray; the cluster launcher keeps the
dashboard local and the virtual environment, runs and W&B files out of the upload; the image has the same Ray."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.config import ExperimentConfig, load_config
from cluster.run import required_resources

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "cluster" / "launch"


def ray_pins() -> set[str]:
    """The Ray versions pyproject.toml pins (every ray[...] requirement)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d.split("==")[1].split()[0] for d in deps if re.match(r"ray\[[\w,]+\]==", d)}


def entrypoint(spec: dict[str, Any]) -> tuple[ExperimentConfig, list[str]]:
    """The config a RayJob's ``tokengym train`` entrypoint runs, and its options (--resume ...)."""
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["tokengym", "train"], argv
    options = [a for i, a in enumerate(argv) if a.startswith("--") or (i > 0 and argv[i - 1] == "--resume")]
    positional = [a for a in argv[2:] if a not in options]
    config, overrides = (positional[0], positional[1:]) if "=" not in positional[0] else (None, positional)
    return load_config(config, overrides), options


def pod(group: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any]]:
    """The Ray resources one pod of a KubeRay group offers (rayStartParams over the container limits) and its
    container."""
    (container,) = group["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    params = group.get("rayStartParams") or {}
    cpu = float(params.get("num-cpus", limits["cpu"]))
    gpu = float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))
    return {"CPU": cpu, "GPU": gpu}, container


def mounts(group: dict[str, Any]) -> dict[str, str]:
    """mountPath -> the PersistentVolumeClaim behind it, for one pod template."""
    spec = group["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in spec.get("volumes", [])
              if "persistentVolumeClaim" in v}
    (container,) = spec["containers"]
    return {m["mountPath"]: claims.get(m["name"]) for m in container.get("volumeMounts", [])}


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    return yaml.safe_load((LAUNCH / "rayjob.yaml").read_text())


def test_rayjob_asks_for_what_its_config_needs(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    cfg, _ = entrypoint(spec)
    need = required_resources(cfg)
    assert need == {"CPU": 4.0, "GPU": 6.0}  # configs/gpu.yaml: 4 actors x (1 CPU, 1 GPU) + 2 learners x 1 GPU
    head, _ = pod(spec["rayClusterSpec"]["headGroupSpec"])
    assert head["CPU"] == 0 and head["GPU"] == 0  # the head runs the driver, no actors
    offered = dict(head)
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        per_pod, _ = pod(group)
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], "a fixed-size cluster"
        for key in offered:
            offered[key] += group["replicas"] * per_pod[key]
        # Every pod is needed: one fewer would leave actors pending forever.
        assert offered["GPU"] - per_pod["GPU"] < need["GPU"], (group["groupName"], offered, need)
    assert offered["GPU"] >= need["GPU"] and offered["CPU"] >= need["CPU"], (offered, need)


def test_rayjob_resumes_on_shared_storage_with_the_projects_ray(rayjob: dict[str, Any]) -> None:
    spec = rayjob["spec"]
    cfg, options = entrypoint(spec)
    assert cfg.cluster.address == "auto"
    assert options == ["--resume", "auto"] and spec["backoffLimit"] >= 1  # a retry continues the run
    cluster = spec["rayClusterSpec"]
    assert ray_pins() == {cluster["rayVersion"]} == {importlib.metadata.version("ray")}
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"  # cluster-internal
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    images = {pod(g)[1]["image"] for g in groups}
    assert len(images) == 1
    runs = {mounts(g).get(cfg.runs_dir) for g in groups}
    assert len(runs) == 1 and None not in runs  # one claim, mounted at runs_dir on every pod
    model = Path(cfg.policy.model_path)
    # Only the driver (on the head) reads the model's directory: it ships the files to every actor through Ray
    # (tests/cluster/test_files.py checks that no actor reads the driver's path).
    assert any(model.is_relative_to(path) for path in mounts(cluster["headGroupSpec"]))
    for g in cluster["workerGroupSpecs"]:
        assert not any(model.is_relative_to(path) for path in mounts(g)), g["groupName"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    (key,) = [e for e in head["env"] if e["name"] == "WANDB_API_KEY"]
    assert "secretKeyRef" in key["valueFrom"] and "value" not in key  # from a Kubernetes secret, never inline


def test_cluster_launcher_keeps_the_dashboard_local_and_local_files_out() -> None:
    launcher = yaml.safe_load((LAUNCH / "cluster.yaml").read_text())
    (head,) = [c for c in launcher["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert all(c.startswith("RAY_AUTH_MODE=token ") for c in launcher["head_start_ray_commands"]
               + launcher["worker_start_ray_commands"] if "ray start" in c)
    assert "~/.ray/auth_token" in launcher["file_mounts"].values()  # one token on every node
    assert {".venv", "runs", "wandb"} <= set(launcher["rsync_exclude"])
    gpus = launcher["available_node_types"]["gpu_worker"]
    cfg = load_config(REPO / "configs" / "gpu.yaml")
    assert gpus["min_workers"] * gpus["resources"]["GPU"] >= required_resources(cfg)["GPU"]


def test_the_image_has_the_projects_ray_and_the_gpu_extra() -> None:
    text = (LAUNCH / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-gpu", base).group(1) in ray_pins()
    assert 'pip install --no-cache-dir ".[gpu,lora]"' in text and "-e " not in text  # a regular install
