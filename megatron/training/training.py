"""The training loop, shared by pretraining, SFT and RLHF through a `TrainingTask`.

    config, ps = setup_parallel(parse_config(argv))
    Trainer(config, ps, task).train()

A task is the providers plus the few facts about them that the loop needs:

- ``model_provider(config, ps, rng) -> nn.Module``: the model laid out for `ps` and initialised
  (a ModuleList of chunks with virtual pipeline stages); the trainer applies the precision plan;
- ``forward_step(data_iterator, model) -> (output, loss_fn)``: see `pipeline_parallel.schedules`;
  ``loss_fn(output) -> (loss, {name: value})`` reports `loss_key` (logged as `loss`);
- ``datasets_provider(config, num_samples) -> (train, valid, test)``: datasets of dict samples;
- what pipeline stages send each other, the tokens per sample (for throughput), and optionally
  the model's FLOPs per token and parameter count.

Reinforcement learning trains on data the model itself makes: its task gives an
``experience_provider(trainer) -> Experience`` instead of datasets. Each iteration then collects
(rollouts from the policy being trained, scored) and makes `Experience.updates` optimizer updates
on what it collected; the iteration stays the unit of the schedule, logging and checkpoints.

The loop itself knows nothing of GPT: it reads its settings (iterations, batch sizes, intervals,
checkpoints, logging, precision) from the run's `RunConfig` (`megatron.training.config`) and takes
everything about the model from the task.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

import torch

from fp8 import fused
from fp8.calibration import resolve_min_features
from fp8.params import param_nbytes
from fp8.scaling import chunk_mb_for, set_chunk_mb
from megatron.core.datasets.builder import train_valid_test_num_samples
from megatron.core.datasets.samplers import build_pretraining_data_loader, cyclic_iterator
from megatron.core.distributed.data_parallel import DistributedDataParallel, bucket_sizes_mb
from megatron.core.optimizer.factory import build_optimizer
from megatron.core.optimizer.grad_scaler import LossScaledOptimizer, LossScaler
from megatron.core.precision import apply_precision
from megatron.core.parallel_state import ParallelState, init_distributed
from megatron.core.pipeline_parallel.model import allreduce_embedding_grads
from megatron.core.pipeline_parallel.schedules import (get_forward_backward_func, reported_mean, reported_mean_tensor,
                                                      reported_sum)
from megatron.core.pipeline_parallel.token_loss import read_micro_batches, with_global_denominator
from megatron.core.tensor_parallel.random import model_parallel_seed
from megatron.training import resume
from megatron.training.attention_backend import attention_context, check_attention_backend
from megatron.training.config import RunConfig
from megatron.training.host_memory import configure_host_allocator
from megatron.training.lr_schedule import LRScheduler
from megatron.training.metrics import (
    Loggers, MetricsWriter, format_eval_line, format_log_line, Progress, peak_flops, throughput_metrics,
)


@dataclass(frozen=True)
class TrainingTask:
    model_provider: Callable[[RunConfig, ParallelState, Any], torch.nn.Module]
    forward_step: Callable
    datasets_provider: Callable
    tokens_per_sample: int
    loss_key: str = "lm loss"
    # The tensor every pipeline send carries ([s, b, h], sequence-sharded under SP) and its dtype.
    pipeline_tensor_shape: tuple[int, ...] | None = None
    pipeline_dtype: torch.dtype = torch.float32
    flops_per_token: float | None = None
    num_params: int | None = None
    # Checkpoint naming: a parameter's layout-independent name, and what a checkpoint must agree on.
    global_name: Callable[[torch.nn.Module, str], str] = resume.local_name
    model_signature: dict = field(default_factory=dict)
    # A checkpoint folder whose weights the model starts from when --load has nothing to resume
    # (fine-tuning from a pretrained model).
    initial_weights: str | None = None
    # Reported values totalled over the global batch into every metrics record: {reported key:
    # record key} (SFT: the response tokens).
    reported_counts: dict = field(default_factory=dict)
    # Reported values averaged over the iteration's micro-batches and updates into every metrics
    # record: {reported key: record key} (RLHF: KL, clip fraction, accuracy, ...).
    reported_means: dict = field(default_factory=dict)
    # Where `reported_counts`, `reported_means` and the experience's values go in the metrics record:
    # the top level, or one object under this key (RLHF: "rlhf", as DESIGN.md's contract has it).
    metrics_section: str | None = None
    # Record keys shown on the training log line after the loss: {record key: label}; a key in the
    # metrics section is written "section.key".
    log_fields: dict = field(default_factory=dict)
    # Data made from the model being trained (RLHF rollouts) instead of `datasets_provider`'s.
    experience_provider: Callable[["Trainer"], "Experience"] | None = None
    # The tokens a micro-batch's loss averages over (None: the loss is no token mean, e.g. DPO's
    # mean over pairs), and whether --calculate-per-token-loss is on unless a flag says otherwise.
    loss_tokens: Callable[[dict], torch.Tensor] | None = None
    per_token_loss: bool = False


class Experience(Protocol):
    """Training data an iteration makes for itself (RLHF: rollouts of the policy, scored).

    `collect(iteration)` makes the iteration's data from the model as it stands and returns the
    values to put in the metrics record (reward, KL, ...); `iterator` then yields the
    micro-batches of `updates` optimizer updates on it, one global batch each. What it collects
    must depend only on the iteration and the model (seeded by both), so that a resumed run
    collects what the original did; any state it carries across iterations (an adaptive KL
    coefficient) it saves through `state_dict` / `load_state_dict`."""

    updates: int
    samples: int  # what an iteration collects (rollouts), counted as its consumed samples
    iterator: Iterator

    def collect(self, iteration: int) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def per_token_loss(flag: bool | None, task: TrainingTask) -> bool:
    """--calculate-per-token-loss as given, else the task's default; refused for a loss that is no
    mean over tokens."""
    if flag is None:
        return task.per_token_loss and task.loss_tokens is not None
    if flag and task.loss_tokens is None:
        raise ValueError(f"--calculate-per-token-loss: the {task.loss_key} is a mean over pairs or sequences, not "
                         f"tokens (each micro-batch holds as many); drop the flag")
    return flag


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_iterations: int = 0
    losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    stopped_early: bool = False

    _SAVED = ("iteration", "consumed_samples", "skipped_iterations")

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in self._SAVED}

    def load_state_dict(self, state: dict) -> None:
        for key in self._SAVED:
            setattr(self, key, int(state.get(key, 0)))


def print_rank0(ps: ParallelState, *values) -> None:
    if ps.rank == 0:
        print(*values, flush=True)


def setup_parallel(config: RunConfig) -> tuple[RunConfig, ParallelState]:
    """Check the config against the launch's world size first (no process group yet, so a bad
    config ends every rank at once), then start torch.distributed and build the groups. Returns
    the config for this world (`RunConfig.for_world`) and the parallel state."""
    config = config.for_world(int(os.environ.get("WORLD_SIZE", "1") or 1))
    from megatron.training.preflight import check_paths  # paths and data, before any work or write
    check_paths(config)
    device = config.training.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible; use --device cpu or auto")
    init_distributed(backend="gloo" if device == "cpu" else None)
    parallel = config.parallel
    ps = ParallelState.build(parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
                             device=None if device == "auto" else device)
    if ps.device.type == "cpu":
        print_rank0(ps, f"> host memory: {configure_host_allocator(config.training.malloc_mmap_threshold_mb)}")
    return config, ps


def run_training(config: RunConfig, ps: ParallelState, task: TrainingTask, *, loss_name: str = "loss",
                 extra: str = "") -> Trainer:
    """An entry point's run of `task`: the trainer built, a line saying what runs, training to the
    end (or a stop condition), and a line with the result. Returns the trainer (its `state`, and
    its `model` for an evaluation after training)."""
    trainer = Trainer(config, ps, task)
    print_rank0(ps, f"> {ps.describe()}; {task.num_params:,} parameters; fp8 level {config.precision.fp8_level}{extra}")
    try:
        state = trainer.train()
    finally:
        trainer.close()
    final = f"final {loss_name} {state.losses[-1]:.4f}, " if state.losses else ""
    print_rank0(ps, f"> done: {state.iteration} iterations, {final}{state.skipped_iterations} skipped")
    return trainer


def memory_record(model: torch.nn.Module, ddp: DistributedDataParallel, optimizer, num_params: int) -> dict:
    """Bytes this rank holds persistently (scales included), per DESIGN.md's metrics contract
    (FP8 linears keep no FP8 weight copy between uses); `fp8_grad_peak_bytes` is what the FP8
    gradients take at the end of backward, before FP8 ZeRO hands them to their owners."""
    weight = sum(param_nbytes(p) for p in model.parameters())  # scaled kinds carry a 4-byte scale
    grad = ddp.grad_buffer.nbytes + ddp.fp8_grad_bytes
    master, optim = optimizer.master_bytes(), optimizer.optim_bytes()
    record = {"num_params": num_params, "weight_bytes": weight, "grad_bytes": grad, "master_bytes": master,
              "optim_bytes": optim, "state_bytes_per_param": (weight + grad + master + optim) / num_params}
    if ddp.fp8_grad_params:
        # The FP8 linear weights alone (this rank's shards): the part the precision table is about.
        numel = sum(p.numel() for p in ddp.fp8_grad_params)
        held = (sum(param_nbytes(p) for p in ddp.fp8_grad_params) + ddp.fp8_grad_bytes
                + optimizer.fp8_state_bytes())
        record.update(fp8_params=numel, fp8_state_bytes_per_param=held / numel,
                      fp8_grad_peak_bytes=ddp.fp8_grad_peak_bytes)
    if ddp.shard_dense_grads:  # ZeRO-2: the dense buckets' full buffers exist only during backward
        record.update(dense_grad_peak_bytes=ddp.grad_buffer.full_numel * ddp.grad_buffer.data.element_size())
    if ddp.fp8_zero is not None:  # FP8 ZeRO's balance: masters + moments assigned per rank
        loads = ddp.fp8_zero.owner_state_bytes()
        record.update(fp8_owner_bytes_min=min(loads), fp8_owner_bytes_max=max(loads))
    return record


def build_data_iterators(config: RunConfig, ps: ParallelState, datasets_provider, consumed_samples: int, iteration: int):
    """Train and validation iterators positioned where a run at `iteration` stands: validation
    continues after the evaluations already done (as Megatron), so a resumed run sees the same
    validation batches as an uninterrupted one."""
    num_samples = train_valid_test_num_samples(train_iters=config.train_iters, global_batch_size=config.global_batch_size,
                                               eval_interval=config.eval_interval, eval_iters=config.eval_iters)
    batches = config.batch_schedule
    num_samples = (batches.samples_for(config.train_iters), *num_samples[1:])  # less than that while the batch ramps
    train_ds, valid_ds, _ = datasets_provider(config, num_samples)
    loader_kw = dict(micro_batch_size=config.micro_batch_size, global_batch_size=config.global_batch_size,
                     data_parallel_rank=ps.dp_rank, data_parallel_size=ps.dp_size, num_workers=config.num_workers)
    # While the batch ramps up, iterations take different numbers of micro-batches from one stream.
    train_kw = dict(loader_kw, global_batch_size=config.micro_batch_size * ps.dp_size) if batches.ramps else loader_kw
    train_iter = iter(build_pretraining_data_loader(train_ds, consumed_samples=consumed_samples, **train_kw))
    valid_iter = None
    if valid_ds is not None and config.eval_iters > 0:
        consumed_valid = (iteration // config.eval_interval) * config.eval_iters * config.global_batch_size
        valid_iter = cyclic_iterator(build_pretraining_data_loader(
            valid_ds, consumed_samples=consumed_valid % max(len(valid_ds), 1) // config.global_batch_size
            * config.global_batch_size, **loader_kw))
    return train_iter, valid_iter


def resolve_fp8_min_features(config: RunConfig, ps: ParallelState) -> None:
    """`--fp8-min-features auto`: the width the checkpoint being resumed was trained with, else
    this GPU's calibration (`fp8.calibration`), else the default. Written back into the run's
    flags, so that checkpoints and the W&B / TensorBoard run config hold the number."""
    precision = config.precision
    if precision.fp8_min_features is not None:
        return
    saved = resume.saved_fp8_min_features(config.load) if not config.finetune else None
    if saved is not None:
        value, why = saved, f"as the checkpoint in {config.load} was trained"
    else:
        value, why = resolve_min_features(precision.fp8_recipe, ps.device, path=precision.fp8_calibration,
                                          fused_casts=fused.active(ps.device))
    object.__setattr__(precision, "fp8_min_features", value)
    if precision.fp8_level != "none":
        print_rank0(ps, f"> --fp8-min-features auto: {value}, {why}")


class Trainer:
    """One training run: model, optimizer, schedule, data and logging, wired together."""

    def __init__(self, config: RunConfig, ps: ParallelState, task: TrainingTask):
        self.config, self.ps, self.task, self.forward_step = config, ps, task, task.forward_step
        self.rng = model_parallel_seed(ps, config.seed)
        fused.set_mode(config.precision.fp8_fused_casts)
        chunk_mb = config.precision.fp8_chunk_mb
        set_chunk_mb(chunk_mb_for(ps.device) if chunk_mb is None else chunk_mb)
        resolve_fp8_min_features(config, ps)
        self.model = task.model_provider(config, ps, self.rng)
        # Once for the whole model (every pipeline chunk): one FP8 gradient store, one ZeRO layout.
        dense_mb, fp8_mb = bucket_sizes_mb(config.ddp_bucket_size)
        self.precision = apply_precision(self.model, config.precision.fp8_config(), ps, bucket_size_mb=fp8_mb,
                                         once_per_step=True)
        plan = self.precision.plan
        # O3 is FP8 ZeRO: with more than one data-parallel rank the dense states are sharded too.
        self.use_distributed_optimizer = config.use_distributed_optimizer or (plan.fp8_zero and ps.dp_size > 1)
        self.ddp = DistributedDataParallel(self.model, ps, use_distributed_optimizer=self.use_distributed_optimizer,
                                           precision=self.precision, bucket_size_mb=dense_mb,
                                           overlap_grad_reduce=config.overlap_grad_reduce,
                                           overlap_param_gather=config.overlap_param_gather,
                                           shard_dense_grads=plan.fp8_zero)
        if self.ddp.fp8_zero is not None:
            print_rank0(ps, f"> {self.ddp.fp8_zero.describe()}")
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(named, config.optimizer.optimizer_config(config.lr), ps, self.ddp, self.precision,
                                         use_distributed_optimizer=self.use_distributed_optimizer, seed=config.seed)
        scaler_config = config.precision.loss_scaler_config()  # --fp16 (or --loss-scale)
        self.loss_scaler = LossScaler(scaler_config) if scaler_config is not None else None
        if self.loss_scaler is not None:
            self.optimizer = LossScaledOptimizer(self.optimizer, self.loss_scaler)
            self.forward_step = self._scaled_forward_step
        self.scheduler = LRScheduler(config.lr_schedule_config(), on_mismatch=config.schedule.mismatch_policy)
        self.batch_schedule = config.batch_schedule
        self._check_run_shape()
        self.state = TrainState()
        self.counts: dict[str, int] = {}  # the last global batch's `task.reported_counts`
        self.means: dict[str, float] = {}  # the last iteration's `task.reported_means`
        self.collected: dict = {}  # what the last iteration's experience collection reported
        self.experience = task.experience_provider(self) if task.experience_provider else None
        self.checkpointer = resume.Checkpointer(
            config, ps, self.model, self.optimizer, self.rng, train_state=self.state,
            components={"scheduler": self.scheduler, "fp8_autoscaler": self.ddp.fp8_autoscaler,
                        "experience": self.experience, "loss_scaler": self.loss_scaler},
            layout=resume.layout_of(ps, self.use_distributed_optimizer), global_name=task.global_name,
            signature=task.model_signature)
        resumed = self.checkpointer.load() if config.load else False
        if not resumed and task.initial_weights:
            self.checkpointer.load_weights(task.initial_weights)
        self.num_params = task.num_params or sum(p.numel() for p in self.model.parameters())
        self.progress = Progress(self.state.iteration, config.train_iters)  # restarted when training starts
        # Evaluation takes whole global batches of the final size; training follows the batch schedule.
        self.num_microbatches = config.global_batch_size // (config.micro_batch_size * ps.dp_size)
        self.forward_backward, self.schedule_model = self._schedule()
        self.per_token_loss = per_token_loss(config.training.calculate_per_token_loss, task)
        if self.experience is not None:
            self.train_iter, self.valid_iter = self.experience.iterator, None
        else:
            self.train_iter, self.valid_iter = build_data_iterators(config, ps, task.datasets_provider,
                                                                    self.state.consumed_samples, self.state.iteration)
        enabled = ps.rank == 0
        # Lines past the starting iteration belong to a run this one replaces (or redoes).
        self.metrics = MetricsWriter(config.metrics_file, enabled, resume_from_iteration=self.state.iteration)
        self.loggers = Loggers(tensorboard_dir=config.tensorboard_dir, wandb_project=config.wandb_project,
                               wandb_exp_name=config.wandb_exp_name, wandb_save_dir=config.wandb_save_dir,
                               wandb_mode=config.wandb_mode, enabled=enabled, run_config=config.flat(),
                               loss_name=task.loss_key)

    def _check_run_shape(self) -> None:
        """What this task and device cannot do with the run's flags, refused before any work."""
        config, task = self.config, self.task
        if task.experience_provider is not None:
            for name in ("rampup_batch_size", "train_samples"):
                if getattr(config.training, name) is not None:
                    raise ValueError(f"--{name.replace('_', '-')} does not apply to an RLHF run: an iteration collects "
                                     "its own rollouts (give --train-iters and a fixed --global-batch-size)")
        model = config.model
        check_attention_backend(model.attention_backend, device=self.ps.device, dtype=config.precision.params_dtype,
                                head_dim=model.kv_channels or model.hidden_size // model.num_attention_heads,
                                dropout=model.attention_dropout)

    def _scaled_forward_step(self, data_iterator, model):
        """The task's forward step with its loss multiplied by the loss scale (--fp16), so the
        backward pass carries scaled gradients; the reported values stay unscaled."""
        output, loss_fn = self.task.forward_step(data_iterator, model)
        scale = self.loss_scaler.scale

        def scaled_loss_fn(output_tensor):
            loss, reported = loss_fn(output_tensor)
            return loss * scale, reported

        return output, scaled_loss_fn

    def samples_this_iteration(self) -> int:
        """The samples the next iteration consumes: its global batch (which a ramp-up grows with
        the consumed samples), or what an experience collects."""
        if self.experience is not None:
            return self.experience.samples
        return self.batch_schedule.global_batch_at(self.state.consumed_samples)

    def _schedule(self):
        """The forward/backward schedule for this layout and the model object it drives (the
        list of chunks under virtual pipeline stages)."""
        task = self.task
        chunks = list(self.model) if isinstance(self.model, torch.nn.ModuleList) else None
        schedule = get_forward_backward_func(self.ps, len(chunks) if chunks else None,
                                             tensor_shape=task.pipeline_tensor_shape, dtype=task.pipeline_dtype,
                                             fp8_p2p=self.precision.plan.fp8_pipeline_p2p)
        return schedule, (chunks if chunks else self.ddp)

    def train_step(self) -> tuple[float, bool, float]:
        """One iteration: one global batch and optimizer update (with an `Experience`: its
        collection, then its updates). Returns (loss averaged over the iteration's micro-batches,
        whether an update was skipped, the last update's grad norm); the task's `reported_counts`
        and `reported_means` are left in `self.counts` and `self.means`."""
        if self.experience is not None:
            self.ddp.wait_param_gather()  # rollouts read the weights outside the training forward
        self.collected = self.experience.collect(self.state.iteration) if self.experience is not None else {}
        reported, skipped = [], False
        num_microbatches = self.batch_schedule.num_microbatches(self.state.consumed_samples, self.config.micro_batch_size,
                                                                self.ps.dp_size)
        for _ in range(self.experience.updates if self.experience is not None else 1):
            self.ddp.module.train()
            self.ddp.zero_grad_buffer()
            self.ddp.start_grad_sync(num_microbatches)
            data, _ = self._global_batch(self.train_iter, num_microbatches)
            with attention_context(self.config.model.attention_backend):
                reported += self.forward_backward(forward_step=self.forward_step, data_iterator=data,
                                                  model=self.schedule_model, num_microbatches=num_microbatches)
            self.ddp.finish_grad_sync()
            allreduce_embedding_grads(self.model, self.ps, self.ddp.reduced_grad)
            result = self.optimizer.step()
            self.precision.end_step()  # delayed scaling's update, FP8 weight copies dropped
            skipped = skipped or result.skipped
        self.counts = {name: int(reported_sum(reported, key, self.ps)) for key, name in self.task.reported_counts.items()}
        self.means = {name: reported_mean(reported, key, self.ps) for key, name in self.task.reported_means.items()}
        # The loss and the FP8 reduction's statistics come to the host in one read: one sync for both.
        loss = self.ddp.read_with_fp8_stats(reported_mean_tensor(reported, self.task.loss_key, self.ps))
        return loss, skipped, result.grad_norm

    def _global_batch(self, iterator, num_microbatches: int):
        """The iterator a schedule reads one global batch from, and the batch's token count
        (None without --calculate-per-token-loss, when the micro-batches are read as they go)."""
        if not self.per_token_loss:
            return iterator, None
        batches, tokens = with_global_denominator(read_micro_batches(iterator, num_microbatches),
                                                  self.task.loss_tokens, self.ps)
        return iter(batches), tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation loss over --eval-iters global batches: their mean, or with the per-token
        loss the mean over all their tokens (each batch's weighted by its token count)."""
        self.ddp.module.eval()
        losses, weights = [], []
        for _ in range(self.config.eval_iters):
            data, tokens = self._global_batch(self.valid_iter, self.num_microbatches)
            with attention_context(self.config.model.attention_backend):
                reported = self.forward_backward(forward_step=self.task.forward_step, data_iterator=data,
                                                 model=self.schedule_model, num_microbatches=self.num_microbatches,
                                                 forward_only=True)
            losses.append(reported_mean(reported, self.task.loss_key, self.ps))
            weights.append(1.0 if tokens is None else float(tokens))
        if not losses:
            return float("nan")
        return sum(loss * weight for loss, weight in zip(losses, weights)) / max(sum(weights), 1.0)

    def record(self, loss: float, skipped: int, grad_norm: float, step_time: float, lr: float,
               comm_bytes: dict, samples_per_iteration: float, batch_size: int) -> dict:
        """The metrics record (docs/metrics.md): `skipped` counts the interval's skipped steps,
        `step_time_s` is the interval's mean and `tokens_per_s` the interval's rate
        (`samples_per_iteration` its mean); the rest describe the logged iteration, whose global
        batch was `batch_size`."""
        tokens_per_s = samples_per_iteration * self.task.tokens_per_sample / step_time
        record = {
            "iteration": self.state.iteration, "loss": loss, "lr": lr, "grad_norm": grad_norm,
            "skipped": skipped, "step_time_s": step_time, "tokens_per_s": tokens_per_s,
            "memory": memory_record(self.model, self.ddp, self.optimizer, self.num_params),
            "comm": comm_bytes, "consumed_samples": self.state.consumed_samples,
            "train_iters": self.config.train_iters, "global_batch_size": batch_size,
            "loss_normalization": "per_token" if self.per_token_loss else "per_micro_batch",
            **self.progress.metrics(self.state.iteration),
        }
        if self.loss_scaler is not None:
            record["loss_scale"] = self.loss_scaler.scale  # what the next iteration's loss is multiplied by
        task_values = {**self.counts, **self.means, **self.collected}
        if self.task.metrics_section:
            record[self.task.metrics_section] = task_values
        else:
            record.update(task_values)
        if self.ddp.fp8_grad_params:
            stats = dict(self.ddp.fp8_stats)
            # The FP8 weights' data-parallel traffic: gradient reduction plus publishing the update.
            stats["weight_dp_bytes"] = stats.pop("dp_bytes", 0) + self.optimizer.publish_dp_bytes
            record["fp8"] = stats
        if self.task.flops_per_token:
            dtype = "fp8" if self.precision.plan.fp8_gemms else "bf16"
            record.update(throughput_metrics(tokens_per_s, self.task.flops_per_token, self.ps.world_size,
                                             peak_flops(self.ps.device, dtype)))
        return record

    def train(self) -> TrainState:
        stop = resume.StopConditions(self.config, self.ps)
        try:
            self._train_loop(stop)
        finally:
            stop.close()
        self.ddp.wait_param_gather()  # --overlap-param-gather: the last step's weights, everywhere
        if self.config.save and self.checkpointer.last_saved_iteration != self.state.iteration:
            self.checkpointer.save()
        return self.state

    def _train_loop(self, stop: resume.StopConditions) -> None:
        config, ps, state = self.config, self.ps, self.state
        counter = ps.counter
        interval_time, interval_steps, interval_skipped, interval_samples = 0.0, 0, 0, 0
        self.progress = Progress(state.iteration, config.train_iters)
        in_samples = self.scheduler.config.unit == "samples"
        while state.iteration < config.train_iters:
            batch = self.samples_this_iteration()
            lr = self.scheduler.step(self.optimizer)  # at the position the applied updates reached
            counter.reset()
            start = time.perf_counter()
            loss, skipped, grad_norm = self.train_step()
            if ps.device.type == "cuda":
                torch.cuda.synchronize()
            step_time = time.perf_counter() - start
            # Asked before the bytes are read: its flag all-reduce is this iteration's traffic too.
            reason = stop.reason(state.iteration + 1)
            comm_bytes = counter.snapshot()
            state.iteration += 1
            state.consumed_samples += batch
            state.skipped_iterations += int(skipped)
            state.losses.append(loss)
            if not skipped:  # Megatron-LM's scheduler moves on with applied updates only
                self.scheduler.advance(batch if in_samples else 1)
            interval_time, interval_steps = interval_time + step_time, interval_steps + 1
            interval_skipped += int(skipped)
            interval_samples += batch
            val_loss = None
            if self.valid_iter is not None and state.iteration % config.eval_interval == 0:
                val_loss = self.evaluate()
            if state.iteration % config.log_interval == 0 or state.iteration == config.train_iters:
                record = self.record(loss, interval_skipped, grad_norm, interval_time / interval_steps, lr, comm_bytes,
                                     interval_samples / interval_steps, batch)
                self.log(record if val_loss is None else dict(record, val_loss=val_loss))
                interval_time, interval_steps, interval_skipped, interval_samples = 0.0, 0, 0, 0
            if val_loss is not None:
                self.log_eval(val_loss)
            if config.save_interval and state.iteration % config.save_interval == 0:
                self.ddp.wait_param_gather()
                self.checkpointer.save()
            if reason is not None:
                print_rank0(ps, f"> stopping after iteration {state.iteration}: {reason}")
                state.stopped_early = True
                break

    def log(self, record: dict) -> None:
        self.metrics.write(record)
        # The validation loss goes to TensorBoard / W&B once, from `log_eval`.
        self.loggers.log({k: v for k, v in record.items() if k != "val_loss"}, record["iteration"])
        print_rank0(self.ps, format_log_line(record, self.task.loss_key, self.task.log_fields))

    def log_eval(self, val_loss: float) -> None:
        self.state.val_losses.append((self.state.iteration, val_loss))
        self.loggers.log({"val_loss": val_loss}, self.state.iteration, samples=self.state.consumed_samples)
        print_rank0(self.ps, format_eval_line(self.state.iteration, val_loss, loss_name=self.task.loss_key))

    def close(self) -> None:
        self.metrics.close()
        self.loggers.close()
