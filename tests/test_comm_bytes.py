"""The byte counters against an independent measure: every `torch.distributed` call the training
makes is wrapped, the tensors handed to it are measured, and DESIGN.md's ring model is applied to
those sizes here (not through `comm.ring_bytes`), per group. That must equal the `ParallelState`'s `counter` at
every point the counter is read or reset, and the metrics file's `comm`, for real training steps
of `pretrain_gpt` on two gloo processes: `none` and O2 (each with and without the distributed
optimizer) and O3 at DP 2, O3 with TP 2 + sequence parallelism + FP8 reduce-scatter, and O3 with
PP 2 (FP8 pipeline sends). One process start runs all seven trainings, two iterations each.

What a call is, is read from the tensors, except where `comm` emulates one collective with another
on gloo; there the call site says which collective the bytes stand for (the ring model charges
the collective asked for), and the test checks what gloo is handed instead (an all-to-all is
charged what leaves the rank: every piece but its own):
- `comm.reduce_scatter` on CPU is an `all_reduce` of the full tensor: 2x the ring figure.
`comm.all_gather_uneven` (FP8 ZeRO's weight publication) is a padded all-gather or broadcasts
from the ranks with pieces: plain collectives, charged as such.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
import threading
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist

from distributed import run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ITERS = 2
BASE = ["--config", os.path.join(REPO, "configs", "gpt-tiny.yaml"), "--device", "cpu", "--seq-length", "64",
        "--max-position-embeddings", "64", "--micro-batch-size", "4", "--global-batch-size", "8",
        "--eval-iters", "0", "--lr-warmup-iters", "1", "--train-iters", str(ITERS), "--log-interval", "1"]
O3 = ["--fp8-level", "O3"]
CASES = {
    "none": [],
    "none-zero": ["--use-distributed-optimizer"],
    "O2": ["--fp8-level", "O2"],
    "O2-zero": ["--fp8-level", "O2", "--use-distributed-optimizer"],
    # The communication thread's collectives (its own data-parallel group), FP8 buckets included.
    "O2-overlap": ["--fp8-level", "O2", "--overlap-grad-reduce", "--ddp-bucket-size", "20000"],
    "O3": O3 + ["--num-layers", "1"],  # 4 FP8 weights: the greedy partition leaves the owners uneven
    "O3-tp2-sp": O3 + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--fp8-reduce-scatter"],
    "O3-pp2": O3 + ["--pipeline-model-parallel-size", "2"],
}
BUCKETS = ("dp", "tp", "pp")
BUCKET_OF = {"dp": "dp", "tp": "tp", "pp": "pp", "embedding": "pp"}

# What the training may hand to torch.distributed, by the collective the ring model charges.
GATHERS = {"all_gather", "all_gather_into_tensor", "all_gather_single"}
SCATTERS = {"reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"}
SENDS, RECVS = {"send", "isend"}, {"recv", "irecv"}
WRAPPED = sorted({"all_reduce", "all_to_all", "all_to_all_single", "broadcast", "barrier", "batch_isend_irecv",
                  "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list",
                  "all_reduce_coalesced", "all_gather_coalesced"} | GATHERS | SCATTERS | SENDS | RECVS)


def ring(op: str, full_nbytes: int, n: int) -> int:
    """DESIGN.md's ring model, written out again: what one rank sends for `op` on S bytes."""
    if n <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (n - 1) * full_nbytes // n
    if op in ("reduce_scatter", "all_gather", "all_to_all"):
        return (n - 1) * full_nbytes // n
    assert op in ("broadcast", "send"), op
    return full_nbytes


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _chunks(t: torch.Tensor, splits, group) -> list[torch.Tensor]:
    return list(t.split(splits)) if splits else list(t.chunk(dist.get_world_size(group)))


