"""Files that actors need (model directories, data files), shipped from the driver through Ray's object store into
storage local to each node.

On a cluster, a path the driver was given (``policy.model_path``, the run's ``policy_init``, ``reward_model.path``,
a ``File-v0`` data file) exists on the driver's node only. The driver therefore ships it once with :func:`ship`:
every file becomes one object in the object store (put straight from a memory map: one copy, never through the
driver's heap), under a digest of the names and contents. What actors receive is the :class:`ShippedPath` handle;
on first use, :func:`local_copy` writes the files into ``<node storage>/<digest>/`` on the actor's node, where every
later user (another actor of that node, a restarted actor, the next run with the same files) finds them.
A handle is path-like (``os.fspath`` gives the node's copy), so loaders that take a path take it unchanged.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from textenv import EnvConfig

TASK_PATH_KEYS = ("path", "eval_path")  # a File-v0 task's data files (env.task_kwargs), read by every environment


def default_node_storage() -> Path:
    """Where a node keeps shipped files when ``cluster.node_storage`` is not set: its temp directory (``TMPDIR``)."""
    return Path(tempfile.gettempdir()) / f"tokengym-{os.getuid()}" / "shipped"


@dataclass(frozen=True)
class ShippedFile:
    """One file of a shipped path: its name relative to the shipped root, its size, its bytes in the object store."""

    path: str
    size: int
    ref: Any  # ray.ObjectRef of a uint8 array


@dataclass(frozen=True, repr=False)
class ShippedPath:
    """A file or directory shipped by :func:`ship`; ``os.fspath(shipped)`` is its copy on the calling node.

    ``name`` is the driver's path, for messages only: nothing reads it on another node.
    """

    name: str
    digest: str  # sha256 over the relative names, sizes and contents
    files: tuple[ShippedFile, ...]
    entry: str  # "" for a directory; for a single file, its name inside the copy
    storage: str | None = None  # cluster.node_storage; None: default_node_storage() of each node

    def __fspath__(self) -> str:
        return str(local_copy(self))

    def __repr__(self) -> str:  # also str(): never the bare driver's path, which would pass for a local one
        return f"ShippedPath({self.name!r}, sha256:{self.digest[:12]})"

    def __deepcopy__(self, memo: dict[int, Any]) -> ShippedPath:
        # Immutable. Copying would re-create its object refs outside Ray's serialization, losing their owner.
        return self


def ship(path: str | os.PathLike[str], storage: str | None = None) -> ShippedPath:
    """Put the file or directory ``path`` (every file under it, symlinks followed) into Ray's object store."""
    import ray

    root = Path(path)
    if root.is_dir():
        sources = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
        entry = ""
    elif root.is_file():
        sources, entry = [(root.name, root)], root.name
    else:
        raise FileNotFoundError(f"cannot ship {str(root)!r}: no such file or directory")
    digest = hashlib.sha256(entry.encode() + b"\0")
    files = []
    for rel, source in sources:
        size = source.stat().st_size
        with source.open("rb") as f:
            content = hashlib.file_digest(f, "sha256").hexdigest()
        digest.update(f"{rel}\0{size}\0{content}\0".encode())
        # A read-only memory map: ray.put copies the pages into the object store once (an empty file cannot be mapped).
        data = np.memmap(source, np.uint8, mode="r").view(np.ndarray) if size else np.empty(0, np.uint8)
        files.append(ShippedFile(rel, size, ray.put(data)))
        del data
    return ShippedPath(str(path), digest.hexdigest(), tuple(files), entry, storage)


def local_copy(shipped: ShippedPath) -> Path:
    """The node-local copy of ``shipped`` (``<storage>/<digest>/``, plus the file's name for a single file).

    Made on first use: the files are written under a temporary name and renamed into place, so a copy that exists
    is complete, and a writer that died leaves only a temporary directory that nobody reads. The processes of one
    node take turns through a lock file: one writes, the others then find its copy. A copy whose files do not all
    have their shipped sizes (damaged after it was made) is replaced.
    """
    root = Path(shipped.storage) if shipped.storage is not None else default_node_storage()
    root.mkdir(parents=True, exist_ok=True)
    target = root / shipped.digest
    if not _complete(target, shipped):
        with open(root / f".{shipped.digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
            if not _complete(target, shipped):
                _materialise(shipped, root, target)
    return target / shipped.entry if shipped.entry else target


def _complete(target: Path, shipped: ShippedPath) -> bool:
    try:
        return all((target / f.path).stat().st_size == f.size for f in shipped.files)
    except FileNotFoundError:
        return False


def _materialise(shipped: ShippedPath, root: Path, target: Path) -> None:
    """Write every file into a temporary directory of ``root``, then rename it to ``target``."""
    import ray

    tmp = Path(tempfile.mkdtemp(prefix=f".{shipped.digest}.", suffix=".tmp", dir=root))
    try:
        for f in shipped.files:
            dest = tmp / f.path
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = ray.get(f.ref)  # one file at a time: zero-copy from this node's object store
            with dest.open("wb") as out:
                out.write(memoryview(data))
            del data
        if target.exists():  # damaged (the lock is held: nobody else is writing it); set it aside first
            aside = root / f".{shipped.digest}.{uuid.uuid4().hex}.damaged"
            os.rename(target, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ship_task_files(env: EnvConfig, storage: str | None = None) -> EnvConfig:
    """``env`` with the data files of a ``file`` task (``task_kwargs.path`` and ``eval_path``) shipped; any other
    environment unchanged (a custom task's keyword arguments are its own to interpret)."""
    if (env.task or ("file" if env.id == "textenv/File-v0" else None)) != "file":
        return env
    shipped = {k: ship(env.task_kwargs[k], storage) for k in TASK_PATH_KEYS if env.task_kwargs.get(k) is not None}
    return replace(env, task_kwargs={**env.task_kwargs, **shipped})
