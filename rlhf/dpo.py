"""Direct preference optimisation (Rafailov et al. 2023) as a task of the one training loop.

The policy is the GPT of pretraining, started from an SFT checkpoint (`--pretrained-checkpoint`,
as `megatron.training.sft`); the reference is a frozen copy of a checkpoint
(`--reference-checkpoint`, by default the same one) loaded for inference at the run's
tensor-parallel size, optionally with FP8 weights (`--reference-fp8-level O3`: one byte per
weight). Each micro-batch holds b preference pairs; chosen and rejected sides go through the
policy in one forward ([2b, s], `both_sides`), and the sequence log-probability of a side is the
sum of -CE over its answer tokens (the loss mask), which the vocab-parallel cross entropy gives
exactly at any tensor-parallel size. The reference's log-probabilities are computed under
no_grad on the same batch, or once before training for every pair
(`--precompute-reference-logprobs`): then each sample carries its pair's two values, so any
loader order and any resume point read the right ones. Dropout is off in the policy unless
`--keep-dropout` (so that at step 0 the policy is the reference).

Reported per micro-batch, averaged into every metrics record: "dpo loss" (the loss key),
"accuracy" (the fraction of pairs whose implicit reward beta x (log pi - log pi_ref) is larger for
the chosen side, a tie counting one half: at step 0, when the policy is the reference, it is
0.5), "reward margin" (chosen minus rejected reward, mean) and the two rewards' means (the
task's `reported_means`).

Validation: the loop's periodic evaluation logs the mean DPO loss of --eval-iters batches
(`val_loss`); at the end `evaluate_pairs` runs once over every validation pair (split over the
data-parallel ranks) and reports the loss, the reward accuracy and margin, and how often the
policy and the reference themselves give the chosen answer the higher log-probability (the
reference's figure is where the policy started).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch

from megatron.core import checkpointing
from megatron.core.datasets.chat_template import load_chat_template
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState
from megatron.core.precision import LEVELS
from megatron.core.tokenizers.tokenizer import build_tokenizer
from megatron.training.config import RunConfig
from megatron.training.flags import Section, flag
from megatron.training.gpt_providers import gpt_task
from megatron.training.inference_model import load_gpt_for_inference
from megatron.training.training import TrainingTask, TrainState, print_rank0, run_training
from rlhf.common import check_same_tokenizer, fp8_settings_of
from rlhf.data import PreferencePair, read_preference_pairs
from rlhf.losses import dpo_loss
from rlhf.preference_dataset import PreferenceDataset, both_sides

LOSS_KEY = "dpo loss"
# Reported key -> metrics record key.
REPORTED_MEANS = {"accuracy": "accuracy", "reward margin": "reward_margin", "chosen reward": "chosen_reward",
                  "rejected reward": "rejected_reward"}
LOG_FIELDS = {"rlhf.accuracy": "accuracy", "rlhf.reward_margin": "reward margin"}


@dataclass(frozen=True)
class DPOArgs(Section):
    title: ClassVar[str] = "DPO"
    pretrained_checkpoint: str | None = flag(
        None, "the SFT model the policy starts from (required unless --load holds a DPO checkpoint to resume)")
    reference_checkpoint: str | None = flag(None, "the frozen reference model (default: --pretrained-checkpoint)")
    dpo_beta: float = flag(0.1, "beta: the strength of the implicit KL penalty to the reference")
    dpo_label_smoothing: float = flag(0.0, "the probability that a preference label is flipped (conservative "
                                           "DPO), in [0, 0.5)")
    reference_fp8_level: str = flag("none", "GEMMs of the reference: none, O0-O2 FP8 GEMMs, O3 also FP8 weights "
                                            "(one byte each)", choices=LEVELS)
    precompute_reference_logprobs: bool = flag(
        False, "compute the reference's log-probabilities of every training and validation pair once before "
               "training instead of at every step")
    valid_data_path: str | None = flag(None, "validation preference pairs (JSON lines)")
    chat_template: str = flag("auto", "how conversations become tokens: auto, default or a .jinja file")
    keep_dropout: bool = flag(False, "keep the model's dropout in the policy (default: off, as TRL does, so "
                                     "that the policy's log-probabilities are those it is judged by)")
    eval_out: str | None = flag(None, "write the final validation figures here (JSON)")

    def __post_init__(self) -> None:
        if not self.dpo_beta > 0:
            raise ValueError(f"--dpo-beta must be > 0, got {self.dpo_beta}")
        if not 0.0 <= self.dpo_label_smoothing < 0.5:
            raise ValueError(f"--dpo-label-smoothing must be in [0, 0.5), got {self.dpo_label_smoothing}")
        if self.eval_out and not self.valid_data_path:
            raise ValueError("--eval-out needs --valid-data-path (the pairs to evaluate on)")


def dpo_config(config: RunConfig) -> RunConfig:
    """`config` checked for DPO (before any process group exists), dropout off unless kept."""
    parallel = config.parallel
    if parallel.pipeline_model_parallel_size > 1 or parallel.num_layers_per_virtual_pipeline_stage:
        raise ValueError(f"DPO does not run pipeline-parallel (--pipeline-model-parallel-size "
                         f"{parallel.pipeline_model_parallel_size}); use --pipeline-model-parallel-size 1 and "
                         f"tensor parallelism to split a large model")
    paths = config.data.data_path or []
    if len(paths) != 1:
        raise ValueError("DPO takes one --data-path FILE.jsonl of preference pairs (tools/builtin_rlhf.py "
                         "--print-args gives the built-in ones)")
    args = config.extra["dpo"]
    if not args.pretrained_checkpoint and not _resumable(config.checkpoint.load):
        raise ValueError("--pretrained-checkpoint is required (the SFT model to start from) unless --load holds "
                         "a checkpoint to resume")
    if not (args.reference_checkpoint or args.pretrained_checkpoint):
        raise ValueError("no reference model: pass --reference-checkpoint (the SFT model the run started from)")
    for name in ("pretrained_checkpoint", "reference_checkpoint"):
        folder = getattr(args, name)
        if folder and not Path(folder).is_dir():
            raise ValueError(f"--{name.replace('_', '-')} {folder} does not exist; pass a checkpoint folder")
    if args.keep_dropout:
        return config
    return replace(config, model=replace(config.model, hidden_dropout=0.0, attention_dropout=0.0))


def _resumable(load: str | None) -> bool:
    return bool(load) and Path(load).is_dir() and checkpointing.latest_iteration(load) is not None


# ----- log-probabilities ----------------------------------------------------------------------------
def answer_logprobs(output: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence log-probability of the answer: `output` is the model's per-token -log p [n, s]."""
    return -(output.float() * loss_mask).sum(-1)


