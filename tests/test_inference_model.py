"""load_gpt_for_inference: a checkpoint saved at one layout and level loads at another tensor-parallel
size with the same logits; FP8 checkpoints give high-precision weights; bad folders fail in one line."""

import zlib

import pytest
import torch

from distributed import run_distributed
from fp8.params import is_fp8_param, param_value
from megatron.core import checkpointing
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState
from megatron.core.parallelize import global_name
from megatron.core.precision import apply_precision
from megatron.core.tensor_parallel.layout import layouts_of
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.config import parse_config
from megatron.training.gpt_providers import gpt_task
from megatron.training.inference_model import LoadedModel, load_gpt_for_inference, tokenizer_config_of
from megatron.training.resume import Checkpointer, layout_of
from megatron.training.training import TrainState

TINY = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--ffn-hidden-size", "128",
        "--seq-length", "16", "--max-position-embeddings", "32", "--train-iters", "10", "--lr", "1e-3",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", "95", "--make-vocab-size-divisible-by", "16",
        "--device", "cpu", "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--init-method-std", "0.1"]
LLAMA = ["--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope", "--rotary-base", "50000",
         "--disable-bias-linear", "--group-query-attention", "--num-query-groups", "2",
         "--untie-embeddings-and-output-weights"]
GPT2 = []  # the defaults: LayerNorm, GeLU, learned positions, biases, tied head
TOKENS = torch.randint(0, 95, (2, 12), generator=torch.Generator().manual_seed(7))


@torch.no_grad()
def _perturb_norms_and_biases(model, ps):
    """Initialisation makes norms one and biases zero; give them values so that a mix-up shows,
    the same full value on every layout (drawn whole from the parameter's name, then sharded)."""
    layouts = layouts_of(model)
    for name, param in model.named_parameters():
        if is_fp8_param(param) or not ("norm" in name or name.endswith("bias")):
            continue
        layout = layouts[param]
        generator = torch.Generator().manual_seed(zlib.crc32(global_name(model, name).encode()))
        full = torch.randn(layout.full_shape(param.shape, ps.tp_size), generator=generator) * 0.2
        param.add_(layout.shard(full, ps.tp_rank, ps.tp_size).to(param.dtype))


def save_random_checkpoint(folder, ps: ParallelState, extra=(), iteration: int = 3):
    """A random GPT built and saved as training builds and saves it (flags, layout, precision
    level, Checkpointer); returns the model, in eval mode."""
    argv = TINY + list(extra) + ["--save", str(folder), "--tensor-model-parallel-size", str(ps.tp_size)]
    config = parse_config(argv).for_world(ps.world_size)
    tokenizer = build_tokenizer(config.tokenizer.tokenizer_config())
    task = gpt_task(config, ps, tokenizer.vocab_size, tokenizer.eod)
    rng = model_parallel_seed(ps, config.seed)
    model = task.model_provider(config, ps, rng)
    _perturb_norms_and_biases(model, ps)
    apply_precision(model, config.precision.fp8_config(), ps)
    Checkpointer(config, ps, model, None, rng, train_state=TrainState(iteration=iteration), components={},
                 layout=layout_of(ps, config.use_distributed_optimizer), global_name=global_name,
                 signature=task.model_signature).save()
    return model.eval()


@torch.no_grad()
def full_logits(model, ps: ParallelState, tokens=TOKENS) -> torch.Tensor:
    """Logits over the whole padded vocabulary (gathered from the vocab-parallel slices)."""
    return comm.all_gather(model(tokens).float(), ps, "tp", dim=-1)


def reshard_worker(rank, world_size, tp1_dir, tp2_dir, dp2_dir):
    """At TP 2: save a model and its logits; load the TP 1 checkpoint the parent saved. At DP 2
    (TP 1): save another, whose second rank file the parent deletes before loading it."""
    torch.manual_seed(0)
    ps = ParallelState.build(2, 1, device="cpu")
    saved = save_random_checkpoint(tp2_dir, ps, LLAMA)
    loaded = load_gpt_for_inference(tp1_dir, ps, params_dtype=torch.float32)
    dp = ParallelState.build(1, 1, device="cpu")
    dp_model = save_random_checkpoint(dp2_dir, dp, GPT2 + ["--seed", "5"])
    return full_logits(saved, ps), full_logits(loaded.model, ps), full_logits(dp_model, dp)


@pytest.mark.distributed
def test_checkpoints_load_at_another_tensor_parallel_size(tmp_path):
    ps = ParallelState.single("cpu")
    tp1_model = save_random_checkpoint(tmp_path / "tp1", ps, GPT2)
    tp1_logits = full_logits(tp1_model, ps)
    results = run_distributed(reshard_worker, 2, str(tmp_path / "tp1"), str(tmp_path / "tp2"), str(tmp_path / "dp2"))
    tp2_logits, tp1_loaded_at_tp2, dp2_logits = results[0]
    assert torch.equal(results[1][0], tp2_logits)
    # TP 1 -> TP 2 (the same model that saved it, vocab-parallel logits gathered).
    torch.testing.assert_close(tp1_loaded_at_tp2, tp1_logits, atol=1e-5, rtol=0)
    # TP 2 -> TP 1.
    loaded = load_gpt_for_inference(str(tmp_path / "tp2"), ps)
    assert isinstance(loaded, LoadedModel) and not loaded.model.training
    assert loaded.config.vocab_size == 96 and loaded.config.num_query_groups == 2 and loaded.iteration == 3
    assert loaded.config.rotary_base == 50000 and loaded.args["swiglu"] and loaded.fp8_level == "none"
    torch.testing.assert_close(full_logits(loaded.model, ps), tp2_logits, atol=1e-5, rtol=0)
    # Only data-parallel rank 0's file holds what inference needs.
    (tmp_path / "dp2" / "iter_0000003" / "rank_00001.pt").unlink()
    dp_loaded = load_gpt_for_inference(str(tmp_path / "dp2"), ps)
    torch.testing.assert_close(full_logits(dp_loaded.model, ps), dp2_logits, atol=1e-5, rtol=0)


