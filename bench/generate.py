"""Generation speed with and without the KV cache, and what the cache and the weights take.

    python bench/generate.py                       # batch 1 and 8, levels none and O3, on CPU
    python bench/generate.py --device cuda --batches 1 8 32 --new-tokens 128

A randomly initialised GPT (default: 8 layers, hidden 512, 8 heads, 2 query groups, SwiGLU,
RMSNorm, rotary positions, vocabulary 8192: a small Llama-shaped model) generates
`--new-tokens` tokens greedily after prompts of `--prompt-tokens`, with the KV cache and by
recomputing the whole sequence each step. Tokens/s counts new tokens of the whole batch; the
first run of each setting is a warm-up. The KV cache's bytes per token and sequence are its
buffers' sizes over their positions; weight bytes are the parameters' storage (the O3 model
holds its FP8 linear weights in one byte each, as generation reads them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from fp8.params import param_nbytes  # noqa: E402
from megatron.core.inference import KVCache, SamplingParams, generate  # noqa: E402
from megatron.core.models.gpt import GPTModel  # noqa: E402
from megatron.core.parallel_state import ParallelState  # noqa: E402
from megatron.core.parallelize import initialize_parameters, parallelize_gpt  # noqa: E402
from megatron.core.precision import FP8Config, apply_inference_precision  # noqa: E402
from megatron.core.transformer.config import TransformerConfig  # noqa: E402

MODEL = dict(num_layers=8, hidden_size=512, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=1408,
             vocab_size=8192, max_position_embeddings=512, normalization="RMSNorm", swiglu=True,
             position_embedding_type="rope", add_bias_linear=False, untie_embeddings_and_output_weights=True)


def build(level: str, device: torch.device) -> GPTModel:
    config = TransformerConfig(**MODEL, hidden_dropout=0.0, attention_dropout=0.0, params_dtype=torch.bfloat16)
    ps = ParallelState.single(device)
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=1, device=device)
    apply_inference_precision(model, FP8Config(level=level, recipe="current"))
    return model.eval()


def timed_generation(model, batch: int, prompt_tokens: int, new_tokens: int, use_cache: bool, device) -> float:
    gen = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, MODEL["vocab_size"], (batch, prompt_tokens), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=new_tokens, greedy=True, stop_on_eod=False)
    for warm in (True, False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        results = generate(model, prompts, params, vocab_size=MODEL["vocab_size"], use_cache=use_cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    assert all(len(r.tokens) == new_tokens for r in results)
    return batch * new_tokens / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", nargs="+", default=["none", "O3"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    print(f"{'level':<6}{'batch':>6}{'cache tok/s':>13}{'recompute tok/s':>17}{'speed-up':>10}"
          f"{'KV B/token':>12}{'weight MiB':>12}")
    for level in args.levels:
        model = build(level, device)
        weight_bytes = sum(param_nbytes(p) for p in model.parameters())
        for batch in args.batches:
            cached = timed_generation(model, batch, args.prompt_tokens, args.new_tokens, True, device)
            recomputed = timed_generation(model, batch, args.prompt_tokens, args.new_tokens, False, device)
            cache = KVCache.for_model(model, batch, args.prompt_tokens + args.new_tokens)
            row = {"level": level, "batch": batch, "cached_tokens_per_s": cached,
                   "recomputed_tokens_per_s": recomputed, "kv_bytes_per_token": cache.bytes_per_token(),
                   "kv_cache_bytes": cache.nbytes, "weight_bytes": weight_bytes}
            rows.append(row)
            print(f"{level:<6}{batch:>6}{cached:>13.1f}{recomputed:>17.1f}{cached / recomputed:>10.2f}"
                  f"{row['kv_bytes_per_token']:>12,}{weight_bytes / 2**20:>12.1f}", flush=True)
    out = args.out or RESULTS / f"generate-{args.device}.json"
    save_results(out, run_meta("generate.py", argv, model=MODEL, prompt_tokens=args.prompt_tokens,
                               new_tokens=args.new_tokens, device=args.device), rows=rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
