"""`--attention-backend`: Megatron-LM's choice of attention kernel, mapped to PyTorch's.

Attention here is `torch.nn.functional.scaled_dot_product_attention` (SDPA), causal, or with an
explicit boolean mask for packed sequences. Megatron-LM picks among Transformer Engine's kernels;
here the flag restricts which of SDPA's kernels may run, for the training and evaluation passes:

| flag | Megatron-LM | here |
|---|---|---|
| `auto` | TE chooses | SDPA chooses (flash, memory-efficient, cuDNN or the math kernel) |
| `flash` | FlashAttention | SDPA's flash kernel only (CUDA; CPU too, without dropout) |
| `fused` | TE's fused (cuDNN) attention | SDPA's memory-efficient and cuDNN kernels (CUDA only) |
| `unfused` | TE's unfused softmax(QK^T)V | SDPA's math kernel: the scores materialised, softmax, times V |
| `local` | Megatron-core's own attention (`--spec local`) | the same as `unfused`: that is what it computes |

A kernel that cannot run this model's attention on this device (dtype, head dimension, dropout)
stops the run before training with one line naming the flag (`check_attention_backend`); one
that fails later on an input the probe did not cover (an explicit mask) stops it the same way
(`attention_context`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local")
_NO_KERNEL = ("No available kernel", "No viable backend")


def _sdpa_backends(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": [SDPBackend.FLASH_ATTENTION],
            "fused": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION],
            "unfused": [SDPBackend.MATH], "local": [SDPBackend.MATH]}.get(name)


@contextlib.contextmanager
def attention_context(name: str) -> Iterator[None]:
    """Run the attention inside (forward and backward) with the kernels `name` allows."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend {name!r}: choose one of {', '.join(ATTENTION_BACKENDS)}")
    backends = _sdpa_backends(name)
    if backends is None:
        yield
        return
    from torch.nn.attention import sdpa_kernel

    try:
        with sdpa_kernel(backends):
            yield
    except RuntimeError as exc:
        if not any(marker in str(exc) for marker in _NO_KERNEL):
            raise
        raise ValueError(f"--attention-backend {name}: PyTorch has no such kernel for this attention (an explicit "
                         f"mask, dtype or head size it does not take: {str(exc).splitlines()[0].strip()}); use "
                         "--attention-backend auto or unfused") from None


def check_attention_backend(name: str, *, device: torch.device, dtype: torch.dtype, head_dim: int,
                            dropout: float) -> None:
    """Refuse `name` (ValueError, one line) where none of its kernels runs causal attention of
    this model (`head_dim`, `dtype`, training `dropout`) on `device`, forward and backward."""
    if _sdpa_backends(name) is None:
        return
    query = torch.zeros(1, 1, 4, head_dim, device=device, dtype=dtype, requires_grad=True)
    try:
        with attention_context(name), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's reasons for passing over each kernel: the error says it
            F.scaled_dot_product_attention(query, query, query, dropout_p=dropout, is_causal=True).sum().backward()
    except ValueError:
        raise ValueError(f"--attention-backend {name} cannot run here ({device.type}, {str(dtype).split('.')[-1]}, "
                         f"head dim {head_dim}, attention dropout {dropout:g}): {_why(name, device, dropout)}; use "
                         "--attention-backend auto or unfused") from None


def _why(name: str, device: torch.device, dropout: float) -> str:
    if name == "fused":
        return ("PyTorch's memory-efficient and cuDNN attention kernels exist on CUDA only" if device.type != "cuda"
                else "neither PyTorch's memory-efficient nor its cuDNN kernel takes this dtype or head size on this GPU")
    if device.type != "cuda" and dropout > 0:
        return "PyTorch's CPU flash kernel takes no dropout (--attention-dropout 0 would allow it)"
    return "PyTorch's flash kernel does not take this dtype or head size on this device"