class FrozenReference:
    """The reference model: loaded for inference at the run's tensor-parallel size, never trained."""

    def __init__(self, folder: str, ps: ParallelState, *, params_dtype: torch.dtype, fp8_level: str,
                 fp8_settings: dict | None = None):
        """`fp8_settings`: casting flags (`rlhf.common.fp8_settings_of`) in place of the saved run's."""
        self.folder, self.ps = folder, ps
        self.model = load_gpt_for_inference(folder, ps, params_dtype=params_dtype, fp8_level=fp8_level,
                                            fp8_settings=fp8_settings).model

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[n] answer log-probabilities of a flattened batch ([n, s] tokens, labels, loss_mask)."""
        return answer_logprobs(self.model(batch["tokens"], batch["labels"]), batch["loss_mask"])


@torch.no_grad()
def pair_logprobs(model: torch.nn.Module, pairs: list[PreferencePair], ps: ParallelState, *, seq_length: int,
                  micro_batch_size: int, pad_id: int) -> torch.Tensor:
    """[len(pairs), 2] (chosen, rejected) answer log-probabilities under `model`, in FP32, on every
    rank: batches of `micro_batch_size` pairs go round the data-parallel ranks (a rank's
    tensor-parallel peers take the same ones), and an all-reduce over "dp" puts them together."""
    data = PreferenceDataset(pairs, seq_length=seq_length, num_samples=len(pairs), seed=0, pad_id=pad_id,
                             shuffle=False)
    table = torch.zeros(len(pairs), 2, dtype=torch.float32, device=ps.device)
    for number, start in enumerate(range(0, len(pairs), micro_batch_size)):
        if number % ps.dp_size != ps.dp_rank:
            continue
        items = [data[i] for i in range(start, min(start + micro_batch_size, len(pairs)))]
        batch = both_sides({k: torch.stack([item[k] for item in items]).to(ps.device) for k in items[0]})
        values = answer_logprobs(model(batch["tokens"], batch["labels"]), batch["loss_mask"])
        table[start:start + len(items)] = values.view(2, -1).t()
    return comm.all_reduce(table, ps, "dp")


# ----- data ------------------------------------------------------------------------------------------
class DPODataset(PreferenceDataset):
    """Preference samples that may carry the reference's precomputed log-probabilities of their
    pair: "reference_logprobs" [2] (chosen, rejected), looked up by the pair each sample draws."""

    def __init__(self, pairs: list[PreferencePair], *, reference_logprobs: torch.Tensor | None = None, **kwargs):
        super().__init__(pairs, **kwargs)
        self.reference_logprobs = None if reference_logprobs is None else reference_logprobs.cpu()

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(index)
        if self.reference_logprobs is not None:
            item["reference_logprobs"] = self.reference_logprobs[int(self.order[index])]
        return item


@dataclass
class DPOData:
    """The run's pairs, its reference, and (with --precompute-reference-logprobs) the reference's
    log-probabilities of every pair, computed when the loop asks for its datasets."""

    train_pairs: list[PreferencePair]
    valid_pairs: list[PreferencePair] | None
    reference: FrozenReference
    pad_id: int
    precompute: bool

    def datasets(self, config: RunConfig, num_samples, *, ps: ParallelState):
        common = dict(seq_length=config.data.seq_length, seed=config.seed, pad_id=self.pad_id)
        train = DPODataset(self.train_pairs, num_samples=num_samples[0],
                           reference_logprobs=self._precomputed(self.train_pairs, config, ps), **common)
        valid = None
        if self.valid_pairs and num_samples[1]:
            valid = DPODataset(self.valid_pairs, num_samples=num_samples[1], shuffle=False,
                               reference_logprobs=self._precomputed(self.valid_pairs, config, ps), **common)
        return train, valid, None

    def _precomputed(self, pairs, config: RunConfig, ps: ParallelState) -> torch.Tensor | None:
        if not self.precompute:
            return None
        start = time.perf_counter()
        table = pair_logprobs(self.reference.model, pairs, ps, seq_length=config.data.seq_length,
                              micro_batch_size=config.micro_batch_size, pad_id=self.pad_id)
        print_rank0(ps, f"> reference log-probabilities of {len(pairs):,} pairs in {time.perf_counter() - start:.1f} s")
        return table


def read_pairs(path: str, template, seq_length: int, what: str, ps: ParallelState) -> list[PreferencePair]:
    pairs, dropped = read_preference_pairs(path, template, max_tokens=seq_length)
    if dropped:
        print_rank0(ps, f"> {what}: left out {dropped} of {len(pairs) + dropped} pairs with a side longer than "
                        f"--seq-length {seq_length}")
    return pairs


def load_dpo_data(config: RunConfig, ps: ParallelState) -> DPOData:
    """Checks the checkpoints' tokenizers against the run's, reads the pairs, loads the reference."""
    args = config.extra["dpo"]
    reference_dir = args.reference_checkpoint or args.pretrained_checkpoint
    tokenizer_config = config.tokenizer.tokenizer_config()
    check_same_tokenizer(tokenizer_config, {"SFT model": args.pretrained_checkpoint,
                                            "reference model": reference_dir})
    tokenizer = build_tokenizer(tokenizer_config)
    template = load_chat_template(tokenizer, args.chat_template)
    seq_length = config.data.seq_length
    train = read_pairs(config.data.data_path[0], template, seq_length, "training pairs", ps)
    valid = read_pairs(args.valid_data_path, template, seq_length, "validation pairs", ps) \
        if args.valid_data_path else None
    # The reference casts as the policy does (the run's FP8 flags, not those its checkpoint saved).
    reference = FrozenReference(reference_dir, ps, params_dtype=config.precision.params_dtype,
                                fp8_level=args.reference_fp8_level, fp8_settings=fp8_settings_of(config))
    return DPOData(train, valid, reference, pad_id=tokenizer.pad, precompute=args.precompute_reference_logprobs)


# ----- the step --------------------------------------------------------------------------------------
def dpo_metrics(policy: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float) -> dict:
    """The loss and what is reported from [2b] log-probabilities (b chosen sides, then b rejected)."""
    b = policy.shape[0] // 2
    out = dpo_loss(policy[:b], policy[b:], reference[:b], reference[b:], beta, label_smoothing)
    margins = beta * ((policy[:b] - reference[:b]) - (policy[b:] - reference[b:]))
    accuracy = ((margins > 0).to(margins.dtype) + 0.5 * (margins == 0).to(margins.dtype)).mean()
    return {LOSS_KEY: out["loss"], "accuracy": accuracy, "reward margin": out["reward_margin"],
            "chosen reward": out["chosen_reward"], "rejected reward": out["rejected_reward"]}


def dpo_loss_func(loss_mask: torch.Tensor, reference: torch.Tensor, beta: float, label_smoothing: float,
                  output: torch.Tensor):
    values = dpo_metrics(answer_logprobs(output, loss_mask), reference, beta, label_smoothing)
    return values[LOSS_KEY], {key: value.detach() for key, value in values.items()}


def dpo_forward_step(data_iterator, model, *, reference: FrozenReference, beta: float, label_smoothing: float,
                     device: torch.device):
    """Both sides of the micro-batch's pairs through the policy in one forward; the reference's
    log-probabilities from the sample (precomputed) or from the frozen model on the same batch."""
    batch = both_sides({k: v.to(device, non_blocking=True) for k, v in next(data_iterator).items()})
    output = model(batch["tokens"], batch["labels"])
    ref = batch["reference_logprobs"] if "reference_logprobs" in batch else reference.logprobs(batch)
    return output, partial(dpo_loss_func, batch["loss_mask"], ref, beta, label_smoothing)


def dpo_task(config: RunConfig, ps: ParallelState, data: DPOData, vocab_size: int) -> TrainingTask:
    """The GPT task of pretraining with preference data and the DPO step, starting from
    --pretrained-checkpoint."""
    args = config.extra["dpo"]
    base = gpt_task(config, ps, vocab_size, eod_id=None, start_from=args.pretrained_checkpoint)
    return replace(base, forward_step=partial(dpo_forward_step, reference=data.reference, beta=args.dpo_beta,
                                              label_smoothing=args.dpo_label_smoothing, device=ps.device),
                   datasets_provider=partial(data.datasets, ps=ps), loss_key=LOSS_KEY,
                   tokens_per_sample=2 * config.data.seq_length, initial_weights=args.pretrained_checkpoint,
                   reported_means=dict(REPORTED_MEANS), log_fields=dict(LOG_FIELDS), metrics_section="rlhf")


# ----- validation at the end -------------------------------------------------------------------------
def _sides_flat(table: torch.Tensor) -> torch.Tensor:
    """[pairs, 2] -> [2 pairs]: the chosen sides, then the rejected ones (as `both_sides` lays them out)."""
    return torch.cat([table[:, 0], table[:, 1]])


def _accuracy(margins: torch.Tensor) -> float:
    return float(((margins > 0).double() + 0.5 * (margins == 0).double()).mean())


def evaluate_pairs(policy: torch.nn.Module, data: DPOData, config: RunConfig, ps: ParallelState) -> dict:
    """DPO's figures over every validation pair (float64 from the per-pair log-probabilities)."""
    args = config.extra["dpo"]
    kw = dict(seq_length=config.data.seq_length, micro_batch_size=config.micro_batch_size, pad_id=data.pad_id)
    was_training = policy.training
    policy.eval()
    try:
        pol = pair_logprobs(policy, data.valid_pairs, ps, **kw).double()
    finally:
        policy.train(was_training)
    ref = pair_logprobs(data.reference.model, data.valid_pairs, ps, **kw).double()
    values = dpo_metrics(_sides_flat(pol), _sides_flat(ref), args.dpo_beta, args.dpo_label_smoothing)
    return {"pairs": len(data.valid_pairs), "dpo_loss": float(values[LOSS_KEY]),
            "accuracy": float(values["accuracy"]), "reward_margin": float(values["reward margin"]),
            "chosen_reward": float(values["chosen reward"]), "rejected_reward": float(values["rejected reward"]),
            "policy_prefers_chosen": _accuracy(pol[:, 0] - pol[:, 1]),
            "reference_prefers_chosen": _accuracy(ref[:, 0] - ref[:, 1])}


