"""Process groups as a value: `ParallelState` is built once from torch.distributed and passed down.

Rank layout follows Megatron: tensor-parallel ranks are adjacent (they talk most, so they share a
node), then data-parallel, then pipeline::

    rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank

Nothing here is stored in module globals; two `ParallelState`s can coexist (tests build several).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

GROUP_NAMES = ("tp", "dp", "pp", "embedding")
# Bytes are counted per bucket; the embedding group (first + last pipeline stage) counts as "pp".
BUCKETS = ("dp", "tp", "pp")
_BUCKET_OF_GROUP = {"tp": "tp", "dp": "dp", "pp": "pp", "embedding": "pp"}


class CommCounter:
    """Bytes this process sent, per group bucket, since the last `reset`."""

    def __init__(self):
        self._bytes = dict.fromkeys(BUCKETS, 0)
        # Overlapped gradient reduction counts from its communication thread.
        self._lock = threading.Lock()

    def add(self, group_name: str, nbytes: int) -> None:
        bucket = _BUCKET_OF_GROUP.get(group_name)
        if bucket is None:
            raise ValueError(f"unknown group {group_name!r}; use one of {', '.join(_BUCKET_OF_GROUP)}")
        assert nbytes >= 0, nbytes
        with self._lock:
            self._bytes[bucket] += int(nbytes)

    def reset(self) -> None:
        self._bytes = dict.fromkeys(BUCKETS, 0)

    def snapshot(self) -> dict[str, int]:
        return {f"{bucket}_bytes": count for bucket, count in self._bytes.items()}

    def since(self, earlier: dict[str, int]) -> dict[str, int]:
        """Bytes sent after `earlier` (a `snapshot`), for measuring one region without resetting."""
        return {key: count - earlier.get(key, 0) for key, count in self.snapshot().items()}


@dataclass(frozen=True)
class GroupLayout:
    """Which global ranks form each group, for every group of the world (not just this rank's)."""

    tp: tuple[tuple[int, ...], ...]
    dp: tuple[tuple[int, ...], ...]
    pp: tuple[tuple[int, ...], ...]
    embedding: tuple[tuple[int, ...], ...]  # empty when pp_size == 1

    def containing(self, name: str, rank: int) -> tuple[int, ...]:
        """The ranks of the `name` group that `rank` belongs to (empty if it belongs to none)."""
        for ranks in getattr(self, name):
            if rank in ranks:
                return ranks
        return ()


def check_sizes(world_size: int, tp_size: int, pp_size: int) -> int:
    """Validates the layout and returns the data-parallel size."""
    for flag, size in (("--tensor-model-parallel-size", tp_size), ("--pipeline-model-parallel-size", pp_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{flag} must be a positive integer, got {size!r}")
    if world_size % (tp_size * pp_size) != 0:
        raise ValueError(
            f"world size {world_size} is not divisible by tensor-parallel size {tp_size} x "
            f"pipeline-parallel size {pp_size}; launch a multiple of {tp_size * pp_size} processes or "
            f"change --tensor-model-parallel-size / --pipeline-model-parallel-size")
    return world_size // (tp_size * pp_size)


def group_layout(world_size: int, tp_size: int = 1, pp_size: int = 1) -> GroupLayout:
    """All groups of a world under Megatron's ordering; pure, so layouts are testable without processes."""
    dp_size = check_sizes(world_size, tp_size, pp_size)
    stride_pp = dp_size * tp_size

    def rank_of(pp_rank: int, dp_rank: int, tp_rank: int) -> int:
        return pp_rank * stride_pp + dp_rank * tp_size + tp_rank

    tp = [tuple(rank_of(p, d, t) for t in range(tp_size)) for p in range(pp_size) for d in range(dp_size)]
    dp = [tuple(rank_of(p, d, t) for d in range(dp_size)) for p in range(pp_size) for t in range(tp_size)]
    pp = [tuple(rank_of(p, d, t) for p in range(pp_size)) for d in range(dp_size) for t in range(tp_size)]
    # Tied input/output embeddings live on the first and last stage; their gradients meet here.
    embedding = [(ranks[0], ranks[-1]) for ranks in pp] if pp_size > 1 else []
    return GroupLayout(tuple(tp), tuple(dp), tuple(pp), tuple(embedding))


@dataclass(frozen=True, eq=False)
class ParallelState:
    """This process's place in the tensor x data x pipeline grid, and its process groups.

    Groups are None only when torch.distributed is not in use (`single`); with it, every group
    exists even when its size is 1, so a stray ``group=None`` can never silently mean "the world".
    """

    world_size: int
    rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    backend: str | None
    tp_group: Any = None
    pp_group: Any = None
    dp_group: Any = None
    embedding_group: Any = None
    tp_ranks: tuple[int, ...] = (0,)
    dp_ranks: tuple[int, ...] = (0,)
    pp_ranks: tuple[int, ...] = (0,)
    embedding_ranks: tuple[int, ...] = ()
    # Bytes sent through these groups (`megatron.core.distributed.comm` adds to it); shared by
    # every `replace`d copy of this state.
    counter: CommCounter = field(default_factory=CommCounter, compare=False, repr=False)

    def __post_init__(self):
        assert self.world_size == self.tp_size * self.dp_size * self.pp_size, self
        expected = self.pp_rank * self.dp_size * self.tp_size + self.dp_rank * self.tp_size + self.tp_rank
        assert self.rank == expected, (self.rank, expected)

    # ----- construction ------------------------------------------------------------------------
    @classmethod
    def single(cls, device: torch.device | str | None = None) -> ParallelState:
        """One process, no torch.distributed: every group has size 1 and every collective is identity."""
        return cls(world_size=1, rank=0, tp_size=1, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0,
                   dp_rank=0, device=_resolve_device(device), backend=None)

    @classmethod
    def build(cls, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
              device: torch.device | str | None = None) -> ParallelState:
        """Creates every subgroup on every rank, in the same order, as torch.distributed requires."""
        tp_size, pp_size = tensor_model_parallel_size, pipeline_model_parallel_size
        if not (dist.is_available() and dist.is_initialized()):
            check_sizes(1, tp_size, pp_size)  # a single process fits only tp = pp = 1
            return cls.single(device)
        world_size, rank = dist.get_world_size(), dist.get_rank()
        layout = group_layout(world_size, tp_size, pp_size)
        groups = _new_groups(layout, rank)
        dp_size = world_size // (tp_size * pp_size)
        backend = str(dist.get_backend())
        return cls(world_size=world_size, rank=rank, tp_size=tp_size, pp_size=pp_size, dp_size=dp_size,
                   tp_rank=rank % tp_size, dp_rank=(rank // tp_size) % dp_size,
                   pp_rank=rank // (tp_size * dp_size),
                   device=_resolve_device(device, backend), backend=backend,
                   tp_group=groups["tp"], dp_group=groups["dp"], pp_group=groups["pp"],
                   embedding_group=groups["embedding"],
                   tp_ranks=layout.containing("tp", rank), dp_ranks=layout.containing("dp", rank),
                   pp_ranks=layout.containing("pp", rank),
                   embedding_ranks=layout.containing("embedding", rank))

    def replace(self, **changes) -> ParallelState:
        return dataclasses.replace(self, **changes)

    # ----- lookup by name ----------------------------------------------------------------------
    def group(self, name: str):
        """The process group called `name` ("tp", "dp", "pp" or "embedding"); None without distributed."""
        _check_name(name)
        return getattr(self, f"{name}_group")

    def group_size(self, name: str) -> int:
        _check_name(name)
        if name == "embedding":
            return len(self.embedding_ranks) if self.embedding_ranks else 1
        return getattr(self, f"{name}_size")

    def group_rank(self, name: str) -> int:
        """This process's index inside its `name` group."""
        _check_name(name)
        return self.ranks(name).index(self.rank) if name == "embedding" else getattr(self, f"{name}_rank")

    def ranks(self, name: str) -> tuple[int, ...]:
        """Global ranks of this process's `name` group, in group order."""
        _check_name(name)
        ranks = getattr(self, f"{name}_ranks")
        return ranks if ranks else (self.rank,)

    # ----- pipeline neighbours -----------------------------------------------------------------
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next pipeline stage; wraps around as in Megatron (for interleaving)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_rank(self) -> int:
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def is_embedding_rank(self) -> bool:
        """True on the stages that hold a copy of a tied embedding (first and last)."""
        return self.is_first_stage or self.is_last_stage

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp_size}, "
                f"dp {self.dp_rank}/{self.dp_size}, pp {self.pp_rank}/{self.pp_size} on {self.device}")


def _check_name(name: str) -> None:
    if name not in GROUP_NAMES:
        raise ValueError(f"unknown process group {name!r}; use one of {', '.join(GROUP_NAMES)}")


def _new_groups(layout: GroupLayout, rank: int) -> dict[str, Any]:
    """`new_group` is collective over the world, so every rank creates every group in one order."""
    mine: dict[str, Any] = {"embedding": None}
    for name in GROUP_NAMES:
        for ranks in getattr(layout, name):
            group = dist.new_group(list(ranks))
            if rank in ranks:
                mine[name] = group
    assert all(name in mine for name in GROUP_NAMES), mine.keys()
    return mine


def _resolve_device(device: torch.device | str | None, backend: str | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    use_cuda = torch.cuda.is_available() and (backend is None or "nccl" in backend)
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")


# ----- process start ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DistributedEnv:
    """What `init_distributed` found: enough to build a `ParallelState` or to log the launch."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.backend is not None


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> DistributedEnv:
    """Initialises torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); gloo on CPU, NCCL on CUDA. A single process is left alone."""
    if dist.is_available() and dist.is_initialized():
        return _current_env()
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return DistributedEnv(0, 1, 0, None, _resolve_device(None))
    rank, local_rank = _env_int("RANK", None), _env_int("LOCAL_RANK", 0)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if rank is None or missing:
        raise ValueError(f"WORLD_SIZE={world_size} but {', '.join(missing or ['RANK'])} is not set; "
                         f"launch with torchrun (or set RANK, MASTER_ADDR and MASTER_PORT)")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    device_id = None
    if "nccl" in backend:
        # Before the first collective, so NCCL binds each process to its own GPU.
        torch.cuda.set_device(local_rank)
        device_id = torch.device("cuda", local_rank)
    dist.init_process_group(backend=backend, init_method="env://", world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s), device_id=device_id)
    return _current_env(local_rank)


def _current_env(local_rank: int | None = None) -> DistributedEnv:
    backend = str(dist.get_backend())
    local_rank = _env_int("LOCAL_RANK", 0) if local_rank is None else local_rank
    return DistributedEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend,
                          _resolve_device(None, backend))


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; "
                         f"let torchrun set it") from None
