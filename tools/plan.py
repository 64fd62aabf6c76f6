#!/usr/bin/env python
"""Plan a run: per-GPU memory and per-iteration traffic for a config, a layout and a precision level.

    python tools/plan.py --config configs/gpt-7b.yaml --data-parallel-size 32 --fp8-level O3
    python tools/plan.py --config configs/gpt-7b.yaml --data-parallel-size 32 --fits 80
    python tools/plan.py --paper        # 7B / 13B / 175B at Table 5's layouts, beside the paper

pretrain_gpt.py's flags override the config; the vocabulary is the tokenizer's, else GPT-2's 50257.

- **States** (the metrics file's `memory`): each pipeline stage is built on the meta device by
  the training code (`build_gpt_stages`, `parallelize_gpt`); the FP8 linears are the precision
  plan's choice; the gradient buffer, the distributed optimizer's shards and FP8 ZeRO's owners are
  the real objects. Per element: weights in the model's dtype, FP16 (O1, O2) or FP8 (O3) + scale
  in FP8 linears; an FP32 gradient buffer, FP8 + scale gradients in FP8 linears (O3: the owned
  ones between steps, all from the first backward to the reduction); FP32 masters of 16-bit
  weights, FP16 + scale masters on O3 owners; Adam moments FP32, or FP8 / FP16 + scale (O2, O3).
- **Traffic** (the metrics file's `comm`): each collective of one iteration under the ring model
  (`comm.ring_bytes`): dense buckets (all-reduce, or reduce-scatter + all-gather), the FP8
  all-reduce (O1, O2), FP8 ZeRO's reduction to owners and FP8 all-gather (O3); per layer 2 tensor-
  parallel all-reduces forward and 2 backward, or SP all-gathers and reduce-scatters (FP8 at O3);
  the pipeline schedule's sends (FP8 at O3), the tied embedding, the scalars.
- **Activations** (what autograd keeps): per layer and micro-batch of T = s b tokens (T' = T / t
  under sequence parallelism), hidden h, FFN f, activation bytes e: the norms' inputs 2 T' h e (+
  FP32 statistics); the QKV and FC1 inputs (T' h e; FP8: T' h at O3, T h at O0-O2, which keep the
  gathered input); Q, K, V and flash attention's output 4 T h e / t (unfused: Q, K, V and the
  b a s^2 e / t probabilities); the projection's input (FP8: T h / t; else flash's output itself)
  and FC2's (T f e / t, FP8 T f / t); GeLU's input T f e / t (SwiGLU: 3 T f e / t); 1-byte dropout
  masks. That is Korthikanti et al.'s s b h (34 + 5 a s / h) (/ t under SP) less the scores and
  masks, plus the attention's output. Full recomputation keeps each chunk's input T' h e and
  rebuilds one chunk at a time; selective keeps Q, K, V only. A stage holds the micro-batches its
  pipeline plan has in flight (the first: PP), each with the output it sent (the first under SP:
  the whole embedding output); the last adds the loss step (T V / t: logits, their FP32 copy, the
  FP32 softmax kept); layers cache their RoPE tables.
- **Total** = states + activations with every FP8 gradient (they exist from the first backward
  on). Not counted: the allocator's cache, workspaces, the buffers of one collective or GEMM.
"""

from __future__ import annotations

import copy
import json
import sys
import types
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import yaml  # noqa: E402

from fp8.collectives import owner_rounds, round_parts  # noqa: E402
from fp8.params import SCALE_BYTES  # noqa: E402
from fp8.scaling import chunk_mb_for, chunk_numel_of  # noqa: E402
from fp8.zero import greedy_partition  # noqa: E402
from megatron.core.distributed.comm import all_gather_uneven_bytes, ring_bytes  # noqa: E402
from megatron.core.distributed.data_parallel import (  # noqa: E402
    SHARD_ALIGN_NUMEL, DistributedDataParallel, GradBuffer, bucket_sizes_mb)
