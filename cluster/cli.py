"""The ``tokengym`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cluster.config import ConfigError, ExperimentConfig, load_config
from cluster.console import RunFailed
from cluster.supervision import ClusterError

RESUME_AUTO = "auto"  # --resume auto

USAGE_EXAMPLES = """examples:
  tokengym train                                   # configs/default.yaml
  tokengym train configs/grpo.yaml algorithm.lr=1e-4 rollout.num_actors=4
  tokengym train --dry-run configs/grpo.yaml seed=3  # check and print the resolved config; no training
  tokengym train --resume runs/reverse-ppo-20261129-101500
  tokengym train --verbose                         # Ray's, RLlib's and vLLM's logs on the console, not console.log
  tokengym train configs/gpu.yaml --resume auto    # continue the newest run of this name, or start one
  tokengym train storage=s3://bucket/runs          # durable copy in s3://bucket/runs/<run>/; runs/ is the local one
  tokengym train --resume s3://bucket/runs/reverse-ppo-20261129-101500   # continue a stored run on any machine
  tokengym config configs/grpo.yaml                # the resolved config, every field with its help text
  tokengym envs                                    # the registered environments and their task_kwargs
  tokengym plot runs/reverse-ppo-20261129-101500   # -> RUN_DIR/plots/summary.png
  tokengym plot runs/a runs/b --out cmp.png        # several runs in one figure
  tokengym export runs/reverse-ppo-20261129-101500 --out exported/
  tokengym export s3://bucket/runs/reverse-ppo-20261129-101500/checkpoints/iter_000100 --out s3://bucket/hf/rev
  tokengym pull smollm2-135m-instruct              # prints the model directory on its last line
  tokengym eval runs/reverse-ppo-20261129-101500   # held-out accuracy, pass@k -> RUN_DIR/eval.json
  tokengym eval MODEL_DIR --env textenv/Addition-v0 --n 128
  tokengym sample runs/reverse-ppo-20261129-101500 --n 8   # responses to held-out prompts, with rewards
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokengym", description="RL for language models on Ray, vLLM and RLlib.",
                                     epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="run an experiment (default: configs/default.yaml)")
    tr.add_argument("overrides", nargs="*", metavar="[CONFIG] [section.key=value ...]")
    tr.add_argument("--resume", metavar="RUN_DIR|URI|auto",
                    help="continue a stopped run from its last checkpoint (a run directory, or <storage>/<run-name>); "
                         "auto: the newest run of the config's name in storage (or under runs_dir without storage), "
                         "or a new run if there is none (what a retried cluster job wants)")
    tr.add_argument("--dry-run", action="store_true",
                    help="check the config as train does before Ray starts, print it resolved, and stop")
    tr.add_argument("--verbose", action="store_true", help="show what Ray, RLlib and vLLM print (tracking.verbose); "
                    "by default it goes to RUN_DIR/console.log")
    tr.set_defaults(run=lambda a: _train([*a.overrides, *(["tracking.verbose=true"] if a.verbose else [])], a.resume,
                                         a.dry_run))
    cf = sub.add_parser("config", help="print a config resolved and validated, each field with its help text")
    cf.add_argument("overrides", nargs="*", metavar="[CONFIG] [section.key=value ...]")
    cf.set_defaults(run=lambda a: _config(a.overrides))
    en = sub.add_parser("envs", help="list the registered textenv environments and their knobs (env.task_kwargs)")
    en.set_defaults(run=lambda a: _envs())
    pt = sub.add_parser("plot", help="draw runs' metrics (reward, KL, entropy, length, losses, timing) into a PNG")
    pt.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    pt.add_argument("--out", help="the PNG to write (default: RUN_DIR/plots/summary.png for one run, "
                                  "./plots/compare.png for several)")
    pt.set_defaults(run=lambda a: _plot([Path(d) for d in a.run_dirs], Path(a.out) if a.out else None))
    ex = sub.add_parser("export", help="write a run's policy as a Hugging Face model directory")
    ex.add_argument("run_dir", metavar="RUN_DIR|URI", help="a run directory, a stored run <storage>/<run-name> (its "
                    "latest checkpoint) or one of its checkpoints <storage>/<run-name>/checkpoints/iter_N")
    ex.add_argument("--out", required=True, help="the directory to write (a path or a URI)")
    ex.set_defaults(run=lambda a: _export(a.run_dir, a.out))
    pl = sub.add_parser("pull", help="install and convert a pretrained model into the local model cache")
    pl.add_argument("name", help="a model name, e.g. smollm2-135m-instruct")
    pl.set_defaults(run=lambda a: _pull(a.name))
    ev = sub.add_parser("eval", help="evaluate a run's final policy or a model directory on held-out prompts")
    ev.add_argument("target", metavar="RUN_DIR|URI|MODEL_DIR")
    ev.add_argument("overrides", nargs="*", metavar="section.key=value")
    ev.add_argument("--config", help="for a model directory: the experiment config (default: configs/default.yaml)")
    ev.add_argument("--env", help="evaluate on this environment id instead, e.g. textenv/Addition-v0")
    ev.add_argument("--n", type=int, help="number of held-out prompts (eval.num_prompts)")
    ev.add_argument("--out", help="where to write the results (default: RUN_DIR|MODEL_DIR/eval.json)")
    ev.set_defaults(run=_eval)
    sa = sub.add_parser("sample", help="show a run's or a model's responses to held-out prompts, with their rewards")
    sa.add_argument("target", metavar="RUN_DIR|URI|MODEL_DIR")
    sa.add_argument("overrides", nargs="*", metavar="section.key=value")
    sa.add_argument("--n", type=int, default=8, help="number of held-out problems (default 8)")
    sa.add_argument("--prompt", action="append", help="a prompt of your own instead (repeatable); no reward without "
                    "an answer")
    sa.add_argument("--greedy", action="store_true", help="temperature 0 instead of rollout.temperature")
    sa.add_argument("--config", help="for a model directory: the experiment config (default: configs/default.yaml)")
    sa.add_argument("--env", help="sample on this environment id instead, e.g. textenv/Addition-v0")
    sa.set_defaults(run=_sample)
    args, extra = parser.parse_known_args(argv)
    # section.key=value overrides may also follow options (eval DIR --n 16 seed=1), where argparse leaves them over.
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides += extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.run(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"tokengym: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:  # one line naming what failed; the traceback is in the run's error.log
        print(f"tokengym: error: {err}", file=sys.stderr)
        return 1
    except ClusterError as err:  # an actor timed out or was lost for good: the checkpoints before it are intact
        # (in a run, its traceback is in the run's error.log too)
        print(f"tokengym: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tokengym: interrupted; continue with --resume from the last checkpoint", file=sys.stderr)
        return 130


def _split_config(positional: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG] [section.key=value ...]`` -> the config file (None: the default) and the overrides."""
    if positional and "=" not in positional[0]:
        return positional[0], list(positional[1:])
    return None, list(positional)


def _train(positional: list[str], resume: str | None, dry_run: bool = False) -> int:
    from cluster.run import check_before_ray, find_resumable_run, find_stored_run, resume_run, run_summary, train

    config_path, overrides = _split_config(positional)
    run_dir = None
    if resume == RESUME_AUTO:
        # The same command again (a retried Kubernetes job) continues the newest run of this name; a run stopped
        # before its first checkpoint starts over in its own directory.
        cfg = load_config(config_path, overrides)
        found = (find_stored_run(cfg.storage, cfg.name) if cfg.storage is not None
                 else find_resumable_run(cfg.runs_dir, cfg.name))
        if found is not None:
            cfg, run_dir = resume_run(found, overrides, require_checkpoint=False)
            print(f"tokengym: --resume auto: continuing {found}", file=sys.stderr)
        resume = str(found) if found is not None else None
    elif resume is not None:
        if config_path is not None:
            raise ConfigError("--resume takes the run's own config.yaml; give only section.key=value overrides")
        cfg, run_dir = resume_run(resume, overrides)
    else:
        cfg = load_config(config_path, overrides)
    if dry_run:
        from cluster.placement import plan_placement
        from cluster.pull import resolve_model_paths

        cfg = resolve_model_paths(cfg)
        check_before_ray(cfg)
        source = f"--resume {resume}" if resume is not None else config_path or "configs/default.yaml"
        _print_config(cfg, source, overrides, "passed every check train makes before Ray starts (dry run)")
        print(plan_placement(cfg).summary())
        return 0
    run_dir = train(cfg, run_dir, resume=run_dir is not None)
    stored = f"{cfg.storage.rstrip('/')}/{run_dir.name}" if cfg.storage is not None else None
    print(run_summary(run_dir, stored=stored))
    return 0


def _config(positional: list[str]) -> int:
    config_path, overrides = _split_config(positional)
    cfg = load_config(config_path, overrides)
    _print_config(cfg, config_path or "configs/default.yaml", overrides, "valid")
    return 0


def _print_config(cfg: ExperimentConfig, source: str, overrides: list[str], verdict: str) -> None:
    from cluster.config_docs import commented_yaml

    given = " ".join([source, *overrides])
    print(commented_yaml(cfg, header=f"{given}: resolved, {verdict}. Every field is set; the comments are their help "
                                     "(docs/configuration.md)."), end="")


def _envs() -> int:
    import inspect

    from textenv.catalog import registered_envs

    envs = registered_envs()
    width = max(len(e.id) for e in envs)
    for e in envs:
        print(f"{e.id:<{width}}  {e.description}")
        knobs = ", ".join(k if v is inspect.Parameter.empty else f"{k}={v!r}" for k, v in e.knobs.items())
        if knobs:
            print(f"{'':<{width}}  task_kwargs: {knobs}")
    return 0


def _plot(run_dirs: list[Path], out: Path | None) -> int:
    from cluster.plot import plot_runs

    print(plot_runs(run_dirs, out))
    return 0


def _export(target: str, out: str) -> int:
    from cluster.export import export_policy
    from cluster.storage import local_output, local_run_copy

    with local_run_copy(target, "export") as run_dir, local_output(out, "--out") as local_out:
        export_policy(run_dir, local_out)
    print(f"exported {target} -> {out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json

    from cluster.evaluation import evaluate_path
    from cluster.storage import is_uri, local_output, local_run_copy

    out = args.out or (f"{args.target.rstrip('/')}/eval.json" if is_uri(args.target) else None)
    with local_run_copy(args.target, "eval") as target, local_output(out, "--out", replace=True) as local_out:
        written = evaluate_path(target, args.overrides, args.config, args.env, args.n, local_out)
        report = json.loads(written.read_text())
    print(" ".join(f"{k}={report[k]:.4g}" for k in ("eval/accuracy", "eval/reward", "eval/pass@k")) +
          f" (k={report['eval/k']}, {report['eval/prompts']} prompts)")
    print(out or written)
    return 0


def _sample(args: argparse.Namespace) -> int:
    from cluster.evaluation import format_samples, sample_path
    from cluster.storage import local_run_copy

    if args.n < 1:
        raise ConfigError(f"--n must be >= 1; got {args.n}")
    with local_run_copy(args.target, "sample") as target:
        rows = sample_path(target, args.overrides, args.config, args.env, args.n, args.prompt, args.greedy)
    print(format_samples(rows))
    return 0


def _pull(name: str) -> int:
    from cluster.pull import pull

    print(pull(name, log=lambda line: print(line, file=sys.stderr)))
    return 0


def entry() -> None:
    """The ``tokengym`` command: :func:`main`, then out without the interpreter's teardown.

    Tearing down torch, Ray, vLLM and transformers at exit takes 3-5 s and does nothing for a finished command: by
    the time ``main`` returns, runs are closed (W&B finished, checkpoints renamed, Ray shut down). If Ray or a W&B
    run is still up, their exit handlers are needed, and the exit is the normal one.
    """
    code = main()
    ray, wandb = sys.modules.get("ray"), sys.modules.get("wandb")
    if (ray is not None and ray.is_initialized()) or (wandb is not None and getattr(wandb, "run", None) is not None):
        sys.exit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
