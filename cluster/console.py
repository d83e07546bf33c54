"""What a run shows on the console: tokengym's own lines only.

Ray, RLlib and vLLM log to the process's stderr from Python, from C++ and from the processes Ray starts (token-auth
and deprecation warnings, actor-died tracebacks); all of it goes to ``RUN_DIR/console.log`` instead, unless
``tracking.verbose``. A run that fails ends with one line naming the component, the function and the prompt, and
writes the whole traceback to ``RUN_DIR/error.log``.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

CONSOLE_LOG = "console.log"
ERROR_LOG = "error.log"
WHERE = "tokengym_where"  # the attribute naming the component an exception came from ("rollout actor 1")


class RunFailed(RuntimeError):
    """A run stopped by an exception; the message is one line for the console and names ``error.log``."""


class ActorDied(RuntimeError):
    """A Ray actor (or its process) died; the message names it and the last error line it left."""


def tag(err: BaseException, where: str) -> BaseException:
    """Mark ``err`` as raised in ``where`` (e.g. "rollout actor 1"), unless a deeper component already claimed it."""
    if getattr(err, WHERE, None) is None:
        try:
            setattr(err, WHERE, where)
        except AttributeError:  # an exception type with __slots__: it stays unnamed
            pass
    return err


@contextmanager
def quiet_console(run_dir: Path, verbose: bool) -> Iterator[IO[str]]:
    """Send everything written to stderr (file descriptor 2) to ``run_dir/console.log`` while the block runs; yield
    the real stderr for tokengym's own lines (the progress bar). With ``verbose``, nothing is redirected.

    The redirect is at the file-descriptor level because much of the noise never passes through Python: Ray's C++
    core and the processes ``ray.init`` starts write to the inherited descriptor directly.
    """
    if verbose:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved = os.dup(2)
    console = os.fdopen(os.dup(saved), "w", buffering=1)
    with open(run_dir / CONSOLE_LOG, "a") as log:
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            console.close()


@contextmanager
def failures_logged(
    run_dir: Path, passthrough: tuple[type[BaseException], ...] = (), logged: tuple[type[BaseException], ...] = (),
) -> Iterator[None]:
    """Turn an exception of the run into :class:`RunFailed`: one line (:func:`one_line`) for the console, and the
    full traceback, the actors' own included, in ``run_dir/error.log``. ``passthrough`` types are re-raised as they
    are (e.g. ``ConfigError``, already one line); ``logged`` types too, after their traceback went to error.log
    (e.g. ``cluster.supervision.ClusterError``: one line naming the actor that timed out or was lost)."""
    try:
        yield
    except passthrough:
        raise
    except logged as err:
        _write_error_log(run_dir, err)
        raise
    except Exception as err:  # noqa: BLE001 - reported in full in error.log, in one line on the console
        path, text = _write_error_log(run_dir, err)
        raise RunFailed(f"{one_line(err, text)} (traceback: {path})") from None


def _write_error_log(run_dir: Path, err: BaseException) -> tuple[Path, str]:
    """``err``'s traceback (Ray's colours removed) in ``run_dir/error.log``; the path and the text."""
    path = run_dir / ERROR_LOG
    text = _ANSI.sub("", "".join(traceback.format_exception(err)))  # Ray colours the actor's name
    path.write_text(text)
    return path, text


def one_line(err: BaseException, text: str = "") -> str:
    """``<component>: <what happened>`` for any exception of a run.

    A reward error already names the reward function (by import path), the task and the prompt, and
    :class:`ActorDied` the actor; any other exception is given with its type, the first line of its message, and the innermost frame of its traceback ``text``
    (the function that raised, in the actor when it came from one).
    """
    from textenv import RewardError

    cause = getattr(err, "cause", None)  # Ray's wrapper of an actor's exception holds the original here
    own = cause if isinstance(cause, BaseException) else err
    message = _first_line(own)
    if isinstance(own, ActorDied):  # names the actor itself
        return message
    if not isinstance(own, RewardError):
        frame = _innermost_frame(text)
        message = f"{type(own).__name__}: {message}" + (f" (in {frame})" if frame else "")
    where = getattr(err, WHERE, None)
    return f"{where}: {message}" if where else message


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[0] if lines else ""


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _innermost_frame(text: str) -> str | None:
    """``function (file.py:line)`` of the last frame in a formatted traceback, or None."""
    frames = _FRAME.findall(text)
    if not frames:
        return None
    file, line, function = frames[-1]
    return f"{function} ({Path(file).name}:{line})"


def seconds_since_launch() -> float:
    """Seconds since this process started: for the CLI, what a user has waited since typing the command; for an
    actor, since Ray started its worker.

    On Linux from the kernel's own clock: the system's uptime less the process's start (both counted from boot, in
    clock ticks). ``psutil.Process().create_time()`` adds the start to the boot time, which Linux gives in whole
    seconds (``btime``), so an age computed from it is too long by the boot time's lost fraction, up to a second
    and the same for every process until the next boot. Elsewhere, or if ``/proc`` disagrees with psutil by more
    than that, psutil's.
    """
    import time

    import psutil

    coarse = time.time() - psutil.Process().create_time()
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, after "pid (comm)"
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        exact = uptime - started / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return coarse
    return exact if -0.05 <= coarse - exact <= 1.05 and exact >= 0 else coarse


@contextmanager
def timed(timings: dict[str, float], phase: str, group: str = "timing") -> Iterator[None]:
    """Seconds the block took, as ``timings[f"{group}/{phase}_s"]``."""
    import time

    start = time.perf_counter()
    yield
    timings[f"{group}/{phase}_s"] = time.perf_counter() - start


def freeze_heap() -> None:
    """Move every object alive now out of the garbage collector's view (``gc.freeze``): the modules, classes and
    engines a process keeps for its whole life.

    A full collection walks every tracked object, and after importing torch, transformers, RLlib and vLLM that is
    ~0.2 s each time: vLLM's engine build collects five times (a third of its build), and the driver's loop runs
    full collections now and then. Frozen objects are skipped; what is allocated later is collected as usual.
    Garbage that exists at the call is kept (never freed): call it at points where little is.
    """
    import gc

    gc.freeze()


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic garbage collection inside (for imports: they make long-lived objects, hardly any garbage, and
    the full collections they trigger walk everything imported so far); as before after."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
