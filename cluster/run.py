"""A run from start to finish: its directory, its policy checkpoint, Ray, the loop, logging and checkpoints.

``runs/<run-name>/`` holds ``config.yaml`` (the resolved config), ``metrics.jsonl``, ``samples.jsonl``,
``checkpoints/``, ``policy_init/`` (the tiny model built for the run, when no ``policy.model_path`` is given),
``wandb/`` (and ``wandb_id``, the W&B run logging it now), ``console.log`` (what Ray, RLlib and vLLM printed),
``error.log`` (after a failure: its traceback) and, once the run has finished, ``plots/summary.png``.

With ``storage`` set (a URI), that directory is the run's local working copy and what must last is copied to
``<storage>/<run-name>/`` (:mod:`cluster.storage`): resuming reads the run back from there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Callable, Iterable

from cluster.checkpoint import CHECKPOINTS, latest_checkpoint, read_state
from cluster.config import ConfigError, ExperimentConfig, dump_config, load_config
from cluster.console import collector_paused, freeze_heap, seconds_since_launch, timed
from cluster.pull import resolve_model_paths
from cluster.storage import (
    CONFIG_FILE, POLICY_INIT, Storage, download_run, is_uri, split_run_uri, stored_checkpoint, upload_checkpoint,
)
from cluster.tracking import Tracker, wandb_mode
from textenv import EpochOrder, HFTokenizerAdapter, make_env

if TYPE_CHECKING:
    from cluster.trainer import Trainer  # torch and Ray: imported when a run starts


def new_run_dir(cfg: ExperimentConfig) -> Path:
    """A fresh ``runs/<name>-<timestamp>`` directory (a name no run in ``storage`` has either)."""
    root = Path(cfg.runs_dir)
    store = Storage.open(cfg.storage) if cfg.storage is not None else None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = root / f"{cfg.name}-{stamp}"
    n = 1
    while path.exists() or (store is not None and store.is_dir(path.name)):
        n += 1
        path = root / f"{cfg.name}-{stamp}-{n}"
    return path


def resume_run(
    target: str | Path, overrides: list[str], require_checkpoint: bool = True,
) -> tuple[ExperimentConfig, Path]:
    """What ``--resume TARGET`` continues: the run's config (plus overrides) and its local run directory. A URI
    ``<storage>/<run-name>`` is a stored run: its local working copy is ``runs_dir/<run-name>``, which
    :func:`train` fills from storage."""
    if not is_uri(target):
        return resume_config(Path(target), overrides, require_checkpoint), Path(target)
    root, name, checkpoint = split_run_uri(str(target))
    run = Storage.open(root, "--resume").child(name)
    if checkpoint is not None:
        raise ConfigError(f"--resume {str(target)!r} is a checkpoint; give its run, {root}/{name}, which resumes from "
                          "its latest checkpoint")
    text = run.read_text(CONFIG_FILE)
    if text is None:
        raise ConfigError(f"--resume {str(target)!r}: no {CONFIG_FILE} there; give <storage>/<run-name> of a run "
                          "made by tokengym train")
    if require_checkpoint and stored_checkpoint(run) is None:
        raise ConfigError(f"--resume {str(target)!r}: the run has no complete checkpoint yet; start it again instead")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / CONFIG_FILE).write_text(text)
        cfg = load_config(Path(tmp) / CONFIG_FILE, overrides)
    cfg = dataclasses.replace(cfg, storage=root)  # where the run is now, should it have been moved
    return cfg, Path(cfg.runs_dir) / name


def resume_config(run_dir: Path, overrides: list[str], require_checkpoint: bool = True) -> ExperimentConfig:
    """The config a stopped run was started with, plus any overrides (e.g. ``iterations=300`` to go further)."""
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"--resume {str(run_dir)!r}: no config.yaml there; give a directory under runs/ made by tokengym train")
    if require_checkpoint and latest_checkpoint(run_dir / CHECKPOINTS) is None:
        raise ConfigError(f"--resume {str(run_dir)!r}: the run has no complete checkpoint yet; start it again instead")
    return load_config(run_dir / "config.yaml", overrides)


def find_resumable_run(runs_dir: str | Path, name: str) -> Path | None:
    """The newest run called ``name`` under ``runs_dir`` (``<name>-<YYYYmmdd-HHMMSS>[-n]`` holding a
    config.yaml), or None: what ``--resume auto`` continues.

    Newest by the start time in the directory name, not by modification time: a resumed older run writes to its
    directory too.
    """
    root = Path(runs_dir)
    found = newest_run([p.name for p in root.iterdir()] if root.is_dir() else [], name,
                       lambda d: (root / d / CONFIG_FILE).is_file())
    return root / found if found is not None else None


def find_stored_run(storage: str, name: str) -> str | None:
    """The URI of the newest run called ``name`` in ``storage`` (as :func:`find_resumable_run`), or None."""
    store = Storage.open(storage)
    found = newest_run(store.list_dirs(), name, lambda d: store.is_file(f"{d}/{CONFIG_FILE}"))
    return f"{store.uri}/{found}" if found is not None else None


def newest_run(names: Iterable[str], name: str, is_run: Callable[[str], bool]) -> str | None:
    """The newest of ``names`` of the form ``<name>-<YYYYmmdd-HHMMSS>[-n]`` for which ``is_run`` holds."""
    pattern = re.compile(rf"{re.escape(name)}-(\d{{8}}-\d{{6}})(?:-(\d+))?")
    matches = [(m.group(1), int(m.group(2) or 1), n) for n in names if (m := pattern.fullmatch(n))]
    return next((n for *_, n in sorted(matches, reverse=True) if is_run(n)), None)


def prepare_policy(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """The policy's HF directory: ``policy.model_path``, or a tiny model built for the task in the run directory."""
    if cfg.policy.model_path is not None:
        return require_model_dir("policy.model_path", cfg.policy.model_path)
    path = run_dir / POLICY_INIT
    if not (path / "config.json").is_file():
        from policies.models import save_tiny_policy

        env = make_env(cfg.env).unwrapped
        p = cfg.policy
        save_tiny_policy(
            path, alphabet=env.task.alphabet, seed=cfg.seed, arch=p.arch, hidden_size=p.hidden_size,
            num_layers=p.num_layers, num_heads=p.num_heads, intermediate_size=p.intermediate_size,
            max_positions=max(64, env.max_prompt_tokens + env.max_response_tokens),
        )
    return path


