"""What the FP8AdamW tests share: FP32 gradients of FP16 / BF16 parameters, which autograd will not
take as `.grad`, handed to the optimizer through `grad_of` (as a data-parallel wrapper's buffer
would be), keyed by parameter; the optimizer reading them; parameters and steps."""

from __future__ import annotations

import pytest
import torch

from fp8.optim import FP8AdamW as _FP8AdamW

_HELD: dict[int, torch.Tensor] = {}
FP32_STATES = {"exp_avg_dtype": "fp32", "exp_avg_sq_dtype": "fp32"}


def held(p: torch.Tensor) -> torch.Tensor | None:
    return _HELD.get(id(p))


def hold(p: torch.Tensor, grad: torch.Tensor) -> None:
    _HELD[id(p)] = grad


@pytest.fixture(autouse=True)
def no_held_gradients():
    """Import into a test module: each test starts and ends with no held gradients."""
    _HELD.clear()
    yield
    _HELD.clear()


def FP8AdamW(*args, **kwargs):  # noqa: N802 -- the optimizer, reading held gradients
    return _FP8AdamW(*args, grad_of=held, **kwargs)


def params_of(*tensors: torch.Tensor) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(t.clone()) for t in tensors]


def take_steps(opt, params, grads) -> None:
    """One optimizer step per entry of `grads` (a list of per-parameter gradients)."""
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            hold(p, g.clone())
        opt.step()
