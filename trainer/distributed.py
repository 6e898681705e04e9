"""Training over several processes with torch.distributed (torchrun): ranks, shards and what only rank 0 does."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

# torch is imported only where a distributed run needs it: a plain `chronorec-train run` that
# finds nothing new must stay quick.

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in a distributed run. A plain run is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that tunes, evaluates, publishes and activates."""
        return self.rank == 0

    def shard(self, rows: Sequence[T]) -> list[T]:
        """This rank's share of one global batch: every world_size-th row from its rank on, so
        the ranks together see the batch a single process would, each a disjoint part."""
        return list(rows[self.rank :: self.world_size])

    def device(self, name: str) -> str:
        """The device of this rank: with several ranks on one machine, "auto" and "cuda" mean
        this rank's own GPU (LOCAL_RANK), as torchrun starts one process per GPU."""
        if not self.distributed or name not in ("auto", "cuda"):
            return name
        import torch

        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return "cpu" if name == "auto" else name

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` on every rank (any picklable object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def current() -> Ranks:
    """The ranks of the process group already set up, or a plain single-process run."""
    if "torch.distributed" not in sys.modules:
        return Ranks()  # no process group can exist without it
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        return Ranks(dist.get_rank(), dist.get_world_size(), local)
    return Ranks()


def init_from_env() -> Ranks:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1): NCCL when
    this rank has a GPU, gloo on CPUs. Without torchrun, a single-process run."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available() and torch.cuda.device_count() > local_rank:
            torch.cuda.set_device(local_rank)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        log.info("rank %d of %d joined the process group (%s)", dist.get_rank(), world_size, backend)
    return current()


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def weights_digest(module) -> str:
    """A digest of every weight, in parameter order: equal on two ranks exactly when their weights are."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        digest.update(name.encode("utf-8"))
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def wrap(module, ranks: Ranks, device) -> Any:
    """`module` in DistributedDataParallel (gradients averaged over the ranks at each backward),
    or None in a single-process run. find_unused_parameters: the encoder's pooler and frozen
    layers give no gradient."""
    if not ranks.distributed:
        return None
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True)


__all__ = ["Ranks", "current", "init_from_env", "shutdown", "weights_digest", "wrap"]
