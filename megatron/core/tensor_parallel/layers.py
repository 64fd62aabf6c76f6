"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Each holds only its shard and says how with `param_layouts()` (`layout.ParamLayout` by
parameter name: the split dimension and blocks, or, for the row layer's bias under sequence
parallelism, a replicated parameter whose gradient is partial on each rank).

Each runs its GEMMs through a kernel (`linear_kernel`): the high-precision one, or the FP8 one
(`fp8.linear.FP8LinearState`) that a precision plan gives the layer. `forward` branches only on
the communication pattern: with sequence parallelism one autograd function per pattern
(`tensor_parallel.sequence_parallel`) moves the kernel's operands; without, the kernel's own
linear sits between the tensor-parallel mappings. Which operands travel - FP8 bytes at O3, the
high-precision input otherwise - is the kernel's business.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from fp8.linear import FP8LinearState
from megatron.core.distributed.fp8_transport import CommTransport
from megatron.core.parallel_state import ParallelState
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel.layout import REPLICATED, ParamLayout
from megatron.core.tensor_parallel.linear_kernel import HIGH_PRECISION, LinearKernel
from megatron.core.tensor_parallel.sequence_parallel import column_parallel_linear, row_parallel_linear


def _copy_shard(param: nn.Parameter, layout: ParamLayout, full: torch.Tensor, ps: ParallelState) -> None:
    with torch.no_grad():
        param.copy_(layout.shard(full, ps.tp_rank, ps.tp_size))


class _ParallelLinear(nn.Module):
    kernel: LinearKernel

    def _init(self, ps: ParallelState, weight_shape, bias_size, dtype, device, bias: bool) -> None:
        self.ps = ps
        self.weight = nn.Parameter(torch.empty(weight_shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(bias_size, device=device, dtype=dtype)) if bias else None
        self.kernel = HIGH_PRECISION
        self.transport = CommTransport(ps, "tp")  # the sequence-parallel traffic, counted under "tp"

    @property
    def fp8(self) -> FP8LinearState | None:
        """The FP8 kernel's state, or None when the layer runs in high precision."""
        return self.kernel if isinstance(self.kernel, FP8LinearState) else None

    @property
    def local_shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

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
        if self.sequence_parallel and self.ps.tp_size > 1:
            y = column_parallel_linear(x, self.weight, self.bias, self.kernel, self.transport)
        else:
            y = self.kernel.linear(mappings.copy_to_tensor_model_parallel_region(x, self.ps), self.weight, self.bias)
        return mappings.gather_from_tensor_model_parallel_region(y, self.ps) if self.gather_output else y


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
        if self.sequence_parallel and self.ps.tp_size > 1:
            y = row_parallel_linear(x, self.weight, self.kernel, self.transport)
        else:
            y = mappings.reduce_from_tensor_model_parallel_region(self.kernel.linear(x, self.weight, None), self.ps)
        return y if self.bias is None else y + self.bias


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
