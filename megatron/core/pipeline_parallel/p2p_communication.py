"""Activations and their gradients between neighbouring pipeline stages.

Every stage of a run exchanges tensors of one shape and dtype, fixed when the run starts:
``[seq_length / tp if sequence parallel else seq_length, micro_batch_size, hidden_size]`` in the
model's activation dtype (`activation_shape`). Receivers therefore allocate without a shape
handshake, and a stage whose output differs is stopped on the sending side with a clear error
rather than left to hang (NCCL) or fail deep inside the transport (gloo).

All traffic goes through `comm.send_recv`, which posts an exchange's sends and receives together
and counts the bytes sent under "pp". One exchange may carry up to four tensors: an activation to
the next stage, an input gradient to the previous one, and the two matching receives.

With `fp8=True` (level O3's FP8 pipeline sends) activations travel as E4M3 and gradients as E5M2,
each with one FP32 scale from its own amax (current scaling: a stage's output range is not known
before it is computed). The scale's four bytes ride at the end of the payload, so every tensor is
still one message and both directions carry messages of one size. Infinities become NaN before
the cast: E4M3 has no infinity and saturating would hide an overflow that must skip the step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fp8.formats import get_spec
from fp8.tensor import ScalingTensor, quantize
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState

ACTIVATION_FORMAT, GRADIENT_FORMAT = "e4m3", "e5m2"
_SCALE_BYTES = 4  # one float32 per-tensor scale appended to each FP8 message


def activation_shape(seq_length: int, micro_batch_size: int, hidden_size: int, *, tp_size: int = 1,
                     sequence_parallel: bool = False) -> tuple[int, int, int]:
    """The shape every pipeline send carries: [sequence, batch, hidden], sequence-sharded when
    sequence parallelism keeps activations split across the tensor-parallel group."""
    if sequence_parallel and tp_size > 1:
        if seq_length % tp_size:
            raise ValueError(f"--seq-length {seq_length} is not divisible by --tensor-model-parallel-size "
                             f"{tp_size}; sequence parallelism needs a multiple of it")
        seq_length //= tp_size
    return (seq_length, micro_batch_size, hidden_size)


class P2PCommunicator:
    """Sends and receives one run's activation-shaped tensors between this rank's neighbours.

    The named methods follow Megatron's vocabulary; each is one `exchange`, so the tensors of a
    combined call (e.g. `send_forward_recv_backward`) travel together and neighbours that both
    send in the same step cannot block each other.
    """

    def __init__(self, ps: ParallelState, tensor_shape: Sequence[int], dtype: torch.dtype = torch.float32, *,
                 fp8: bool = False):
        if ps.pp_size < 2:
            raise ValueError("point-to-point pipeline communication needs --pipeline-model-parallel-size >= 2")
        self.ps = ps
        self.tensor_shape = tuple(int(d) for d in tensor_shape)
        self.dtype = dtype
        self.fp8 = fp8  # activations as E4M3, gradients as E5M2, each with a scale

    @property
    def message_nbytes(self) -> int:
        """Bytes of one activation (or gradient) message; with fp8 the payload plus its scale."""
        return self._numel + _SCALE_BYTES if self.fp8 else self._numel * self.dtype.itemsize

    @property
    def _numel(self) -> int:
        numel = 1
        for dim in self.tensor_shape:
            numel *= dim
        return numel

    def _check_outgoing(self, t: torch.Tensor, what: str) -> torch.Tensor:
        if tuple(t.shape) != self.tensor_shape or t.dtype != self.dtype:
            raise ValueError(
                f"pipeline stage {self.ps.pp_rank} would send {what} of shape {tuple(t.shape)} ({t.dtype}), but the "
                f"pipeline was set up for {self.tensor_shape} ({self.dtype}); pass tensor_shape = [seq_length "
                f"(/ tp with --sequence-parallel), micro_batch_size, hidden_size] and the model's activation dtype")
        return t.detach()

    def _empty(self) -> torch.Tensor:
        if self.fp8:
            return torch.empty(self.message_nbytes, dtype=torch.uint8, device=self.ps.device)
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=self.ps.device)

    def _encode(self, t: torch.Tensor, fmt: str) -> torch.Tensor:
        """`t` as one uint8 message (FP8 payload, then the scale's bytes), or as it is without fp8."""
        if not self.fp8:
            return t
        t_fp8 = quantize(t, fmt, inf_to_nan=True)
        return torch.cat([t_fp8.data.reshape(-1).view(torch.uint8), t_fp8.scale.reshape(1).view(torch.uint8)])

    def _decode(self, message: torch.Tensor | None, fmt: str) -> torch.Tensor | None:
        if message is None or not self.fp8:
            return message
        data = message[:self._numel].view(get_spec(fmt).dtype).view(self.tensor_shape)
        # clone: the scale's bytes sit at an offset a float32 view may not be aligned to
        scale = message[self._numel:].clone().view(torch.float32).reshape(())
        return ScalingTensor(data, scale, fmt).dequantize(self.dtype)

    def exchange(self, *, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                 recv_prev: bool = False, recv_next: bool = False,
                 requires_grad: bool = False) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One paired exchange. Returns (activation from the previous stage, gradient from the next
        stage), None where nothing was asked for; `requires_grad` marks the received activation as
        a leaf whose gradient backward will fill, to send back later.

        Sends are posted next-then-previous and receives previous-then-next: with two stages both
        neighbours are one rank, and this order makes an activation meet an activation receive and a
        gradient meet a gradient receive on the shared link."""
        sends = []
        if send_next is not None:
            activation = self._check_outgoing(send_next, "an activation")
            sends.append((self._encode(activation, ACTIVATION_FORMAT), self.ps.next_rank))
        if send_prev is not None:
            grad = self._check_outgoing(send_prev, "a gradient")
            sends.append((self._encode(grad, GRADIENT_FORMAT), self.ps.prev_rank))
        from_prev = self._empty() if recv_prev else None
        from_next = self._empty() if recv_next else None
        recvs = [(t, peer) for t, peer in ((from_prev, self.ps.prev_rank), (from_next, self.ps.next_rank))
                 if t is not None]
        if sends or recvs:
            comm.send_recv(self.ps, sends=sends, recvs=recvs)
        from_prev, from_next = self._decode(from_prev, ACTIVATION_FORMAT), self._decode(from_next, GRADIENT_FORMAT)
        if from_prev is not None and requires_grad:
            from_prev.requires_grad_()
        return from_prev, from_next

    # ----- Megatron's named exchanges -----------------------------------------------------------
    def recv_forward(self, requires_grad: bool = True) -> torch.Tensor:
        return self.exchange(recv_prev=True, requires_grad=requires_grad)[0]

    def send_forward(self, output: torch.Tensor) -> None:
        self.exchange(send_next=output)

    def recv_backward(self) -> torch.Tensor:
        return self.exchange(recv_next=True)[1]

    def send_backward(self, input_grad: torch.Tensor) -> None:
        self.exchange(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor) -> torch.Tensor:
        return self.exchange(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
        return self.exchange(send_prev=input_grad, recv_prev=True, requires_grad=requires_grad)[0]