from megatron.core.distributed.fp8_zero import FP8ZeroLayout, backward_buckets  # noqa: E402
from megatron.core.optimizer.distrib_optimizer import owned_segments  # noqa: E402
from megatron.core.parallel_state import ParallelState  # noqa: E402
from megatron.core.parallelize import parallelize_gpt  # noqa: E402
from megatron.core.pipeline_parallel.model import build_gpt_stages  # noqa: E402
from megatron.core.pipeline_parallel.schedules import (  # noqa: E402
    Backward, Exchange, Forward, PipelineGeometry, interleaved_plan, one_f_one_b_plan)
from megatron.core.precision import LEVELS, _fp8_linears, plan_for  # noqa: E402
from megatron.core.tensor_parallel.layers import (  # noqa: E402
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
from megatron.core.tensor_parallel.layout import layouts_of  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402
from tools.plan_activations import activation_bytes  # noqa: E402

GPT2_VOCAB = 50257
GB = 1e9
STATE_BYTES = {"fp32": (4, 0), "bf16": (2, 0), "fp16": (2, SCALE_BYTES), "fp8": (1, SCALE_BYTES)}  # per element, scale
PERSISTENT = ("weight_bytes", "grad_bytes", "master_bytes", "optim_bytes")


# ----- the run's configuration -----------------------------------------------------------------
def run_config(run_argv: list[str]):
    """pretrain_gpt.py's configuration from these flags; the schedule flags that do not change
    memory or traffic are filled in when neither the flags nor the config file give them."""
    from megatron.training.config import parse_config

    given = {t.split("=", 1)[0][2:].replace("-", "_") for t in run_argv if t.startswith("--")}
    if "config" in given:
        path = run_argv[run_argv.index("--config") + 1] if "--config" in run_argv else None
        try:
            values = yaml.safe_load(Path(path).read_text()) if path and Path(path).is_file() else {}
        except yaml.YAMLError:
            values = {}  # parse_config says what is wrong with it
        given |= {str(k).replace("-", "_") for k in (values if isinstance(values, dict) else {})}
    extra = [] if "lr" in given else ["--lr", "1e-4"]
    if not given & {"train_iters", "train_samples"}:
        extra += ["--train-iters", "1"]
    return parse_config(run_argv + extra, description="plan a run")


def tokenizer_vocab(config) -> int:
    """The unpadded vocabulary: the tokenizer's, or --vocab-size, or GPT-2's."""
    tok = config.tokenizer
    if tok.tokenizer_type is not None:
        from megatron.core.tokenizers.tokenizer import build_tokenizer
        return build_tokenizer(tok.tokenizer_config()).vocab_size
    return tok.vocab_size or GPT2_VOCAB


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    mbs: int
    gbs: int
    sp: bool
    vpp_layers: int | None  # --num-layers-per-virtual-pipeline-stage

    @property
    def num_microbatches(self) -> int:
        return max(1, self.gbs // (self.mbs * self.dp))


def layout_of(config, dp: int) -> Layout:
    p, t = config.parallel, config.training
    mbs = t.micro_batch_size
    return Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size, dp, mbs,
                  t.global_batch_size or mbs * dp, p.sequence_parallel and p.tensor_model_parallel_size > 1,
                  p.num_layers_per_virtual_pipeline_stage)


# ----- one pipeline stage, built by the training code on the meta device -----------------------
class Stage:
    """Pipeline stage `pp_rank` (every model chunk of it) at tensor-parallel rank 0, with the
    precision plan's FP8 linears, the gradient buffer and FP8 ZeRO's partition."""

    def __init__(self, config, transformer, layout: Layout, pp_rank: int):
        self.config, self.layout = config, layout
        tp, pp, dp = layout.tp, layout.pp, layout.dp
        self.ps = ParallelState(world_size=tp * pp * dp, rank=pp_rank * dp * tp, tp_size=tp, pp_size=pp, dp_size=dp,
                                tp_rank=0, pp_rank=pp_rank, dp_rank=0, device=torch.device("meta"), backend=None)
        chunks = build_gpt_stages(transformer, self.ps, device="meta", num_layers_per_virtual_stage=layout.vpp_layers)
        for chunk in chunks:
            parallelize_gpt(chunk, self.ps, sequence_parallel=layout.sp)
        self.chunks = chunks
        self.model = chunks[0] if len(chunks) == 1 else nn.ModuleList(chunks)
        self.layouts = layouts_of(self.model)
        self.fp8_config = config.precision.fp8_config()
        self.plan = plan_for(self.fp8_config)
        recipe = self.fp8_config.to_recipe()
        self.fp8_modules = ({id(m) for _, m in _fp8_linears(self.model, self.fp8_config, recipe)}
                            if self.plan.fp8_gemms else set())
        linears = [m for m in self.model.modules() if id(m) in self.fp8_modules]
        self.fp8_params = [m.weight for m in linears] if self.plan.fp8_wgrad else []
        self.fp16_masters = self.fp8_config.optimizer_dtypes()[0] == "fp16"
        self.use_dist_opt = config.parallel.use_distributed_optimizer or (self.plan.fp8_zero and dp > 1)
        self.dense = DistributedDataParallel.dense_grad_params(self.model, self.fp8_params)
        dense_mb, fp8_mb = bucket_sizes_mb(config.parallel.ddp_bucket_size)
        bucket_numel = max(1, int(dense_mb * 2**20 / 4))
        self.overlap = config.parallel.overlap_grad_reduce and dp > 1
        # O3 at DP > 1 keeps only this rank's chunks of the dense gradients (ZeRO-2), as the trainer does.
        self.grad_buffer = GradBuffer(self.dense, torch.float32, torch.device("meta"), bucket_numel,
                                      pad_to=dp * SHARD_ALIGN_NUMEL if self.use_dist_opt else 1,
                                      alone=self.layouts.params(tied_embedding=True),
                                      shard_of=(0, dp) if self.plan.fp8_zero and dp > 1 else None)
        self.zero = (FP8ZeroLayout(self.fp8_params, dp, int(fp8_mb * 2**20))
                     if self.plan.fp8_zero and self.fp8_params else None)
        self.owners = (self.zero.owners if self.zero is not None else
                       greedy_partition([p.numel() for p in self.fp8_params], dp) if self.use_dist_opt
                       else None)

    def fp8_owned(self, dp_rank: int) -> list[nn.Parameter]:
        if self.owners is None:
            return list(self.fp8_params)
        return [p for p, owner in zip(self.fp8_params, self.owners) if owner == dp_rank]

    # ----- persistent bytes (the metrics file's `memory`) --------------------------------------
    def state_bytes(self, dp_rank: int = 0) -> dict[str, int]:
        fp8_ids = {id(p) for p in self.fp8_params}
        weight = 0
        for p in self.model.parameters():
            if id(p) not in fp8_ids or not (self.plan.fp8_zero or self.fp16_masters):
                weight += p.numel() * p.element_size()
            else:  # FP8 (O3) or FP16 (O1, O2) payload with a per-tensor scale
                weight += p.numel() * (1 if self.plan.fp8_zero else 2) + SCALE_BYTES
        fp8_grads_all = sum(p.numel() + SCALE_BYTES for p in self.fp8_params)
        held = self.fp8_owned(dp_rank) if self.zero is not None else self.fp8_params
        grad = self.grad_buffer.nbytes + sum(p.numel() + SCALE_BYTES for p in held)
        return {"weight_bytes": weight, "grad_bytes": grad, "master_bytes": self._master_bytes(dp_rank),
                "optim_bytes": self._optim_bytes(dp_rank), "fp8_grad_peak_bytes": fp8_grads_all}

    def _master_bytes(self, dp_rank: int) -> int:
        if self.use_dist_opt:
            segments = owned_segments(types.SimpleNamespace(grad_buffer=self.grad_buffer), dp_rank, self.layout.dp)
            dense = 4 * sum(s.numel for s in segments if s.master_start is not None)
        else:
            dense = 4 * sum(p.numel() for p in self.dense if p.dtype != torch.float32)
        fp8 = sum(2 * p.numel() + SCALE_BYTES for p in self.fp8_owned(dp_rank)) if self.zero is not None else 0
        return dense + fp8

    def _optim_bytes(self, dp_rank: int) -> int:
        buffered = self.grad_buffer.full_numel
        dense = 8 * (buffered // self.layout.dp if self.use_dist_opt else buffered)
        _, m_dtype, v_dtype = self.fp8_config.optimizer_dtypes()
        fp8 = 0
        for p in self.fp8_owned(dp_rank):
            for dtype in (m_dtype, v_dtype):
                per_element, scale = STATE_BYTES[dtype]
                fp8 += per_element * p.numel() + scale
        return dense + fp8

    # ----- traffic per iteration (the metrics file's `comm`) -----------------------------------
    def dp_bytes(self, dp_rank: int = 0) -> int:
        n = self.layout.dp
        if n == 1:
            return 0
        total = 0
        for bucket in self.grad_buffer.buckets:
            size = bucket.numel
            if self.use_dist_opt:
                chunk = size // n * bucket.params[0].element_size()
                total += ring_bytes("reduce_scatter", 4 * size, n) + ring_bytes("all_gather", chunk * n, n)
            else:
                total += ring_bytes("all_reduce", 4 * size, n)
        total += self._fp8_dp_bytes(dp_rank)
        if self.use_dist_opt:
            total += ring_bytes("all_reduce", 8, n)  # the dense shards' squared norm (float64)
        return total + 2 * ring_bytes("all_reduce", 4, n)  # the stop flag; the logged loss

    def _fp8_dp_bytes(self, dp_rank: int) -> int:
        n, params = self.layout.dp, self.fp8_params
        if not params:
            return 0
        total = ring_bytes("all_reduce", 40, n)  # the reduction's five counts (float64), once per step
        chunk = self.fp8_chunk_numel
        if self.zero is None:
            # One reduction of all, or (overlapped) one per bucket of FP8GradReducer.buckets: per
            # round an all-to-all and an all-gather of a part of L values each.
            for bucket in self._fp8_allreduce_buckets():
                numel = sum(params[i].numel() for i in bucket)
                parts = round_parts(numel, n, chunk)
                total += ring_bytes("all_reduce", 4 * len(bucket), n) + 2 * (n - 1) * sum(L for _, L in parts)
            if self.owners is not None and any(o != dp_rank for o in self.owners):  # owners broadcast FP16
                for owner in set(self.owners):
                    mine = [p for p, o in zip(params, self.owners) if o == owner]
                    total += sum(p.numel() * (2 if self.fp16_masters else p.element_size()) for p in mine)
                    total += SCALE_BYTES * len(mine) if self.fp16_masters else 0
            return total
        total += ring_bytes("all_reduce", 4 * len(params), n)  # the FP8 gradients' squared norms
        if not self.overlap:  # the shared scales agreed once for all buckets
            total += ring_bytes("all_reduce", 4 * len(params), n)
        for by_rank in self.zero.publication_groups(4 * chunk):  # published, padded to the largest piece
            total += all_gather_uneven_bytes([sum(p.numel() for p in owned) + SCALE_BYTES * len(owned)
                                              for owned in by_rank])
        for bucket in self.zero.buckets:
            if self.overlap:
                total += ring_bytes("all_reduce", 4 * len(bucket), n)
            numels, owners = [params[i].numel() for i in bucket], [self.zero.owners[i] for i in bucket]
            if owner_rounds(numels, owners, n, chunk)[0] == "direct":  # what the others own, once
                total += sum(size for size, owner in zip(numels, owners) if owner != dp_rank)
            else:
                total += self._owner_round_bytes(numels, owners, dp_rank, chunk)
        return total

    def _owner_round_bytes(self, numels: list[int], owners: list[int], dp_rank: int, chunk: int) -> int:
        """FP8 ZeRO's reduction of one bucket in rounds: per round an all-to-all of L values to
        each other rank, then this rank's summed part sent on to the owners of its values but
        itself."""
        n, total = self.layout.dp, 0
        ends = [sum(numels[:i + 1]) for i in range(len(numels))]
        for start, length in round_parts(ends[-1], n, chunk):
            lo, hi = start + dp_rank * length, min(start + (dp_rank + 1) * length, ends[-1])
            others = sum(max(0, min(hi, end) - max(lo, end - size))
                         for size, end, owner in zip(numels, ends, owners) if owner != dp_rank)
            total += (n - 1) * length + others
        return total

    @property
    def fp8_chunk_numel(self) -> int:
        """The run's `--fp8-chunk-mb` in values (auto: the budget of its `--device`, CUDA's for
        `auto`: a plan is for GPUs). The FP8 reductions' rounds, hence a few bytes of padding and
        FP8 ZeRO's choice of reduction (`fp8.collectives.owner_rounds`), depend on it."""
        mb = self.config.precision.fp8_chunk_mb
        device = "cuda" if self.config.training.device == "auto" else self.config.training.device
        return chunk_numel_of(chunk_mb_for(device) if mb is None else mb)

    def _fp8_allreduce_buckets(self) -> list[list[int]]:
        if not self.overlap:  # one reduction of all
            return [list(range(len(self.fp8_params)))]
        return backward_buckets([p.numel() for p in self.fp8_params], self.grad_buffer.bucket_numel)

    def tp_bytes(self) -> int:
        t = self.layout.tp
        if t == 1:
            return 0
        per_step = ring_bytes("all_reduce", 4, t) * (2 + bool(self.fp8_params))  # stop flag, norm(s)
        if self.layout.sp:  # one sum per gradient bucket holding sequence-parallel parameters
            for bucket in self.grad_buffer.buckets:
                sp_numel = sum(p.numel() for p in bucket.params if self.layouts[p].sequence_parallel)
                per_step += ring_bytes("all_reduce", 4 * sp_numel, t)
        return per_step + self.layout.num_microbatches * self._tp_microbatch_bytes()

    def _tp_microbatch_bytes(self) -> int:
        """Forward and backward of one micro-batch on this stage."""
        t, sp, cfg = self.layout.tp, self.layout.sp, self.config
        tokens = cfg.data.seq_length * self.layout.mbs
        e = cfg.precision.params_dtype.itemsize
        total = 0
        for module in self.model.modules():
            if isinstance(module, VocabParallelEmbedding):
                full = tokens * module.embedding_dim
                total += ring_bytes("all_reduce", full * e, t) + (ring_bytes("all_gather", full * e, t) if sp else 0)
            elif isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                column = isinstance(module, ColumnParallelLinear)
                full = tokens * (module.input_size if column else module.output_size)
                total += self._linear_tp_bytes(module, column, full, e)
        if any(c.post_process for c in self.chunks):  # vocab-parallel cross-entropy: max, then two sums
            total += ring_bytes("all_reduce", 4 * tokens, t) + ring_bytes("all_reduce", 8 * tokens, t)
        return total

    def _linear_tp_bytes(self, module, column: bool, full: int, e: int) -> int:
        t = self.layout.tp
        if not self.layout.sp:  # column: all-reduce of the input gradient; row: of the output
            return ring_bytes("all_reduce", full * e, t)
        fp8 = id(module) in self.fp8_modules
        amax = ring_bytes("all_reduce", 4, t)  # O3: the ranks agree on the amax of a gathered tensor
        if column:
            if not fp8:  # gather, reduce-scatter the input gradient, gather again for the weight gradient
                return 3 * ring_bytes("all_gather", full * e, t)
            if not self.plan.fp8_tp_comm:  # O0-O2: gather in high precision, keep the whole
                return 2 * ring_bytes("all_gather", full * e, t)
            scatter = (amax + full - full // t) if self.plan.fp8_reduce_scatter else ring_bytes("reduce_scatter",
                                                                                               full * e, t)
            return amax + 2 * ring_bytes("all_gather", full, t) + scatter
        out = ring_bytes("reduce_scatter", full * e, t)  # row: outputs summed in high precision
        return out + (amax + ring_bytes("all_gather", full, t) if fp8 and self.plan.fp8_tp_comm
                      else ring_bytes("all_gather", full * e, t))

    def pp_bytes(self) -> int:
        p = self.layout.pp
        if p == 1:
            return 0
        tied = [q for q in self.layouts.params(tied_embedding=True)]
        if self.grad_buffer.sharded:  # ZeRO-2: the kept chunk of the embedding's own bucket
            owned = {id(b.params[0]): b.numel // self.layout.dp for b in self.grad_buffer.buckets if len(b.params) == 1}
            total = sum(ring_bytes("all_reduce", 4 * owned[id(q)], 2) for q in tied)
        else:  # the whole gradient, over the first and last stage
            total = sum(ring_bytes("all_reduce", 4 * q.numel(), 2) for q in tied)
        total += ring_bytes("all_reduce", 4, p) * (2 + bool(self.fp8_params)) + ring_bytes("broadcast", 4, p)
        message = self.p2p_numel() * (1 if self.plan.fp8_pipeline_p2p else self.config.precision.params_dtype.itemsize)
        message += SCALE_BYTES if self.plan.fp8_pipeline_p2p else 0
        sends = sum(a.send_next + a.send_prev for a in self.schedule() if isinstance(a, Exchange))
        return total + sends * message

    def p2p_numel(self) -> int:
        seq = self.config.data.seq_length // (self.layout.tp if self.layout.sp else 1)
        return seq * self.layout.mbs * self.config.model.hidden_size

    def schedule(self) -> list:
        """This stage's pipeline plan for one iteration (the code's own)."""
        geometry = PipelineGeometry(self.layout.pp, self.ps.pp_rank, self.layout.num_microbatches, len(self.chunks))
        return (one_f_one_b_plan if len(self.chunks) == 1 else interleaved_plan)(geometry)

    def in_flight(self) -> int:
        """The most model-chunk forwards whose activations this stage holds at once."""
        if self.layout.pp == 1:
            return 1
        live = most = 0
        for action in self.schedule():
            live += isinstance(action, Forward) - isinstance(action, Backward)
            most = max(most, live)
        return most


# ----- plans ----------------------------------------------------------------------------------
@dataclass
class Run:
    """A configuration at a data-parallel size, its pipeline stages built."""

    config: object
    num_params: int
    vocab: int
    layout: Layout
    stages: list[Stage]

    def at_micro_batch(self, mbs: int) -> list[Stage]:
        """The stages with another micro-batch size (their states do not change)."""
        stages = [copy.copy(stage) for stage in self.stages]
        for stage in stages:
            stage.layout = replace(stage.layout, mbs=mbs)
        return stages


def build_run(run_argv: list[str], dp: int, level: str | None = None, stages: list[int] | None = None) -> Run:
    """pretrain_gpt.py's flags at data-parallel size `dp` (and `level`), pipeline stages `stages`
    (default all) built for tensor- and data-parallel rank 0."""
    from megatron.training.gpt_providers import transformer_config

    if dp < 1:
        raise ValueError(f"--data-parallel-size must be positive, got {dp}")
    config = run_config(list(run_argv) + (["--fp8-level", level] if level else []))
    tp, pp = config.parallel.tensor_model_parallel_size, config.parallel.pipeline_model_parallel_size
    config = config.for_world(tp * pp * dp)
    vocab = config.model.padded_vocab_size(tokenizer_vocab(config), tp)
    transformer = transformer_config(config, vocab)
    layout = layout_of(config, dp)
    return Run(config, transformer.num_parameters(), vocab, layout,
               [Stage(config, transformer, layout, r) for r in (stages if stages is not None else range(pp))])


def persistent_bytes(stage: Stage) -> tuple[int, int, int]:
    """(rank 0's, the most loaded data-parallel rank's) states with every gradient held, and the
    gradients held at the end of backward beyond those kept between steps (O3: the FP8 gradients
    of other owners, and the dense buckets' full buffers beyond this rank's chunks)."""
    states = stage.state_bytes(0)
    extra = states["fp8_grad_peak_bytes"] - (states["grad_bytes"] - stage.grad_buffer.nbytes)
    extra += 4 * stage.grad_buffer.full_numel - stage.grad_buffer.nbytes
    ranks = range(stage.layout.dp) if stage.owners is not None or stage.use_dist_opt else [0]
    worst = max(sum(stage.state_bytes(r)[k] for k in PERSISTENT) for r in ranks)
    return sum(states[k] for k in PERSISTENT) + extra, worst + extra, extra


def stage_plan(stage: Stage) -> dict:
    m = stage.config.model
    acts = activation_bytes(stage, m.recompute_granularity, m.recompute_method, m.recompute_num_layers)
    acts_full = activation_bytes(stage, "full", "uniform", 1)
    held, worst, extra = persistent_bytes(stage)
    memory = dict(stage.state_bytes(0), fp8_grad_extra_bytes=extra, activation_bytes=acts,
                  activation_bytes_full_recompute=acts_full, total_bytes=held + acts,
                  total_bytes_full_recompute=held + acts_full, worst_dp_rank_total_bytes=worst + acts,
                  worst_dp_rank_total_bytes_full_recompute=worst + acts_full)
    return {"pp_rank": stage.ps.pp_rank, "memory": memory,
            "comm": {"dp_bytes": stage.dp_bytes(0), "tp_bytes": stage.tp_bytes(), "pp_bytes": stage.pp_bytes()}}


def make_plan(run_argv: list[str], dp: int, level: str | None = None, stages: list[int] | None = None) -> dict:
    """The plan of pretrain_gpt.py's flags at data-parallel size `dp`: per pipeline stage, the
    figures of its tensor- and data-parallel rank 0 (stage 0's are global rank 0's, which the
    metrics file records), and the largest over every rank."""
    run = build_run(run_argv, dp, level, stages)
    lay, plans = run.layout, [stage_plan(s) for s in run.stages]
    return {"level": run.config.precision.fp8_level, "num_params": run.num_params, "vocab_size": run.vocab,
            "layout": {"tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "micro_batch_size": lay.mbs,
                       "global_batch_size": lay.gbs, "num_microbatches": lay.num_microbatches,
                       "sequence_parallel": lay.sp, "seq_length": run.config.data.seq_length},
            "stages": plans,
            "max_total_bytes": max(p["memory"]["worst_dp_rank_total_bytes"] for p in plans),
            "max_total_bytes_full_recompute": max(p["memory"]["worst_dp_rank_total_bytes_full_recompute"]
                                                  for p in plans),
            "max_dp_bytes": max(p["comm"]["dp_bytes"] for p in plans)}


def fits(run_argv: list[str], dp: int, budget_gb: float) -> list[dict]:
    """Per level, the largest micro-batch (one that divides the global batch per data-parallel
    rank, as the trainer requires) whose most loaded GPU holds at most `budget_gb`, without and
    with full recomputation; where none fits, micro-batch 1's total."""
    rows = []
    for level in LEVELS:
        run = build_run(run_argv, dp, level)
        m, per_rank = run.config.model, run.layout.gbs // dp
        held = [persistent_bytes(s)[1] for s in run.stages]
        row = {"level": level}
        for key, recompute in (("", (m.recompute_granularity, m.recompute_method, m.recompute_num_layers)),
                               ("_full_recompute", ("full", "uniform", 1))):
            row["micro_batch" + key], row["total_bytes" + key] = None, None
            for mbs in (k for k in range(1, per_rank + 1) if per_rank % k == 0):
                total = max(h + activation_bytes(s, *recompute) for h, s in zip(held, run.at_micro_batch(mbs)))
                if total > budget_gb * GB:
                    row["total_bytes" + key] = row["total_bytes" + key] or total
                    break
                row["micro_batch" + key], row["total_bytes" + key] = mbs, total
        rows.append(row)
    return rows


# ----- output -----------------------------------------------------------------------------------
ROWS = (("weights", "memory", "weight_bytes"), ("gradients, between steps", "memory", "grad_bytes"),
        ("gradients until reduced (O3)", "memory", "fp8_grad_extra_bytes"),
        ("masters", "memory", "master_bytes"), ("Adam moments", "memory", "optim_bytes"),
        ("activations", "memory", "activation_bytes"),
        ("activations, full recomputation", "memory", "activation_bytes_full_recompute"),
        ("total", "memory", "total_bytes"), ("total, full recomputation", "memory", "total_bytes_full_recompute"),
        ("total, most loaded data-parallel rank", "memory", "worst_dp_rank_total_bytes"),
        ("data-parallel traffic / iteration", "comm", "dp_bytes"),
        ("tensor-parallel traffic / iteration", "comm", "tp_bytes"),
        ("pipeline traffic / iteration", "comm", "pp_bytes"))

def _gb(value) -> str:
    return "-" if value is None else f"{value / GB:,.2f}"


def format_plan(plan: dict, name: str) -> str:
    lay, stages = plan["layout"], plan["stages"]
    lines = [f"{name}: {plan['num_params'] / 1e9:.2f}B parameters (vocabulary {plan['vocab_size']:,}), level "
             f"{plan['level']}; TP {lay['tp']} x PP {lay['pp']} x DP {lay['dp']} = {lay['tp'] * lay['pp'] * lay['dp']} "
             f"GPUs{', sequence parallel' if lay['sequence_parallel'] else ''}; sequence {lay['seq_length']}, "
             f"micro-batch {lay['micro_batch_size']}, {lay['num_microbatches']} micro-batches per iteration",
             f"{'GB per GPU (10^9 bytes)':<40}" + "".join(f"{'stage ' + str(s['pp_rank']):>12}" for s in stages)]
    for label, group, key in ROWS:
        values = [s[group][key] for s in stages]
        if any(values) or key != "fp8_grad_extra_bytes":
            lines.append(f"  {label:<38}" + "".join(f"{_gb(v):>12}" for v in values))
    return "\n".join(lines)


def format_fits(rows: list[dict], budget: float, name: str) -> str:
    lines = [f"{name}: the largest micro-batch whose most loaded GPU holds at most {budget:g} GB "
             "('-': none does; GB is then micro-batch 1's)",
             f"{'level':<7}{'micro-batch':>12}{'GB':>9}{'full recomputation':>20}{'GB':>9}"]
    for row in rows:
        lines.append(f"{row['level']:<7}{row['micro_batch'] or '-':>12}{_gb(row['total_bytes']):>9}"
                     f"{row['micro_batch_full_recompute'] or '-':>20}{_gb(row['total_bytes_full_recompute']):>9}")
    return "\n".join(lines)


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="plan.py", allow_abbrev=False, description=__doc__.split("\n\n")[0],
                                epilog="Other flags are pretrain_gpt.py's (layout, micro-batch, level, recomputation, "
                                       "tokenizer) and override the config.")
    parser.add_argument("--config", help="a run's YAML file (configs/gpt-7b.yaml, ...)")
    parser.add_argument("--data-parallel-size", type=int, default=1, help="data-parallel ranks (default 1)")
    parser.add_argument("--fits", type=float, metavar="GB", help="the largest micro-batch that fits, at each level")
    parser.add_argument("--paper", action="store_true", help="Table 5's models and layouts beside the paper's figures")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, run_argv = build_parser().parse_known_args(argv)
    if args.paper:
        if args.config or args.fits is not None or run_argv:
            raise ValueError("--paper takes no other flag but --json (it uses the paper's configs and layouts)")
        from tools.plan_paper import format_paper, paper_rows

        result = paper_rows()
        print(format_paper(result))
    elif args.config is None:
        raise ValueError("give --config FILE.yaml (and the layout), or --paper")
    elif args.fits is not None:
        if not args.fits > 0:
            raise ValueError(f"--fits takes a positive number of GB, got {args.fits:g}")
        result = fits(["--config", args.config] + run_argv, args.data_parallel_size, args.fits)
        print(format_fits(result, args.fits, Path(args.config).name))
    else:
        run_argv = ["--config", args.config] + run_argv
        pp = run_config(run_argv).parallel.pipeline_model_parallel_size
        result = make_plan(run_argv, args.data_parallel_size, stages=None if pp <= 4 else [0, 1, pp - 1])
        print(format_plan(result, Path(args.config).name))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
