"""The model-size configs follow the paper's Table 1 and Table 5: they parse, validate at the world
size they are laid out for (and refuse another), and build models of the sizes they are named for.
The SLURM script is valid bash and passes its arguments through."""

import os
import subprocess

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.training.config import parse_config
from megatron.training.gpt_providers import transformer_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT2_VOCAB = 50257
# name: (parameters, TP x PP x DP GPUs, tokens per batch, tokens in all), PAPER-FACTS.md
PAPER = {"125m": (125e6, 8, 2**20, 100e9), "7b": (7e9, 32, 4 * 2**20, 100e9), "13b": (13e9, 32, 4 * 2**20, 100e9),
         "175b": (175e9, 128, 2**20, 40e9)}


def load(name: str, world_size: int):
    return parse_config(["--config", os.path.join(REPO, "configs", f"gpt-{name}.yaml")]).for_world(world_size)


@pytest.mark.parametrize("name", list(PAPER))
def test_config_matches_the_paper(name):
    params, gpus, batch_tokens, tokens = PAPER[name]
    args = load(name, gpus)
    assert args.global_batch_size * args.seq_length == batch_tokens
    assert args.train_iters * batch_tokens == pytest.approx(tokens, rel=0.05)
    assert args.fp8_level == "O3" and args.bf16 and args.adam_beta2 == 0.95 and args.weight_decay == 0.1
    assert args.min_lr == pytest.approx(args.lr / 10)
    assert args.sequence_parallel == (args.tensor_model_parallel_size > 1)
    vocab = args.model.padded_vocab_size(GPT2_VOCAB, args.tensor_model_parallel_size)
    with torch.device("meta"):
        model = GPTModel(transformer_config(args, vocab), device="meta")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=0.08)


@pytest.mark.parametrize("name", list(PAPER))
def test_config_refuses_a_world_size_it_does_not_fit(name):
    args = parse_config(["--config", os.path.join(REPO, "configs", f"gpt-{name}.yaml")])
    gpus = PAPER[name][1]
    with pytest.raises(ValueError, match="--global-batch-size"):  # one more data-parallel replica
        args.for_world(gpus + args.tensor_model_parallel_size * args.pipeline_model_parallel_size)


def test_slurm_script_is_valid_and_needs_a_config(tmp_path):
    script = os.path.join(REPO, "scripts", "slurm_pretrain.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "CONFIG"}
    done = subprocess.run(["bash", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode != 0 and "set CONFIG" in done.stderr


def _fake_tool(folder, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


@pytest.mark.parametrize("limit,minutes", [("1-00:00:00", "1430"), ("24:00:00", "1430"), ("30:00", "20"),
                                           ("UNLIMITED", None)])
def test_slurm_script_launches_torchrun_on_the_head_node(tmp_path, limit, minutes):
    """squeue, scontrol and srun replaced by stand-ins: the torchrun line the script would run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "squeue", f"echo {limit}")
    _fake_tool(bin_dir, "scontrol", "printf 'node7\\nnode8\\n'")
    _fake_tool(bin_dir, "srun", f"printf '%s\\n' \"$@\" > {tmp_path / 'srun.args'}")
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", CONFIG="configs/gpt-7b.yaml",
               SLURM_JOB_ID="42", SLURM_NNODES="2", SLURM_JOB_NODELIST="node[7-8]", RUN_DIR=str(tmp_path / "run"))
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "slurm_pretrain.sh"), "--lr", "1e-4"], env=env,
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    argv = (tmp_path / "srun.args").read_text().split("\n")
    assert argv[argv.index("--rdzv-endpoint") + 1] == "node7:29500"
    assert argv[argv.index("--nnodes") + 1] == "2" and argv[argv.index("--config") + 1] == "configs/gpt-7b.yaml"
    assert argv[argv.index("--load") + 1] == str(tmp_path / "run" / "checkpoints")
    assert argv[-3:-1] == ["--lr", "1e-4"]
    if minutes is None:
        assert "--exit-duration-in-mins" not in argv
    else:
        assert argv[argv.index("--exit-duration-in-mins") + 1] == minutes
