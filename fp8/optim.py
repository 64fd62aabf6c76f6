"""FP8 AdamW with precision decoupling (FP8-LM section 2.2, level O2).

Each parameter is its own master weight; no FP32 copy is kept. Two kinds of parameter:

- an ordinary FP32 (or BF16, or unscaled FP16) tensor, updated in place;
- an *FP16 master with a per-tensor scale*: a float16 tensor ``p`` with a 0-dim FP32 ``p.scale``
  so that the true value is ``p.float() / p.scale`` (``x_q = cast(x * scale)``, as everywhere in
  `fp8`). After each update it is re-quantized with a fresh scale from its amax. See
  `make_scaled_fp16_param`, `scaled_value`.

The Adam moments are stored as configured: "fp32", "bf16", "fp16" (a `ScalingTensor` of format
fp16 with a per-tensor scale) or "fp8" (E4M3 with a per-tensor scale). The step dequantizes them,
computes the moments and the update in FP32 exactly as `torch.optim.AdamW` does, and
re-quantizes the moments with fresh scales. The paper's choice (the default) is an FP8 first
moment and an FP16 second moment: the direction of the update tolerates FP8's 3 mantissa bits,
its size ``1 / sqrt(v)`` does not.

Why not an FP8 second moment: ``v ~ g**2`` squares the dynamic range of the gradient. E4M3 with
one scale per tensor spans about 2**17 (448 down to its smallest subnormal 2**-9), so every ``v``
below ``amax(v) / 2**17`` - every gradient smaller than about 1/360 of the tensor's largest - is
flushed to zero, while the FP8 first moment (which spans the same 2**17 of *linear* range) keeps
those gradients. Their update ``m / (sqrt(v) + eps)`` is then far too large: the paper saw
training diverge. FP16 with a scale spans 2**40, i.e. gradients down to 1e-6 of the largest.
The optimizer allows "fp8" for ``exp_avg_sq`` for experiments and warns once.

Scales are rounded down to powers of two by default (``power_of_two_scales``): an FP16 master
whose scale changes is then rescaled exactly (re-quantizing an unchanged weight is the identity,
so no rounding noise is added by the rescale), and a dequantized state re-quantizes to the same
values, so checkpoints that store FP32 values resume bit-exactly. It costs at most one binade
of range at the top, which neither FP16 nor E4M3 needs.

Gradients (reduced and clipped by the caller; no clipping or finite checks here) are read from
``p.grad``, else its entry in ``fp8_grads`` (an `FP8GradStore`), else ``grad_of(p)``: an FP32
gradient kept elsewhere, since autograd refuses an FP32 ``.grad`` on an FP16 parameter (on
Megatron-LM, ``grad_of=lambda p: p.main_grad``). A parameter with none is skipped. They are
gradients of the loss with respect to the parameter's *true* value.

Two ways through a step, with the same results to the bit:

- per tensor (``foreach=False``): each parameter in turn, `chunk_numel` values at a time; where a
  new scale is needed, one pass over the chunks finds the amaxes and a second writes;
- multi-tensor (``foreach=True``, and the default ``None`` for parameters on CPU or CUDA), in
  `fp8.optim_foreach`: the parameters of a group are batched (same device, kind, step count and
  state formats; at most `foreach_numel` values, by default `chunk_numel`) and each operation of
  the step is one ``torch._foreach_*`` call over a batch's chunks. A batch is computed once and
  held in FP32 until its scales are known. Larger tensors take the per-tensor path. Stochastic
  rounding keeps its per-tensor draws (batches are then runs of consecutive parameters).
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from fp8.formats import E4M3, FP16
from fp8.gradients import FP8GradStore
from fp8.scaling import abs_max, compute_scale, default_chunk_numel
from fp8.stochastic import stochastic_round
from fp8.tensor import ScalingTensor, cast_saturate, quantize

STATE_DTYPES = ("fp32", "bf16", "fp16", "fp8")
_SCALED_STATE_SPECS = {"fp16": FP16, "fp8": E4M3}
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MOMENTS = ("exp_avg", "exp_avg_sq")
FP8_SECOND_MOMENT_WARNING = (
    "exp_avg_sq_dtype='fp8': the FP8-LM paper's optimizer ablation (section 2.2) saw training "
    "diverge with an FP8 second moment, because E4M3 flushes the small values of v (~g**2) to "
    "zero and blows up their updates; use exp_avg_sq_dtype='fp16' (the paper's choice)"
)

Stored = torch.Tensor | ScalingTensor


# ----------------------------------------------------------------------------------------------
# FP16 masters with a per-tensor scale
# ----------------------------------------------------------------------------------------------

class ScaledFP16Parameter(nn.Parameter):
    """A parameter stored as FP16 with a per-tensor FP32 ``scale``: value = ``data.float() / scale``.

    The kind of a parameter is its type: code asks ``isinstance(p, ScaledFP16Parameter)`` (or
    `is_scaled_fp16`), never whether some attribute happens to be there. Made in place from an
    FP32 / BF16 parameter by `make_scaled_fp16_param`, or new with `new`."""

    scale: torch.Tensor

    @classmethod
    def new(cls, payload: torch.Tensor, scale: torch.Tensor, requires_grad: bool = False) -> ScaledFP16Parameter:
        assert payload.dtype == torch.float16 and scale.dtype == torch.float32 and scale.dim() == 0
        param = cls(payload, requires_grad=requires_grad)
        param.scale = scale
        return param

    def __deepcopy__(self, memo):
        copy = type(self).new(self.data.clone(), self.scale.clone(), self.requires_grad)
        memo[id(self)] = copy
        return copy


def is_scaled_fp16(p: torch.Tensor) -> bool:
    """Whether `p` is an FP16 master with a per-tensor scale."""
    return isinstance(p, ScaledFP16Parameter)


def to_scaled_fp16(tensor: torch.Tensor, *, power_of_two: bool = True,
                   prev_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(payload_fp16, scale)`` with ``tensor ~= payload_fp16.float() / scale``; the amax maps to
    FP16's maximum (or just below, for a power-of-two scale). A tensor of zeros (or with a
    non-finite amax) keeps `prev_scale` (1.0 when None)."""
    x = tensor.detach().float()
    amax = abs_max(x) if x.numel() else torch.zeros((), device=x.device)
    scale = compute_scale(amax, FP16.max, 0, power_of_two, prev_scale)
    return cast_saturate(x * scale, FP16), scale