def require_model_dir(key: str, path: str) -> Path:
    """``path`` as a local Hugging Face model directory; a ConfigError naming ``key`` otherwise."""
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"{key} {path!r} is not a local Hugging Face model directory (no config.json)")
    return Path(path)


def check_before_ray(cfg: ExperimentConfig) -> None:
    """Everything that can be checked without Ray: the environment builds, files exist."""
    for key in ("model_path", "critic_model_path"):
        if getattr(cfg.policy, key) is not None:
            require_model_dir(f"policy.{key}", getattr(cfg.policy, key))
    tokenizer = None
    if cfg.env.chat_template:  # the prompt's tokens come from the model's own tokenizer and chat template
        if cfg.policy.model_path is None:
            raise ConfigError("env.chat_template=true needs policy.model_path: an instruct model whose tokenizer has "
                              "a chat template (e.g. the directory `tokengym pull smollm2-135m-instruct` prints)")
        from policies.models import load_tokenizer

        tokenizer = HFTokenizerAdapter(load_tokenizer(Path(cfg.policy.model_path)))
    try:
        env = make_env(cfg.env, tokenizer=tokenizer).unwrapped
    except (ValueError, TypeError) as err:
        raise ConfigError(f"env: {err}") from None
    if cfg.storage is not None:
        Storage.open(cfg.storage)  # reachable, with a filesystem for its scheme
    if cfg.reward_model.path is not None:
        check_reward_model(cfg.reward_model.path, cfg.reward_model.label)
    if cfg.eval.every > 0:
        try:
            env.task.heldout()
        except ValueError as err:
            raise ConfigError(f"eval.every={cfg.eval.every}: {err}") from None
    wandb_mode(cfg.tracking)  # with mode auto: W&B credentials that exist but are invalid are a config error


