"""Text generation for the project's GPT: a KV cache, sampling, and the decoding loop."""

from megatron.core.inference.generation import GenerationResult, SamplingParams, generate
from megatron.core.inference.kv_cache import KVCache

__all__ = ["GenerationResult", "KVCache", "SamplingParams", "generate"]