def test_fp8_checkpoint_gives_high_precision_weights(tmp_path):
    ps = ParallelState.single("cpu")
    model = save_random_checkpoint(tmp_path / "o3", ps, LLAMA + ["--fp8-level", "O3", "--fp8-min-features", "16"])
    fp8 = {global_name(model, n): p for n, p in model.named_parameters() if is_fp8_param(p)}
    assert len(fp8) == 8  # qkv, proj, fc1, fc2 of both layers
    loaded = load_gpt_for_inference(str(tmp_path / "o3"), ps)
    assert loaded.fp8_level == "O3"
    params = dict(loaded.model.named_parameters())
    for name, param in fp8.items():
        assert params[name].dtype == torch.float32 and not is_fp8_param(params[name])
        assert torch.equal(params[name], param_value(param))  # the FP8 value, exactly
    bf16 = load_gpt_for_inference(str(tmp_path / "o3"), ps, params_dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.model(TOKENS).dtype == torch.bfloat16
    save_random_checkpoint(tmp_path / "bf16", ps, LLAMA + ["--bf16"])
    assert next(load_gpt_for_inference(str(tmp_path / "bf16"), ps).model.parameters()).dtype == torch.bfloat16


def test_tokenizer_config_of_takes_the_run_flags_and_overrides():
    args = {"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": "/data/tok.model", "vocab_size": None}
    config = tokenizer_config_of(args)
    assert (config.tokenizer_type, config.tokenizer_model) == ("SentencePieceTokenizer", "/data/tok.model")
    assert tokenizer_config_of(args, tokenizer_model="/other.model", vocab_size=None).tokenizer_model == "/other.model"
    null = tokenizer_config_of(args, tokenizer_type="NullTokenizer", vocab_size=10)
    assert (null.tokenizer_type, null.vocab_size) == ("NullTokenizer", 10)
    with pytest.raises(ValueError, match="no tokenizer given"):
        tokenizer_config_of({})
    with pytest.raises(TypeError, match="tokenizer_path"):
        tokenizer_config_of(args, tokenizer_path="x")


def _one_line_error(exc_info, *fragments):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_bad_folders_and_layouts_fail_in_one_line(tmp_path):
    ps = ParallelState.single("cpu")
    with pytest.raises(ValueError) as missing:
        load_gpt_for_inference(str(tmp_path / "nowhere"), ps)
    _one_line_error(missing, "does not exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpointing.CheckpointError) as empty:
        load_gpt_for_inference(str(tmp_path / "empty"), ps)
    _one_line_error(empty, "holds no checkpoint", checkpointing.MARKER)
    save_random_checkpoint(tmp_path / "ckpt", ps, GPT2)
    with pytest.raises(ValueError) as pipeline:
        load_gpt_for_inference(str(tmp_path / "ckpt"), ps.replace(pp_size=2, world_size=2))
    _one_line_error(pipeline, "pipeline size is 2", "--pipeline-model-parallel-size 1")
    tp3 = ParallelState(world_size=3, rank=0, tp_size=3, pp_size=1, dp_size=1, tp_rank=0, pp_rank=0, dp_rank=0,
                        device=torch.device("cpu"), backend=None)
    with pytest.raises(ValueError) as heads:  # refused before any collective is needed
        load_gpt_for_inference(str(tmp_path / "ckpt"), tp3)
    _one_line_error(heads, "tensor-parallel size 3 does not divide the model's 4 attention heads", "--tensor-model-parallel-size")
    rank_file = tmp_path / "ckpt" / "iter_0000003" / "rank_00000.pt"
    rank_file.write_bytes(rank_file.read_bytes()[:1000])
    with pytest.raises(checkpointing.CheckpointError) as damaged:
        load_gpt_for_inference(str(tmp_path / "ckpt"), ps)
    _one_line_error(damaged, "rank_00000.pt cannot be loaded safely", "damaged")
    rank_file.unlink()
    with pytest.raises(checkpointing.CheckpointError) as gone:
        load_gpt_for_inference(str(tmp_path / "ckpt"), ps)
    _one_line_error(gone, "rank_00000.pt is missing")
    (tmp_path / "ckpt" / "iter_0000003" / "common.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(checkpointing.CheckpointError) as common:
        load_gpt_for_inference(str(tmp_path / "ckpt"), ps)
    _one_line_error(common, "common.pt cannot be loaded safely")
