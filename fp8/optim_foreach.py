"""FP8AdamW's multi-tensor step: many parameters updated by each ``torch._foreach_*`` call.

`FP8AdamW.step` with ``foreach`` (the default) hands each parameter group to `multi_tensor_step`.
It groups the parameters that have a gradient into `Batch`es: the same device, kind of parameter
(FP32, BF16, unscaled FP16, FP16 master with a scale), step count and moment formats, at most
``foreach_numel`` values in all. A batch is updated by one call per operation of
`FP8AdamW._chunk_update` / `_write_back` / `_store_chunk`, each over the list of its pieces,
where a piece is one ``chunk_numel`` chunk of one tensor - the very views the per-tensor path
works on, so that every kernel sees the same operands as there:

- CPU: a foreach op is a loop over the per-tensor op (ATen's "slow path"), so the results are
  those of the per-tensor path by construction.
- CUDA: the fused foreach kernels compute the same formulas as the single-tensor kernels
  (``a + alpha * (b * c)`` for addcmul, ``a + alpha * (b / c)`` for addcdiv, the same `lerp`)
  except one: the single-tensor division by a Python number multiplies by its FP32 reciprocal,
  which `_div_` does too. (Reasoned from ATen's sources, not yet run: on a GPU,
  tests/test_fp8_optim_foreach.py's CUDA test and ``bench/fp8_optim.py --device cuda`` compare
  the two paths' bits.)

Per-tensor quantities stay per tensor: the amax of each tensor is the largest of its pieces'
(``torch._foreach_max`` of their absolute values: a maximum is exact in any order), and a
batch's new scales come from one `compute_scale` over the stacked amaxes and previous scales
(elementwise, so each scale is the per-tensor one: the CPU's vectorized and scalar ``log2``
kernels agreed to the bit on 8M values, those next to every power of two among them, with the
default, AVX2 and AVX512 kernels).

Unlike the per-tensor path, which computes a step twice when a new scale is needed (once for the
amaxes, once to write), a batch computes it once and keeps its FP32 values (about six per
element at the peak: gradient, moments, denominator, old weight, update) until the scales are
known. ``foreach_numel`` therefore bounds the FP32 working set; by default it is ``chunk_numel``
(measured on CPU for O2 states: 20 MB above the resting set for a batch of 16 x 64K values; 44 MB
for one 4M-value tensor, per tensor, in 1M chunks). A tensor with more values than that (or
none) goes through the per-tensor path, chunk by chunk, as before. A larger bound batches larger
tensors too (fewer kernel launches, for GPUs), but on a CPU it was slower for FP32 states: each
operation then streams the whole batch through memory, where a chunk at a time stays in cache.

Stochastic rounding draws from the device's generator in parameter order, a chunk at a time.
With it on, batches are consecutive runs of parameters (a parameter of another kind, or one
updated per tensor, ends the run) and their write-backs are made piece by piece in order, so
the draws are the per-tensor path's: the same bits with or without ``foreach``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fp8.formats import FP16
from fp8.optim import _MOMENTS, _SCALED_STATE_SPECS, _decode_chunk, grad_source, is_scaled_fp16, stored_kind
from fp8.scaling import compute_scale
from fp8.stochastic import stochastic_round
from fp8.tensor import ScalingTensor

# Devices where ``foreach=None`` (the default) takes this path: those whose kernels are known to
# give the per-tensor path's bits (see the module docstring). ``foreach=True`` takes it anywhere.
FOREACH_DEVICE_TYPES = ("cpu", "cuda")


def param_kind(p: torch.Tensor) -> str:
    if is_scaled_fp16(p):
        return "scaled_fp16"
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[p.dtype]


@dataclass
class Batch:
    """Parameters updated together; `key` is what they share: (device, kind, step count the
    update makes, exp_avg format, exp_avg_sq format)."""

    key: tuple
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list = field(default_factory=list)  # grad_source callables, one per parameter
    numel: int = 0


def plan(opt, group: dict) -> list:
    """The work of one parameter group, in the order it is done: `Batch`es and, for parameters
    the per-tensor path keeps, ``(param, grad)`` pairs. Initializes the states of batched
    parameters (their formats are part of the key)."""
    items, open_batches = [], {}
    ordered = opt.stochastic_rounding  # keep the generator's draws in parameter order
    for p in group["params"]:
        grad = grad_source(p, opt.fp8_grads, opt.grad_of)
        if grad is None:
            continue
        numel = p.numel()
        if not (0 < numel <= opt.foreach_numel and (opt.foreach or p.device.type in FOREACH_DEVICE_TYPES)):
            if ordered:
                items.extend(open_batches.values())
                open_batches.clear()
            items.append((p, grad))
            continue
        state = opt.state[p]
        if not state:
            opt._init_state(p, state)
        key = (p.device, param_kind(p), state["step"] + 1, stored_kind(state["exp_avg"]),
               stored_kind(state["exp_avg_sq"]))
        if ordered and key not in open_batches:  # one run at a time
            items.extend(open_batches.values())
            open_batches.clear()
        batch = open_batches.get(key)
        if batch is not None and batch.numel + numel > opt.foreach_numel:
            items.append(open_batches.pop(key))
            batch = None
        if batch is None:
            batch = open_batches[key] = Batch(key)
        batch.params.append(p)
        batch.grads.append(grad)
        batch.numel += numel
    items.extend(open_batches.values())
    return items


def multi_tensor_step(opt, group: dict) -> None:
    """One AdamW step of every parameter of `group` that has a gradient."""
    for item in plan(opt, group):
        if isinstance(item, Batch):
            step_batch(opt, item, group)
        else:
            opt._step_param(*item, group)


def _div_(tensors: list[torch.Tensor], divisor: float) -> None:
    """``t / divisor`` in place for each FP32 tensor, as the single-tensor kernel of the tensors'
    device computes it: CUDA's multiplies by the FP32 reciprocal of a Python-number divisor (its
    fused foreach division divides), the CPU's divides."""
    if tensors[0].device.type == "cuda":
        torch._foreach_mul_(tensors, (torch.ones((), dtype=torch.float32) / divisor).item())
    else:
        torch._foreach_div_(tensors, divisor)


