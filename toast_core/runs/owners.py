"""Who runs a run: the owner stamp in each status.json (host, pid, process start, registry token),
and whether that owner is still alive — the one test every reader of the registry applies."""

from __future__ import annotations

import os
import socket
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toast_core.runs.record import ACTIVE_STATES

if TYPE_CHECKING:
    from toast_core.runs.registry import Registry

_HOST = socket.gethostname()
#: registries open in this process, so a second manager on the same root leaves their runs alone
_LIVE_REGISTRIES: weakref.WeakSet[Registry] = weakref.WeakSet()


def _process_start(pid: int) -> str | None:
    """When a process started (Linux /proc, clock ticks since boot), to tell a reused pid apart."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # alive, someone else's
    except OSError:
        return False
    now = _process_start(pid)
    return not (start and now and now != start)


def owner_stamp(token: str) -> dict[str, Any]:
    """The owner of the runs a registry with this token writes: this host and process."""
    return {"host": _HOST, "pid": os.getpid(), "start": _process_start(os.getpid()), "manager": token}


def live_registry(owner: dict[str, Any], *, besides: object = None) -> Registry | None:
    """The open registry in this process with this owner token (other than `besides`), if any."""
    if owner.get("host") != _HOST or owner.get("pid") != os.getpid():
        return None
    for registry in list(_LIVE_REGISTRIES):
        if registry is not besides and registry.token == owner.get("manager"):
            return registry
    return None


def running_elsewhere(run_id: str, owner: dict[str, Any], token: str | None = None) -> bool:
    """Whether the run's owner (not the registry with `token`) still runs it: an open registry in
    this process that has it active, or a live process on this host."""
    if not owner or owner.get("host") != _HOST or (token is not None and owner.get("manager") == token):
        return False
    if owner.get("pid") == os.getpid():
        other = live_registry(owner)
        if other is None or other.token == token:
            return False
        with other.lock:
            theirs = other.records.get(run_id)
            return theirs is not None and not theirs.external and theirs.status.state in ACTIVE_STATES
    try:
        return _pid_alive(int(owner["pid"]), owner.get("start"))
    except (KeyError, TypeError, ValueError):
        return False
