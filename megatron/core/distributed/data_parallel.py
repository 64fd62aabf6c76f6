"""Data-parallel gradient handling: contiguous FP32 gradient buffers in buckets.

Every trainable parameter gets ``param.main_grad``, a view into one contiguous buffer (FP32 by
default, whatever the parameter's dtype). A post-accumulate hook adds each backward's gradient
into it and frees ``param.grad``, so BF16 models accumulate micro-batches in FP32 as Megatron
does. `finish_grad_sync` then

1. sums the gradients of sequence-parallel parameters (norms, row-parallel biases) across the
   tensor-parallel group, since each rank saw only its share of the tokens, and
2. all-reduces the buffer bucket by bucket across the data-parallel group and divides by its
   size (the loss is a per-rank mean).

Buckets follow reverse parameter order (the order backward produces gradients) and hold about
`bucket_size_mb` each; they bound the size of a single collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState


@dataclass
class Bucket:
    params: list[nn.Parameter]
    buffer: torch.Tensor  # a view of the grad buffer covering `params`


class GradBuffer:
    """One contiguous buffer of `dtype` holding the main gradients of `params`."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype, device, bucket_numel: int):
        self.dtype = dtype
        total = sum(p.numel() for p in params)
        self.data = torch.zeros(total, dtype=dtype, device=device)
        self.buckets: list[Bucket] = []
        offset, start, current = 0, 0, []
        for param in reversed(params):
            param.main_grad = self.data[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
            current.append(param)
            if offset - start >= bucket_numel:
                self.buckets.append(Bucket(current, self.data[start:offset]))
                start, current = offset, []
        if current:
            self.buckets.append(Bucket(current, self.data[start:offset]))

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _accumulate_into_main_grad(param: torch.Tensor) -> None:
    param.main_grad.add_(param.grad)
    param.grad = None


class DistributedDataParallel(nn.Module):
    """Wraps a model; `forward` is the model's. Call `zero_grad_buffer()` before a step's first
    micro-batch and `finish_grad_sync()` after its last backward."""

    def __init__(self, module: nn.Module, ps: ParallelState, *, grad_dtype: torch.dtype = torch.float32,
                 bucket_size_mb: float = 40.0):
        super().__init__()
        self.module, self.ps = module, ps
        params = self.dense_grad_params(module)
        bucket_numel = max(1, int(bucket_size_mb * 2**20 / torch.tensor([], dtype=grad_dtype).element_size()))
        device = params[0].device if params else ps.device
        self.grad_buffer = GradBuffer(params, grad_dtype, device, bucket_numel)
        self._hooks = [p.register_post_accumulate_grad_hook(_accumulate_into_main_grad) for p in params]
        self.sequence_parallel_params = [p for p in params if getattr(p, "sequence_parallel", False)]

    @staticmethod
    def dense_grad_params(module: nn.Module) -> list[nn.Parameter]:
        """Trainable parameters whose gradients arrive as dense tensors (in definition order)."""
        return [p for p in module.parameters() if p.requires_grad]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        self.grad_buffer.data.zero_()

    def finish_grad_sync(self) -> None:
        if self.ps.tp_size > 1 and self.sequence_parallel_params:
            # One collective for all of them: they are many and small.
            grads = [p.main_grad for p in self.sequence_parallel_params]
            flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in grads]), self.ps, "tp")
            for grad, summed in zip(grads, flat.split([g.numel() for g in grads])):
                grad.copy_(summed.view_as(grad))
        if self.ps.dp_size > 1:
            for bucket in self.grad_buffer.buckets:
                comm.all_reduce(bucket.buffer, self.ps, "dp")
                bucket.buffer.div_(self.ps.dp_size)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True):
        return self.module.load_state_dict(state_dict, strict=strict)
