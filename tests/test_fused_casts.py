"""Fused casts (fp8/fused.py, --fp8-fused-casts): the compiled amax and cast kernels give the
eager chunked cast's bytes and scales, for every scaling granularity and format, with
infinities, NaN and values beyond the format's range; and a training run takes the same steps to
the bit with them as without. On CPU the kernels are torch.compile's C++ ones (on a GPU, Triton's:
bench/gpu_suite.py checks those)."""

import json
import os

import pytest
import torch

from fp8 import fused
from fp8.fused import same_bits
from fp8.scaling import tile_amax
from fp8.tensor import accumulate, quantize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def restore_mode():
    yield
    fused.set_mode("auto")


def cast(mode, x, **kwargs):
    fused.set_mode(mode)
    return quantize(x, **kwargs)


def awkward(shape, seed=0):
    """Normal values over a wide range, with inf, -inf, NaN and a value past every FP8 format."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * torch.logspace(-3, 3, shape[-1])
    flat = x.view(-1)
    flat[3], flat[11], flat[17], flat[23] = float("inf"), float("-inf"), float("nan"), 1e30
    return x.to(torch.bfloat16)


CASES = [  # (format, granularity, role, inf_to_nan)
    ("e4m3", "tensor", "activation", False),
    ("e5m2", "tensor", "activation", True),
    ("e4m3", "row", "activation", False),
    ("e4m3", "block", "activation", False),
    ("e5m2", "block", "weight", False),
]


@pytest.mark.parametrize("fmt,granularity,role,inf_to_nan", CASES)
def test_fused_cast_equals_eager(fmt, granularity, role, inf_to_nan):
    for shape in [(200, 300), (3, 7, 130)]:  # tiles that do not divide the shape; leading dims flattened
        x = awkward(shape)
        kwargs = dict(fmt=fmt, granularity=granularity, role=role, inf_to_nan=inf_to_nan)
        eager, compiled = cast("off", x, **kwargs), cast("on", x, **kwargs)
        assert torch.equal(eager.scale, compiled.scale)
        assert compiled.data.shape == x.shape and compiled.data.dtype == eager.data.dtype
        assert same_bits(eager.data, compiled.data), (shape, kwargs)
        finite = torch.isfinite(x.float())
        # The infinities saturate to +-max, or become NaN with inf_to_nan, as the eager cast does.
        assert torch.isnan(compiled.data.float()[~finite]).sum() == (3 if inf_to_nan else 1)


def test_fused_cast_with_given_scale_and_amax():
    x = awkward((64, 256), seed=1)
    for tile in (None, (1, 256), (1, 128), (128, 128)):
        fused.set_mode("off")
        amax_eager = tile_amax(x.reshape(64, 256), tile)
        fused.set_mode("on")
        amax_fused = tile_amax(x.reshape(64, 256), tile)
        assert torch.equal(amax_eager, amax_fused) or torch.equal(torch.isnan(amax_eager), torch.isnan(amax_fused))
    scale = torch.tensor(3.5)  # delayed scaling: a scale from earlier casts
    eager, compiled = cast("off", x, fmt="e4m3", scale=scale), cast("on", x, fmt="e4m3", scale=scale)
    assert torch.equal(compiled.scale, scale) and same_bits(eager.data, compiled.data)
    # Every finite value lands where the eager cast puts it: checked against float64 arithmetic too.
    finite = torch.isfinite(x.float())
    want = (x.double() * 3.5).clamp(-448, 448).float().to(torch.float8_e4m3fn)
    assert same_bits(want[finite], compiled.data[finite])


def test_fused_gradient_accumulation_equals_eager():
    """FP8 weight gradients summed over micro-batches (fp8.tensor.accumulate), with an overflow
    in the second one: the same bytes and scales, NaN where the sum overflowed."""
    grads = [awkward((96, 160), seed=s).float() * 1e-3 for s in (2, 3, 4)]
    grads[0] = torch.nan_to_num(grads[0], nan=0.0, posinf=1.0, neginf=-1.0)
    results = {}
    for mode in ("off", "on"):
        fused.set_mode(mode)
        acc = None
        for g in grads:
            acc = accumulate(acc, g, "e4m3")
        results[mode] = acc
    assert torch.equal(results["off"].scale, results["on"].scale)
    assert same_bits(results["off"].data, results["on"].data)
    assert torch.isnan(results["on"].data.float()).any()


def _untraceable(x):
    if x.sum() > 0:  # a branch on a value: torch.compile(fullgraph=True) refuses it
        return x * 2
    return x


def test_a_compile_failure_under_auto_falls_back_to_eager(capsys):
    fused.set_mode("auto")
    x = torch.ones(4)
    assert torch.equal(fused.compiled(_untraceable)(x), x * 2)
    assert fused.mode() == "off"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: fused FP8 casts could not be compiled")
    fused.set_mode("on")  # asked for explicitly: the failure is an error
    with pytest.raises(Exception):
        fused.compiled(_untraceable)(x)


def test_modes():
    cpu = torch.device("cpu")
    fused.set_mode("auto")
    assert not fused.active(cpu)  # auto fuses on CUDA only
    fused.set_mode("on")
    assert fused.active(cpu)
    fused.set_mode("off")
    assert not fused.active(torch.device("cuda"))
    with pytest.raises(ValueError, match="--fp8-fused-casts 'fast': use one of auto, on, off"):
        fused.set_mode("fast")


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["--fp8-level", "O2"], ["--fp8-level", "O3", "--fp8-recipe", "blockwise",
                                                           "--fp8-format", "e4m3"]], ids=["O2-delayed", "O3-block"])
def test_training_is_bit_identical_with_fused_casts(builtin_corpus_small, tmp_path, flags):
    import pretrain_gpt

    base = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "32",
            "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
            "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", "3", "--log-interval", "1",
            "--fp8-min-features", "16", *builtin_corpus_small.training_args(), *flags]
    records = {}
    for mode in ("off", "on"):
        metrics = tmp_path / f"{mode}.jsonl"
        assert pretrain_gpt.main(base + ["--fp8-fused-casts", mode, "--metrics-file", str(metrics)]) == 0
        records[mode] = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(records["on"]) == 3
    for off, on in zip(records["off"], records["on"]):
        assert (off["loss"], off["grad_norm"], off.get("fp8")) == (on["loss"], on["grad_norm"], on.get("fp8"))
    assert records["on"][-1]["loss"] != records["on"][0]["loss"]


def _overlapped_runs(rank, world_size, data_args, folder):
    import pretrain_gpt

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    for mode in ("off", "on"):
        argv = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "32",
                "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
                "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", "3", "--log-interval", "1",
                "--fp8-level", "O2", "--fp8-min-features", "16", "--overlap-grad-reduce", "--ddp-bucket-size", "20000",
                *data_args, "--fp8-fused-casts", mode, "--metrics-file", os.path.join(folder, f"{mode}.jsonl")]
        assert pretrain_gpt.main(argv) == 0
    return True


@pytest.mark.slow
@pytest.mark.distributed
def test_fused_casts_at_dp2_with_overlapped_reduction(builtin_corpus_small, tmp_path):
    """DP 2, O2, --overlap-grad-reduce (the FP8 all-reduce on the communication thread while
    backward's casts are compiled kernels): the same steps, statistics and bytes as eager casts."""
    from distributed import run_distributed

    run_distributed(_overlapped_runs, 2, builtin_corpus_small.training_args(), str(tmp_path), timeout=600)
    off, on = ([json.loads(line) for line in (tmp_path / f"{mode}.jsonl").read_text().splitlines()]
               for mode in ("off", "on"))
    assert len(on) == 3
    for a, b in zip(off, on):
        assert (a["loss"], a["grad_norm"], a["fp8"], a["comm"]) == (b["loss"], b["grad_norm"], b["fp8"], b["comm"])


def _offset_by_key(x, key):
    return x + len(key)


def test_casts_compile_every_variant_in_any_thread():
    """Dynamo's recompile limit is per thread (torch >= 2.12): a thread that did not raise it (an
    autograd backward thread, the communication thread) would stop compiling after 8 variants
    and, under ``on``, fail. Ten variants compiled from a fresh thread give the eager results."""
    import threading

    fused.set_mode("on")
    fn = fused.compiled(_offset_by_key)
    x = torch.arange(8.0)
    results, errors = {}, []

    def work():
        try:
            for length in range(1, 11):
                results[length] = fn(x, "k" * length)
        except Exception as exc:  # noqa: BLE001 - reported to the test below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert not errors, errors
    assert all(torch.equal(results[n], x + n) for n in range(1, 11))