def make_scaled_fp16_param(param: torch.Tensor, *, power_of_two: bool = True) -> torch.Tensor:
    """Turn an FP32/BF16 parameter into an FP16 master with a per-tensor scale, in place: the
    Parameter object and its other attributes are kept; ``param.data`` becomes the FP16 payload
    and ``param.scale`` the scale. A parameter that already is one is returned unchanged."""
    if is_scaled_fp16(param):
        return param
    if param.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"make_scaled_fp16_param needs an fp32 or bf16 parameter, got {param.dtype}")
    if param.grad is not None:
        raise ValueError("make_scaled_fp16_param: the parameter already has a .grad of the old dtype; "
                         "convert parameters before the first backward (or set .grad = None first)")
    if not isinstance(param, nn.Parameter):
        raise ValueError("make_scaled_fp16_param converts an nn.Parameter in place; wrap the tensor in one first")
    payload, scale = to_scaled_fp16(param, power_of_two=power_of_two)
    param.data = payload
    param.__class__ = ScaledFP16Parameter  # the same object (optimizers, names keep it), now of its kind
    param.scale = scale
    return param


def scaled_value(p: torch.Tensor) -> torch.Tensor:
    """The true FP32 value of either kind of parameter (for FP32 ones, its own storage, detached)."""
    if is_scaled_fp16(p):
        # Multiplying by the reciprocal, as ScalingTensor.dequantize does, keeps both paths equal.
        return p.detach().float() * p.scale.reciprocal()
    return p.detach().float()


