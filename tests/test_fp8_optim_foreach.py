"""FP8AdamW's multi-tensor path (fp8/optim_foreach.py) against its per-tensor path (``foreach=False``,
itself checked against torch.optim.AdamW in test_fp8_optim.py): the same bits - weights, their
scales, moments and their scales, step counts, generator states - after every step, for every
kind of parameter and every pair of moment formats."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch

import fp8
import fp8.optim_foreach as optim_foreach
from fp8.gradients import FP8GradStore
from fp8.optim import STATE_DTYPES, FP8AdamW, is_scaled_fp16, make_scaled_fp16_param

KINDS = ("fp32", "bf16", "fp16", "scaled_fp16")
CHUNK, BOUND = 64, 256  # small chunks and batches: tensors of several pieces, several batches
# Values per tensor: more than a batch holds (per-tensor path), none, one, a piece, 2-4 pieces,
# exactly a batch; some 2-D.
SHAPES = ((300,), (0,), (1,), (64,), (10, 10), (150,), (37,), (16, 16), (5,))
GROUPS = ({"lr": 1e-2, "weight_decay": 0.1}, {"lr": 3e-3, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-6})
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of `t` as integers, so that NaNs compare too (and -0 differs from +0)."""
    t = t.detach()
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def _param(kind: str, value: torch.Tensor) -> torch.nn.Parameter:
    if kind == "scaled_fp16":
        return make_scaled_fp16_param(torch.nn.Parameter(value.clone()))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[kind]
    return torch.nn.Parameter(value.to(dtype))


