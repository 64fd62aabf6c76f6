"""tools/checkpoint/convert.py and megatron.training.hf_interop: tiny random transformers models
imported give transformers' logits at TP 1 and 2, import -> export reproduces their tensors bit for
bit, our checkpoints (an O3 one trained by pretrain_gpt.py among them) exported load in transformers
with the same logits and greedy generations, and bad input ends in one line, exit code 2, nothing written."""

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import pretrain_gpt
from distributed import run_distributed
from megatron.core.parallel_state import ParallelState
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.cli import run_cli as run_training_cli
from megatron.training.inference_model import load_gpt_for_inference, tokenizer_config_of
from test_inference_model import GPT2, full_logits, save_random_checkpoint
from tools import run_cli
from tools.checkpoint import convert

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

REPO_ROOT = Path(__file__).resolve().parent.parent
SEQ = 12
LLAMA_CONFIG = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False, max_position_embeddings=64,
                    rms_norm_eps=1e-5, initializer_range=0.1)
GPT2_CONFIG = dict(n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=96, activation_function="gelu",
                   initializer_range=0.1, layer_norm_epsilon=1e-5)


@dataclass
class HFModels:
    llama: Path
    gpt2: Path
    llama_logits: torch.Tensor
    gpt2_logits: torch.Tensor
    llama_tokens: torch.Tensor
    gpt2_tokens: torch.Tensor


@torch.no_grad()
def _randomize_norms_and_biases(model):
    """transformers initialises norms to one and biases to zero; make a mix-up visible."""
    generator = torch.Generator().manual_seed(3)
    for name, param in model.named_parameters():
        if "norm" in name or ".ln_" in name:
            param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
        elif name.endswith("bias"):
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))


