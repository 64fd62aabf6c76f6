"""Where FP8 weight gradients live between backward and the optimizer step.

An FP8 linear with FP8 weight gradients (level O1 and above) does not hand its weight gradient to
autograd: it accumulates it, as E4M3 with a per-tensor scale, into an `FP8GradStore` under the
weight (`FP8GradStore.accumulate`: dequantize, add in FP32, re-quantize). The data-parallel
reduction replaces each entry by the reduced gradient (or drops it, under FP8 ZeRO, where this
rank does not own the tensor), and the optimizer reads the entries it is given. One store serves a
whole model; the precision plan creates it and hands it to each of those consumers, so a gradient
never rides on the parameter as an attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fp8.tensor import ScalingTensor, accumulate


class FP8GradStore:
    """FP8 gradients keyed by parameter (by identity: a tensor's ``==`` is elementwise)."""

    def __init__(self):
        self._entries: dict[int, tuple[torch.Tensor, ScalingTensor]] = {}
        # Called with the parameter after each `accumulate` (the data-parallel wrapper's overlap
        # of gradient reduction with backward counts arrivals through it); None: nobody listens.
        self.on_accumulate: Callable[[torch.Tensor], None] | None = None

    def get(self, param: torch.Tensor) -> ScalingTensor | None:
        entry = self._entries.get(id(param))
        return entry[1] if entry is not None else None

    def set(self, param: torch.Tensor, grad: ScalingTensor | None) -> None:
        """Store `grad` for `param` (None drops it)."""
        if grad is None:
            self._entries.pop(id(param), None)
        else:
            self._entries[id(param)] = (param, grad)

    def accumulate(self, param: torch.Tensor, grad: torch.Tensor, fmt: str = "e4m3") -> None:
        """Add a high-precision gradient to `param`'s entry, kept in `fmt` with a fresh scale."""
        self.set(param, accumulate(self.get(param), grad, fmt))
        if self.on_accumulate is not None:
            self.on_accumulate(param)

    def clear(self, params: Iterable[torch.Tensor] | None = None) -> None:
        """Drop every entry (or those of `params`): the next backward starts from zero."""
        if params is None:
            self._entries.clear()
        for param in params or ():
            self._entries.pop(id(param), None)

    def __contains__(self, param: torch.Tensor) -> bool:
        return id(param) in self._entries