def check_reward_model(path: str, label: int | str) -> None:
    """The reward-model directory exists and ``label`` is one of its classes (reads only its config.json)."""
    from transformers import AutoConfig

    from cluster.reward_model import check_model_dir, resolve_label

    try:
        model_config = AutoConfig.from_pretrained(check_model_dir(path))
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from None
    except (OSError, ValueError) as err:
        raise ConfigError(f"reward_model.path {path!r} cannot be loaded: {str(err).splitlines()[0]}") from None
    try:
        resolve_label(model_config, label, path)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def required_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """The Ray resources a run's placement group reserves (the driver, and a learner in its process, ask for none):
    rollout actors, learner actors (RLlib gives a learner 1 CPU without a GPU, none with one), the reward model, and
    the custom resources they ask for. On a cluster smaller than this the run waits (up to
    ``cluster.actor_timeout_s``)."""
    from cluster.placement import plan_placement

    return {"CPU": 0.0, "GPU": 0.0, **plan_placement(cfg).total()}


def init_ray(cfg: ExperimentConfig) -> None:
    """Start a local Ray sized for the run, or join ``cluster.address``; nothing when Ray is running already."""
    import ray

    if ray.is_initialized():
        return
    env_vars = {"VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"), "TOKENIZERS_PARALLELISM": "false"}
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=cfg.tracking.verbose)
    if cfg.cluster.address is not None:  # the cluster's workers get them with the job
        kwargs["runtime_env"] = {"env_vars": env_vars}
    else:  # a local Ray sized for every actor and learner
        # Its processes inherit this environment. Not a job runtime_env: Ray starts a worker per core (up to
        # num_cpus) as soon as the driver connects, with none, and the actors of a job with one never take those
        # workers (each started one of its own while they idled).
        for key, value in env_vars.items():
            os.environ.setdefault(key, value)
        # the scorer is an actor of its own
        actor_cpus = cfg.rollout.num_actors * cfg.rollout.num_cpus_per_actor + int(cfg.reward_model.path is not None)
        kwargs["num_cpus"] = cfg.cluster.num_cpus or actor_cpus + cfg.cluster.num_learners + 1
        # The custom resources that pin actors to node pools: one local node is every pool, so a cluster's config
        # runs unchanged on one machine.
        kwargs["resources"] = {k: v for k, v in required_resources(cfg).items() if k not in ("CPU", "GPU")}
    # "local" rather than None: a head started on this machine by `ray start` (or RAY_ADDRESS) is not joined unasked
    ray.init(address=cfg.cluster.address or "local", **kwargs)


