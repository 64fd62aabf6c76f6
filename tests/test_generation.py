"""Generation with a KV cache (megatron.core.inference): the cache changes nothing but speed, the
sampler draws from the distribution it says it does, and tensor parallelism gives the tokens of
one process."""

from __future__ import annotations

import math

import pytest
import torch

from megatron.core.inference import KVCache, SamplingParams, generate
from megatron.core.inference.generation import next_logits
from megatron.core.inference.sampling import choose_tokens, filtered_probs, sequence_generators
from megatron.core.models.gpt import GPTModel
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import initialize_parameters, parallelize_gpt
from megatron.core.transformer.config import TransformerConfig
from distributed import run_distributed

VARIANTS = {
    "gpt2": dict(),
    "llama": dict(normalization="RMSNorm", swiglu=True, position_embedding_type="rope", num_query_groups=2,
                  untie_embeddings_and_output_weights=True, add_bias_linear=False),
    "mqa-learned-untied": dict(normalization="RMSNorm", num_query_groups=1, untie_embeddings_and_output_weights=True),
    "swiglu-rope-tied": dict(swiglu=True, position_embedding_type="rope"),
}
VOCAB, PADDED, MAX_POS = 100, 128, 48
PROMPTS = [[5, 17, 3, 99, 42], [7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [1, 2]]


def build(ps: ParallelState, variant: str = "llama", dtype=torch.float32, gain: float = 4.0) -> GPTModel:
    config = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=PADDED,
                               unpadded_vocab_size=VOCAB, max_position_embeddings=MAX_POS, ffn_hidden_size=96, hidden_dropout=0.0,
                               attention_dropout=0.0, params_dtype=dtype, **VARIANTS[variant])
    model = GPTModel(config, device="meta")
    parallelize_gpt(model, ps)
    initialize_parameters(model, ps, seed=7)
    with torch.no_grad():  # larger weights than the init's, so that logits are far from uniform
        for param in model.parameters():
            param.mul_(gain)
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_cached_logits_equal_full_recomputation(variant):
    """Prefill of 5 tokens, then 1 and 3 tokens at a time through the cache: each step's logits
    equal those of the whole sequence recomputed (every norm, MLP, position and head variant),
    to float64 rounding."""
    model = build(ParallelState.single("cpu"), variant, dtype=torch.float64)
    tokens = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))
    cache = KVCache.for_model(model, batch=3, max_length=12)
    position = 0
    for step in (5, 1, 3, 1, 2):
        got = next_logits(model, tokens[:, position:position + step], None, cache)
        position += step
        want = next_logits(model, tokens[:, :position], None)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
        with torch.no_grad():
            full = model(tokens[:, :position])[:, -1]
        torch.testing.assert_close(got, full, rtol=1e-9, atol=1e-9)
    assert cache.length == 12
    # keys and values: 2 x layers x groups x head dim x 8 bytes per token and sequence
    groups = model.config.num_query_groups
    assert cache.bytes_per_token() == 2 * 2 * groups * model.config.kv_channels * 8
    assert cache.nbytes == sum(t.untyped_storage().nbytes() for t in cache.keys + cache.values)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_greedy_generation_with_cache_equals_recomputation(variant):
    model = build(ParallelState.single("cpu"), variant)
    params = SamplingParams(max_new_tokens=12, greedy=True)
    cached = generate(model, PROMPTS, params, vocab_size=VOCAB)
    recomputed = generate(model, PROMPTS, params, vocab_size=VOCAB, use_cache=False)
    assert [r.tokens for r in cached] == [r.tokens for r in recomputed]
    for a, b in zip(cached, recomputed):
        assert len(a.tokens) == 12 and a.finish_reason == "length"
        assert all(t < VOCAB for t in a.tokens)  # padded vocabulary rows are never chosen
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    # A prompt's continuation does not depend on the prompts batched with it.
    for prompt, result in zip(PROMPTS, cached):
        alone = generate(model, [prompt], params, vocab_size=VOCAB)[0]
        assert alone.tokens == result.tokens


