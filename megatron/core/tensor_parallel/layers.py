"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Each holds only its shard and says how with `param_layouts()` (`layout.ParamLayout` by
parameter name: the split dimension and blocks, or, for the row layer's bias under sequence
parallelism, a replicated parameter whose gradient is partial on each rank).

The GEMM is `F.linear`, or `fp8.fp8_linear` once a precision plan has given the layer an
`fp8` state. A sequence-parallel layer whose state asks for FP8 traffic (``fp8_comm``, level O3)
fuses the GEMM with its sequence collectives (`fp8.sequence_parallel`), so that activations and
output gradients are all-gathered in FP8 and fed to the GEMMs as gathered. Without an FP8
state, a sequence-parallel column layer keeps only its input chunk and gathers it again in
backward (`tensor_parallel.sequence_parallel`), as Megatron-LM does; with an FP8 state but no
FP8 traffic (O0-O2) it gathers first and `fp8_linear` keeps the gathered FP8 input.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8.linear import FP8LinearState, fp8_linear
from fp8.sequence_parallel import column_parallel_fp8_linear, row_parallel_fp8_linear
from megatron.core.distributed.fp8_transport import CommTransport
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layout import REPLICATED, ParamLayout
from megatron.core.tensor_parallel.sequence_parallel import column_parallel_linear


def _copy_shard(param: nn.Parameter, layout: ParamLayout, full: torch.Tensor, ps: ParallelState) -> None:
    with torch.no_grad():
        param.copy_(layout.shard(full, ps.tp_rank, ps.tp_size))


def _linear(x, weight, bias, fp8_state: FP8LinearState | None):
    if fp8_state is not None:
        return fp8_linear(x, weight, bias, fp8_state)
    return F.linear(x, weight, bias)


class _ParallelLinear(nn.Module):
    fp8: FP8LinearState | None

    def _init(self, ps: ParallelState, weight_shape, bias_size, dtype, device, bias: bool) -> None:
        self.ps = ps
        self.weight = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(bias_size, device=device, dtype=dtype)) if bias else None
        self.fp8 = None

    @property
    def local_shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def _fp8_transport(self) -> CommTransport | None:
        """Where this layer's sequence-parallel traffic goes in FP8, or None (high precision)."""
        if self.sequence_parallel and self.ps.tp_size > 1 and self.fp8 is not None and self.fp8.fp8_comm:
            return CommTransport(self.ps, "tp")
        return None

    def get_extra_state(self) -> dict:
        return self.fp8.state_dict() if self.fp8 is not None else {}

    def set_extra_state(self, state: dict) -> None:
        if self.fp8 is not None:
            self.fp8.load_state_dict(state)

    def extra_repr(self) -> str:
        mode = self.fp8.describe() if self.fp8 is not None else "high precision"
        return (f"in_features={self.input_size}, out_features={self.output_size}, local={self.local_shape}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}, {mode}")


class ColumnParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by output rows: each rank computes its slice of Y.

    The input is replicated (copy to the region: identity forward, all-reduce backward), or
    sequence-sharded under sequence parallelism (all-gather forward, reduce-scatter backward).
    """

    def __init__(self, input_size: int, output_size: int, *, ps: ParallelState, bias: bool = True,
                 gather_output: bool = False, sequence_parallel: bool = False, partition_parts: int = 1,
                 device=None, dtype=torch.float32):
        super().__init__()
        if output_size % (ps.tp_size * partition_parts):
            raise ValueError(f"output size {output_size} of a column-parallel linear is not divisible by "
                             f"--tensor-model-parallel-size {ps.tp_size}" + (" x 2 (SwiGLU)" if partition_parts > 1 else ""))
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.partition_parts = partition_parts
        self._init(ps, (output_size // ps.tp_size, input_size), output_size // ps.tp_size, dtype, device, bias)

    def param_layouts(self) -> dict[str, ParamLayout]:
        split = ParamLayout(tp_dim=0, tp_parts=self.partition_parts)
        return {"weight": split} | ({"bias": split} if self.bias is not None else {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transport = self._fp8_transport()
        if transport is not None:
            y = column_parallel_fp8_linear(x, self.weight, self.bias, self.fp8, transport)
        elif self.sequence_parallel and self.fp8 is None:
            y = column_parallel_linear(x, self.weight, self.bias, self.ps)
        else:
            y = _linear(self._input(x), self.weight, self.bias, self.fp8)
        return mappings.gather_from_tensor_model_parallel_region(y, self.ps) if self.gather_output else y

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return mappings.gather_from_sequence_parallel_region(x, self.ps)
        return mappings.copy_to_tensor_model_parallel_region(x, self.ps)


class RowParallelLinear(_ParallelLinear):
    """Y = X A^T + b with A split by input columns: each rank holds a slice of X (the output of
    a column-parallel layer) and the partial products are summed (all-reduce), or summed and
    scattered along the sequence (reduce-scatter) under sequence parallelism. The bias is
    replicated and added once, after the sum."""

    def __init__(self, input_size: int, output_size: int, *, ps: ParallelState, bias: bool = True,
                 sequence_parallel: bool = False, device=None, dtype=torch.float32):
        super().__init__()
        if input_size % ps.tp_size:
            raise ValueError(f"input size {input_size} of a row-parallel linear is not divisible by "
                             f"--tensor-model-parallel-size {ps.tp_size}")
        self.input_size, self.output_size = input_size, output_size
        self.sequence_parallel = sequence_parallel
        self._init(ps, (output_size, input_size // ps.tp_size), output_size, dtype, device, bias)

    def param_layouts(self) -> dict[str, ParamLayout]:
        bias = {"bias": ParamLayout(sequence_parallel=self.sequence_parallel)} if self.bias is not None else {}
        return {"weight": ParamLayout(tp_dim=1)} | bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        transport = self._fp8_transport()
        if transport is not None:
            y = row_parallel_fp8_linear(x, self.weight, self.fp8, transport)
        else:
            y = self._reduce(_linear(x, self.weight, None, self.fp8))
        return y if self.bias is None else y + self.bias

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            return mappings.reduce_scatter_to_sequence_parallel_region(y, self.ps)
        return mappings.reduce_from_tensor_model_parallel_region(y, self.ps)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the ids it holds, zeros the
    rest, and the partial results are summed across the tensor-parallel group."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, ps: ParallelState, device=None,
                 dtype=torch.float32):
        super().__init__()
        if num_embeddings % ps.tp_size:
            raise ValueError(f"vocabulary size {num_embeddings} is not divisible by --tensor-model-parallel-size "
                             f"{ps.tp_size}; pad it with --make-vocab-size-divisible-by")
        self.ps = ps
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        per_rank = num_embeddings // ps.tp_size
        self.vocab_start, self.vocab_end = ps.tp_rank * per_rank, (ps.tp_rank + 1) * per_rank
        self.weight = nn.Parameter(torch.empty(per_rank, embedding_dim, device=device, dtype=dtype))

    def param_layouts(self) -> dict[str, ParamLayout]:
        return {"weight": ParamLayout(tp_dim=0)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return mappings.reduce_from_tensor_model_parallel_region(out, self.ps)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, local rows [{self.vocab_start}, {self.vocab_end})"


def load_full_weights(module: "_ParallelLinear | VocabParallelEmbedding", full: nn.Module | dict, ps: ParallelState) -> None:
    """Copy this rank's shards of a full (unsharded) module's or state dict's tensors into the
    matching parameters of `module` (parameters the full one lacks are left alone)."""
    full_state = full if isinstance(full, dict) else full.state_dict()
    layouts = module.param_layouts()
    for name, param in module.named_parameters():
        if name in full_state:
            _copy_shard(param, layouts.get(name, REPLICATED), full_state[name], ps)
