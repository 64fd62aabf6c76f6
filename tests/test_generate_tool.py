"""tools/generate.py and FP8 generation from checkpoints: any saved layout, any launch layout
(tensor parallel, data parallel), the same tokens; O3 weights read as stored; bad input in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from distributed import run_distributed
from fp8.params import fp8_weight_tensor, is_fp8_param, param_nbytes
from megatron.core.inference import SamplingParams, generate
from megatron.core.parallel_state import ParallelState
from megatron.training.cli import run_cli
from megatron.training.inference_model import load_gpt_for_inference
from test_inference_model import LLAMA, save_random_checkpoint
from tools import generate as generate_tool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["5 17 3 90 42", "7", "11 12 13 14 15 16 17 18 19", "1 2", "60 61 62"]


def run_tool(argv) -> int:
    return run_cli(lambda: generate_tool.main(argv))


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A Llama-shaped random checkpoint saved at TP 1, and a prompts file."""
    root = tmp_path_factory.mktemp("generate-tool")
    torch.manual_seed(0)
    save_random_checkpoint(root / "ckpt", ParallelState.single("cpu"), LLAMA)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS[:4])
                       + json.dumps({"tokens": [60, 61, 62]}) + "\n")
    return root


def launch_worker(rank, world_size, argv):
    os.environ["OMP_NUM_THREADS"] = "1"
    return run_tool(argv)


def test_greedy_results_match_the_library_and_every_launch_layout(checkpoint, tmp_path):
    base = ["--load", str(checkpoint / "ckpt"), "--prompts-file", str(checkpoint / "prompts.jsonl"),
            "--max-new-tokens", "6", "--device", "cpu", "--micro-batch-size", "2"]
    greedy, sampled = base + ["--greedy"], base + ["--temperature", "0.9", "--top-k", "20", "--seed", "3"]
    assert run_tool(greedy + ["--out", str(tmp_path / "tp1.jsonl")]) == 0
    assert run_tool(sampled + ["--out", str(tmp_path / "tp1-sampled.jsonl")]) == 0
    single = records(tmp_path / "tp1.jsonl")
    assert [r["index"] for r in single] == list(range(5))
    # The library, recomputing the whole sequence each step, gives the tool's (cached) tokens.
    loaded = load_gpt_for_inference(str(checkpoint / "ckpt"), ParallelState.single("cpu"))
    prompts = [[int(t) for t in p.split()] for p in PROMPTS]
    reference = generate(loaded.model, prompts, SamplingParams(max_new_tokens=6, greedy=True), vocab_size=96,
                         eod_id=95, use_cache=False)
    assert [r["tokens"] for r in single] == [r.tokens for r in reference]
    for record, result in zip(single, reference):
        assert record["prompt"] == " ".join(map(str, result.prompt))
        assert record["text"] == " ".join(map(str, record["tokens"]))
        assert record["logprobs"] == pytest.approx(result.logprobs, abs=1e-4)
    # Two processes as TP 2, and as DP 2 (each runs its share of the prompts): the same results.
    for layout, extra in (("tp2", ["--tensor-model-parallel-size", "2"]), ("dp2", [])):
        for name, argv in (("", greedy), ("-sampled", sampled)):
            out = tmp_path / f"{layout}{name}.jsonl"
            assert run_distributed(launch_worker, 2, argv + extra + ["--out", str(out)],
                                   init_process_group=False, timeout=300) == [0, 0]
            got, want = records(out), records(tmp_path / f"tp1{name}.jsonl")
            assert [r["tokens"] for r in got] == [r["tokens"] for r in want], (layout, name)
            for g, w in zip(got, want):
                assert g["logprobs"] == pytest.approx(w["logprobs"], abs=1e-4)


def test_o3_checkpoint_generates_from_its_fp8_weights_as_stored(tmp_path):
    """An O3 checkpoint loaded at its own level: every FP8 linear weight is one byte again, with
    the payload the saving model held, so the model takes about a quarter of FP32's bytes."""
    torch.manual_seed(0)
    ps = ParallelState.single("cpu")
    saved = save_random_checkpoint(tmp_path / "o3", ps, LLAMA + ["--fp8-level", "O3", "--fp8-min-features", "32",
                                                                  "--fp8-recipe", "current"])
    loaded = load_gpt_for_inference(str(tmp_path / "o3"), ps, fp8_level=None)
    assert loaded.fp8_level == "O3"
    saved_params = dict(saved.named_parameters())
    fp8_weights = [(n, p) for n, p in loaded.model.named_parameters() if is_fp8_param(p)]
    assert len(fp8_weights) == 8
    for name, param in fp8_weights:
        want = fp8_weight_tensor(saved_params[name])
        assert param.element_size() == 1 and param_nbytes(param) == param.numel() + 4
        assert torch.equal(param.data.view(torch.uint8), want.data.view(torch.uint8)), name
        torch.testing.assert_close(param.scale, want.scale, rtol=2.4e-7, atol=0)
    high = load_gpt_for_inference(str(tmp_path / "o3"), ps)  # default: high-precision GEMMs, FP32 weights
    prompts = [[5, 17, 3, 90, 42], [7, 8]]
    fp8_out = generate(loaded.model, prompts, SamplingParams(max_new_tokens=5, greedy=True), vocab_size=96)
    assert all(len(r.tokens) == 5 and all(t < 96 for t in r.tokens) for r in fp8_out)
    fp8_bytes = sum(param_nbytes(p) for _, p in fp8_weights)
    fp32_bytes = sum(param_nbytes(p) for n, p in high.model.named_parameters() if n in dict(fp8_weights))
    assert fp8_bytes * 4 == pytest.approx(fp32_bytes, rel=0.01)


@pytest.mark.parametrize("argv, message", [
    ([], "no prompts"),
    (["--prompt", "1 2"], None),  # with --load pointing nowhere
    (["--prompt", "1 2", "--tensor-model-parallel-size", "3"], "processes do not divide"),
    (["--prompts-file", "BAD"], "is not JSON"),
    (["--prompt", "1 2", "--top-p", "0"], "--top-p"),
])
def test_bad_input_is_one_line_and_writes_nothing(argv, message, checkpoint, tmp_path, capsys):
    load = str(tmp_path / "nowhere") if message is None else str(checkpoint / "ckpt")
    if "BAD" in argv:
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"prompt": "1 2"}\nnot json\n')
        argv = ["--prompts-file", str(bad)]
    out = tmp_path / "out.jsonl"
    assert run_tool(["--load", load, "--device", "cpu", "--out", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert (message or "does not exist") in err[0]
    assert not out.exists()


def test_interactive_prompt_loop(checkpoint):
    done = subprocess.run([sys.executable, os.path.join(REPO, "tools", "generate.py"), "--load",
                           str(checkpoint / "ckpt"), "--device", "cpu", "--interactive", "--greedy",
                           "--max-new-tokens", "4"], input="5 17 3\n\n7 8\n/quit\n", capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    answers = [line.split("prompt> ")[-1] for line in done.stdout.splitlines() if line.split("prompt> ")[-1]]
    assert len(answers) == 2 and all(len(a.split()) == 4 for a in answers), done.stdout
