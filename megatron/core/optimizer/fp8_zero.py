"""The FP8 weights' part of the optimizer at level O3: FP8 ZeRO with greedy whole-tensor
distribution.

Every rank stores the transformer linear weights in FP8 E4M3 with a per-tensor scale (one byte
each, `fp8.params`), which is what the FP8 GEMMs read. Each weight has one owner among the
data-parallel ranks (`megatron.core.distributed.fp8_zero.FP8ZeroLayout`); the precision plan
(`megatron.core.precision.apply_precision`) decides the owners, makes the weights FP8 and gives
each owner an FP16 master with a scale of its weights; the DDP wrapper delivers the reduced FP8
gradients to the owners. Here the owners update their masters and Adam moments (FP8 / FP16 at the
defaults) with `fp8.optim.FP8AdamW`, re-quantize their weights from the masters, and one collective
per run of buckets (payloads and scales in one message: a padded all-gather, or broadcasts from
the owners, `FP8ZeroLayout.publication_groups`) gives every rank the new weights.

As a part of a `ChainedOptimizer` (with the dense optimizer, sharded by the distributed optimizer
as at any level): one norm over the dense part and the owners' FP8 gradients (summed over dp as
well, since each owner holds its tensors alone); a skipped step publishes nothing.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fp8.gradients import FP8GradStore
from fp8.optim import ScaledFP16Parameter, scaled_value, to_scaled_fp16
from fp8.params import SCALE_BYTES, fp8_weight_from_master, param_value
from fp8.scaling import default_chunk_numel
from megatron.core.distributed import comm
from megatron.core.distributed.fp8_zero import FP8ZeroLayout
from megatron.core.optimizer import OptimizerConfig
from megatron.core.optimizer.fp8_optimizer import FP8WeightOptimizer, fp8_adamw, fp8_grad_square_sum
from megatron.core.parallel_state import ParallelState


class FP8ZeroWeightOptimizer(FP8WeightOptimizer):
    def __init__(self, config: OptimizerConfig, ps: ParallelState, *, layout: FP8ZeroLayout,
                 masters: dict[nn.Parameter, ScaledFP16Parameter], fp8_grads: FP8GradStore, exp_avg_dtype: str,
                 exp_avg_sq_dtype: str, stochastic_rounding: bool = False, seed: int = 0, ddp=None):
        """`layout` and `masters` (this rank's owned weights -> FP16 masters) are the precision
        plan's; `fp8_grads`: where the reduction leaves the owned tensors' FP8 gradients; `ddp`:
        the data-parallel wrapper, whose communication thread runs the weight all-gathers under
        ``--overlap-param-gather``."""
        self.config, self.ps, self.layout, self.fp8_grads = config, ps, layout, fp8_grads
        self.ddp = ddp  # as the base class keeps it
        self.overlap_param_gather = ddp is not None and ddp.overlap_param_gather
        self.master_grads = FP8GradStore()  # the owned gradients, filed under their masters for FP8AdamW
        self.publish_dp_bytes = 0
        self.fp8_params, self.owners = layout.params, layout.owners
        self.owned = layout.owned(ps.dp_rank)
        assert [id(p) for p in masters] == [id(p) for p in self.owned], "masters are the owned weights'"
        self.masters = masters
        self.fp8 = fp8_adamw(list(self.masters.values()), self.master_grads, config, ps, exp_avg_dtype=exp_avg_dtype,
                             exp_avg_sq_dtype=exp_avg_sq_dtype, stochastic_rounding=stochastic_rounding, seed=seed)

    def grad_norm_squared(self) -> float:
        return self.grad_norm_squared_tensor().item()

    def grad_norm_squared_tensor(self) -> torch.Tensor:
        return fp8_grad_square_sum(self.fp8_params, self.fp8_grads, self.ps, owned=self.owned)

    def _fp8_step(self) -> None:
        for param, master in self.masters.items():
            self.master_grads.set(master, self.fp8_grads.get(param))
        self.fp8.step()
        self.master_grads.clear()

    @torch.no_grad()
    def _publish(self, overlap: bool | None = None) -> None:
        """Owners re-quantize their weights; one collective per run of buckets
        (`FP8ZeroLayout.publication_groups`, bounded by the FP8 chunk's bytes) delivers them -
        with ``--overlap-param-gather`` by the communication thread, in the order the next forward
        needs them, each waited for by the forward that reads it."""
        groups = self.layout.publication_groups(4 * default_chunk_numel())
        if not (self.overlap_param_gather if overlap is None else overlap):
            for by_rank in groups:
                self._publish_group(by_rank, self.ps)
            return
        for by_rank in reversed(groups):  # forward needs the last bucket first
            nbytes = comm.all_gather_uneven_bytes(self._group_numels(by_rank))
            self.ddp.gather_async([p for params in by_rank for p in params],
                                  lambda ps, group=by_rank: self._publish_group(group, ps), nbytes)

    @staticmethod
    def _group_numels(by_rank) -> list[int]:
        return [sum(p.numel() for p in params) + SCALE_BYTES * len(params) for params in by_rank]

    def _publish_group(self, by_rank, ps) -> None:
        rank = self.ps.dp_rank
        pieces = [fp8_weight_from_master(self.masters[p], p.cast, p.scale) for p in by_rank[rank]]
        local = torch.cat([payload.reshape(-1).view(torch.uint8) for payload, _ in pieces]
                          + [torch.stack([scale.float() for _, scale in pieces]).view(torch.uint8)
                             if pieces else torch.empty(0, dtype=torch.uint8, device=self.ps.device)])
        for params, data in zip(by_rank, comm.all_gather_uneven(local, self._group_numels(by_rank), ps, "dp")):
            self._unpack(params, data)

    @staticmethod
    def _unpack(params: list[nn.Parameter], data: torch.Tensor) -> None:
        payload_numel = sum(p.numel() for p in params)
        scales = data[payload_numel:].view(torch.float32)
        for param, payload, scale in zip(params, data[:payload_numel].split([p.numel() for p in params]), scales):
            param.copy_(payload.view(param.dtype).view(param.shape))
            param.scale.copy_(scale)

    # ----- memory accounting ---------------------------------------------------------------------
    def _master_bytes(self) -> int:
        return sum(m.numel() * m.element_size() + SCALE_BYTES for m in self.masters.values())

    def master_bytes(self) -> int:
        return self._master_bytes()

    def fp8_state_bytes(self) -> int:
        return self._master_bytes() + (self.fp8.state_bytes() if self.fp8 is not None else 0)

    # ----- checkpoints -------------------------------------------------------------------------
    def local_state(self) -> dict[nn.Parameter, dict]:
        """Each owned FP8 weight's master value and FP32 moments, whole."""
        out = {}
        for param, master in self.masters.items():
            entry = {"range": (0, param.numel()), "master": scaled_value(master).reshape(-1)}
            entry.update({k: v.reshape(-1) for k, v in self.fp8.state_fp32(master).items()})
            out[param] = entry
        return out

    @torch.no_grad()
    def load_local_state(self, full_states: dict[nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        """Owners take masters (else the loaded weight's value) and moments, then publish the
        weights re-quantized from the masters, so every rank holds what the saved run held."""
        for param, master in self.masters.items():
            given = full_states.get(param) or {}
            value = given["master"] if "master" in given else param_value(param)
            payload, scale = to_scaled_fp16(value.float().reshape(param.shape))
            master.copy_(payload)
            master.scale.copy_(scale)
            if "exp_avg" in given and "exp_avg_sq" in given:
                self.fp8.load_state_fp32(master, {"exp_avg": given["exp_avg"], "exp_avg_sq": given["exp_avg_sq"]},
                                         step)
        self._publish(overlap=False)
