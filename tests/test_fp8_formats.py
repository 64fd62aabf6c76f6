"""Format specs and the saturating cast, checked code by code."""

import math

import pytest
import torch

import fp8
from fp8.tensor import cast_saturate

SPECS = [fp8.E4M3, fp8.E5M2]


def all_codes(spec):
    """Every byte pattern of the format, decoded to float32."""
    codes = torch.arange(256, dtype=torch.uint8)
    return codes, codes.view(spec.dtype).float()


def decode_reference(byte: int, spec) -> float:
    """Decode one FP8 byte from its bit fields, independently of torch's cast."""
    sign = -1.0 if byte & 0x80 else 1.0
    exp = (byte >> spec.mantissa_bits) & ((1 << spec.exponent_bits) - 1)
    man = byte & ((1 << spec.mantissa_bits) - 1)
    top = (1 << spec.exponent_bits) - 1
    if spec.name == "e4m3" and exp == top and man == (1 << spec.mantissa_bits) - 1:
        return math.nan
    if spec.name == "e5m2" and exp == top:
        return sign * math.inf if man == 0 else math.nan
    if exp == 0:
        return sign * man * 2.0 ** (1 - spec.bias - spec.mantissa_bits)
    return sign * (1 + man / (1 << spec.mantissa_bits)) * 2.0 ** (exp - spec.bias)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_every_code_decodes_and_round_trips(spec):
    codes, values = all_codes(spec)
    for byte, value in zip(codes.tolist(), values.tolist()):
        ref = decode_reference(byte, spec)
        if math.isnan(ref):
            assert math.isnan(value)
            continue
        assert value == ref, (byte, value, ref)
        back = torch.tensor([value]).to(spec.dtype).view(torch.uint8).item()
        # +0 and -0 are distinct codes and both survive.
        assert back == byte, (spec.name, byte, value, back)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_spec_constants_match_the_codes(spec):
    _, values = all_codes(spec)
    finite = values[torch.isfinite(values)]
    positive = finite[finite > 0]
    assert spec.max == finite.max().item()
    assert spec.min_subnormal == positive.min().item()
    normal_min = 2.0 ** (1 - spec.bias)
    assert spec.min_normal == normal_min
    assert spec.has_inf == bool(torch.isinf(values).any())
    assert spec.has_nan and bool(torch.isnan(values).any())


def test_published_constants():
    assert (fp8.E4M3.max, fp8.E4M3.min_subnormal) == (448.0, 2.0**-9)
    assert (fp8.E5M2.max, fp8.E5M2.min_subnormal) == (57344.0, 2.0**-16)
    assert fp8.FP16.max == 65504.0
    assert fp8.get_spec(torch.float8_e5m2) is fp8.E5M2
    with pytest.raises(ValueError, match="unknown number format"):
        fp8.get_spec("e3m4")


def test_format_choices():
    assert fp8.HYBRID.forward is fp8.E4M3 and fp8.HYBRID.backward is fp8.E5M2
    e4m3 = fp8.Format.parse("e4m3")
    assert e4m3.forward is fp8.E4M3 and e4m3.backward is fp8.E4M3
    with pytest.raises(ValueError, match="--fp8-format"):
        fp8.Format.parse("e5m2")


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_midpoints_round_to_even(spec):
    _, values = all_codes(spec)
    positive = sorted({v for v in values.tolist() if math.isfinite(v) and v > 0})
    checked = 0
    for lo, hi in zip(positive, positive[1:]):
        mid = torch.tensor([(lo + hi) / 2], dtype=torch.float64)
        got = cast_saturate(mid, spec).float().item()
        lo_byte = torch.tensor([lo]).to(spec.dtype).view(torch.uint8).item()
        even = lo if lo_byte % 2 == 0 else hi
        assert got == even, (spec.name, lo, hi, got)
        checked += 1
    assert checked == len(positive) - 1 > 100


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_cast_saturates_instead_of_overflowing(spec):
    x = torch.tensor([spec.max * 1.01, -spec.max * 4, 1e30, -math.inf, math.inf])
    out = cast_saturate(x, spec).float()
    assert out.tolist() == [spec.max, -spec.max, spec.max, -spec.max, spec.max]
    q = fp8.quantize(x[:3], spec, scale=1.0)
    assert q.dequantize().tolist() == [spec.max, -spec.max, spec.max]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_subnormals(spec):
    tiny = spec.min_subnormal
    x = torch.tensor([tiny, 3 * tiny, tiny / 2, 0.75 * tiny, -tiny, tiny / 4])
    out = cast_saturate(x, spec).float().tolist()
    # tiny/2 is a tie between 0 and tiny: even is 0; 0.75*tiny rounds up.
    assert out == [tiny, 3 * tiny, 0.0, tiny, -tiny, 0.0]


@pytest.mark.parametrize("spec", SPECS + [fp8.FP16], ids=lambda s: s.name)
def test_nan_stays_nan(spec):
    x = torch.tensor([1.0, math.nan, -2.0])
    q = fp8.quantize(x, spec)
    out = q.dequantize()
    assert math.isnan(out[1].item())
    assert out[0].item() == pytest.approx(1.0, rel=0.07) and out[2].item() == pytest.approx(-2.0, rel=0.07)


def test_inf_to_nan_keeps_overflow_visible():
    x = torch.tensor([1.0, math.inf, -math.inf])
    assert torch.isnan(cast_saturate(x, fp8.E4M3, inf_to_nan=True).float()[1:]).all()
    assert fp8.quantize(x, "e4m3", inf_to_nan=True).dequantize()[1:].isnan().all()
