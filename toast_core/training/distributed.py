"""Several processes, one run: `torchrun --nproc_per_node=N` over the steering module only.

Why an explicit gradient all-reduce and not `DistributedDataParallel`: DDP syncs the gradients of
the module whose `forward` it wrapped, but our steps do not always go through one forward (the
linear probe's head-only step on cached features calls `method.head`; TOAST runs two passes and
FORT reads captures), a rank may leave some parameters without a gradient (DDP then needs
`find_unused_parameters`), and the last global batch of an epoch can split unevenly. One call
after `backward()` — `reduce_gradients` — handles all of these the same way: every rank scales its
gradient by its share of the global batch (n_r / B) and the ranks sum, which is exactly the
gradient of the single-process mean loss over the same B images; a parameter gets a gradient when
any rank produced one (so AdamW skips the same parameters a single process would). Only the
method's `trainable_parameters()` are reduced; the frozen backbone is never wrapped, broadcast or
synchronised. What DDP would add is overlap of communication with the backward pass, which
matters little for modules of 0.1-15% of a ViT-B (full fine-tuning pays one all-reduce of the
copy's gradients per step).

Everything else that makes N processes equal one: `broadcast_module` at the start (every rank
holds rank 0's initial module), `rank_slice` (rank r takes its contiguous slice of the global batch
the single-process run draws from the same seeded order), `any_rank` (a cancel on any rank stops
every rank before the same step), `evaluate` (validation sharded over ranks, sums reduced).
Clipping runs after the reduce, on the averaged gradient, so it matches the single-process clip.
A rank that dies makes the others' next collective fail; that failure becomes a `RankFailure`
whose message says so, and the run manager records it as the run's error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from toast_core.data.base import LabeledImages
    from toast_core.data.files import FileSet
    from toast_core.methods.base import SteeringMethod

#: entry keys every rank already has the same value of (never averaged)
SHARED_KEYS = frozenset({"step", "lr"})
#: gradients are reduced in buckets of at most this many elements (bounds the extra memory)
BUCKET_ELEMENTS = 16 * 2**20
DEFAULT_TIMEOUT_S = 600.0


class RankFailure(RuntimeError):
    """Another rank of this distributed run stopped (killed, crashed, out of memory)."""


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank of size, the local GPU index, the backend."""

    rank: int
    size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True inside a `torchrun` launch with more than one process (WORLD_SIZE > 1)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


def current() -> World | None:
    """The initialised world of more than one process, or None (a plain single-process run)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return World(
        rank=dist.get_rank(),
        size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
        backend=str(dist.get_backend()),
    )


def init_from_env(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> World | None:
    """Join the process group torchrun describes (nccl on CUDA, gloo on CPU); None when not launched.

    On CUDA each process takes GPU LOCAL_RANK, so `device_for` and the backbone load agree."""
    if not launched():
        return None
    if dist.is_initialized():
        return current()
    use_cuda = torch.cuda.is_available() and not str(device).startswith("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return current()


def ensure_joined(device: torch.device) -> World | None:
    """The world a training loop on `device` belongs to. Inside a torchrun launch whose script never
    called `init_from_env` (a benchmark runner, a notebook), join on first use, so `train` still
    trains one run over every rank instead of N copies of it."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return current()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and (device.index or 0) != local_rank:
        raise ValueError(
            f"Under torchrun, rank with LOCAL_RANK={local_rank} trains on {device}; load the backbone on "
            f"cuda:{local_rank} (toast_core.training.distributed.device_for) so every rank has its own GPU."
        )
    return init_from_env("cuda" if device.type == "cuda" else "cpu")


