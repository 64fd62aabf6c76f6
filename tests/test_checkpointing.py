"""Checkpoints: exact resume, resharding across layouts, crash safety, unsafe files, stopping."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import pretrain_gpt
from distributed import run_distributed
from megatron.core import checkpointing
from megatron.training.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--log-interval", "1", "--lr-warmup-iters", "2", "--eval-interval", "3", "--eval-iters", "1",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1"]



def losses(path):
    with open(path) as f:
        return [json.loads(line)["loss"] for line in f]


def run(argv):
    return run_cli(lambda: pretrain_gpt.main(argv))


@pytest.mark.slow
@pytest.mark.parametrize("level", ["none", "O0"])
def test_resume_is_exact(level, builtin_corpus_small, tmp_path):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "8", "--fp8-level", level,
                                                      "--fp8-recipe", "delayed"]
    assert run(args + ["--metrics-file", str(tmp_path / "full.jsonl")]) == 0
    ckpt, split = tmp_path / "ckpt", str(tmp_path / "split.jsonl")
    assert run(args + ["--metrics-file", split, "--save", str(ckpt), "--exit-interval", "5"]) == 0
    assert checkpointing.latest_iteration(str(ckpt)) == 5
    assert run(args + ["--metrics-file", split, "--load", str(ckpt), "--save", str(ckpt)]) == 0
    assert losses(split) == losses(tmp_path / "full.jsonl")  # bit for bit, dropout and FP8 included
    assert checkpointing.latest_iteration(str(ckpt)) == 8


def torchrun_worker(rank, world_size, argv):
    os.environ["OMP_NUM_THREADS"] = "1"
    return run_cli(lambda: pretrain_gpt.main(argv))


def launch(world, argv):
    codes = run_distributed(torchrun_worker, world, argv, init_process_group=False, timeout=300)
    assert codes == [0] * world


@pytest.mark.slow
@pytest.mark.distributed
def test_tensor_parallel_resume_and_resharding(builtin_corpus_small, tmp_path):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "6", "--fp8-level", "none"]
    tp2 = args + ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
    launch(2, tp2 + ["--metrics-file", str(tmp_path / "tp2.jsonl")])
    # Exact resume at TP 2 (model-parallel RNG streams included).
    launch(2, tp2 + ["--metrics-file", str(tmp_path / "split.jsonl"), "--save", str(tmp_path / "a"),
                     "--exit-interval", "3"])
    launch(2, tp2 + ["--metrics-file", str(tmp_path / "split.jsonl"), "--load", str(tmp_path / "a")])
    assert losses(tmp_path / "split.jsonl") == losses(tmp_path / "tp2.jsonl")
    # TP 2 -> TP 1 and TP 2 -> DP 2: the same model and optimizer state, laid out anew. Dropout
    # streams differ across layouts, so compare with dropout off.
    nodrop = args + ["--hidden-dropout", "0", "--attention-dropout", "0"]
    ref = tmp_path / "ref.jsonl"
    assert run(nodrop + ["--metrics-file", str(ref)]) == 0
    launch(2, nodrop + ["--tensor-model-parallel-size", "2", "--save", str(tmp_path / "b"), "--exit-interval", "3",
                        "--metrics-file", str(tmp_path / "b.jsonl")])
    assert run(nodrop + ["--load", str(tmp_path / "b"), "--metrics-file", str(tmp_path / "b1.jsonl")]) == 0
    launch(2, nodrop + ["--load", str(tmp_path / "b"), "--metrics-file", str(tmp_path / "b2.jsonl")])
    for resumed in ("b1.jsonl", "b2.jsonl"):
        assert losses(tmp_path / resumed) == pytest.approx(losses(ref)[3:], rel=1e-5)
    # TP 1 -> TP 2.
    assert run(nodrop + ["--save", str(tmp_path / "c"), "--exit-interval", "3"]) == 0
    launch(2, nodrop + ["--tensor-model-parallel-size", "2", "--load", str(tmp_path / "c"),
                        "--metrics-file", str(tmp_path / "c2.jsonl")])
    assert losses(tmp_path / "c2.jsonl") == pytest.approx(losses(ref)[3:], rel=1e-5)


def test_checkpoint_of_another_model_is_one_clear_error(builtin_corpus_small, tmp_path, capsys):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "2"]
    assert run(args + ["--save", str(tmp_path / "ck")]) == 0
    capsys.readouterr()
    assert run(args + ["--load", str(tmp_path / "ck"), "--hidden-size", "64"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another model" in err[0] and "--hidden-size 128" in err[0], err


@pytest.mark.slow
def test_a_changed_schedule_is_refused_unless_a_flag_says_which_to_keep(builtin_corpus_small, tmp_path, capsys):
    """Megatron-LM's rule: resuming with other schedule flags than the checkpoint's is an error;
    --override-opt-param-scheduler keeps this run's, --use-checkpoint-opt-param-scheduler the
    checkpoint's. The scheduler's state is a component the checkpointer saves and restores."""
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "4", "--eval-iters", "0"]
    ckpt = str(tmp_path / "ckpt")
    assert run(args + ["--save", ckpt, "--exit-interval", "2", "--lr", "1e-3"]) == 0
    capsys.readouterr()
    assert run(args + ["--load", ckpt, "--lr", "2e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--override-opt-param-scheduler" in err[0] and "--lr" in err[0], err
    lrs = {}
    for flag in ("--use-checkpoint-opt-param-scheduler", "--override-opt-param-scheduler"):
        metrics = str(tmp_path / f"{flag}.jsonl")
        assert run(args + ["--load", ckpt, "--lr", "2e-3", flag, "--metrics-file", metrics]) == 0
        with open(metrics) as f:
            lrs[flag] = [json.loads(line)["lr"] for line in f]
    # The same point of the schedule (iteration 3 of 4), at the checkpoint's peak and at this run's.
    assert lrs["--override-opt-param-scheduler"][0] == pytest.approx(2 * lrs["--use-checkpoint-opt-param-scheduler"][0])


def test_finetune_takes_weights_only(builtin_corpus_small, tmp_path, capsys):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "2"]
    assert run(args + ["--save", str(tmp_path / "ck")]) == 0
    assert run(args + ["--load", str(tmp_path / "ck"), "--finetune", "--metrics-file", str(tmp_path / "ft.jsonl")]) == 0
    with open(tmp_path / "ft.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [1, 2]  # counted from 0 again
    assert "weights for fine-tuning" in capsys.readouterr().out


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_unsafe_checkpoint_file_is_refused_not_executed(builtin_corpus_small, tmp_path, monkeypatch, capsys):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "2"]
    assert run(args + ["--save", str(tmp_path / "ck")]) == 0
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    rank_file = checkpointing.iteration_dir(tmp_path / "ck", 2) / "rank_00000.pt"
    torch.save({"format": 1, "payload": Exploit()}, rank_file)
    capsys.readouterr()
    assert run(args + ["--load", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and "rank_00000.pt" in err
    assert not marker.exists()


CRASHING_SAVE = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    from megatron.core import checkpointing
    real_save = checkpointing._torch_save_atomic
    def save_then_die(obj, path):
        real_save(obj, path)
        if path.name == "common.pt" and "iter_0000004" in str(path):
            os.kill(os.getpid(), signal.SIGKILL)  # mid-save: rank file and common written, no rename yet
    checkpointing._torch_save_atomic = save_then_die
    import pretrain_gpt
    from megatron.training.cli import run_cli
    sys.exit(run_cli(lambda: pretrain_gpt.main(sys.argv[1:])))
""")