def _amaxes(values: list[torch.Tensor], owners: list[int], count: int, in_place: bool = False) -> torch.Tensor:
    """Per tensor, the amax of its pieces (`owners[j]`: the tensor of piece j, in order): a
    vector of `count`. `in_place` overwrites `values` with their absolute values."""
    absolute = values if in_place else torch._foreach_abs(values)
    if in_place:
        torch._foreach_abs_(absolute)
    piece_max = torch._foreach_max(absolute)
    del absolute
    if count == len(piece_max):
        return torch.stack(piece_max)
    grouped: list[list[torch.Tensor]] = [[] for _ in range(count)]
    for owner, value in zip(owners, piece_max):
        grouped[owner].append(value)
    return torch.stack([torch.stack(maxes).amax() if len(maxes) > 1 else maxes[0] for maxes in grouped])


def _saturate_(tensors: list[torch.Tensor], fmt_max: float) -> None:
    """`cast_saturate`'s clamp to +-fmt_max, in place (NaN stays NaN, as with ``clamp``)."""
    torch._foreach_clamp_min_(tensors, -fmt_max)
    torch._foreach_clamp_max_(tensors, fmt_max)


def step_batch(opt, batch: Batch, group: dict) -> None:
    """One AdamW step of the parameters of `batch` (see the module docstring)."""
    params, chunk = batch.params, opt.chunk_numel
    states = [opt.state[p] for p in params]
    for state in states:
        state["step"] += 1
    step, (beta1, beta2) = batch.key[2], group["betas"]
    lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
    step_size, correction2 = lr / (1 - beta1 ** step), (1 - beta2 ** step) ** 0.5
    # The pieces: the per-tensor path's chunks, tensor by tensor.
    spans = [(i, start, min(start + chunk, p.numel())) for i, p in enumerate(params)
             for start in range(0, p.numel(), chunk)]
    owners = [i for i, _, _ in spans]

    def per_piece(values: torch.Tensor) -> list[torch.Tensor]:
        """A vector of one value per tensor as a list of one 0-dim view per piece."""
        per_tensor = values.unbind()
        return [per_tensor[i] for i in owners]

    def decode(key: str) -> list[torch.Tensor]:
        """`_decode_chunk` of every piece; one stacked reciprocal gives each tensor's scale_inv()."""
        stored = [state[key] for state in states]
        if not isinstance(stored[0], ScalingTensor):
            return [_decode_chunk(stored[i], start, end, copy=False) for i, start, end in spans]
        pieces = [stored[i].data.view(-1)[start:end].float() for i, start, end in spans]
        torch._foreach_mul_(pieces, per_piece(torch.stack([s.scale for s in stored]).reciprocal()))
        return pieces

    # ----- the update: `_chunk_update`, op for op --------------------------------------------
    grads = [batch.grads[i](start, end) for i, start, end in spans]
    exp_avg, exp_avg_sq = decode("exp_avg"), decode("exp_avg_sq")
    torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1 - beta2)
    del grads
    denom = torch._foreach_sqrt(exp_avg_sq)
    _div_(denom, correction2)
    torch._foreach_add_(denom, eps)
    kind = batch.key[1]
    weights = [params[i].detach().view(-1)[start:end] for i, start, end in spans]
    w_old = delta = None  # an FP32 weight is updated in place
    if kind == "fp32":
        if weight_decay != 0:
            torch._foreach_mul_(weights, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(weights, exp_avg, denom, value=-step_size)
    else:
        w_old = [w.float() for w in weights]
        if kind == "scaled_fp16":  # `_weight_chunk`
            torch._foreach_mul_(w_old, per_piece(torch.stack([p.scale for p in params]).reciprocal()))
        # The update kept apart from the weight, for stochastic rounding.
        delta = torch._foreach_mul(w_old, -lr * weight_decay)
        torch._foreach_addcdiv_(delta, exp_avg, denom, value=-step_size)
    del denom

    # ----- the new scales, from every piece's amax -------------------------------------------
    pow2, count = opt.power_of_two_scales, len(params)
    scales = {}
    for key, values, fmt in zip(_MOMENTS, (exp_avg, exp_avg_sq), batch.key[3:]):
        if fmt in _SCALED_STATE_SPECS:
            spec = _SCALED_STATE_SPECS[fmt]
            prev = torch.stack([state[key].scale for state in states])
            scales[key] = compute_scale(_amaxes(values, owners, count), spec.max, 0, pow2, prev)
    param_scale = None
    if kind == "scaled_fp16":
        total = torch._foreach_add(w_old, delta)
        prev = torch.stack([p.scale for p in params])
        param_scale = compute_scale(_amaxes(total, owners, count, in_place=True), FP16.max, 0, pow2, prev)
        del total

    # ----- the writes: `_write_back` and `_store_chunk` (in place on FP32 values no longer needed)
    if w_old is not None:
        if param_scale is not None:
            piece_scales = per_piece(param_scale)
            torch._foreach_mul_(w_old, piece_scales)
            torch._foreach_mul_(delta, piece_scales)
        if opt.stochastic_rounding:  # piece by piece: the per-tensor path's draws, in its order
            generator = opt._generator(params[0].device)
            for weight, base, update in zip(weights, w_old, delta):
                weight.copy_(stochastic_round(base, update, weight.dtype, generator))
        else:
            torch._foreach_add_(w_old, delta)
            if kind != "bf16":
                _saturate_(w_old, FP16.max)
            torch._foreach_copy_(weights, w_old)
        del w_old, delta
    for key, values in zip(_MOMENTS, (exp_avg, exp_avg_sq)):
        stored = [state[key] for state in states]
        if key in scales:  # `values` are decoded copies
            torch._foreach_mul_(values, per_piece(scales[key]))
            _saturate_(values, stored[0].spec.max)
            torch._foreach_copy_([stored[i].data.view(-1)[start:end] for i, start, end in spans], values)
            torch._foreach_copy_([s.scale for s in stored], list(scales[key].unbind()))
        elif stored_kind(stored[0]) == "bf16":
            torch._foreach_copy_([stored[i].view(-1)[start:end] for i, start, end in spans], values)
    if param_scale is not None:
        torch._foreach_copy_([p.scale for p in params], list(param_scale.unbind()))
