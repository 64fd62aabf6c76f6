"""Multi-node launch: two `torchrun --nnodes 2` agents on this machine, one process each, meeting
through the c10d rendezvous as scripts/slurm_pretrain.sh has them meet (through its launcher,
scripts/torchrun_graceful.py), train the same run as one agent with two processes: the losses
and gradient norms agree bit for bit. The layout is data parallel 2 at FP8 level O3, so the FP8
gradient reduction and the FP8 weight all-gathers cross the two "nodes"."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCHER = REPO / "scripts" / "torchrun_graceful.py"
RUN = ["--config", str(REPO / "configs" / "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "64",
       "--max-position-embeddings", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
       "--train-iters", "4", "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "0",
       "--lr-warmup-iters", "1", "--fp8-level", "O3"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def records(path: Path) -> list[tuple[int, float, float]]:
    with open(path) as f:
        return [(r["iteration"], r["loss"], r["grad_norm"]) for r in map(json.loads, f)]


@pytest.mark.slow
@pytest.mark.distributed
def test_two_nodes_train_like_one_node_with_two_processes(builtin_corpus_small, tmp_path):
    # One thread per process: the CPU GEMMs then sum in the same order in both launches.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    train = [str(REPO / "pretrain_gpt.py"), *RUN, *builtin_corpus_small.training_args()]

    single = tmp_path / "single.jsonl"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *train, "--metrics-file", str(single)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    multi = tmp_path / "multi.jsonl"
    endpoint = f"127.0.0.1:{free_port()}"
    agents = [subprocess.Popen([sys.executable, str(LAUNCHER), "--nnodes", "2", "--nproc-per-node", "1",
                                "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                                "--rdzv-id", "multinode-test", *train, "--metrics-file", str(multi)],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for node in range(2)]
    try:
        outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    text = "\n".join(outputs)
    assert "rank 0/2" in text and "dp 0/2" in text

    expected = records(single)
    assert [r[0] for r in expected] == [1, 2, 3, 4]
    assert records(multi) == expected