@pytest.mark.slow
def test_killed_in_the_middle_of_a_save_keeps_the_previous_checkpoint(builtin_corpus_small, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_SAVE.format(repo=REPO))
    ckpt = tmp_path / "ck"
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "6", "--save", str(ckpt), "--save-interval", "2"]
    proc = subprocess.run([sys.executable, str(script), *args], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert checkpointing.latest_iteration(str(ckpt)) == 2
    assert (ckpt / "iter_0000004.tmp").exists() and not (ckpt / "iter_0000004").exists()
    # The next run resumes from iteration 2, cleans the half-written save, and finishes.
    assert run(args + ["--load", str(ckpt), "--metrics-file", str(tmp_path / "m.jsonl")]) == 0
    with open(tmp_path / "m.jsonl") as f:
        assert [json.loads(line)["iteration"] for line in f] == [3, 4, 5, 6]
    assert checkpointing.latest_iteration(str(ckpt)) == 6 and not (ckpt / "iter_0000004.tmp").exists()


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(builtin_corpus_small, tmp_path):
    ckpt = tmp_path / "ck"
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "100000", "--save", str(ckpt),
                                                      "--eval-interval", "100000"]
    proc = subprocess.Popen([sys.executable, "pretrain_gpt.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until it trains
        if " iteration " in line and "/  100000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received" in out
    iteration = checkpointing.latest_iteration(str(ckpt))
    assert iteration is not None and iteration >= 1


def test_exit_duration_stops_and_saves(builtin_corpus_small, tmp_path, capsys):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "50", "--save", str(tmp_path / "ck"),
                                                      "--exit-duration-in-mins", "0.0001"]
    assert run(args) == 0
    assert "--exit-duration-in-mins 0.0001 reached" in capsys.readouterr().out
    assert checkpointing.latest_iteration(str(tmp_path / "ck")) == 1


def test_damaged_marker_and_missing_folder(tmp_path):
    (tmp_path / checkpointing.MARKER).write_text("soon\n")
    with pytest.raises(checkpointing.CheckpointError, match="does not hold an iteration"):
        checkpointing.latest_iteration(str(tmp_path))
    (tmp_path / checkpointing.MARKER).write_text("7\n")
    with pytest.raises(checkpointing.CheckpointError, match="iter_0000007 is missing"):
        checkpointing.latest_iteration(str(tmp_path))
    assert checkpointing.latest_iteration(str(tmp_path / "empty")) is None


@pytest.mark.slow
@pytest.mark.distributed
def test_distributed_optimizer_checkpoints_reshard_across_data_parallel_sizes(builtin_corpus_small, tmp_path):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "6", "--hidden-dropout", "0",
                                                      "--attention-dropout", "0"]
    ref = tmp_path / "ref.jsonl"
    assert run(args + ["--metrics-file", str(ref)]) == 0
    zero = ["--use-distributed-optimizer"]
    # DP 2 with ZeRO -> DP 4 with ZeRO, and -> one process without it.
    launch(2, args + zero + ["--save", str(tmp_path / "z2"), "--exit-interval", "3"])
    launch(4, args + zero + ["--load", str(tmp_path / "z2"), "--metrics-file", str(tmp_path / "z4.jsonl")])
    assert run(args + ["--load", str(tmp_path / "z2"), "--metrics-file", str(tmp_path / "p1.jsonl")]) == 0
    # DP 4 without ZeRO -> DP 2 with it.
    launch(4, args + ["--save", str(tmp_path / "p4"), "--exit-interval", "3"])
    launch(2, args + zero + ["--load", str(tmp_path / "p4"), "--metrics-file", str(tmp_path / "z2b.jsonl")])
    for resumed in ("z4.jsonl", "p1.jsonl", "z2b.jsonl"):
        assert losses(tmp_path / resumed) == pytest.approx(losses(ref)[3:], rel=1e-5), resumed


@pytest.mark.slow
@pytest.mark.distributed
def test_pipeline_checkpoints_reshard_between_stages(builtin_corpus_small, tmp_path):
    args = BASE + builtin_corpus_small.training_args() + ["--train-iters", "6", "--hidden-dropout", "0",
                                                      "--attention-dropout", "0", "--num-layers", "4"]
    ref = tmp_path / "ref.jsonl"
    assert run(args + ["--metrics-file", str(ref)]) == 0
    pp2 = ["--pipeline-model-parallel-size", "2"]
    launch(2, args + pp2 + ["--save", str(tmp_path / "pp2"), "--exit-interval", "3"])
    assert run(args + ["--load", str(tmp_path / "pp2"), "--metrics-file", str(tmp_path / "pp1.jsonl")]) == 0
    assert run(args + ["--save", str(tmp_path / "one"), "--exit-interval", "3"]) == 0
    launch(2, args + pp2 + ["--load", str(tmp_path / "one"), "--metrics-file", str(tmp_path / "back.jsonl")])
    for resumed in ("pp1.jsonl", "back.jsonl"):
        assert losses(tmp_path / resumed) == pytest.approx(losses(ref)[3:], rel=1e-5), resumed