class ImportsAlongside:
    """The policy's imports (transformers and the model classes: seconds of one core) in a thread of their own,
    started while the main thread starts Ray, which is mostly spent in the processes it launches; :meth:`join` waits
    for them and re-raises what they raised.

    Only modules that ``ray.init`` never imports itself: two threads importing modules that import each other can
    leave one of them a partly initialised module. ``ray.init`` imports Ray's own modules and their dependencies
    (pydantic, grpc, aiohttp, ...), and RLlib shares some of them, so RLlib is imported after Ray is up; of what
    ``policies.models`` imports, ``ray.init`` imports only ``ctypes.util``, imported here before the thread starts.
    """

    def __init__(self) -> None:
        import ctypes.util  # noqa: F401
        import threading

        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="tokengym-imports", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            import policies.models  # noqa: F401
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread by join()
            self.error = err

    def join(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def train(cfg: ExperimentConfig, run_dir: Path | None = None, resume: bool = False) -> Path:
    """Run (or resume) an experiment; returns its run directory.

    Unless ``tracking.verbose``, what Ray, RLlib and vLLM print goes to ``RUN_DIR/console.log``; an exception ends
    the run as :class:`cluster.console.RunFailed` (one line) with its traceback in ``RUN_DIR/error.log``, except an
    actor that timed out or was lost for good: :class:`cluster.supervision.ClusterError` (already one line; its
    traceback in error.log too).
    """
    from cluster.console import failures_logged, quiet_console
    from cluster.supervision import ClusterError

    cfg = resolve_model_paths(cfg)  # e.g. model_path: smollm2-135m-instruct -> its directory in the model cache
    check_before_ray(cfg)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    store = Storage.open(cfg.storage).child(run_dir.name) if cfg.storage is not None else None
    if not resume and (run_dir / CONFIG_FILE).exists():
        raise ConfigError(f"run directory {str(run_dir)!r} already holds a run; resume it with --resume {run_dir}")
    if not resume and store is not None and store.is_file(CONFIG_FILE):
        raise ConfigError(f"{store.uri} already holds a run; resume it with --resume {store.uri}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with (quiet_console(run_dir, cfg.tracking.verbose) as console,
          failures_logged(run_dir, passthrough=(ConfigError,), logged=(ClusterError,))):
        import ray

        ray_was_running = ray.is_initialized()
        try:
            _run(cfg, run_dir, resume, console, store)
        finally:
            if not ray_was_running and ray.is_initialized():
                ray.shutdown()  # here, so that what Ray prints on the way out lands in console.log too
    if plot_summary(run_dir) is not None and store is not None:
        store.upload(run_dir / "plots", "plots")
    return run_dir


def _run(cfg: ExperimentConfig, run_dir: Path, resume: bool, console: IO[str], store: Storage | None) -> None:
    """The run itself: Ray, policy, trainer, tracker, the loop, then the artifacts."""
    # Where the start went, as the user waits: logged with the first iteration (docs/metrics.md, startup/*).
    startup = {"startup/launch_s": seconds_since_launch()}  # the interpreter, the CLI's imports, the config's checks
    with collector_paused():  # RLlib, torch, transformers: seconds of imports, and no garbage to collect in them
        with timed(startup, "ray", "startup"):  # Ray's start is mostly waiting for its processes: import meanwhile
            imports = ImportsAlongside()
            init_ray(cfg)
        with timed(startup, "imports", "startup"):  # what is left of them once Ray is up, then RLlib's
            imports.join()
            from cluster.trainer import Trainer
            from policies.models import load_tokenizer

    freeze_heap()  # what they made lives as long as the process: later full collections need not walk it
    if resume and store is not None:  # storage is the truth: its latest checkpoint, metrics and W&B id
        download_run(store, run_dir)
    with timed(startup, "policy", "startup"):
        model_dir = prepare_policy(cfg, run_dir)
    dump_config(cfg, run_dir / CONFIG_FILE)
    if store is not None:
        store.upload(run_dir / CONFIG_FILE, CONFIG_FILE)  # --resume auto finds a run before its first checkpoint
        if (run_dir / POLICY_INIT).is_dir() and not store.is_dir(POLICY_INIT):
            store.upload(run_dir / POLICY_INIT, POLICY_INIT)
    env = make_env(cfg.env, tokenizer=HFTokenizerAdapter(load_tokenizer(model_dir))).unwrapped
    checkpoint = latest_checkpoint(run_dir / CHECKPOINTS) if resume else None
    start = int(read_state(checkpoint)["iteration"]) if checkpoint else 0

    data = EpochOrder.for_task(env.task, cfg.seed)  # a dataset task's rows, served in epochs by the driver
    trainer = Trainer(cfg, model_dir, env.max_prompt_tokens, env.max_response_tokens, data=data,
                      name=f"tokengym:{run_dir.name}")  # the placement group's name on Ray
    exit_code = 1
    tracker = None
    try:
        with timed(startup, "first_sync", "startup"):
            if checkpoint is not None:
                trainer.restore(checkpoint)
            else:
                trainer.sync_weights()  # version 1: the engines and the learners start from the same weights
        with timed(startup, "tracking", "startup"):  # W&B's start
            tracker = Tracker(cfg.tracking, run_dir, run_dir.name, cfg.to_dict(), start, cfg.iterations, console)
        startup |= trainer.startup
        freeze_heap()  # the trainer, its learners, the tracker: alive until the run ends
        startup["startup/total_s"] = seconds_since_launch()
        train_loop(cfg, trainer, tracker, start, run_dir, store, startup)
        if cfg.tracking.log_artifacts:
            log_artifacts(tracker, run_dir)
        exit_code = 0
    except KeyboardInterrupt:
        exit_code = 130
        raise
    finally:
        if tracker is not None:
            tracker.close(exit_code)
        trainer.shutdown()


def train_loop(
    cfg: ExperimentConfig, trainer: Trainer, tracker: Tracker, start: int, run_dir: Path, store: Storage | None,
    startup: dict[str, float] | None = None,
) -> None:
    """Iterations ``start + 1 .. cfg.iterations``: train, evaluate and log samples when due, log (the first
    iteration with ``startup``, where this process's start went), checkpoint (and copy the checkpoint, then the
    metrics up to it, to ``store``)."""
    every, samples_every = cfg.eval.every, cfg.tracking.log_samples_every
    if every > 0 and start == 0:  # the policy before any update, as iteration 0
        scores, examples = trainer.evaluate()
        tracker.log_samples(0, "eval", examples)
        tracker.log({"iteration": 0, **scores})
    for iteration in range(start + 1, cfg.iterations + 1):
        metrics, rollouts = trainer.run_iteration(iteration)
        if iteration == start + 1:
            metrics.update(startup or {})
        if samples_every > 0 and iteration % samples_every == 0:
            tracker.log_samples(iteration, "train", rollouts)
        if every > 0 and iteration % every == 0:
            scores, examples = trainer.evaluate()  # the policy after this iteration's update
            metrics.update(scores)
            tracker.log_samples(iteration, "eval", examples)
        tracker.log(metrics)
        if iteration % cfg.checkpoint_every == 0 or iteration == cfg.iterations:
            checkpoint = trainer.save(run_dir / CHECKPOINTS, iteration, {"wandb_id": tracker.wandb_id})
            if store is not None:
                upload_checkpoint(store, checkpoint, cfg.keep_checkpoints, run_dir)


def log_artifacts(tracker: Tracker, run_dir: Path) -> None:
    """The final checkpoint and its export (a Hugging Face model directory) as the run's W&B artifacts."""
    import tempfile

    from cluster.export import export_policy

    checkpoint = latest_checkpoint(run_dir / CHECKPOINTS)
    tracker.log_artifact(checkpoint, f"{run_dir.name}-checkpoint", "checkpoint")
    with tempfile.TemporaryDirectory() as tmp:  # W&B copies the files into its staging area when they are added
        tracker.log_artifact(export_policy(run_dir, Path(tmp) / "hf"), f"{run_dir.name}-model", "model")


def plot_summary(run_dir: Path) -> Path | None:
    """Draw ``plots/summary.png`` of a finished run; a failure is one warning line on stderr, never the run's."""
    try:
        from cluster.plot import SUMMARY, plot_runs

        return plot_runs([run_dir], run_dir / SUMMARY)
    except Exception as err:  # noqa: BLE001  (the run itself succeeded; its metrics are in metrics.jsonl)
        reason = (str(err).splitlines() or [""])[0]
        print(f"tokengym: warning: no plots/summary.png for {run_dir} ({type(err).__name__}: {reason})", file=sys.stderr)
        return None


# Logged with a process's first iteration (docs/metrics.md), with their words in the run's summary: the driver's
# phases, one after the other ("startup/<part>_s"); inside "actors", the slowest rollout actor's own
# ("startup/actor_<part>_s", cluster.rollout.STARTUP_PARTS); and the total from the process's start.
STARTUP_PARTS = {"launch": "launch", "ray": "Ray", "imports": "imports", "policy": "policy", "actors": "rollout actors",
                 "learners": "learners", "first_sync": "first weight sync", "tracking": "tracking"}
ACTOR_STARTUP_WORDS = {"process": "process", "import": "vLLM import", "engine": "engine build", "warmup": "warm-up"}
STARTUP_KEYS = (*(f"startup/{p}_s" for p in STARTUP_PARTS), *(f"startup/actor_{p}_s" for p in ACTOR_STARTUP_WORDS),
                "startup/total_s")


def startup_line(row: dict[str, Any]) -> str:
    """``startup/*`` of a metrics row in words: the total and its parts, the slowest actor's on a line of their own."""
    parts = [f"{words} {row[f'startup/{p}_s']:.1f}s" for p, words in STARTUP_PARTS.items() if f"startup/{p}_s" in row]
    actor = [f"{words} {row[f'startup/actor_{p}_s']:.1f}s" for p, words in ACTOR_STARTUP_WORDS.items()
             if f"startup/actor_{p}_s" in row]
    inside = f"\n{'':18}(rollout actors, the slowest one's: {', '.join(actor)})" if actor else ""
    return f"{row['startup/total_s']:.1f}s: {', '.join(parts)}{inside}"


def run_summary(run_dir: Path, last: int = 5, stored: str | None = None) -> str:
    """A finished run in a few lines: final reward (mean of the last ``last`` iterations), best eval accuracy, mean
    time per phase, and where its files are (``stored``: its URI in storage)."""
    from cluster.plot import PHASES, SUMMARY
    from cluster.tracking import METRICS_FILE, WANDB_ID_FILE, read_metrics

    logged = read_metrics(run_dir)
    rows = [r for r in logged if r.get("reward/mean") is not None]  # not the evaluation before training
    lines = [f"run finished: {run_dir}"]
    if rows:
        tail = rows[-last:]
        mean = sum(r["reward/mean"] for r in tail) / len(tail)
        lines.append(f"  reward          {mean:.4g} (mean reward/mean of iterations {tail[0]['iteration']}-"
                     f"{tail[-1]['iteration']})")
    evals = [r for r in logged if r.get("eval/accuracy") is not None]
    if evals:
        best = max(evals, key=lambda r: r["eval/accuracy"])
        lines.append(f"  eval accuracy   {best['eval/accuracy']:.4g} (best, at iteration {best['iteration']}; "
                     f"{evals[-1]['eval/accuracy']:.4g} at the last evaluation)")
    phases = []
    for phase in (*PHASES, "iteration"):
        times = [r[f"timing/{phase}_s"] for r in rows if r.get(f"timing/{phase}_s") is not None]
        if times:
            phases.append(f"{phase} {sum(times) / len(times):.3g}s")
    if phases:
        lines.append(f"  time per phase  {', '.join(phases)} (mean per iteration)")
    started = [r for r in rows if r.get("startup/total_s") is not None]
    if started:  # this run's latest start (a resumed run starts again)
        lines.append(f"  start-up        {startup_line(started[-1])}")
    lines.append(f"  metrics         {run_dir / METRICS_FILE}")
    checkpoint = latest_checkpoint(run_dir / CHECKPOINTS)
    if checkpoint is not None:
        lines.append(f"  checkpoint      {checkpoint}")
    if (run_dir / SUMMARY).is_file():
        lines.append(f"  plots           {run_dir / SUMMARY}")
    if stored is not None:
        lines.append(f"  storage         {stored}")
    wandb_id = (run_dir / WANDB_ID_FILE).read_text().strip() if (run_dir / WANDB_ID_FILE).is_file() else None
    wandb_runs = sorted((run_dir / "wandb").glob(f"*run-*-{wandb_id}")) if wandb_id else []
    if wandb_runs:
        where = wandb_runs[-1]
        offline = where.name.startswith("offline-")
        lines.append(f"  wandb           {f'offline; upload with: wandb sync {where}' if offline else where}")
    return "\n".join(lines)