@torch.no_grad()
def _save(model, folder: Path, vocab: int):
    _randomize_norms_and_biases(model)
    model.eval().save_pretrained(str(folder))
    tokens = torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(11))
    return model(tokens).logits, tokens


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory, write_hf_tokenizer) -> HFModels:
    """A GQA Llama with an untied head and rope_theta 5e5 (no tokenizer), and a GPT-2 with exact GeLU
    and a tokenizer.json, both random, saved by save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_CONFIG))
    llama_logits, llama_tokens = _save(llama, root / "llama", 96)
    (root / "gpt2").mkdir()
    _, tokenizer = write_hf_tokenizer(root / "gpt2")
    vocab = tokenizer.get_vocab_size()
    (root / "gpt2" / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
         "pad_token": "<pad>"}))
    eod = tokenizer.token_to_id("<|endoftext|>")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, bos_token_id=eod, eos_token_id=eod,
                                                                **GPT2_CONFIG))
    gpt2_logits, gpt2_tokens = _save(gpt2, root / "gpt2", vocab)
    return HFModels(root / "llama", root / "gpt2", llama_logits, gpt2_logits, llama_tokens, gpt2_tokens)


def convert_cli(*argv) -> int:
    return run_cli(convert.main, [str(a) for a in argv])


def our_logits(ckpt: Path, tokens: torch.Tensor, rows: int) -> torch.Tensor:
    loaded = load_gpt_for_inference(str(ckpt), ParallelState.single("cpu"), params_dtype=torch.float32)
    with torch.no_grad():
        logits = loaded.model(tokens)
    assert torch.isneginf(logits[..., rows:]).all()  # padding rows are no part of the distribution
    return logits[..., :rows]


def assert_same_tensors(hf_folder: Path, exported: Path):
    source = safetensors_torch.load_file(str(hf_folder / "model.safetensors"))
    written = safetensors_torch.load_file(str(exported / "model.safetensors"))
    assert sorted(written) == sorted(source)
    for name, tensor in source.items():
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name


def test_llama_import_matches_transformers_and_round_trips(hf_models, tmp_path):
    assert convert_cli("import", "--hf", hf_models.llama, "--save", tmp_path / "tp1") == 0
    torch.testing.assert_close(our_logits(tmp_path / "tp1", hf_models.llama_tokens, 96), hf_models.llama_logits,
                               atol=1e-4, rtol=0)
    assert convert_cli("import", "--hf", hf_models.llama, "--save", tmp_path / "tp2pp2",
                       "--tensor-model-parallel-size", 2, "--pipeline-model-parallel-size", 2) == 0
    metadata = json.loads((tmp_path / "tp2pp2" / "iter_0000000" / "metadata.json").read_text())
    assert metadata["layout"] == {"world_size": 4, "tp": 2, "pp": 2, "dp": 1, "distributed_optimizer": False}
    assert metadata["model"]["vocab_size"] == 256 and metadata["model"]["num_query_groups"] == 2
    assert len(list((tmp_path / "tp2pp2" / "iter_0000000").glob("rank_*.pt"))) == 4
    torch.testing.assert_close(our_logits(tmp_path / "tp2pp2", hf_models.llama_tokens, 96), hf_models.llama_logits,
                               atol=1e-4, rtol=0)
    for ckpt in ("tp1", "tp2pp2"):
        assert convert_cli("export", "--load", tmp_path / ckpt, "--out", tmp_path / f"{ckpt}-hf") == 0
        assert_same_tensors(hf_models.llama, tmp_path / f"{ckpt}-hf")
    source, written = (json.loads((folder / "config.json").read_text()) for folder in (hf_models.llama, tmp_path / "tp1-hf"))
    for key in ("architectures", "vocab_size", "hidden_size", "intermediate_size", "num_key_value_heads", "head_dim",
                "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings", "bos_token_id", "eos_token_id"):
        assert written[key] == source[key], key
    assert written["rope_parameters"]["rope_theta"] == 500000.0


def test_bf16_tied_llama_with_wide_heads_round_trips_in_bf16(tmp_path):
    """Multi-head attention, head_dim != hidden / heads, a tied head, weights stored in BF16."""
    torch.manual_seed(1)
    config = transformers.LlamaConfig(**{**LLAMA_CONFIG, "num_key_value_heads": 4, "head_dim": 32,
                                         "tie_word_embeddings": True, "rope_theta": 10000.0})
    model = transformers.LlamaForCausalLM(config)
    _randomize_norms_and_biases(model)
    model.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    assert convert_cli("import", "--hf", tmp_path / "hf", "--save", tmp_path / "ckpt") == 0
    loaded = load_gpt_for_inference(str(tmp_path / "ckpt"), ParallelState.single("cpu"))
    assert loaded.args["bf16"] and next(loaded.model.parameters()).dtype == torch.bfloat16
    assert loaded.config.kv_channels == 32 and not loaded.config.untie_embeddings_and_output_weights
    wide = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    tokens = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = wide(tokens).logits
    torch.testing.assert_close(our_logits(tmp_path / "ckpt", tokens, 96), expected, atol=1e-4, rtol=0)
    assert convert_cli("export", "--load", tmp_path / "ckpt", "--out", tmp_path / "out") == 0
    assert_same_tensors(tmp_path / "hf", tmp_path / "out")  # bf16, bit for bit, no lm_head
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_gpt2_import_matches_transformers_and_round_trips(hf_models, tmp_path):
    vocab = hf_models.gpt2_logits.shape[-1]
    assert convert_cli("import", "--hf", hf_models.gpt2, "--save", tmp_path / "ckpt") == 0
    torch.testing.assert_close(our_logits(tmp_path / "ckpt", hf_models.gpt2_tokens, vocab), hf_models.gpt2_logits,
                               atol=1e-4, rtol=0)
    # The tokenizer came along, and the run flags name it.
    args = load_gpt_for_inference(str(tmp_path / "ckpt"), ParallelState.single("cpu")).args
    ours = build_tokenizer(tokenizer_config_of(args))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_models.gpt2), local_files_only=True)
    text = "The quick brown fox jumps over the lazy dog. def tokenize(text)"
    assert ours.tokenize(text) == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert ours.eod == hf_tokenizer.eos_token_id and Path(args["tokenizer_model"]).parent == tmp_path / "ckpt" / "tokenizer"
    flags = (tmp_path / "ckpt" / "model_config.yaml").read_text()
    assert "normalization: LayerNorm" in flags and "tokenizer_type: HuggingFaceTokenizer" in flags
    assert convert_cli("export", "--load", tmp_path / "ckpt", "--out", tmp_path / "hf") == 0
    assert_same_tensors(hf_models.gpt2, tmp_path / "hf")
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert exported(text, add_special_tokens=False).input_ids == ours.tokenize(text)


def tp2_import_worker(rank, world_size, checkpoints):
    torch.manual_seed(0)
    ps = ParallelState.build(2, 1, device="cpu")
    out = []
    for folder, tokens in checkpoints:
        loaded = load_gpt_for_inference(folder, ps)
        out.append(full_logits(loaded.model, ps, tokens))
    return out


@pytest.mark.distributed
def test_imports_match_transformers_at_tensor_parallel_2(hf_models, tmp_path):
    # The Llama at TP 1 loads resharded; the GPT-2 is written at TP 2 and loads piece by piece.
    assert convert_cli("import", "--hf", hf_models.llama, "--save", tmp_path / "llama") == 0
    assert convert_cli("import", "--hf", hf_models.gpt2, "--save", tmp_path / "gpt2",
                       "--tensor-model-parallel-size", 2) == 0
    jobs = [(str(tmp_path / "llama"), hf_models.llama_tokens), (str(tmp_path / "gpt2"), hf_models.gpt2_tokens)]
    results = run_distributed(tp2_import_worker, 2, jobs)
    for rank_result in results:
        llama, gpt2 = rank_result
        torch.testing.assert_close(llama[..., :96], hf_models.llama_logits, atol=1e-4, rtol=0)
        vocab = hf_models.gpt2_logits.shape[-1]
        torch.testing.assert_close(gpt2[..., :vocab], hf_models.gpt2_logits, atol=1e-4, rtol=0)


@torch.no_grad()
def greedy_by_recomputation(model, prompt: torch.Tensor, new_tokens: int, rows: int, eos: int | None):
    """Greedy decoding that runs the whole sequence again for every token (no KV cache)."""
    ids = prompt
    for _ in range(new_tokens):
        next_id = model(ids)[:, -1, :rows].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_id], dim=1)
        if eos is not None and next_id.item() == eos:
            break
    return ids


def check_export_in_transformers(ckpt: Path, out: Path, tokens: torch.Tensor) -> tuple:
    """Export, load the folder with transformers, compare logits and greedy generations."""
    assert convert_cli("export", "--load", ckpt, "--out", out) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    loaded = load_gpt_for_inference(str(ckpt), ParallelState.single("cpu"), params_dtype=torch.float32)
    rows = hf_model.config.vocab_size
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(tokens)[..., :rows], hf_model(tokens).logits, atol=1e-4, rtol=0)
    prompt = tokens[:1, :5]
    theirs = hf_model.generate(prompt, max_new_tokens=6, do_sample=False)
    eos = hf_model.generation_config.eos_token_id
    assert torch.equal(theirs, greedy_by_recomputation(loaded.model, prompt, 6, rows, eos))
    return hf_model, loaded


@pytest.mark.parametrize("variant", ["tied head, ids as text", "untied head, tokenizer.json"])
def test_our_gpt2_checkpoint_exports_to_transformers(variant, tmp_path, write_hf_tokenizer):
    extra = GPT2
    if variant.startswith("untied"):  # a bare tokenizer.json: the export writes its tokenizer_config.json
        path, _ = write_hf_tokenizer(tmp_path)
        extra = GPT2 + ["--untie-embeddings-and-output-weights", "--tokenizer-type", "HuggingFaceTokenizer",
                        "--tokenizer-model", str(path)]
    save_random_checkpoint(tmp_path / "ckpt", ParallelState.single("cpu"), extra)
    tokens = torch.randint(0, 95, (2, SEQ), generator=torch.Generator().manual_seed(5))
    hf_model, loaded = check_export_in_transformers(tmp_path / "ckpt", tmp_path / "hf", tokens)
    assert type(hf_model).__name__ == "GPT2LMHeadModel"
    assert hf_model.config.tie_word_embeddings == variant.startswith("tied")
    if variant.startswith("tied"):
        assert hf_model.config.vocab_size == 96 and hf_model.generation_config.eos_token_id == 95  # 95 ids + EOD
        assert not (tmp_path / "hf" / "tokenizer_config.json").exists()  # ids as text have no tokenizer files
        return
    ours = build_tokenizer(tokenizer_config_of(loaded.args))
    assert hf_model.config.vocab_size == ours.vocab_size <= loaded.config.vocab_size  # padding rows are dropped
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    text = "The lazy dog jumps over the quick brown fox."
    assert exported(text, add_special_tokens=False).input_ids == ours.tokenize(text)
    assert exported.eos_token_id == ours.eod == hf_model.generation_config.eos_token_id


TRAIN = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "96", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--normalization", "RMSNorm", "--swiglu",
         "--position-embedding-type", "rope", "--rotary-base", "20000", "--disable-bias-linear",
         "--untie-embeddings-and-output-weights", "--init-method-std", "0.05"]
RUN = ["--device", "cpu", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
       "--log-interval", "1", "--eval-iters", "0", "--num-workers", "0", "--hidden-dropout", "0",
       "--attention-dropout", "0"]


@pytest.mark.slow
def test_o3_training_run_exports_and_fine_tunes_from_import(builtin_corpus_small, tmp_path, capsys):
    data = builtin_corpus_small.training_args()
    o3 = TRAIN + RUN + data + ["--fp8-level", "O3", "--fp8-min-features", "16", "--train-iters", "2",
                               "--save", str(tmp_path / "o3")]
    assert run_training_cli(lambda: pretrain_gpt.main(o3)) == 0
    tokenizer = build_tokenizer(tokenizer_config_of({}, tokenizer_type="SentencePieceTokenizer",
                                                    tokenizer_model=str(builtin_corpus_small.tokenizer_model)))
    text = builtin_corpus_small.documents()[0][:400]
    tokens = torch.tensor([tokenizer.tokenize(text)[:SEQ]])
    hf_model, loaded = check_export_in_transformers(tmp_path / "o3", tmp_path / "hf", tokens)
    assert loaded.fp8_level == "O3" and type(hf_model).__name__ == "LlamaForCausalLM"
    # The FP8 weights were exported as the values they stand for.
    fc1 = dict(loaded.model.named_parameters())["decoder.layers.0.mlp.linear_fc1.weight"]
    assert torch.equal(hf_model.model.layers[0].mlp.gate_proj.weight, fc1[:96])
    assert fc1.unique().numel() <= 2 * 256  # E4M3 codes under one scale
    # The tokenizer files encode as ours does (SentencePiece keeps special-token text as text).
    exported = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"), local_files_only=True)
    assert exported(text, add_special_tokens=False, split_special_tokens=True).input_ids == tokenizer.tokenize(text)
    assert convert_cli("export", "--load", tmp_path / "o3", "--out", tmp_path / "hf-bf16", "--dtype", "bf16") == 0
    assert safetensors_torch.load_file(str(tmp_path / "hf-bf16" / "model.safetensors"))["lm_head.weight"].dtype \
        == torch.bfloat16
    # Back again, and pretrain_gpt.py fine-tunes the import with the flags it wrote.
    assert convert_cli("import", "--hf", tmp_path / "hf", "--save", tmp_path / "back") == 0
    finetune = ["--config", str(tmp_path / "back" / "model_config.yaml"), "--load", str(tmp_path / "back"),
                "--finetune", "--train-iters", "1"] + RUN + data[:2]
    capsys.readouterr()
    assert run_training_cli(lambda: pretrain_gpt.main(finetune)) == 0
    assert "loaded iteration 0" in capsys.readouterr().out


# ----- bad input ---------------------------------------------------------------------------------
def _edit_config(folder: Path, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _bad_import_cases(models: HFModels, work: Path):
    """name -> (extra import flags, the HF folder, what the error line must say)."""
    def variant(source, name, edit):
        folder = work / name
        shutil.copytree(source, folder)
        edit(folder)
        return folder

    theta = {"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}
    return {
        "missing folder": ([], work / "nowhere", "is not a folder"),
        "no config.json": ([], variant(models.llama, "noconfig", lambda f: (f / "config.json").unlink()),
                           "config.json is missing"),
        "unknown architecture": ([], variant(models.llama, "mistral", lambda f: _edit_config(
            f, architectures=["MistralForCausalLM"], model_type="mistral")), "MistralForCausalLM"),
        "rope scaling": ([], variant(models.llama, "scaled", lambda f: _edit_config(
            f, rope_parameters=theta, rope_scaling=theta)), "rope scaling"),
        "attention bias": ([], variant(models.llama, "bias", lambda f: _edit_config(f, attention_bias=True)),
                           "attention_bias true"),
        "gelu_new": ([], variant(models.gpt2, "gelunew", lambda f: _edit_config(f, activation_function="gelu_new")),
                     "activation_function 'gelu_new'"),
        "layer-scaled attention": ([], variant(models.gpt2, "scaled_attn", lambda f: _edit_config(
            f, scale_attn_by_inverse_layer_idx=True)), "scale_attn_by_inverse_layer_idx"),
        "no weights": ([], variant(models.llama, "noweights", lambda f: (f / "model.safetensors").unlink()),
                       "holds no weights"),
        "damaged weights": ([], variant(models.llama, "damaged", lambda f: (f / "model.safetensors").write_bytes(
            (f / "model.safetensors").read_bytes()[:5000])), "cannot be read"),
        "shape mismatch": ([], variant(models.llama, "shape", lambda f: _edit_config(f, intermediate_size=128)),
                           "has shape"),
        "heads vs TP": (["--tensor-model-parallel-size", "3"], models.llama,
                        "tensor-parallel size 3 does not divide the model's 4 attention heads"),
        "layers vs PP": (["--pipeline-model-parallel-size", "3"], models.llama,
                         "--num-layers (2) must be divisible by --pipeline-model-parallel-size (3)"),
    }


def _assert_one_line_error(code, capsys, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], (code, err)


def test_bad_imports_exit_2_with_one_line_and_write_nothing(hf_models, tmp_path, capsys):
    work = tmp_path / "inputs"
    work.mkdir()
    out = tmp_path / "out"
    for name, (extra, folder, fragment) in _bad_import_cases(hf_models, work).items():
        code = convert_cli("import", "--hf", folder, "--save", out / "ckpt", *extra)
        _assert_one_line_error(code, capsys, fragment)
        assert not out.exists(), name  # neither the checkpoint nor the folders above it
    (out / "ckpt").mkdir(parents=True)
    (out / "ckpt" / "notes.txt").write_text("mine")
    _assert_one_line_error(convert_cli("import", "--hf", hf_models.llama, "--save", out / "ckpt"), capsys,
                           "already exists and is not empty")
    assert [p.name for p in out.iterdir()] == ["ckpt"] and (out / "ckpt" / "notes.txt").read_text() == "mine"


def test_bad_exports_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    ps = ParallelState.single("cpu")
    save_random_checkpoint(tmp_path / "layernorm-swiglu", ps, ["--swiglu"])
    save_random_checkpoint(tmp_path / "gpt2", ps, GPT2)
    cases = [
        ([tmp_path / "layernorm-swiglu"], "no exact Hugging Face counterpart"),
        ([tmp_path / "nowhere"], "does not exist"),
        ([tmp_path / "gpt2", "--tokenizer-type", "NullTokenizer", "--vocab-size", "500"], "the tokenizer has 501 ids"),
    ]
    for (load, *extra), fragment in cases:
        _assert_one_line_error(convert_cli("export", "--load", load, "--out", tmp_path / "hf", *extra), capsys, fragment)
        assert not (tmp_path / "hf").exists()
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the hf extra were not installed
    _assert_one_line_error(convert_cli("export", "--load", tmp_path / "gpt2", "--out", tmp_path / "hf"), capsys,
                           "pip install fp8-lm[hf]")
    assert not (tmp_path / "hf").exists()


def test_the_script_reports_errors_in_one_line(run_tool, hf_models, tmp_path):
    shutil.copytree(hf_models.llama, tmp_path / "mistral")
    _edit_config(tmp_path / "mistral", architectures=["MistralForCausalLM"])
    done = run_tool("checkpoint/convert.py", "import", "--hf", tmp_path / "mistral", "--save", tmp_path / "ckpt")
    assert done.returncode == 2 and not (tmp_path / "ckpt").exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "MistralForCausalLM" in lines[0] and "LlamaForCausalLM" in lines[0], done.stderr


def test_the_converter_imports_transformers_only_when_it_runs():
    code = ("import sys, tools.checkpoint.convert, megatron.training.inference_model; "
            "print([m for m in ('transformers', 'safetensors') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


# ----- the model's distribution: padding rows and extra rows -------------------------------------
def hf_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(next token) at each position but the last, from transformers' logits of the whole rows."""
    return torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def our_token_losses(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the training loss per token, the RLHF updates' -log p per token) of `tokens`' next tokens."""
    from rlhf.rollout import token_losses

    with torch.no_grad():
        return model(tokens[:, :-1], tokens[:, 1:]), token_losses(model, model(tokens[:, :-1]), tokens[:, 1:])


def tp2_loss_worker(rank, world_size, folder, tokens):
    loaded = load_gpt_for_inference(folder, ParallelState.build(2, 1, device="cpu"), params_dtype=torch.float32)
    return our_token_losses(loaded.model, tokens)


@pytest.mark.distributed
def test_losses_and_logprobs_are_those_of_the_unpadded_model(hf_models, tmp_path):
    """A GPT-2 whose rows are no multiple of 128 imports padded to the next multiple. The training loss
    (SFT, DPO, the reward model's backbone), the RLHF updates' log-probabilities and generation's
    equal transformers' log_softmax of the unpadded model, at TP 1 and TP 2."""
    from megatron.core.inference.generation import generate
    from megatron.core.inference.sampling import SamplingParams

    vocab = hf_models.gpt2_logits.shape[-1]
    assert vocab % 128
    assert convert_cli("import", "--hf", hf_models.gpt2, "--save", tmp_path / "ckpt") == 0
    metadata = json.loads((tmp_path / "ckpt" / "iter_0000000" / "metadata.json").read_text())
    assert metadata["model"]["vocab_size"] == -(-vocab // 128) * 128 and metadata["model"]["unpadded_vocab_size"] == vocab
    loaded = load_gpt_for_inference(str(tmp_path / "ckpt"), ParallelState.single("cpu"), params_dtype=torch.float32)
    tokens = hf_models.gpt2_tokens
    want = -hf_token_logprobs(hf_models.gpt2_logits, tokens)
    loss, rl = our_token_losses(loaded.model, tokens)
    torch.testing.assert_close(loss.double(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(rl.double(), want, atol=1e-4, rtol=0)
    result = generate(loaded.model, [tokens[0, :5].tolist()], SamplingParams(max_new_tokens=6, temperature=1.0, seed=5),
                      vocab_size=vocab)[0]
    hf = transformers.GPT2LMHeadModel.from_pretrained(str(hf_models.gpt2)).eval()
    sequence = torch.tensor([result.prompt + result.tokens])
    with torch.no_grad():
        hf_logprobs = hf_token_logprobs(hf(sequence).logits, sequence)[0, 4:]
    torch.testing.assert_close(torch.tensor(result.logprobs, dtype=torch.float64), hf_logprobs, atol=1e-4, rtol=0)
    for rank_loss, rank_rl in run_distributed(tp2_loss_worker, 2, str(tmp_path / "ckpt"), tokens):
        torch.testing.assert_close(rank_loss, loss, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rank_rl, rl, rtol=1e-6, atol=1e-6)


def test_a_model_with_more_rows_than_tokenizer_ids_fine_tunes(hf_models, tmp_path, capsys):
    """Shaped like Qwen2 (more embedding rows than tokenizer ids): finetune_sft.py
    (--pretrained-checkpoint, or --load with --finetune), the import's own suggested pretrain_gpt.py
    line and rlhf/train_dpo.py run with the model's vocabulary, which their checkpoints record; a
    model smaller than the tokenizer is one line naming both sizes."""
    import numpy as np

    import finetune_sft
    from megatron.core.datasets.indexed_dataset import IndexedDatasetWriter
    from rlhf import train_dpo
    from test_dpo import write_pairs
    from test_sft_training import synthetic_samples, write_sft

    tokenizer_ids = build_tokenizer(tokenizer_config_of({}, tokenizer_type="HuggingFaceTokenizer",
                                                        tokenizer_model=str(hf_models.gpt2 / "tokenizer.json"))).vocab_size
    rows = tokenizer_ids + 10
    hf_dir = tmp_path / "qwen-shaped"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**dict(LLAMA_CONFIG, vocab_size=rows)))
    model.save_pretrained(str(hf_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(hf_models.gpt2 / name, hf_dir / name)
    assert convert_cli("import", "--hf", hf_dir, "--save", tmp_path / "ckpt") == 0
    data = write_sft(tmp_path / "sft", synthetic_samples(16, seed=3))
    run = ["--config", str(tmp_path / "ckpt" / "model_config.yaml"), "--data-path", data, "--seq-length", "32",
           "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--lr", "1e-4",
           "--device", "cpu", "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0"]
    with IndexedDatasetWriter(str(tmp_path / "corpus"), np.uint16) as corpus:
        for seed in range(8):
            corpus.add_document(np.random.RandomState(seed).randint(0, tokenizer_ids, size=40))
        corpus.finalize()
    pairs = write_pairs(tmp_path / "pairs.jsonl", 8, seed=1)
    runs = {"pretrained": (finetune_sft.main, run + ["--pretrained-checkpoint", str(tmp_path / "ckpt")]),
            "finetune": (finetune_sft.main, run + ["--load", str(tmp_path / "ckpt"), "--finetune"]),
            "pretrain_gpt": (pretrain_gpt.main, run[:2] + ["--data-path", str(tmp_path / "corpus")] + run[4:]
                             + ["--load", str(tmp_path / "ckpt"), "--finetune"]),
            "dpo": (train_dpo.main, run[:2] + ["--data-path", str(pairs)] + run[4:]
                    + ["--pretrained-checkpoint", str(tmp_path / "ckpt"), "--seq-length", "64"])}
    for name, (main, argv) in runs.items():
        out = tmp_path / name
        assert run_training_cli(lambda: main(argv + ["--save", str(out)])) == 0, name
        saved = json.loads((out / "iter_0000002" / "metadata.json").read_text())["model"]
        assert saved["unpadded_vocab_size"] == rows and saved["vocab_size"] == -(-rows // 128) * 128, (name, saved)
    capsys.readouterr()
    # The GPT-2 import's vocabulary is its tokenizer's; a 500-id tokenizer does not fit it.
    assert convert_cli("import", "--hf", hf_models.gpt2, "--save", tmp_path / "gpt2") == 0
    code = run_training_cli(lambda: finetune_sft.main(run[2:] + [
        "--config", str(tmp_path / "gpt2" / "model_config.yaml"), "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "500", "--pretrained-checkpoint", str(tmp_path / "gpt2")]))
    _assert_one_line_error(code, capsys, f"the tokenizer has 501 ids but the model in {tmp_path / 'gpt2'} a "
                                         f"vocabulary of only {tokenizer_ids}")
