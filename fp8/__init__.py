"""FP8 numerics for FP8-LM: formats, scaling, ScalingTensor, FP8 GEMM and linear layer, FP8
collectives with auto-scaling, the FP8 Adam optimizer, and FP8 ZeRO's tensor placement.

Imports torch only; never megatron.
"""

from fp8.autoscale import GradientAutoScaler
from fp8.collectives import ProcessGroupTransport, fp8_all_reduce, fp8_reduce_scatter
from fp8.formats import E4M3, E5M2, FP16, HYBRID, Format, FormatSpec, get_spec
from fp8.gemm import fp8_matmul, select_path
from fp8.linear import FP8Linear, FP8LinearState, fp8_linear
from fp8.monitor import cast_stats, overflow_fraction, sqnr_db, underflow_fraction
from fp8.optim import FP8AdamW, make_scaled_fp16_param, scaled_value, to_scaled_fp16
from fp8.scaling import CurrentScaling, DelayedScaling, Recipe, compute_scale
from fp8.tensor import ScalingTensor, accumulate, dequantize, quantize, requantize
from fp8.zero import greedy_partition, rank_loads

__all__ = [
    "GradientAutoScaler", "ProcessGroupTransport", "fp8_all_reduce", "fp8_reduce_scatter",
    "greedy_partition", "rank_loads",
    "E4M3", "E5M2", "FP16", "HYBRID", "Format", "FormatSpec", "get_spec",
    "fp8_matmul", "select_path", "FP8Linear", "FP8LinearState", "fp8_linear",
    "FP8AdamW", "make_scaled_fp16_param", "scaled_value", "to_scaled_fp16",
    "cast_stats", "overflow_fraction", "sqnr_db", "underflow_fraction",
    "CurrentScaling", "DelayedScaling", "Recipe", "compute_scale",
    "ScalingTensor", "accumulate", "dequantize", "quantize", "requantize",
]
