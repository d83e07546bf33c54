"""Durable storage of runs: a directory on any filesystem pyarrow opens from a URI (``file://``, ``s3://``, ``gs://``,
``hdfs://``; other schemes through fsspec, e.g. ``abfs://`` with adlfs installed).

With ``storage`` set, a run still works in ``runs_dir/<run>/`` (console.log, W&B's files, the checkpoint RLlib
writes, which is the staging copy) and copies what must outlive the machine to ``<storage>/<run>/``: config.yaml,
``policy_init/`` (the tiny model a run builds, whose tokenizer export needs), metrics.jsonl, samples.jsonl,
wandb_id, every checkpoint, and plots/. ``--resume``, ``--resume auto``, ``export``, ``eval`` and ``sample`` read
from there, so a job retried on a fresh pod continues a run whose first pod, and its disk, are gone.

A checkpoint in storage is copied file by file under its final name, then the run's metrics, then the checkpoint's
``state.json``, then the ``latest`` pointer: a checkpoint is complete when its ``state.json`` is there, and the
metrics up to it are there by then (a resumed run's history). Not a temporary name and a rename, as on a local
disk: object stores have no directory rename (pyarrow's S3 and GCS moves copy and delete object by object), so a
rename would be neither atomic nor cheap. A writer killed mid-upload leaves a folder
without ``state.json`` and an unchanged ``latest``: readers skip it, the next upload of that iteration replaces it
and pruning removes it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from cluster.checkpoint import CHECKPOINTS, LATEST, STATE, atomic_write_text
from cluster.config import ConfigError
from cluster.tracking import METRICS_FILE, SAMPLES_FILE, WANDB_ID_FILE

if TYPE_CHECKING:
    from pyarrow.fs import FileSystem, FileType  # imported only where storage is used: a run without it skips pyarrow

CONFIG_FILE = "config.yaml"
POLICY_INIT = "policy_init"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, SAMPLES_FILE, WANDB_ID_FILE)  # copied at every checkpoint, read on resume
CHECKPOINT_DIR = re.compile(r"iter_\d+")


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` names a place in storage (``scheme://...``) rather than a local or mounted path."""
    return "://" in str(location)


class Storage:
    """A directory on a pyarrow filesystem; files in it are named by paths relative to it (``checkpoints/latest``)."""

    def __init__(self, fs: FileSystem, root: str, uri: str) -> None:
        self.fs, self.root, self.uri = fs, root.rstrip("/"), uri.rstrip("/")

    @classmethod
    def open(cls, uri: str, key: str = "storage") -> Storage:
        """The directory at ``uri``, checked to be reachable; a one-line ConfigError naming ``key`` otherwise."""
        import pyarrow
        from pyarrow import fs as pafs

        fix = ("give a URI such as file:///abs/dir, s3://bucket/prefix or gs://bucket/prefix, with the filesystem's "
               "credentials in its usual place (for a local or mounted shared directory, set runs_dir instead)")
        try:
            fs, root = pafs.FileSystem.from_uri(uri)
        except pyarrow.ArrowInvalid as err:
            if "Unrecognized filesystem type" not in str(err):  # e.g. "File URI cannot be relative"
                raise ConfigError(f"{key} {uri!r}: {_first_line(err)}; {fix}") from None
            fs, root = _fsspec_filesystem(uri, key, _first_line(err), fix)  # a scheme pyarrow has no filesystem for
        except OSError as err:  # e.g. an S3 bucket whose region cannot be resolved, HDFS without its Java library
            raise ConfigError(f"{key} {uri!r} cannot be opened ({_first_line(err)}); {fix}") from None
        try:
            info = fs.get_file_info(root)
        except OSError as err:
            raise ConfigError(f"{key} {uri!r} is unreachable ({_first_line(err)}); {fix}") from None
        if info.type == pafs.FileType.File:
            raise ConfigError(f"{key} {uri!r} is a file, not a directory; {fix}")
        return cls(fs, root, uri)

    def child(self, name: str) -> Storage:
        return Storage(self.fs, f"{self.root}/{name}", f"{self.uri}/{name}")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _type(self, rel: str) -> FileType:
        return self.fs.get_file_info(self.path(rel)).type

    def is_file(self, rel: str) -> bool:
        from pyarrow import fs as pafs

        return self._type(rel) == pafs.FileType.File

    def is_dir(self, rel: str = "") -> bool:
        from pyarrow import fs as pafs

        return self._type(rel) == pafs.FileType.Directory

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when there is no such file."""
        if not self.is_file(rel):
            return None
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read().decode()

    def write_text(self, rel: str, text: str) -> None:
        """Replace a small file so that a reader sees the old or the new text: written aside, then moved (a rename
        on a local disk; on object stores the new object appears whole)."""
        final = self.path(rel)
        parent, _, name = final.rpartition("/")
        tmp = f"{parent}/.{name}.tmp-{os.getpid()}"
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(tmp) as f:
            f.write(text.encode())
        self.fs.move(tmp, final)

    def upload(self, local: Path, rel: str, exclude: str | None = None) -> None:
        """Copy a local file, or a directory tree file by file (but its top-level file ``exclude``), to ``rel``."""
        from pyarrow import fs as pafs

        files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
        for path in (p for p in files if not (p.parent == local and p.name == exclude)):
            dest = self.path(rel if path == local else f"{rel}/{path.relative_to(local).as_posix()}")
            self.fs.create_dir(dest.rpartition("/")[0], recursive=True)
            pafs.copy_files(str(path), dest, destination_filesystem=self.fs)

    def download(self, rel: str, local: Path) -> None:
        """Copy the file or directory tree at ``rel`` to ``local``."""
        from pyarrow import fs as pafs

        source = self.path(rel)
        if self.is_file(rel):
            files = [(source, local)]
        else:
            infos = self.fs.get_file_info(pafs.FileSelector(source, recursive=True))
            files = [(i.path, local / i.path[len(source) + 1:]) for i in infos if i.type == pafs.FileType.File]
        for path, dest in files:
            dest.parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(path, str(dest), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())

    def list_dirs(self, rel: str = "") -> list[str]:
        """The names of the directories directly under ``rel`` (none when it does not exist)."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def delete_dir(self, rel: str) -> None:
        if self.is_dir(rel):
            self.fs.delete_dir(self.path(rel))


