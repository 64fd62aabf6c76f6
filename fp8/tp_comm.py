"""FP8 sequence-parallel traffic around an FP8 linear (level O3, paper section 2).

Under sequence parallelism a column-parallel linear all-gathers its input along the sequence
(dim 0 of [s/tp, b, h]) and reduce-scatters the input gradient; a row-parallel linear
reduce-scatters its output and all-gathers the output gradient. At O3 the all-gathered tensors
travel as FP8, cast once, before the gather, and go into the FP8 GEMMs as they arrive:

- per-tensor recipes: the ranks agree on the amax (MAX over the group, `agreed_amax`) before
  casting, so every piece has the same scale, the gathered bytes are those of casting the whole
  tensor in one process, and delayed-scaling histories stay identical on every rank;
- row / block recipes scale each token row on its own: the scales travel with the payload
  (`all_gather_fp8`).

The input gradient is reduce-scattered in high precision, or in FP8 with `fp8_reduce_scatter_sum`:
the minimum-scale protocol of `fp8.collectives` (every rank casts with its own scale, all re-cast
to the smallest, an all-to-all of bytes, an FP32 sum) without the final re-cast, since the sum
goes on in the gradient's dtype. A row layer's output reduce-scatter stays in high precision: it
is a sum.

The pieces are used by `fp8.linear.FP8LinearState` (the FP8 linear kernel); the autograd
functions that move a linear's operands between ranks are the framework's
(`megatron.core.tensor_parallel.sequence_parallel`), whatever the kernel. Communication goes
through a `SequenceTransport`; the framework supplies one that counts bytes per process group.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fp8.collectives import Transport, fp32_sum, shared_scale_payloads
from fp8.formats import FormatSpec
from fp8.tensor import ScalingTensor, quantize


class SequenceTransport(Transport, Protocol):
    def reduce_scatter(self, t: torch.Tensor) -> torch.Tensor: ...  # sum over the group, own chunk of dim 0


def agreed_amax(amax: torch.Tensor, transport: Transport) -> torch.Tensor:
    """The group's largest amax. NaN becomes inf first: MAX is not sure to propagate NaN on every
    backend, and an inf reaches every rank, where the scale then stays as it was (`compute_scale`)."""
    amax = torch.where(torch.isnan(amax), torch.full_like(amax, float("inf")), amax.float())
    return transport.all_reduce_(amax.reshape(1), "max").reshape(amax.shape)


def all_gather_fp8(x: ScalingTensor, transport: Transport) -> ScalingTensor:
    """Every rank's rows of 2-D `x` in rank order, as bytes; per-row scales travel in the same
    message, each row's four scale bytes after its payload."""
    if x.tile is None:
        return ScalingTensor(transport.all_gather(x.data.view(torch.uint8)).view(x.spec.dtype), x.scale, x.spec)
    assert x.dim() == 2 and x.tile[0] == 1, "only row-aligned tiles can be gathered by rows"
    cols = x.shape[1]
    packed = torch.cat([x.data.view(torch.uint8), x.scale.contiguous().view(torch.uint8)], dim=1)
    gathered = transport.all_gather(packed)
    data = gathered[:, :cols].contiguous().view(x.spec.dtype)
    scale = gathered[:, cols:].contiguous().view(torch.float32)
    return ScalingTensor(data, scale, x.spec, x.tile)


def fp8_reduce_scatter_sum(t: torch.Tensor, transport: Transport, spec: FormatSpec, *, margin: int = 0,
                           power_of_two: bool = False) -> torch.Tensor:
    """The sum over the group of every rank's `t`, this rank's chunk of dim 0, in `t.dtype`;
    sent as FP8 with the group's minimum scale."""
    size = transport.size
    assert t.shape[0] % size == 0, (tuple(t.shape), size)
    own = quantize(t, spec, margin=margin, power_of_two=power_of_two, inf_to_nan=True)
    (payload,), shared, _ = shared_scale_payloads([own], transport, 1.0, spec)
    received = transport.all_to_all(list(payload.chunk(size)))  # dim 0 leads: byte chunks are sequence chunks
    return (fp32_sum(received, spec) / shared[0]).to(t.dtype).reshape(t.shape[0] // size, *t.shape[1:])