# ----- the run ---------------------------------------------------------------------------------------
@dataclass
class DPORun:
    state: TrainState
    data: DPOData
    evaluation: dict | None  # `evaluate_pairs` at the end (None without validation pairs)


def run_dpo(config: RunConfig, ps: ParallelState) -> DPORun:
    """Load the reference and the pairs, train, evaluate on the validation pairs; `config` is the
    one `dpo_config` and `setup_parallel` returned."""
    data = load_dpo_data(config, ps)
    vocab_size = build_tokenizer(config.tokenizer.tokenizer_config()).vocab_size
    task = dpo_task(config, ps, data, vocab_size)
    args = config.extra["dpo"]
    trainer = run_training(config, ps, task, loss_name=LOSS_KEY,
                           extra=f"; reference fp8 level {args.reference_fp8_level}; {len(data.train_pairs):,} "
                                 f"training pairs; beta {args.dpo_beta}; {config.train_iters} iterations")
    state = trainer.state
    evaluation = None
    if data.valid_pairs:
        evaluation = dict(evaluate_pairs(trainer.model, data, config, ps), iteration=state.iteration)
        print_rank0(ps, "> validation: " + ", ".join(f"{k} {_short(v)}" for k, v in evaluation.items()))
        if args.eval_out and ps.rank == 0:
            path = Path(args.eval_out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(evaluation, indent=1) + "\n")
    return DPORun(state, data, evaluation)


def _short(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else str(value)