def test_logprobs_are_the_models_log_softmax_of_each_chosen_token():
    model = build(ParallelState.single("cpu"), "gpt2")
    result = generate(model, [PROMPTS[0]], SamplingParams(max_new_tokens=6, temperature=0.8, seed=3),
                      vocab_size=VOCAB)[0]
    sequence = PROMPTS[0] + result.tokens
    with torch.no_grad():
        logits = model.double()(torch.tensor([sequence]))[0, :, :VOCAB]
    want = torch.log_softmax(logits, -1)
    for i, (token, logprob) in enumerate(zip(result.tokens, result.logprobs)):
        assert logprob == pytest.approx(want[len(PROMPTS[0]) - 1 + i, token].item(), abs=1e-5)


def test_sampling_is_reproducible_and_independent_of_the_batch():
    model = build(ParallelState.single("cpu"), "llama")
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9, seed=11)
    first = generate(model, PROMPTS, params, vocab_size=VOCAB)
    again = generate(model, PROMPTS, params, vocab_size=VOCAB, use_cache=False)
    assert [r.tokens for r in first] == [r.tokens for r in again]
    # The third prompt alone, with its global index: the same tokens as inside the batch.
    alone = generate(model, [PROMPTS[2]], params, vocab_size=VOCAB, indices=[2])[0]
    assert alone.tokens == first[2].tokens
    other_seed = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, seed=12), vocab_size=VOCAB)
    assert [r.tokens for r in other_seed] != [r.tokens for r in first]


def test_stops_at_end_of_document_and_at_the_position_limit():
    model = build(ParallelState.single("cpu"), "gpt2")
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    free = generate(model, [PROMPTS[0]], greedy, vocab_size=VOCAB)[0]
    eod = free.tokens[3]
    stopped = generate(model, [PROMPTS[0]], greedy, vocab_size=VOCAB, eod_id=eod)[0]
    first = free.tokens.index(eod)
    assert stopped.tokens == free.tokens[:first + 1] and stopped.finish_reason == "eod"
    near_limit = [list(range(1, MAX_POS - 3))]
    capped = generate(model, near_limit, SamplingParams(max_new_tokens=10, greedy=True), vocab_size=VOCAB)[0]
    assert len(capped.tokens) == MAX_POS - len(near_limit[0]) == 4 and capped.finish_reason == "length"
    with pytest.raises(ValueError, match="no room to generate"):
        generate(model, [list(range(MAX_POS))], greedy, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], greedy, vocab_size=VOCAB)


def _reference_filtered(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Float64 probabilities per token id after temperature, then top-k, then top-p on the
    renormalised top-k distribution (the order Hugging Face's logits warpers apply them in)."""
    probs = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(probs)), key=lambda i: (-probs[i].item(), i))
    candidates = order[:top_k] if top_k else order
    total = sum(probs[i].item() for i in candidates)
    keep, mass = [], 0.0
    for i in candidates:
        if keep and mass >= top_p:
            break
        keep.append(i)
        mass += probs[i].item() / total
    out = torch.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.6), (1.0, 8, 0.8)])
def test_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    logits = torch.randn(1, 30, generator=torch.Generator().manual_seed(4)) * 2
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    want = _reference_filtered(logits[0], temperature, top_k, top_p)
    probs, order = filtered_probs(logits, params)
    got = torch.zeros(30, dtype=torch.float64).scatter(0, order[0], probs[0].double())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    draws = 4000
    counts = torch.zeros(30, dtype=torch.float64)
    for generator in sequence_generators(9, list(range(draws))):
        counts[choose_tokens(logits, params, [generator])[0]] += 1
    assert counts[want == 0].sum() == 0  # nothing outside the kept set
    freq = counts / draws
    # within 4.5 standard errors of each kept token's probability
    assert torch.all((freq - want).abs() <= 4.5 * torch.sqrt(want * (1 - want) / draws) + 1e-9), (freq, want)


