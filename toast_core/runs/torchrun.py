"""Runs over several processes: joining a torchrun launch, and launching one from the run manager.

Inside a launch (`torchrun --nproc_per_node=N -m toast_core train ...`): `join` makes this process
a rank (nccl on CUDA, one GPU per rank; gloo on CPU). Rank 0 records the run in the registry as any
run; the other ranks `follower.follow` it and write nothing. On rank 0, SIGTERM (what torchrun sends
the survivors when a rank dies, or the run manager's cancel) becomes a cancel: if every rank is
alive they all stop before the same step and the run ends `cancelled` with its checkpoint; if a
rank is gone, rank 0's next collective fails and the run ends `failed` with a message that says so.

From the run manager (`launch`): `python -m torch.distributed.run --standalone` as a subprocess of
the CLI's train command, when the machine has more than one GPU and the Tuning Lab asks for it.
The subprocess's rank 0 creates the run folder (the manager follows it from disk like any run of
another process) and writes its id to a file, so the launcher knows which run it started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from toast_core.training import distributed
from toast_core.runs.config import RunConfig

def gpu_count() -> int:
    """CUDA devices visible here; a torchrun launch is offered when there are at least two."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _terminate_to_cancel(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # the CLI's cancel path: cancel the run, wait for its record


def join(config: RunConfig) -> distributed.World | None:
    """Under torchrun: join the process group, put the run on this rank's device, and on rank 0 turn
    SIGTERM into a cancel. None (nothing changes) outside a launch."""
    world = distributed.init_from_env(config.device)
    if world is None:
        return None
    config.device = distributed.device_for(world, config.device)
    if world.is_main:
        signal.signal(signal.SIGTERM, _terminate_to_cancel)
    else:  # Ctrl-C in a terminal reaches every rank: only rank 0 decides, the others follow its cancel
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return world


def write_run_id(path: str | os.PathLike[str] | None, run_id: str) -> None:
    """Tell a launcher which run rank 0 created (atomically: the reader never sees half an id)."""
    if path is None:
        return
    tmp = Path(f"{path}.tmp")
    tmp.write_text(run_id)
    os.replace(tmp, path)


def train_command(config_file: str | os.PathLike[str], config: RunConfig, runs_dir: str | os.PathLike[str],
                  backbone: str, nproc: int, run_id_file: str | os.PathLike[str],
                  weights: str | None = None) -> list[str]:
    """The torchrun command line that trains the RunConfig saved in `config_file` on `nproc` processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "toast_core", "train", "--method", config.method, "--task", config.task,
           "--run-config", str(config_file), "--runs-dir", str(runs_dir), "--backbone", backbone,
           "--quiet", "--run-id-file", str(run_id_file)]
    return cmd + (["--weights", weights] if weights else [])


@dataclass
class LaunchedRun:
    """A torchrun subprocess training one run; `run_id` once its rank 0 has created the record."""

    process: subprocess.Popen[bytes]
    run_id_file: Path
    runs_dir: Path
    nproc: int
    run_id: str | None = None
    log: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def wait_for_id(self, timeout: float = 120.0) -> str:
        """Block until rank 0 has created the run (or the launch died first: RuntimeError with its log)."""
        deadline = time.monotonic() + timeout
        while self.run_id is None:
            if self.run_id_file.is_file():
                self.run_id = self.run_id_file.read_text().strip()
                break
            code = self.process.poll()
            if code is not None:
                tail = self.log.read_text()[-1500:] if self.log and self.log.is_file() else ""
                raise RuntimeError(f"torchrun exited with code {code} before the run started. {tail}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no run was created within {timeout:.0f} s")
            time.sleep(0.1)
        return self.run_id

    def rank0_pid(self) -> int | None:
        """Rank 0's pid: the owner stamp of the run it records."""
        if self.run_id is None:
            return None
        try:
            status = json.loads((self.runs_dir / self.run_id / "status.json").read_text())
            return int(status["owner"]["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def cancel(self) -> None:
        """Ask rank 0 to cancel (every rank stops before the same step; checkpoint kept); without a run
        yet, stop the whole launch."""
        pid = self.rank0_pid()
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        elif self.process.poll() is None:
            self.process.terminate()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)


def launch(config: RunConfig, runs_dir: str | os.PathLike[str], backbone: str, nproc: int | None = None,
           *, weights: str | None = None, env: dict[str, str] | None = None) -> LaunchedRun:
    """Start `config` as a torchrun subprocess over `nproc` processes (default: every GPU)."""
    nproc = nproc or gpu_count()
    if nproc < 2:
        raise ValueError("A torchrun launch needs at least 2 processes (this machine has "
                         f"{gpu_count()} GPU(s)); run it in the ordinary queue instead.")
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = f"{os.getpid()}-{time.monotonic_ns()}"
    id_file = runs_dir / f".torchrun-{stamp}.id"
    log = runs_dir / f".torchrun-{stamp}.log"
    config_file = runs_dir / f".torchrun-{stamp}.json"
    config_file.write_text(json.dumps(config.to_dict()))
    cmd = train_command(config_file, config, runs_dir, backbone, nproc, id_file, weights)
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                   start_new_session=True)
    return LaunchedRun(process, id_file, runs_dir, nproc, log=log)


# --- the run manager's side -------------------------------------------------------------------------
_LAUNCHED: dict[str, LaunchedRun] = {}  # run id -> its launch, for cancel from this process


def backbone_spec(backbone: Any) -> str:
    """The CLI --backbone text that loads the same weights in a subprocess (hash-checked by `submit`)."""
    source, card = getattr(backbone, "source", ""), getattr(backbone, "card", {}) or {}
    if source == "file" and card.get("file"):
        return f"{str(backbone.name).split(':')[0]}@{card['file']}"
    if source in ("embedded", "fixture"):
        return source
    return str(backbone.name)


def submit(manager: Any, config: RunConfig, nproc: int | None = None, *, timeout: float = 300.0) -> str:
    """Launch `config` over `nproc` GPUs with torchrun and return its run id once rank 0 has created
    it; the manager then follows it from disk like any other process's run, and `cancel` reaches it."""
    backbone = manager.backbone
    if backbone is None:
        raise ValueError("The run manager has no backbone to launch a run on.")
    run = launch(config, manager.root, backbone_spec(backbone), nproc)
    run_id = run.wait_for_id(timeout)
    _LAUNCHED[run_id] = run
    status = json.loads((manager.root / run_id / "status.json").read_text())
    if status.get("backbone", {}).get("weights_hash") != backbone.weights_hash:
        run.cancel()
        raise ValueError(f"The torchrun processes loaded other backbone weights than this app's "
                         f"({backbone_spec(backbone)}); the run was cancelled.")
    manager.rescan()
    return run_id


def cancel(run_id: str) -> bool:
    """Cancel a run this process launched with torchrun; False when it did not launch it."""
    run = _LAUNCHED.get(run_id)
    if run is None or run.process.poll() is not None:
        return False
    run.cancel()
    return True
