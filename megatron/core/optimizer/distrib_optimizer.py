"""Megatron's distributed optimizer (ZeRO stage 1): FP32 master weights and Adam moments sharded
over the data-parallel group.

Ownership follows the grad buffer of a `DistributedDataParallel` built with
``use_distributed_optimizer=True``: every bucket is padded to a multiple of dp_size and split into
dp_size equal contiguous chunks, and data-parallel rank r owns chunk r of every bucket. Sharding
per bucket rather than the buffer as a whole keeps each reduce-scatter and all-gather one bucket
long, so they could overlap with backward and forward as in Megatron.

A step, on every rank:
1. `finish_grad_sync` has reduce-scattered the buckets: the owned chunks hold the averaged gradient;
2. the global gradient norm is summed from the owned chunks (over dp, then tp and pp by
   `global_grad_norm`'s rule that replicated parameters count once); a non-finite norm skips the
   step on every rank with nothing changed;
3. clipping, then AdamW on the owned elements only (masters, moments: 1/dp of the model each);
4. every bucket's updated chunk is all-gathered in the parameters' dtype into every rank's model.

Parameters that are already FP32 are their own masters: the optimizer updates their owned
elements in place (through views) instead of keeping a copy, as Megatron does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron.core.distributed import comm
from megatron.core.distributed.data_parallel import DistributedDataParallel
from megatron.core.optimizer import (
    Optimizer, OptimizerConfig, StepResult, _no_weight_decay, clip_coefficient, global_grad_square_sum,
    norm_from_squares,
)
from megatron.core.parallel_state import ParallelState

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class OwnedSegment:
    """The contiguous part of one parameter that this data-parallel rank updates."""

    param: nn.Parameter
    start: int                # in the flattened (tensor-parallel local) parameter
    end: int
    bucket: int               # index into the grad buffer's buckets
    chunk_start: int          # offset inside this rank's chunk of that bucket
    master_start: int | None  # offset in the flat FP32 master shard; None: the param is its own master

    @property
    def numel(self) -> int:
        return self.end - self.start

    @property
    def chunk_slice(self) -> slice:
        return slice(self.chunk_start, self.chunk_start + self.numel)


def owned_segments(ddp: DistributedDataParallel, dp_rank: int, dp_size: int) -> list[OwnedSegment]:
    """What data-parallel rank `dp_rank` owns of each parameter, in grad-buffer order."""
    segments, master_numel = [], 0
    grad_buffer = ddp.grad_buffer
    for index, bucket in enumerate(grad_buffer.buckets):
        chunk_numel = bucket.numel // dp_size
        owned_lo = bucket.offset + dp_rank * chunk_numel
        owned_hi = owned_lo + chunk_numel
        for param in bucket.params:
            param_lo, param_hi = grad_buffer.param_ranges[param]
            lo, hi = max(param_lo, owned_lo), min(param_hi, owned_hi)
            if lo >= hi:
                continue
            master_start = None if param.dtype == torch.float32 else master_numel
            segments.append(OwnedSegment(param, lo - param_lo, hi - param_lo, index, lo - owned_lo, master_start))
            if master_start is not None:
                master_numel += hi - lo
    return segments


def _check_pairing(named_params: list[tuple[str, nn.Parameter]], ddp) -> None:
    if not isinstance(ddp, DistributedDataParallel) or not ddp.use_distributed_optimizer:
        raise ValueError("DistributedOptimizer needs the model wrapped as DistributedDataParallel(model, ps, "
                         "use_distributed_optimizer=True), whose buffer it shards")
    if ddp.grad_buffer.dtype != torch.float32:
        raise ValueError(f"DistributedOptimizer updates from an FP32 grad buffer, got {ddp.grad_buffer.dtype}; "
                         f"build DistributedDataParallel with grad_dtype=torch.float32")
    mine = {id(p) for _, p in named_params}
    buffered = {id(p) for p in ddp.grad_buffer.param_ranges}
    if mine != buffered:
        raise ValueError(f"DistributedOptimizer got {len(mine)} parameters but the grad buffer holds "
                         f"{len(buffered)}; pass exactly the model's trainable parameters "
                         f"([(n, p) for n, p in model.named_parameters() if p.requires_grad])")
    for name, param in named_params:
        if not param.is_contiguous():
            raise ValueError(f"parameter {name} is not contiguous; make it contiguous before building the optimizer")


class DistributedOptimizer(Optimizer):
    """AdamW over data-parallel shards of the FP32 masters; the interface of MixedPrecisionOptimizer."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], config: OptimizerConfig,
                 ps: ParallelState, ddp: DistributedDataParallel):
        _check_pairing(named_params, ddp)
        assert ddp.ps.dp_size == ps.dp_size and ddp.ps.dp_rank == ps.dp_rank, "ddp built for another layout"
        self.config, self.ps, self.ddp = config, ps, ddp
        self.params = [p for _, p in named_params]
        buckets = ddp.grad_buffer.buckets
        self._grad_chunks = [b.shard(ps.dp_rank, ps.dp_size) for b in buckets]
        self._segments = owned_segments(ddp, ps.dp_rank, ps.dp_size)
        self._segment_of = {id(s.param): s for s in self._segments}
        self._bucket_segments = [[s for s in self._segments if s.bucket == i] for i in range(len(buckets))]
        # The norm sums per-tensor squares in the plain optimizer's order, so DP = 1 matches it bit for bit.
        self._norm_segments = [self._segment_of[id(p)] for p in self.params if id(p) in self._segment_of]
        self._master = self._initial_master_shard()
        self._exp_avg: list[torch.Tensor] | None = None  # per bucket chunk, allocated at the first update
        self._exp_avg_sq: list[torch.Tensor] | None = None
        self._step = 0
        self.param_groups = self._build_param_groups(named_params)
        self._group_segments = [[self._segment_of[id(p)] for p in g["params"] if id(p) in self._segment_of]
                                for g in self.param_groups]

    def _initial_master_shard(self) -> torch.Tensor:
        separate = [s for s in self._segments if s.master_start is not None]
        if not separate:
            return torch.zeros(0, dtype=torch.float32, device=self._grad_chunks[0].device if self._grad_chunks
                               else self.ps.device)
        with torch.no_grad():
            return torch.cat([s.param.detach().reshape(-1)[s.start:s.end].float() for s in separate])

    def _build_param_groups(self, named_params) -> list[dict]:
        """As MixedPrecisionOptimizer's: the scheduler writes each group's "lr" before every step."""
        decay = [p for n, p in named_params if not _no_weight_decay(n, p)]
        no_decay = [p for n, p in named_params if _no_weight_decay(n, p)]
        groups = [{"params": decay, "lr": self.config.lr, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "lr": self.config.lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    # ----- views ----------------------------------------------------------------------------------
    def _master_view(self, segment: OwnedSegment) -> torch.Tensor:
        if segment.master_start is None:
            return segment.param.detach().view(-1)[segment.start:segment.end]
        return self._master[segment.master_start:segment.master_start + segment.numel]

    def _grad_view(self, segment: OwnedSegment) -> torch.Tensor:
        return self._grad_chunks[segment.bucket][segment.chunk_slice]

    def _state_view(self, key: str, segment: OwnedSegment) -> torch.Tensor:
        return getattr(self, f"_{key}")[segment.bucket][segment.chunk_slice]

    # ----- the step -------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> StepResult:
        norm = self.grad_norm()
        if not math.isfinite(norm):
            return StepResult(skipped=True, grad_norm=norm)
        self.apply(clip_coefficient(self.config.clip_grad, norm))
        return StepResult(skipped=False, grad_norm=norm)

    def grad_norm(self) -> float:
        return norm_from_squares(self.grad_norm_squared_tensor().item())  # one read of the device

    def grad_norm_squared(self) -> float:
        return self.grad_norm_squared_tensor().item()

    def grad_norm_squared_tensor(self) -> torch.Tensor:
        """The model's sum of squares (float64, on the device; non-finite as inf): this rank's
        chunks, already summed over tp and pp, then summed over dp."""
        segments = self._norm_segments
        squares = global_grad_square_sum([s.param for s in segments], [self._grad_view(s) for s in segments],
                                         self.ps, self.ddp.layouts).double()
        comm.all_reduce(squares, self.ps, "dp")
        return torch.where(torch.isfinite(squares), squares, math.inf)

    @torch.no_grad()
    def apply(self, coefficient: float) -> None:
        """Scale the owned gradients by the clipping `coefficient`, update, all-gather."""
        if coefficient < 1.0 and self._grad_chunks:
            torch._foreach_mul_(self._grad_chunks, coefficient)
        self._adamw_update()
        self._all_gather_params(overlap=self.ddp.overlap_param_gather)

    def _ensure_adam_state(self) -> None:
        if self._exp_avg is None:
            self._exp_avg = [torch.zeros_like(chunk) for chunk in self._grad_chunks]
            self._exp_avg_sq = [torch.zeros_like(chunk) for chunk in self._grad_chunks]

    def _adamw_update(self) -> None:
        """torch.optim.AdamW's foreach arithmetic, op for op, so results match it to the last bit
        or nearly; moments run over whole chunks (padding stays zero), decay and update per group."""
        self._ensure_adam_state()
        self._step += 1
        if not self._grad_chunks:  # nothing trainable; foreach ops refuse empty lists
            return
        beta1, beta2, eps = self.config.adam_beta1, self.config.adam_beta2, self.config.adam_eps
        torch._foreach_lerp_(self._exp_avg, self._grad_chunks, 1 - beta1)
        torch._foreach_mul_(self._exp_avg_sq, beta2)
        torch._foreach_addcmul_(self._exp_avg_sq, self._grad_chunks, self._grad_chunks, 1 - beta2)
        bias_correction1 = 1 - beta1 ** float(self._step)
        bias_correction2_sqrt = (1 - beta2 ** float(self._step)) ** 0.5
        denoms = torch._foreach_sqrt(self._exp_avg_sq)
        torch._foreach_div_(denoms, bias_correction2_sqrt)
        torch._foreach_add_(denoms, eps)
        for group, segments in zip(self.param_groups, self._group_segments):
            if not segments:
                continue
            masters = [self._master_view(s) for s in segments]
            lr, weight_decay = group["lr"], group["weight_decay"]
            if weight_decay != 0:
                torch._foreach_mul_(masters, 1 - lr * weight_decay)
            torch._foreach_addcdiv_(masters, [self._state_view("exp_avg", s) for s in segments],
                                    [denoms[s.bucket][s.chunk_slice] for s in segments], (lr / bias_correction1) * -1)

    def _all_gather_params(self, overlap: bool = False) -> None:
        """Every rank's updated chunk, cast to the parameters' dtype, into every rank's model;
        with `overlap` (``--overlap-param-gather``) by the communication thread, bucket by bucket in
        the order the next forward needs them, each waited for by the forward that reads it."""
        buckets = list(enumerate(self.ddp.grad_buffer.buckets))
        if not overlap:
            for index, _ in buckets:
                self._gather_bucket(index, self.ps)
            return
        n = self.ps.dp_size
        for index, bucket in reversed(buckets):  # buckets run in backward order; forward needs the last first
            nbytes = comm.ring_bytes("all_gather", self._grad_chunks[index].numel() * n * bucket.params[0].element_size(), n)
            self.ddp.gather_async(bucket.params, lambda ps, i=index: self._gather_bucket(i, ps), nbytes)

    def _gather_bucket(self, index: int, ps) -> None:
        bucket = self.ddp.grad_buffer.buckets[index]
        ranges = self.ddp.grad_buffer.param_ranges
        chunk = torch.zeros(self._grad_chunks[index].numel(), dtype=bucket.params[0].dtype,
                            device=self._grad_chunks[index].device)
        owned = self._bucket_segments[index]
        if owned:
            torch._foreach_copy_([chunk[s.chunk_slice] for s in owned], [self._master_view(s) for s in owned])
        gathered = comm.all_gather(chunk, ps, "dp")
        local = [gathered[ranges[p][0] - bucket.offset:ranges[p][1] - bucket.offset] for p in bucket.params]
        torch._foreach_copy_([p.detach().view(-1) for p in bucket.params], local)

    # ----- memory accounting (bytes this rank holds) ----------------------------------------------
    def master_bytes(self) -> int:
        return self._master.numel() * self._master.element_size()

    def optim_bytes(self) -> int:
        if self._exp_avg is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self._exp_avg, *self._exp_avg_sq))

    # ----- checkpoints: per-parameter state (the contract shared with MixedPrecisionOptimizer) ----
    def step_count(self) -> int:
        """Optimizer updates taken so far (skipped steps excluded): Adam's bias-correction step."""
        return self._step

    def local_state(self) -> dict[nn.Parameter, dict]:
        """Per parameter this rank updates: "range" (start, end) of its flattened local shard, and
        its FP32 "master" and (after the first update) "exp_avg", "exp_avg_sq" over that range.
        Copies, so saving one does not save the whole flat shard it would otherwise view."""
        states = {}
        for segment in self._segments:
            entry = {"range": (segment.start, segment.end), "master": self._master_view(segment).float().clone()}
            if self._exp_avg is not None:
                for key in ADAM_KEYS:
                    entry[key] = self._state_view(key, segment).clone()
            states[segment.param] = entry
        return states

    @torch.no_grad()
    def load_local_state(self, full_states: dict[nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        """Install state given per parameter as whole local shards shaped like the parameter
        ("master", "exp_avg", "exp_avg_sq"): this rank keeps the ranges it owns, and each given
        parameter is set from its master. Parameters not in `full_states` keep their state."""
        for param in self.params:
            given = full_states.get(param)
            if given is None:
                continue
            for key, value in given.items():
                if key in ("master", *ADAM_KEYS) and value.numel() != param.numel():
                    raise ValueError(f"{key} for a parameter of shape {tuple(param.shape)} has {value.numel()} "
                                     f"elements; give the whole tensor-parallel shard, shaped like the parameter")
            if "master" in given:
                param.copy_(given["master"].view_as(param))
            self._load_owned_range(param, given)
        self._step = int(step)

    def _load_owned_range(self, param: nn.Parameter, given: dict[str, torch.Tensor]) -> None:
        segment = self._segment_of.get(id(param))
        if segment is None:
            return
        if "master" in given:
            self._master_view(segment).copy_(given["master"].reshape(-1)[segment.start:segment.end])
        if all(key in given for key in ADAM_KEYS):
            self._ensure_adam_state()
            for key in ADAM_KEYS:
                self._state_view(key, segment).copy_(given[key].reshape(-1)[segment.start:segment.end])

    # ----- same-layout resume: this rank's flat shard as it is ------------------------------------
    def _layout(self) -> dict:
        return {"dp_size": self.ps.dp_size, "dp_rank": self.ps.dp_rank,
                "chunk_numels": [c.numel() for c in self._grad_chunks]}

    def state_dict(self) -> dict:
        """This rank's shard, valid only for the same data-parallel layout and model (else use
        `local_state` / `load_local_state`, which reshard)."""
        state = {"layout": self._layout(), "step": self._step, "master": self._master.clone(),
                 "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]}
        if self._exp_avg is not None:
            for key in ADAM_KEYS:
                state[key] = [t.clone() for t in getattr(self, f"_{key}")]
        return state

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Collective over the data-parallel group: the loaded masters are all-gathered into the model."""
        if state.get("layout") != self._layout():
            raise ValueError(f"distributed optimizer state was saved for layout {state.get('layout')} but this "
                             f"run has {self._layout()}; load it through local_state / load_local_state "
                             f"(the checkpoint's resharding path) instead")
        self._master.copy_(state["master"])
        if "exp_avg" in state and self._grad_chunks:
            self._ensure_adam_state()
            for key in ADAM_KEYS:
                torch._foreach_copy_(getattr(self, f"_{key}"), [t.to(self._master.device) for t in state[key]])
        for group, saved in zip(self.param_groups, state["param_groups"]):
            group.update(saved)
        self._step = int(state["step"])
        self._all_gather_params()