def _weight_chunk(p: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`scaled_value` of values [start, end) of `p`."""
    piece = p.detach().view(-1)[start:end].float()
    return piece * p.scale.reciprocal() if is_scaled_fp16(p) else piece


# ----------------------------------------------------------------------------------------------
# Moment storage
# ----------------------------------------------------------------------------------------------

def encode_state(x_fp32: torch.Tensor, dtype: str, prev: Stored | None = None,
                 power_of_two: bool = True) -> Stored:
    """Store an FP32 moment as `dtype`; scaled formats take a fresh scale from its amax (a zero or
    non-finite amax keeps `prev`'s scale). An "fp32" moment is the tensor itself, not a copy."""
    if dtype == "fp32":
        return x_fp32
    if dtype == "bf16":
        return x_fp32.to(torch.bfloat16)
    spec = _SCALED_STATE_SPECS[dtype]
    amax = abs_max(x_fp32) if x_fp32.numel() else torch.zeros((), device=x_fp32.device)
    prev_scale = prev.scale if isinstance(prev, ScalingTensor) else None
    scale = compute_scale(amax, spec.max, 0, power_of_two, prev_scale)
    return quantize(x_fp32, spec, scale=scale)


def decode_state(stored: Stored) -> torch.Tensor:
    """FP32 value of a stored moment; an FP32 moment is returned as is, to be updated in place."""
    if isinstance(stored, ScalingTensor):
        return stored.dequantize()
    return stored.float()


def _decode_chunk(stored: Stored, start: int, end: int, copy: bool) -> torch.Tensor:
    """`decode_state` of values [start, end); an FP32 moment's own storage unless `copy`."""
    if isinstance(stored, ScalingTensor):
        return stored.data.view(-1)[start:end].float() * stored.scale_inv()
    piece = stored.view(-1)[start:end]
    return piece.clone() if copy and piece.dtype == torch.float32 else piece.float()


def stored_kind(stored: Stored) -> str:
    if isinstance(stored, ScalingTensor):
        return "fp8" if stored.spec.is_fp8 else "fp16"
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[stored.dtype]


def stored_bytes(stored: Stored) -> int:
    if isinstance(stored, ScalingTensor):
        return stored.nbytes
    return stored.numel() * stored.element_size()


def _pack(stored: Stored) -> torch.Tensor | dict:
    return stored.state_dict() if isinstance(stored, ScalingTensor) else stored


def _unpack(packed: torch.Tensor | dict, device: torch.device) -> Stored:
    if isinstance(packed, dict):
        return ScalingTensor.from_state_dict(packed).to(device)
    return packed.to(device)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------

def read_grad(p: torch.Tensor, fp8_grads: FP8GradStore | None = None,
              grad_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor | None:
    """The FP32 gradient of `p`'s true value: ``p.grad``, else `p`'s entry in `fp8_grads`, else
    ``grad_of(p)``."""
    source = grad_source(p, fp8_grads, grad_of)
    return source(0, p.numel()).reshape(p.shape) if source is not None else None


def grad_source(p: torch.Tensor, fp8_grads: FP8GradStore | None = None,
                grad_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None):
    """``fn(start, end)``: the FP32 gradient of `p`'s flattened values [start, end), from where
    `read_grad` finds it (None when there is none); an FP8 gradient is dequantized a piece at a
    time, as `ScalingTensor.dequantize` does it."""
    grad = p.grad
    if grad is None and fp8_grads is not None:
        stored = fp8_grads.get(p)
        if stored is not None:
            assert stored.tile is None, "FP8 weight gradients have per-tensor scales"
            data, inv = stored.data.reshape(-1), stored.scale_inv()
            return lambda start, end: data[start:end].float() * inv
    if grad is None and grad_of is not None:
        grad = grad_of(p)
    if grad is None:
        return None
    flat = grad.reshape(-1)
    return lambda start, end: flat[start:end].float()


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------

def _check_hparams(lr, betas, eps, weight_decay) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0):
        raise ValueError(f"FP8AdamW: lr must be a number >= 0, got {lr!r}")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"FP8AdamW: betas must be two numbers in [0, 1), e.g. (0.9, 0.95); got {betas!r}")
    if not eps >= 0:
        raise ValueError(f"FP8AdamW: eps must be >= 0 (typically 1e-8), got {eps!r}")
    if not weight_decay >= 0:
        raise ValueError(f"FP8AdamW: weight_decay must be >= 0, got {weight_decay!r}")


def _check_state_dtype(name: str, value: str) -> str:
    if value not in STATE_DTYPES:
        raise ValueError(f"FP8AdamW: {name}={value!r} is not supported; use one of {', '.join(STATE_DTYPES)}")
    return value


def _check_param(p: torch.Tensor) -> None:
    if p.dtype not in _PARAM_DTYPES:
        raise ValueError(f"FP8AdamW updates fp32, bf16 or fp16 parameters, got one of dtype {p.dtype}")
    if is_scaled_fp16(p) and not (p.dtype == torch.float16 and isinstance(p.scale, torch.Tensor)
                                  and p.scale.dtype == torch.float32 and p.scale.dim() == 0):
        raise ValueError("an FP16 master's .scale must be a 0-dim float32 tensor; "
                         "build it with fp8.make_scaled_fp16_param")


class FP8AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as `torch.optim.AdamW`) with configurable state precision.

    Keyword-only options: `exp_avg_dtype` / `exp_avg_sq_dtype` (one of `STATE_DTYPES`; the
    default is the paper's FP8 first moment and FP16 second moment); `stochastic_rounding` for
    the write-back of FP16 (scaled or not) and BF16 parameters, drawn from a generator per device
    seeded with `seed` - the same on every rank, so data-parallel replicas stay identical;
    `power_of_two_scales` (see the module docstring); `fp8_grads` and `grad_of`: where gradients not
    in `.grad` are (see the module docstring); `chunk_numel`: values updated at once per tensor;
    `foreach`: the multi-tensor path (None: on CPU and CUDA parameters; False: per tensor, always);
    `foreach_numel`: most values in one multi-tensor batch (default `chunk_numel`: the batch's
    FP32 working set, about six values per element, is that of one chunk of the per-tensor path).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, *, exp_avg_dtype: str = "fp8",
                 exp_avg_sq_dtype: str = "fp16", stochastic_rounding: bool = False, seed: int = 0,
                 power_of_two_scales: bool = True, fp8_grads: FP8GradStore | None = None,
                 grad_of: Callable[[torch.Tensor], torch.Tensor | None] | None = None,
                 chunk_numel: int | None = None, foreach: bool | None = None,
                 foreach_numel: int | None = None):
        _check_hparams(lr, betas, eps, weight_decay)
        self.exp_avg_dtype = _check_state_dtype("exp_avg_dtype", exp_avg_dtype)
        self.exp_avg_sq_dtype = _check_state_dtype("exp_avg_sq_dtype", exp_avg_sq_dtype)
        if exp_avg_sq_dtype == "fp8":
            warnings.warn(FP8_SECOND_MOMENT_WARNING, UserWarning, stacklevel=2)
        self.stochastic_rounding, self.seed = bool(stochastic_rounding), int(seed)
        self.power_of_two_scales = bool(power_of_two_scales)
        self.fp8_grads = fp8_grads  # where FP8 gradients of the parameters are found (level O1+)
        self.grad_of = grad_of      # where other gradients kept outside `.grad` are found
        chunk_numel = default_chunk_numel(chunk_numel)
        if chunk_numel < 1:
            raise ValueError(f"chunk_numel must be >= 1, got {chunk_numel}")
        self.chunk_numel = int(chunk_numel)  # values updated at once: bounds the FP32 working set
        self.foreach = None if foreach is None else bool(foreach)
        if foreach_numel is not None and foreach_numel < 1:
            raise ValueError(f"foreach_numel must be >= 1, got {foreach_numel}")
        self.foreach_numel = self.chunk_numel if foreach_numel is None else int(foreach_numel)
        self._generators: dict[str, torch.Generator] = {}
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            for p in group["params"]:
                _check_param(p)

    # ----- the step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.foreach is not False:
            from fp8.optim_foreach import multi_tensor_step  # it builds on this module
            for group in self.param_groups:
                multi_tensor_step(self, group)
            return loss
        for group in self.param_groups:
            for p in group["params"]:
                grad = grad_source(p, self.fp8_grads, self.grad_of)
                if grad is not None:
                    self._step_param(p, grad, group)
        return loss

    def _step_param(self, p: torch.Tensor, grad, group: dict) -> None:
        """One AdamW step of `p`, `chunk_numel` values at a time, so its FP32 working set is
        bounded whatever the tensor's size. Where a new per-tensor scale is needed (scaled
        moments, an FP16 master) a first pass finds the new values' amaxes and a second one
        stores them; both compute the same values, since nothing is written before the second."""
        state = self.state[p]
        if not state:
            self._init_state(p, state)
        state["step"] += 1
        step, (beta1, beta2) = state["step"], group["betas"]
        hp = dict(beta1=beta1, beta2=beta2, step_size=group["lr"] / (1 - beta1 ** step),
                  correction2=(1 - beta2 ** step) ** 0.5, eps=group["eps"], lr=group["lr"],
                  weight_decay=group["weight_decay"])
        numel, chunk = p.numel(), self.chunk_numel
        stored = {key: state[key] for key in _MOMENTS}
        scaled = [key for key in _MOMENTS if isinstance(stored[key], ScalingTensor)]
        amax = {}
        if scaled or is_scaled_fp16(p):
            zero = torch.zeros((), device=p.device)
            amax = {key: zero for key in [*scaled, "param"]}
            for start in range(0, numel, chunk):
                end = min(start + chunk, numel)
                m, v, w_old, delta = self._chunk_update(p, stored, grad, start, end, hp, copy=True)
                for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
                    if key in amax:
                        amax[key] = torch.maximum(amax[key], abs_max(value))
                if w_old is not None and is_scaled_fp16(p):
                    amax["param"] = torch.maximum(amax["param"], abs_max(w_old + delta))
        pow2 = self.power_of_two_scales
        scales = {key: compute_scale(amax[key], _SCALED_STATE_SPECS[dtype].max, 0, pow2, stored[key].scale)
                  for key, dtype in zip(_MOMENTS, (self.exp_avg_dtype, self.exp_avg_sq_dtype)) if key in scaled}
        param_scale = compute_scale(amax["param"], FP16.max, 0, pow2, p.scale) if is_scaled_fp16(p) else None
        for start in range(0, numel, chunk):
            end = min(start + chunk, numel)
            m, v, w_old, delta = self._chunk_update(p, stored, grad, start, end, hp, copy=False)
            if w_old is not None:
                self._write_back(p, w_old, delta, start, end, param_scale)
            for key, value in (("exp_avg", m), ("exp_avg_sq", v)):
                self._store_chunk(stored[key], value, start, end, scales.get(key))
        for key in scaled:  # each piece was read at the old scale; the new one holds from now on
            stored[key].scale.copy_(scales[key])
        if param_scale is not None:
            p.scale.copy_(param_scale)

    def _chunk_update(self, p, stored: dict, grad, start: int, end: int, hp: dict, *, copy: bool):
        """The new first and second moments of values [start, end) and the weight update, in the
        same operations and order as torch.optim.AdamW's single-tensor path (so that FP32 states
        reproduce it bit for bit). An FP32 weight or moment is updated in place unless `copy`;
        returns (exp_avg, exp_avg_sq, old weight, update), the last two None for an FP32 weight
        (already updated)."""
        g = grad(start, end)
        m, v = (_decode_chunk(stored[key], start, end, copy) for key in _MOMENTS)
        m.lerp_(g, 1 - hp["beta1"])
        v.mul_(hp["beta2"]).addcmul_(g, g, value=1 - hp["beta2"])
        denom = (v.sqrt() / hp["correction2"]).add_(hp["eps"])
        if p.dtype == torch.float32:
            if not copy:
                w = p.detach().view(-1)[start:end]
                if hp["weight_decay"] != 0:
                    w.mul_(1 - hp["lr"] * hp["weight_decay"])
                w.addcdiv_(m, denom, value=-hp["step_size"])
            return m, v, None, None
        w_old = _weight_chunk(p, start, end)
        # The update is kept apart from the weight so that stochastic rounding sees all of it.
        delta = torch.addcdiv(w_old * (-hp["lr"] * hp["weight_decay"]), m, denom, value=-hp["step_size"])
        return m, v, w_old, delta

    def _write_back(self, p: torch.Tensor, w_old: torch.Tensor, delta: torch.Tensor, start: int, end: int,
                    scale: torch.Tensor | None) -> None:
        generator = self._generator(p.device) if self.stochastic_rounding else None
        if scale is not None:
            w_old, delta = w_old * scale, delta * scale
        if generator is not None:
            new = stochastic_round(w_old, delta, p.dtype, generator)
        elif p.dtype == torch.float16:
            new = cast_saturate(w_old + delta, FP16)
        else:
            new = (w_old + delta).to(p.dtype)
        p.detach().view(-1)[start:end].copy_(new)

    @staticmethod
    def _store_chunk(stored: Stored, value: torch.Tensor, start: int, end: int, scale: torch.Tensor | None) -> None:
        """Values [start, end) of a moment written back in its format (FP32: already in place)."""
        if isinstance(stored, ScalingTensor):
            stored.data.view(-1)[start:end].copy_(cast_saturate(value * scale, stored.spec))
        elif stored.dtype != torch.float32:
            stored.view(-1)[start:end].copy_(value)

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        for key, dtype in zip(_MOMENTS, (self.exp_avg_dtype, self.exp_avg_sq_dtype)):
            state[key] = encode_state(torch.zeros_like(p, dtype=torch.float32), dtype)

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def init_states(self) -> None:
        """Allocate every parameter's moments now (zeros) rather than at its first step, e.g. to
        report memory before training starts."""
        for group in self.param_groups:
            for p in group["params"]:
                if not self.state[p]:
                    self._init_state(p, self.state[p])

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's, and drops the parameters' FP8 gradients too, which would otherwise be
        accumulated into by the next backward."""
        super().zero_grad(set_to_none=set_to_none)
        if self.fp8_grads is not None:
            self.fp8_grads.clear(p for group in self.param_groups for p in group["params"])

    # ----- memory accounting -------------------------------------------------------------------
    def state_bytes(self) -> int:
        """Bytes of the Adam moments held, payloads and scales (0 for steps not yet taken)."""
        return sum(stored_bytes(state[key]) for state in self.state.values() for key in _MOMENTS
                   if key in state)

    def master_bytes(self) -> int:
        """0: every parameter is its own master weight."""
        return 0

    def step_count(self) -> int:
        return max((int(state["step"]) for state in self.state.values() if "step" in state), default=0)

    # ----- checkpoints: layout-independent FP32 values -----------------------------------------
    def state_fp32(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"exp_avg", "exp_avg_sq"}`` of `p` as FP32 tensors shaped like `p` (copies); empty
        before its first step."""
        state = self.state.get(p)
        if not state or "exp_avg" not in state:
            return {}
        return {key: decode_state(state[key]).clone() for key in _MOMENTS}

    def load_state_fp32(self, p: torch.Tensor, states: dict[str, torch.Tensor], step: int) -> None:
        """Install `p`'s moments from FP32 values (any shape with ``p.numel()`` elements) after
        `step` steps, re-quantized to the configured dtypes."""
        missing = [key for key in _MOMENTS if key not in states]
        if missing:
            raise ValueError(f"load_state_fp32: missing {missing}; pass both exp_avg and exp_avg_sq")
        state = {"step": int(step)}
        for key, dtype in zip(_MOMENTS, (self.exp_avg_dtype, self.exp_avg_sq_dtype)):
            value = states[key].detach().to(device=p.device, dtype=torch.float32).reshape(p.shape).clone()
            state[key] = encode_state(value, dtype, None, self.power_of_two_scales)
        self.state[p] = state

    # ----- checkpoints: torch.load(weights_only=True) ------------------------------------------
    def state_dict(self) -> dict:
        packed = super().state_dict()
        packed["state"] = {index: {key: _pack(value) for key, value in state.items()}
                           for index, state in packed["state"].items()}
        packed["fp8"] = {
            "exp_avg_dtype": self.exp_avg_dtype, "exp_avg_sq_dtype": self.exp_avg_sq_dtype,
            "rng": {device: gen.get_state() for device, gen in self._generators.items()},
        }
        return packed

    def load_state_dict(self, state_dict: dict) -> None:
        # Not torch's: it would cast every floating state tensor (FP8 payloads, scales) to the
        # parameter's dtype.
        params = self._params_by_index(state_dict["param_groups"])
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({key: value for key, value in saved.items() if key != "params"})
        self.state = defaultdict(dict)
        for index, packed in state_dict["state"].items():
            p = params[int(index)]
            self.state[p] = self._unpack_state(packed, p)
        for device, rng_state in state_dict.get("fp8", {}).get("rng", {}).items():
            self._generator(self._local_device(torch.device(device))).set_state(rng_state.cpu())

    def _local_device(self, saved: torch.device) -> torch.device:
        """Where a generator saved on `saved` belongs here: the same device, or the one device of
        its type that holds parameters (a rank resumed on another GPU index)."""
        devices = {p.device for group in self.param_groups for p in group["params"]}
        same_type = [d for d in devices if d.type == saved.type]
        return saved if saved in devices or len(same_type) != 1 else same_type[0]

    def _params_by_index(self, saved_groups: list[dict]) -> dict[int, torch.Tensor]:
        sizes = [len(g["params"]) for g in self.param_groups]
        saved_sizes = [len(g["params"]) for g in saved_groups]
        if sizes != saved_sizes:
            raise ValueError(f"optimizer state has parameter groups of sizes {saved_sizes}, this optimizer "
                             f"{sizes}; build the optimizer over the same parameters as the checkpoint")
        return {int(index): p for saved, group in zip(saved_groups, self.param_groups)
                for index, p in zip(saved["params"], group["params"])}

    def _unpack_state(self, packed: dict, p: torch.Tensor) -> dict:
        state = {"step": int(packed["step"])}
        for key, dtype in zip(_MOMENTS, (self.exp_avg_dtype, self.exp_avg_sq_dtype)):
            stored = _unpack(packed[key], p.device)
            if stored_kind(stored) != dtype:  # saved with other state dtypes: convert
                stored = encode_state(decode_state(stored).clone(), dtype, None, self.power_of_two_scales)
            state[key] = stored
        return state