def device_for(world: World | None, requested: str = "auto") -> str:
    """The device this rank trains on: its own GPU under nccl, else what was asked for."""
    if world is not None and world.backend == "nccl":
        return f"cuda:{world.local_rank}"
    if world is not None:
        return "cpu"
    return requested


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _guarded(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run one collective; a dead peer's error becomes a RankFailure that says what happened."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as exc:  # gloo: connection closed / reset; nccl: DistBackendError, timeouts
        world = current()
        where = f"rank {world.rank} of {world.size}" if world else "this rank"
        raise RankFailure(
            f"another rank of this distributed run stopped during {what} (seen from {where}); "
            f"the whole run ends here. ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
        ) from exc


def _comm_device(world: World) -> torch.device:
    return torch.device(f"cuda:{world.local_rank}") if world.backend == "nccl" else torch.device("cpu")


# --- the pieces the training loop calls ---------------------------------------------------------
def rank_slice(n: int, world: World) -> slice:
    """This rank's contiguous part of a global batch of n (sizes differ by at most one)."""
    return slice(n * world.rank // world.size, n * (world.rank + 1) // world.size)


def broadcast_module(method: torch.nn.Module, world: World) -> None:
    """Every rank takes rank 0's parameters and buffers (the backbone is not part of the module)."""
    with torch.no_grad():
        for tensor in method.state_dict().values():
            _guarded("the start-up broadcast", dist.broadcast, tensor, src=0)


def any_rank(flag: bool, world: World) -> bool:
    """True on every rank when it is true on any (a cancel seen by one stops all)."""
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device(world))
    _guarded("the cancel check", dist.all_reduce, t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def local_part(world: World, source: Any, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """This rank's part of a batch a batch source returned; a source marked `rank_aware` (it loads
    only this rank's slice itself, e.g. `data.streaming.FileBatches`) is passed through."""
    if getattr(source, "rank_aware", False):
        return images, targets
    part = rank_slice(len(images), world)
    return images[part], targets[part]


def reduce_gradients(world: World, params: Sequence[torch.nn.Parameter], n_local: int) -> int:
    """After backward, before unscaling / clipping: every rank's gradients become the gradient of the
    global batch's mean loss, sum_r (n_r / B) g_r. Returns B (the global batch size)."""
    device = _comm_device(world)
    head = torch.tensor(
        [float(n_local)] + [float(p.grad is not None) for p in params], dtype=torch.float64, device=device
    )
    _guarded("the gradient all-reduce", dist.all_reduce, head)
    n_global = int(head[0])
    if n_global <= 0:
        raise ValueError("Every rank had an empty batch.")
    share = n_local / n_global
    live = [p for p, flag in zip(params, head[1:].tolist()) if flag > 0]
    for p in live:
        if p.grad is None:  # another rank has a gradient for it: this rank's share is zero
            p.grad = torch.zeros_like(p)
    for bucket in _buckets(live):
        flat = torch.cat([p.grad.reshape(-1) for p in bucket]).mul_(share).to(device)
        _guarded("the gradient all-reduce", dist.all_reduce, flat)
        offset = 0
        for p in bucket:
            size = p.grad.numel()
            p.grad.copy_(flat[offset : offset + size].view_as(p.grad))
            offset += size
    return n_global


def reduce_metrics(world: World, n_local: int, entry: dict[str, float]) -> dict[str, float]:
    """A step's history entry as global means over every rank's images (weighted by batch share);
    `step` and `lr`, the same everywhere, are kept as they are."""
    keys = sorted(k for k in entry if k not in SHARED_KEYS)
    t = torch.tensor(
        [float(n_local)] + [entry[k] * n_local for k in keys], dtype=torch.float64, device=_comm_device(world)
    )
    _guarded("the metric reduce", dist.all_reduce, t)
    out = dict(entry)
    out.update({k: float(t[1 + i]) / float(t[0]) for i, k in enumerate(keys)})
    return out


def _buckets(params: Sequence[torch.nn.Parameter]) -> list[list[torch.nn.Parameter]]:
    """Consecutive groups of parameters of the same device and dtype, each <= BUCKET_ELEMENTS."""
    groups: list[list[torch.nn.Parameter]] = []
    size = 0
    for p in params:
        last = groups[-1] if groups else None
        fits = last is not None and size + p.numel() <= BUCKET_ELEMENTS
        if not (fits and last[0].grad.dtype == p.grad.dtype and last[0].grad.device == p.grad.device):  # type: ignore[index]
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.numel()
    return groups


def evaluate(
    method: SteeringMethod,
    data: LabeledImages | FileSet,
    world: World | None,
    batch_size: int = 64,
    cancel: Any = None,
) -> dict[str, float]:
    """`evaluation.evaluate` over this rank's shard (a FileSet is streamed in chunks), summed over
    ranks: {"acc", "loss", "n"}; {} when any rank was cancelled. `world` None: one process, all of it."""
    from toast_core.training.evaluation import evaluate as evaluate_local  # above this module's layer

    part = rank_slice(len(data), world) if world is not None else slice(0, len(data))
    shard = data.subset(list(range(part.start, part.stop)))
    chunks = shard.chunks(batch_size) if hasattr(shard, "chunks") else ([shard] if len(shard) else [])
    sums = [0.0, 0.0, 0.0]
    for chunk in chunks:
        if cancel is not None and cancel.is_set():
            break
        got = evaluate_local(method, chunk, batch_size, cancel=cancel)
        sums = [sums[0] + got["acc"] * got["n"], sums[1] + got["loss"] * got["n"], sums[2] + got["n"]]
    stopped = cancel is not None and cancel.is_set()
    t = torch.tensor([*sums, 1.0 if stopped else 0.0], dtype=torch.float64)
    if world is not None:
        t = t.to(_comm_device(world))
        _guarded("the evaluation reduce", dist.all_reduce, t)
    if t[3] > 0:
        return {}
    total = max(float(t[2]), 1.0)
    return {"acc": float(t[0]) / total, "loss": float(t[1]) / total, "n": int(t[2])}


def gather_tensor(value: Tensor, world: World) -> list[Tensor]:
    """Every rank's copy of a same-shaped tensor (rank order), e.g. to check that modules agree."""
    device = _comm_device(world)
    parts = [torch.empty_like(value, device=device) for _ in range(world.size)]
    _guarded("a gather", dist.all_gather, parts, value.to(device))
    return [p.cpu() for p in parts]