# ----- recording what torch.distributed is handed ----------------------------------------------
class Tracer:
    """Wraps the torch.distributed functions; records one entry per outermost call, and the
    counter's value each time the project reads (`snapshot`, `since`) or resets it."""

    def __init__(self):
        from megatron.core.distributed import comm
        from megatron.core.parallel_state import ParallelState

        self.comm_file, self.counter, self.ps_cls = comm.__file__, None, ParallelState
        self.calls, self.points, self.ps, self._saved = [], [], None, {}
        self._local = threading.local()  # nesting depth per thread: the overlap's thread calls too

    def install(self) -> None:
        for name in WRAPPED:
            if hasattr(dist, name):
                self._saved[name] = getattr(dist, name)
                setattr(dist, name, self._wrap(name, self._saved[name]))
        self._saved_build = self.ps_cls.__dict__["build"]
        build, tracer = self._saved_build.__func__, self

        def traced_build(cls, *args, **kwargs):
            tracer.ps = build(cls, *args, **kwargs)
            tracer._trace_counter(tracer.ps.counter)
            return tracer.ps
        self.ps_cls.build = classmethod(traced_build)

    def _trace_counter(self, counter) -> None:
        """Record every reading and reset of the training's counter (the one its ParallelState carries)."""
        self.counter = counter
        snapshot, reset = counter.snapshot, counter.reset

        def traced_snapshot():
            value = snapshot()
            self.points.append(("snapshot", value, len(self.calls)))
            return value

        def traced_reset():
            self.points.append(("reset", snapshot(), len(self.calls)))
            reset()
        counter.snapshot, counter.reset = traced_snapshot, traced_reset

    def uninstall(self) -> None:
        for name, fn in self._saved.items():
            setattr(dist, name, fn)
        self.ps_cls.build = self._saved_build

    def _wrap(self, name, fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                self.calls.append(self._describe(name, signature.bind(*args, **kwargs).arguments))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth
        return wrapper

    def _site(self) -> str | None:
        """The `comm` function that made this call (None: torch.distributed called directly)."""
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename != self.comm_file:
            frame = frame.f_back
        return frame.f_code.co_name if frame is not None else None

    def _describe(self, name: str, a: dict) -> dict:
        """Sizes of what the call is handed: `in_bytes` (this rank's input), `out_bytes`."""
        call = {"fn": name, "group": a.get("group"), "site": self._site(), "peer": None}
        if name == "batch_isend_irecv":  # one entry per operation (NCCL only; gloo gets isend/irecv)
            call["ops"] = [(op.op.__name__, op.tensor.numel() * op.tensor.element_size(), op.peer, op.group)
                           for op in a["p2p_op_list"]]
        elif name in ("all_reduce", "broadcast"):
            call["in_bytes"] = call["out_bytes"] = _nbytes([a["tensor"]])
        elif name == "all_gather":
            call["in_bytes"], call["out_bytes"] = _nbytes([a["tensor"]]), _nbytes(a["tensor_list"])
        elif name in GATHERS | SCATTERS - {"all_gather", "reduce_scatter"}:
            call["in_bytes"], call["out_bytes"] = _nbytes([a["input_tensor"] if "input_tensor" in a else a["input"]]), \
                _nbytes([a["output_tensor"] if "output_tensor" in a else a["output"]])
        elif name == "reduce_scatter":
            call["in_bytes"], call["out_bytes"] = _nbytes(a["input_list"]), _nbytes([a["output"]])
        elif name == "all_to_all":
            call["in_bytes"], call["out_bytes"] = _nbytes(a["input_tensor_list"]), _nbytes(a["output_tensor_list"])
            call["own_bytes"] = _nbytes([a["input_tensor_list"][dist.get_rank(a.get("group"))]])
        elif name == "all_to_all_single":
            sent = _chunks(a["input"], a.get("input_split_sizes"), a.get("group"))
            call["in_bytes"], call["out_bytes"] = _nbytes([a["input"]]), _nbytes([a["output"]])
            call["own_bytes"] = _nbytes([sent[dist.get_rank(a.get("group"))]])  # kept, not sent
        elif name in SENDS | RECVS:
            call["in_bytes"] = _nbytes([a["tensor"]])
            call["peer"] = a.get("dst", a.get("src"))
        elif name != "barrier":
            call["in_bytes"] = None  # a collective this test has no model for: fails below
        return call

    # ----- the independent tally -----------------------------------------------------------------
    def bucket(self, group) -> str:
        for name, bucket in BUCKET_OF.items():
            if self.ps is not None and self.ps.group(name) is group:
                return bucket
        # The overlapped reduction's own group: another group over the data-parallel ranks.
        if self.ps is not None and group is not None and self.ps.dp_size > 1 \
                and tuple(dist.get_process_group_ranks(group)) == self.ps.ranks("dp"):
            return "dp"
        return "other"

    def charge(self, call: dict) -> list[tuple[str, str, int, int]]:
        """[(bucket, collective, ring bytes of the collective meant, ring bytes of the call as made)]."""
        fn, site = call["fn"], call["site"]
        if fn == "batch_isend_irecv":
            return [(self.bucket(g), "send", s, s) for op, s, _, g in call["ops"] if op == "isend"]
        bucket, n = self.bucket(call["group"]), dist.get_world_size(call["group"])
        if fn == "barrier" or fn in RECVS:
            return [(bucket, fn, 0, 0)]
        if fn == "all_reduce":
            made = ring("all_reduce", call["in_bytes"], n)
            if site == "reduce_scatter":  # gloo fallback: the full tensor all-reduced, own chunk kept
                return [(bucket, "reduce_scatter", ring("reduce_scatter", call["in_bytes"], n), made)]
            return [(bucket, "all_reduce", made, made)]
        if fn in GATHERS:
            assert call["out_bytes"] == n * call["in_bytes"], call
            return [(bucket, "all_gather", *[ring("all_gather", call["out_bytes"], n)] * 2)]
        if fn in SCATTERS:
            assert call["in_bytes"] == n * call["out_bytes"], call
            return [(bucket, "reduce_scatter", *[ring("reduce_scatter", call["in_bytes"], n)] * 2)]
        if fn in ("all_to_all", "all_to_all_single"):
            sent = call["in_bytes"] - call["own_bytes"]  # what leaves the rank: every piece but its own
            return [(bucket, "all_to_all", sent, sent)]
        if fn == "broadcast":
            return [(bucket, "broadcast", *[ring("broadcast", call["in_bytes"], n)] * 2)]
        if fn in SENDS:
            return [(bucket, "send", call["in_bytes"], call["in_bytes"])]
        raise AssertionError(f"the training called torch.distributed.{fn}, which comm does not count "
                             f"and this test does not model")

    def tally(self, calls) -> dict:
        out = dict.fromkeys((f"{b}_bytes" for b in BUCKETS), 0)
        for call in calls:
            for bucket, _, meant, _ in self.charge(call):
                assert bucket != "other" or meant == 0, ("a collective outside tp/dp/pp/embedding", call)
                if bucket != "other":
                    out[f"{bucket}_bytes"] += meant
        return out

    def report(self) -> dict:
        """Every counter reading against the independent tally since the reset before it, the loop's
        per-iteration readings, what gloo was handed where comm emulates, and the p2p totals."""
        checks, starts, per_iteration, after_step = [], [0], [], []
        resets = [i for i, (kind, _, _) in enumerate(self.points) if kind == "reset"]
        for kind, value, end in self.points:
            checks.append((kind, value, self.tally(self.calls[starts[-1]:end])))
            if kind == "reset":
                starts.append(end)
        # The loop reads the counter last before the next reset; whatever follows is not in the record.
        for reset, next_reset in zip(resets, resets[1:] + [len(self.points)]):
            last = max(i for i in range(reset, next_reset) if self.points[i][0] == "snapshot")
            per_iteration.append(self.points[last][1])
            end = self.points[next_reset][2] if next_reset < len(self.points) else len(self.calls)
            after_step += [(c["fn"], c["site"], c["in_bytes"]) for c in self.calls[self.points[last][2]:end]]
        emulated, p2p = defaultdict(lambda: [0, 0]), defaultdict(int)
        for call in self.calls:
            for bucket, op, meant, made in self.charge(call):
                if meant != made:
                    emulated[(bucket, op, call["fn"])][0] += meant
                    emulated[(bucket, op, call["fn"])][1] += made
            if call["fn"] in SENDS | RECVS:
                p2p[(call["fn"].lstrip("i"), call["peer"])] += call["in_bytes"]
        return {"checks": checks, "per_iteration": per_iteration, "after_step": after_step,
                "emulated": dict(emulated), "p2p": dict(p2p),
                "sites": sorted({(c["fn"], c["site"]) for c in self.calls})}


def traced_trainings(rank, world_size, data_args, folder):
    import pretrain_gpt

    os.environ.update(WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    tracer = Tracer()
    tracer.install()
    results = {}
    try:
        for name, flags in CASES.items():
            tracer.calls, tracer.points, tracer.ps = [], [], None  # each run builds its state and counter
            metrics_file = os.path.join(folder, f"{name}.jsonl")
            assert pretrain_gpt.main(BASE + data_args + flags + ["--metrics-file", metrics_file]) == 0
            results[name] = tracer.report()
    finally:
        tracer.uninstall()
    return results


# ----- the checks --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traced(builtin_corpus_small, tmp_path_factory):
    folder = tmp_path_factory.mktemp("comm-bytes")
    ranks = run_distributed(traced_trainings, 2, builtin_corpus_small.training_args(), str(folder), timeout=300)
    metrics = {}
    for name in CASES:
        with open(folder / f"{name}.jsonl") as f:
            metrics[name] = [json.loads(line) for line in f]
    return ranks, metrics


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_counters_equal_the_bytes_handed_to_torch_distributed(traced, case):
    ranks, metrics = traced
    for rank, result in enumerate(ranks):
        report = result[case]
        assert report["checks"], "the training never read the counter"
        for kind, counted, measured in report["checks"]:
            assert counted == measured, (case, rank, kind, report["sites"])
        assert len(report["per_iteration"]) == ITERS
        # Nothing moves between the loop's reading and the next reset: the stop check's flag
        # all-reduce is asked before the reading, so every record carries all of its iteration.
        assert report["after_step"] == [], report["after_step"]
    assert [r["comm"] for r in metrics[case]] == ranks[0][case]["per_iteration"]
    group = {"O3-tp2-sp": "tp", "O3-pp2": "pp"}.get(case, "dp")
    assert all(r["comm"][f"{group}_bytes"] > 0 for r in metrics[case])


@pytest.mark.slow
@pytest.mark.distributed
def test_what_gloo_is_handed_where_comm_emulates(traced):
    ranks, _ = traced
    for result in ranks:
        # A reduce-scatter on CPU is an all-reduce of the full tensor: twice the ring figure.
        for case, buckets in (("none-zero", {"dp"}), ("O3-tp2-sp", {"tp"})):
            emulated = result[case]["emulated"]
            scatters = {b for b, op, fn in emulated if op == "reduce_scatter" and fn == "all_reduce"}
            assert scatters == buckets, emulated
            for (_, op, _), (meant, made) in emulated.items():
                if op == "reduce_scatter":
                    assert made == 2 * meant
    # FP8 ZeRO's weight publication and gradient reduction are plain collectives, charged as made:
    # nothing O3 hands gloo is emulated (its reduce-scatter of dense gradients aside).
    assert {op for _, op, _ in ranks[0]["O3"]["emulated"]} <= {"reduce_scatter"}
    called = {fn for fn, _ in ranks[0]["O3"]["sites"]}
    assert "all_to_all_single" in called and called & {"all_gather", "broadcast"}
    # Pipeline sends: what one stage sends the other receives, byte for byte.
    p2p = [result["O3-pp2"]["p2p"] for result in ranks]
    assert p2p[0][("send", 1)] == p2p[1][("recv", 0)] > 0 and p2p[1][("send", 0)] == p2p[0][("recv", 1)] > 0