def _fsspec_filesystem(uri: str, key: str, arrow_reason: str, fix: str) -> tuple[FileSystem, str]:
    """A filesystem pyarrow does not know, through fsspec (the package for the scheme, e.g. adlfs, installed)."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except ImportError as err:  # fsspec knows the scheme; its package is missing ("Install adlfs to access ...")
        raise ConfigError(f"{key} {uri!r}: {_first_line(err)}; install that package, or {fix}") from None
    except ValueError as err:  # "Protocol not known: foo"
        raise ConfigError(f"{key} {uri!r}: neither pyarrow ({arrow_reason}) nor fsspec ({_first_line(err)}) has a "
                          f"filesystem for it; {fix}") from None
    return PyFileSystem(FSSpecHandler(fs)), root


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


# --------------------------------------------------------------------------------------------------- checkpoints
def stored_checkpoint(run: Storage) -> str | None:
    """The name (``iter_000050``) of the newest complete checkpoint of the run at ``run``, or None: the one the
    ``latest`` pointer names, else the newest folder holding ``state.json``."""
    pointer = run.read_text(f"{CHECKPOINTS}/{LATEST}")
    if pointer is not None and run.is_file(f"{CHECKPOINTS}/{pointer.strip()}/{STATE}"):
        return pointer.strip()
    complete = [d for d in _checkpoint_dirs(run) if run.is_file(f"{CHECKPOINTS}/{d}/{STATE}")]
    return complete[-1] if complete else None


def upload_checkpoint(run: Storage, checkpoint: Path, keep: int, run_dir: Path | None = None) -> None:
    """Copy a complete local checkpoint into the run's ``checkpoints/`` but its ``state.json``; then the run files of
    ``run_dir`` (its metrics up to the checkpoint); then ``state.json``, which makes the checkpoint complete; then
    the ``latest`` pointer; then keep only the newest ``keep`` complete checkpoints."""
    rel = f"{CHECKPOINTS}/{checkpoint.name}"
    run.delete_dir(rel)  # a torn upload of this iteration by a killed writer, or the same iteration saved again
    run.upload(checkpoint, rel, exclude=STATE)
    if run_dir is not None:
        upload_run_files(run, run_dir)
    run.upload(checkpoint / STATE, f"{rel}/{STATE}")
    run.write_text(f"{CHECKPOINTS}/{LATEST}", checkpoint.name)
    names = _checkpoint_dirs(run)
    complete = [d for d in names if run.is_file(f"{CHECKPOINTS}/{d}/{STATE}")]
    for name in names:
        if name not in complete[-keep:]:  # older checkpoints, and torn uploads a killed writer left
            run.delete_dir(f"{CHECKPOINTS}/{name}")


def _checkpoint_dirs(run: Storage) -> list[str]:
    return [d for d in run.list_dirs(CHECKPOINTS) if CHECKPOINT_DIR.fullmatch(d)]  # sorted: zero-padded numbers


# --------------------------------------------------------------------------------------------------- runs
def upload_run_files(run: Storage, run_dir: Path) -> None:
    """The run's config, metrics, samples and W&B id, as they are now."""
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            run.upload(run_dir / name, name)