def test_bad_sampling_settings_are_refused():
    for kwargs, message in [(dict(max_new_tokens=0), "--max-new-tokens"), (dict(temperature=-1), "--temperature"),
                            (dict(top_k=-2), "--top-k"), (dict(top_p=0.0), "--top-p")]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)


def tp_worker(rank, world_size):
    ps = ParallelState.build(tensor_model_parallel_size=world_size)
    out = {}
    for variant in ("gpt2", "llama"):
        model = build(ps, variant)
        out[variant] = [(r.tokens, r.logprobs) for r in generate(
            model, PROMPTS, SamplingParams(max_new_tokens=10, greedy=True), vocab_size=VOCAB, ps=ps)]
        out[variant + "-sampled"] = [(r.tokens, r.logprobs) for r in generate(
            model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0.9, top_p=0.95, seed=5),
            vocab_size=VOCAB, ps=ps)]
    return out


@pytest.mark.distributed
def test_tensor_parallel_generation_gives_the_tokens_of_one_process():
    """Greedy and seeded sampling at TP 2 (vocabulary-parallel logits gathered per step) give the
    tokens of TP 1, on both ranks, with log-probabilities equal to rounding."""
    single = tp_worker(0, 1)
    for rank_out in run_distributed(tp_worker, 2):
        for key, results in single.items():
            assert [t for t, _ in rank_out[key]] == [t for t, _ in results], key
            for (_, lp2), (_, lp1) in zip(rank_out[key], results):
                assert lp2 == pytest.approx(lp1, abs=1e-4)
            assert not math.isnan(sum(sum(lp) for _, lp in results))


@pytest.mark.parametrize("level", ["O0", "O3"])
def test_fp8_generation(level):
    """At O0 the FP8 linears cast their BF16/FP32 weights per GEMM; at O3 they hold them in FP8
    (one byte each, plus a scale) and read them as stored. Logits stay close to the FP32 model's,
    and with row-wise scales (one per token) the cache still equals recomputation to rounding."""
    from fp8 import sqnr_db
    from fp8.params import fp8_weight_tensor, is_fp8_param, quantize_fp8_weight, WeightCast
    from megatron.core.precision import FP8Config, apply_inference_precision

    ps = ParallelState.single("cpu")
    reference = build(ps, "llama", gain=1.0)
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    want = next_logits(reference, tokens, None)
    for recipe in ("current", "rowwise"):
        model = build(ps, "llama", gain=1.0)
        originals = {n: p.detach().clone() for n, p in model.named_parameters()}
        config = FP8Config(level=level, recipe=recipe, min_features=32)
        names = apply_inference_precision(model, config)
        cast = WeightCast(config.to_recipe().margin, config.to_recipe().power_of_two)
        assert len(names) == 8  # qkv, proj, fc1, fc2 of both layers
        for name in names:
            weight = model.get_submodule(name).weight
            assert is_fp8_param(weight) == (level == "O3")
            if level == "O3":
                assert weight.element_size() == 1
                payload, scale = quantize_fp8_weight(originals[name + ".weight"], cast)
                stored = fp8_weight_tensor(weight)
                assert torch.equal(stored.data.view(torch.uint8), payload.view(torch.uint8))
                assert torch.equal(stored.scale, scale)
        got = next_logits(model, tokens, None)
        assert torch.isneginf(got[:, VOCAB:]).all()
        assert sqnr_db(want[:, :VOCAB], got[:, :VOCAB]) > 20, (recipe, sqnr_db(want[:, :VOCAB], got[:, :VOCAB]))
        if recipe == "rowwise":
            cache = KVCache.for_model(model, batch=2, max_length=10)
            next_logits(model, tokens[:, :6], None, cache)
            step = next_logits(model, tokens[:, 6:7], None, cache)
            torch.testing.assert_close(step, next_logits(model, tokens[:, :7], None), rtol=1e-4, atol=1e-4)
