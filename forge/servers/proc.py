"""Process-lifetime helpers: how Forge's children die with it. Shared by the embedded
servers, the PostgreSQL watchdog, the worker supervisor and the bench harness."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from forge.errors import EmbeddedServerError

_PR_SET_PDEATHSIG = 1
_POLL_INTERVAL_S = 0.02


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only).

    Without it a SIGKILLed Forge would leave its children (embedded servers, worker
    processes) running on their own.
    """
    if sys.platform == "linux":
        _set_parent_death_signal(_prctl(), int(sig), os.getppid())


def die_with_parent_preexec(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """The same for a child about to be started: a ``preexec_fn`` for ``Popen`` (None
    where there is no prctl). The library is looked up before the fork: loading one in
    the forked child could deadlock."""
    if sys.platform != "linux":
        return None
    prctl, parent_pid = _prctl(), os.getpid()
    return lambda: _set_parent_death_signal(prctl, int(sig), parent_pid)


def _prctl() -> Callable[..., int]:
    prctl: Callable[..., int] = ctypes.CDLL(None, use_errno=True).prctl
    return prctl


def _set_parent_death_signal(prctl: Callable[..., int], sig: int, parent_pid: int) -> None:
    if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect; the signal would never come


def wait_for_parent_exit(parent_pid: int, poll_s: float = 1.0) -> None:
    """Return once ``parent_pid``, this process's parent, has exited, however it died.

    Waits on a pidfd (Linux 5.3+), which becomes readable when the whole process has
    exited. Not PR_SET_PDEATHSIG: that fires when the *thread* that forked this process
    ends, and a worker starts its embedded PostgreSQL on a handler thread. Elsewhere it
    polls for having been handed to a new parent.
    """
    pidfd = _open_pidfd(parent_pid)
    try:
        # Checked after opening: had the parent died before, the pidfd could name a
        # process that reused its pid; the parent pid changing shows the death either way.
        if os.getppid() != parent_pid:
            return
        if pidfd is None:
            while os.getppid() == parent_pid:
                time.sleep(poll_s)
            return
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll()
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _open_pidfd(pid: int) -> int | None:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None  # not Linux
    try:
        return int(pidfd_open(pid))
    except OSError:
        return None  # gone already (ESRCH), or a kernel older than 5.3 (ENOSYS)


def terminate_child(proc: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """SIGTERM ``proc``, SIGKILL it after ``timeout_s``; False if it had to be killed."""
    proc.terminate()  # harmless if it has already exited
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout_s)
        return True
    proc.kill()
    proc.wait()
    return False


def terminate_pid(pid: int, timeout_s: float, kill_wait_s: float, what: str) -> None:
    """Like ``terminate_child`` for a process that is not our child; ``what`` names it
    in the errors."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, kill_wait_s)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError as exc:
            raise EmbeddedServerError(f"cannot stop {what} {pid}: {exc}") from exc
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not alive(pid):
                return
            time.sleep(_POLL_INTERVAL_S)
    raise EmbeddedServerError(f"{what} {pid} did not exit")


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        os.kill(pid, 0)
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[:1]
    except ProcessLookupError:
        return False
    except OSError:  # no /proc, or the pid belongs to another user
        return True
    # An orphan that exited stays a zombie until its new parent reaps it (some container
    # init processes never do); it holds no files or sockets any more.
    return state != ["Z"]