def download_run(run: Storage, run_dir: Path, checkpoint: str | None = None) -> None:
    """Make ``run_dir`` a working copy of the stored run: its files, ``policy_init/``, and one checkpoint (default:
    the newest complete one) as the local latest. Local files the stored run lacks go: storage is the truth."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
        if run.is_file(name):
            run.download(name, run_dir / name)
    if run.is_dir(POLICY_INIT) and not (run_dir / POLICY_INIT).is_dir():
        run.download(POLICY_INIT, run_dir / POLICY_INIT)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    checkpoint = checkpoint or stored_checkpoint(run)
    if checkpoint is not None:
        run.download(f"{CHECKPOINTS}/{checkpoint}", run_dir / CHECKPOINTS / checkpoint)
        atomic_write_text(run_dir / CHECKPOINTS / LATEST, checkpoint)


def split_run_uri(uri: str) -> tuple[str, str, str | None]:
    """``<storage>/<run>`` or ``<storage>/<run>/checkpoints/<iter_N>`` -> (storage, run name, checkpoint or None)."""
    parts = uri.rstrip("/").split("/")
    if len(parts) > 2 and parts[-2] == CHECKPOINTS and CHECKPOINT_DIR.fullmatch(parts[-1]):
        return "/".join(parts[:-3]), parts[-3], parts[-1]
    return "/".join(parts[:-1]), parts[-1], None


@contextlib.contextmanager
def local_run_copy(target: str, what: str) -> Iterator[Path]:
    """A local run directory for ``target``: the path itself, or, for the URI of a stored run (or of one of its
    checkpoints), a temporary copy of it with that checkpoint as its latest. ``what`` names the argument in errors."""
    if not is_uri(target):
        yield Path(target)
        return
    root, name, checkpoint = split_run_uri(target)
    run = Storage.open(root, what).child(name)
    if not run.is_file(CONFIG_FILE):
        raise ConfigError(f"{what} {target!r}: no {CONFIG_FILE} there; give <storage>/<run-name> of a run made by "
                          "tokengym train, or one of its checkpoints (<storage>/<run-name>/checkpoints/iter_N)")
    if checkpoint is not None and not run.is_file(f"{CHECKPOINTS}/{checkpoint}/{STATE}"):
        raise ConfigError(f"{what} {target!r} is not a complete checkpoint (no {STATE})")
    with tempfile.TemporaryDirectory(prefix="tokengym-run-") as tmp:
        local = Path(tmp) / name
        download_run(run, local, checkpoint)
        yield local


@contextlib.contextmanager
def local_output(out: str | None, what: str, replace: bool = False) -> Iterator[Path | None]:
    """Where to write ``out`` locally: the path itself (None stays None), or, for a URI, a temporary path copied
    there once the body succeeded. Unless ``replace``, an existing URI is refused, as an existing local export is."""
    if out is None or not is_uri(out):
        yield Path(out) if out is not None else None
        return
    parent, _, name = out.rstrip("/").rpartition("/")
    dest = Storage.open(parent, what)
    if not replace and (dest.is_dir(name) or dest.is_file(name)):
        raise ConfigError(f"{what} {out!r} exists; choose a new location")
    with tempfile.TemporaryDirectory(prefix="tokengym-out-") as tmp:
        local = Path(tmp) / name
        yield local
        dest.upload(local, name)
