"""One benchmark, two versions of tokengym, side by side: this tree's sources against a git revision's, in turn.

The benchmark script is this tree's in both cases (the same measurement), copied into a temporary worktree of
``REV`` so that it imports that revision's sources there (each bench script puts its own checkout first on the path);
the two alternate, ``--rounds`` times, the order flipping every round (the machine is noisy). ``--metric REGEX``
(its first group a number, e.g. ``"RLlib learner +([\\d.]+) ms"``) is read from every output; the medians of both
and their ratio (this tree / REV) are printed, with each round's values. Without it, the outputs are printed.

    .venv/bin/python bench/ab.py REV [--rounds 3] [--metric REGEX] [--record] -- SCRIPT [ARGS ...]
    .venv/bin/python bench/ab.py 78e1508 --metric "RLlib learner +([\\d.]+) ms" -- bench/learner.py --preset tiny-64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: bench/ is not a package

from bench.rollout import record  # noqa: E402


@contextlib.contextmanager
def revision_tree(rev: str) -> Iterator[Path]:
    """A detached git worktree of ``rev`` in a temporary directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="tokengym-ab-") as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), rev], cwd=REPO, check=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=False)


def run(tree: Path, script: str, args: list[str]) -> str:
    """``python TREE/SCRIPT ARGS`` with TREE's sources first on the path (the driver's and Ray's workers'); stdout."""
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(tree / script), *args], cwd=tree, capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{script} {' '.join(args)} failed in {tree}:\n{done.stderr[-3000:]}")
    return done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="the git revision to compare this tree with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--metric", help="a regular expression whose first group is the number to compare")
    parser.add_argument("--record", action="store_true", help="append the result to bench/RESULTS.md")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)  # the benchmark's own command line follows "--"
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    if not command:
        parser.error("give the benchmark after --: -- bench/SCRIPT.py [ARGS ...]")
    script, script_args = command[0], command[1:]
    if not (REPO / script).is_file():
        parser.error(f"{script}: no such file in {REPO} (give a path relative to the checkout)")
    metric = re.compile(args.metric, re.M) if args.metric else None
    load, started = os.getloadavg(), time.time()
    values: dict[str, list[float]] = {"this tree": [], args.rev: []}
    outputs: list[str] = []
    with revision_tree(args.rev) as base:
        (base / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / script, base / script)  # the same benchmark against the revision's sources
        trees = {"this tree": REPO, args.rev: base}
        for r in range(args.rounds):
            for label in list(trees) if r % 2 == 0 else list(trees)[::-1]:
                out = run(trees[label], script, script_args)
                if metric is None:
                    outputs.append(f"--- round {r + 1}, {label}\n{out.rstrip()}")
                    continue
                found = metric.search(out)
                if found is None:
                    raise SystemExit(f"--metric {args.metric!r} not found in the output of {label}:\n{out[-3000:]}")
                values[label].append(float(found.group(1)))
    lines = [f"`{' '.join(command)}`, this tree against {args.rev}, {args.rounds} round(s) in turn"]
    if metric is None:
        lines += outputs
    else:
        med = {label: statistics.median(v) for label, v in values.items()}
        for label, v in values.items():
            lines.append(f"  {label:12} median {med[label]:g}  (rounds {', '.join(f'{x:g}' for x in v)})")
        lines.append(f"  this tree / {args.rev}: {med['this tree'] / med[args.rev]:.2f}x  (metric '{args.metric}')")
    lines.append(f"{os.cpu_count()} cores; {(time.time() - started) / 60:.1f} min in all")
    text = "\n".join(lines)
    print(text)
    if args.record:
        record("ab.py", load, text, "")


if __name__ == "__main__":
    main()