class Run:
    """Parameters, their gradient sources and an FP8AdamW over them; `twin` makes the same with
    the other path."""

    def __init__(self, specs, *, foreach, groups=GROUPS, device="cpu", **opt_kwargs):
        gen = torch.Generator().manual_seed(0)
        self.specs, self.device = specs, torch.device(device)
        self.params = [_param(kind, (torch.randn(shape, generator=gen) * 10.0 ** (i % 5 - 2)).to(self.device))
                       for i, (kind, shape) in enumerate(specs)]
        self.store, self.held = FP8GradStore(), {}
        kwargs = {"chunk_numel": CHUNK, "foreach_numel": BOUND, **opt_kwargs}
        self.opt_kwargs, self.groups = kwargs, groups
        # By rows of `_interleaved` specs: every kind in every group.
        param_groups = [{"params": [p for i, p in enumerate(self.params) if i // len(KINDS) % len(groups) == g], **hp}
                        for g, hp in enumerate(groups)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an FP8 second moment warns
            self.opt = FP8AdamW(param_groups, fp8_grads=self.store, grad_of=lambda p: self.held.get(id(p)),
                                foreach=foreach, **kwargs)

    def twin(self, foreach):
        """A new Run like this one was when it was made, with path `foreach`."""
        return Run(self.specs, foreach=foreach, groups=self.groups, device=self.device, **self.opt_kwargs)

    def give_grads(self, step: int, skip=(), source=None) -> None:
        """Deterministic gradients of step `step` (the same in every Run): by turns in `.grad`
        (FP32 / BF16 parameters), as FP8 in the store (two micro-batches accumulated) and as FP32
        through `grad_of`; the parameters in `skip` get none."""
        gen = torch.Generator().manual_seed(1000 + step)
        self.store.clear()
        self.held.clear()
        for i, p in enumerate(self.params):
            p.grad = None
            g = (torch.randn(p.shape, generator=gen) * 10.0 ** ((i + step) % 7 - 4)).to(self.device)
            where = source or ("grad", "fp8", "held")[i % 3]
            if i in skip:
                continue
            if where == "grad" and p.dtype in (torch.float32, torch.bfloat16) and not is_scaled_fp16(p):
                p.grad = g.to(p.dtype)
            elif where in ("fp8", "grad"):
                self.store.accumulate(p, g * 0.5)
                self.store.accumulate(p, g * 0.5)
            else:
                self.held[id(p)] = g

    def snapshot(self) -> dict[str, torch.Tensor]:
        out = {}
        for i, p in enumerate(self.params):
            out[f"param {i}"] = _bits(p)
            if is_scaled_fp16(p):
                out[f"param {i} scale"] = _bits(p.scale)
            state = self.opt.state.get(p, {})
            if "step" in state:
                out[f"param {i} step"] = torch.tensor(state["step"])
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    stored = state[key]
                    if isinstance(stored, fp8.ScalingTensor):
                        out[f"param {i} {key}"] = _bits(stored.data)
                        out[f"param {i} {key} scale"] = _bits(stored.scale)
                    else:
                        out[f"param {i} {key}"] = _bits(stored)
        for device, generator in self.opt._generators.items():
            out[f"generator {device}"] = generator.get_state()
        return out


def assert_same(a: Run, b: Run, when: str) -> None:
    mine, theirs = a.snapshot(), b.snapshot()
    assert mine.keys() == theirs.keys(), when
    different = [name for name in mine if not torch.equal(mine[name], theirs[name])]
    assert not different, f"{when}: {len(different)} entries differ, e.g. {different[:8]}"


def _step_both(per_tensor: Run, multi: Run, steps: int = 3, skip_at: dict | None = None, source=None) -> None:
    for step in range(steps):
        skip = (skip_at or {}).get(step, ())
        for run in (per_tensor, multi):
            run.give_grads(step, skip, source)
            run.opt.step()
        assert_same(per_tensor, multi, f"after step {step + 1}")


def _interleaved(kinds=KINDS, shapes=SHAPES):
    return [(kind, shape) for shape in shapes for kind in kinds]


def _count_per_tensor_calls(monkeypatch) -> list:
    """(optimizer, numel) of every parameter updated by the per-tensor `_step_param` from now on."""
    calls = []
    original = FP8AdamW._step_param

    def spy(self, p, grad, group):
        calls.append((self, p.numel()))
        return original(self, p, grad, group)

    monkeypatch.setattr(FP8AdamW, "_step_param", spy)
    return calls


# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("exp_avg_dtype,exp_avg_sq_dtype", list(itertools.product(STATE_DTYPES, STATE_DTYPES)))
def test_multi_tensor_step_is_bit_identical_to_per_tensor(exp_avg_dtype, exp_avg_sq_dtype, monkeypatch):
    """Every kind of parameter (interleaved, in two groups with their own lr, betas, eps and
    weight decay on / off), tensors of one piece, several pieces, more values than a batch holds,
    one value and none; gradients in .grad, FP8 in the store and through grad_of; a step where
    some parameters have no gradient, so that step counts differ within a group afterwards."""
    states = {"exp_avg_dtype": exp_avg_dtype, "exp_avg_sq_dtype": exp_avg_sq_dtype}
    multi = Run(_interleaved(), foreach=None, **states)
    per_tensor = multi.twin(foreach=False)
    calls = _count_per_tensor_calls(monkeypatch)
    skipped = set(range(0, len(multi.params), 5))
    _step_both(per_tensor, multi, steps=3, skip_at={1: skipped})
    # The multi-tensor run left only the 300-value and empty tensors to the per-tensor path.
    left = [i for i, (_, shape) in enumerate(multi.specs) if shape in ((300,), (0,))]
    assert sorted(n for opt, n in calls if opt is multi.opt) == sorted(
        multi.params[i].numel() for i in left for step in range(3) if not (step == 1 and i in skipped))
    assert sum(opt is per_tensor.opt for opt, _ in calls) == 3 * len(multi.params) - len(skipped)


@pytest.mark.parametrize("power_of_two_scales", [True, False])
def test_paper_formats_with_fp8_gradients(power_of_two_scales):
    """The O2 configuration (FP8 first moment, FP16 second moment, FP16 masters with scales), every
    gradient FP8 from the store, 5 steps, with and without power-of-two scales; a batch of 40
    tensors, so that its stacked scales and amaxes go through the vectorized kernels."""
    specs = [("scaled_fp16", (int(n),)) for n in torch.randint(1, 60, (40,), generator=torch.Generator().manual_seed(2))]
    specs += [("scaled_fp16", (200,)), ("scaled_fp16", (500,))]
    kwargs = {"power_of_two_scales": power_of_two_scales, "foreach_numel": 4096, "groups": GROUPS[:1]}
    multi = Run(specs, foreach=True, **kwargs)
    per_tensor = multi.twin(foreach=False)
    _step_both(per_tensor, multi, steps=5, source="fp8")
    assert len(multi.store._entries) == len(specs)


@pytest.mark.parametrize("states", [{"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp16"},
                                    {"exp_avg_dtype": "fp32", "exp_avg_sq_dtype": "bf16"}])
def test_stochastic_rounding_draws_as_the_per_tensor_path(states):
    """With stochastic rounding, the write-backs draw the per-tensor path's random numbers in its
    order: interleaved kinds (FP32 parameters draw nothing), multi-piece tensors and a tensor
    updated per tensor between batches; the generator's state matches too."""
    multi = Run(_interleaved(), foreach=None, stochastic_rounding=True, seed=11, **states)
    per_tensor = multi.twin(foreach=False)
    _step_both(per_tensor, multi, steps=3, skip_at={1: {3, 4}})
    assert multi.opt._generators  # it did draw


def test_non_finite_gradients_give_the_same_bits():
    """An inf and a NaN gradient: NaN amaxes keep the previous scales in both paths."""
    multi = Run(_interleaved(KINDS, ((10, 10), (7,))), foreach=True)
    per_tensor = multi.twin(foreach=False)
    for run in (per_tensor, multi):
        run.give_grads(0)
        for i, p in enumerate(run.params[:4]):
            run.store.set(p, fp8.quantize(torch.full(p.shape, float("inf") if i % 2 else float("nan")), "e4m3"))
            run.held.pop(id(p), None)
            p.grad = None
        run.opt.step()
    assert_same(per_tensor, multi, "after a non-finite step")
    assert multi.params[3].scale.isfinite()


def test_updates_past_the_fp16_maximum_saturate_alike():
    """Unscaled FP16 weights pushed past 65504 by a huge learning rate saturate (BF16 ones round)
    in both paths."""
    specs = _interleaved(("fp16", "bf16", "fp16"), ((40,), (3, 7)))
    groups = ({"lr": 1e3, "weight_decay": 0.0},)
    multi = Run(specs, foreach=True, groups=groups, exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32")
    per_tensor = multi.twin(foreach=False)
    for run in (per_tensor, multi):
        for p in run.params:
            p.data.fill_(65000.0)
    _step_both(per_tensor, multi, steps=2, source="held")
    assert any((p == 65504).any() for p in multi.params if p.dtype == torch.float16)


def test_state_dict_round_trips_alike_in_both_paths():
    """The two paths save the same state dict; either path resumes from either's and the runs
    stay bit-identical."""
    states = {"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp16", "stochastic_rounding": True}
    multi = Run(_interleaved(), foreach=True, **states)
    per_tensor = multi.twin(foreach=False)
    _step_both(per_tensor, multi, steps=2)
    saved = {name: run.opt.state_dict() for name, run in (("multi", multi), ("per_tensor", per_tensor))}
    _assert_same_tree(saved["multi"], saved["per_tensor"])
    for source, run in (("multi", multi), ("per_tensor", per_tensor)):
        # Each path resumes from this path's checkpoint; they go on alike.
        resumed = [_resume(run, saved[source], foreach) for foreach in (True, False)]
        assert_same(*resumed, f"resumed from {source}")
        for step in (2, 3):
            for other in resumed:
                other.give_grads(step)
                other.opt.step()
            assert_same(*resumed, f"resumed from {source}, step {step + 1}")
        _assert_same_tree(resumed[0].opt.state_dict(), resumed[1].opt.state_dict())
    for step in (2, 3):  # and as the runs that saved them
        for run in (multi, per_tensor):
            run.give_grads(step)
            run.opt.step()
    assert_same(multi, resumed[0], "resumed vs uninterrupted")


def _resume(source: Run, state_dict: dict, foreach: bool) -> Run:
    """A new run of path `foreach` with `source`'s weights and `state_dict`."""
    run = source.twin(foreach=foreach)
    for mine, theirs in zip(run.params, source.params):
        mine.data.copy_(theirs.data)
        if is_scaled_fp16(mine):
            mine.scale.copy_(theirs.scale)
    run.opt.load_state_dict(copy.deepcopy(state_dict))
    return run


def _assert_same_tree(a, b, path="state_dict"):
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same_tree(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(_bits(a), _bits(b)), path
    else:
        assert a == b, path


def test_plan_batches_by_kind_step_and_bound():
    """Batches share device, kind, step count and formats and hold at most `foreach_numel` values;
    tensors above that, and empty ones, are left to the per-tensor path; with stochastic rounding
    a batch is a run of consecutive parameters."""
    specs = [("fp32", (100,)), ("bf16", (100,)), ("fp32", (100,)), ("fp32", (300,)), ("bf16", (100,)),
             ("fp32", (100,)), ("bf16", (0,)), ("fp32", (56,))]
    for stochastic_rounding in (False, True):
        run = Run(specs, foreach=None, groups=GROUPS[:1], stochastic_rounding=stochastic_rounding)
        run.give_grads(0, source="held")
        items = optim_foreach.plan(run.opt, run.opt.param_groups[0])
        index = {id(p): i for i, p in enumerate(run.params)}
        shown = [[index[id(p)] for p in item.params] if isinstance(item, optim_foreach.Batch)
                 else index[id(item[0])] for item in items]
        if stochastic_rounding:
            assert shown == [[0], [1], [2], 3, [4], [5], 6, [7]]
        else:
            assert shown == [3, [0, 2], 6, [1, 4], [5, 7]]  # [0, 2] is full when 5 comes
        assert all(item.numel <= BOUND for item in items if isinstance(item, optim_foreach.Batch))
    run = Run(specs[:3], foreach=None, groups=GROUPS[:1])
    run.give_grads(0, source="held")
    run.opt.step()
    run.give_grads(1, skip={2}, source="held")
    run.opt.step()  # parameter 2 is now a step behind parameter 0
    run.give_grads(2, source="held")
    items = optim_foreach.plan(run.opt, run.opt.param_groups[0])
    assert sorted(len(item.params) for item in items) == [1, 1, 1]


def test_foreach_options():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="foreach_numel"):
        FP8AdamW([p], foreach_numel=0)
    assert FP8AdamW([p]).foreach is None and FP8AdamW([p]).foreach_numel == FP8AdamW([p]).chunk_numel
    assert FP8AdamW([p], chunk_numel=10, foreach=False).foreach_numel == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("states", [{"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp16"},
                                    {"exp_avg_dtype": "fp32", "exp_avg_sq_dtype": "fp32"},
                                    {"exp_avg_dtype": "bf16", "exp_avg_sq_dtype": "fp16"}])
@pytest.mark.parametrize("stochastic_rounding", [False, True])
def test_on_cuda_multi_tensor_step_is_bit_identical_to_per_tensor(states, stochastic_rounding):
    """On CUDA the foreach ops are fused kernels of their own (and the division by a Python
    number differs from the single-tensor kernel's): the bits must still be the per-tensor ones."""
    multi = Run(_interleaved(), foreach=None, device="cuda", stochastic_rounding=stochastic_rounding, **states)
    per_tensor = multi.twin(foreach=False)
    _step_both(per_tensor, multi, steps=3, skip_at={1: {2, 7}})
