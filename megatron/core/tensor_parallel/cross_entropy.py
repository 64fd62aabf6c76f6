"""Cross-entropy over logits sharded on the vocabulary dimension, without gathering the logits.

Rank r holds vocabulary entries [r * V_local, (r + 1) * V_local). The loss needs only three
per-token numbers summed across tensor-parallel ranks (after a max all-reduce for stability): the
sum of exponentials, the target's logit and, with label smoothing, the sum of logits. They travel
in one all-reduce. The result equals ``F.cross_entropy(full_logits, target, reduction="none",
label_smoothing=...)``.
"""

from __future__ import annotations

import torch

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, target, ps, label_smoothing):
        vocab_local = logits_local.shape[-1]
        vocab_size = vocab_local * ps.tp_size
        # At least fp32: exp and log-sum over a large vocabulary lose too much in bf16.
        compute_dtype = torch.promote_types(logits_local.dtype, torch.float32)
        logits = logits_local.to(compute_dtype).reshape(-1, vocab_local)
        target_flat = target.reshape(-1)
        row_max = logits.max(dim=-1).values
        comm.all_reduce_max(row_max, ps, "tp")
        shifted = logits - row_max.unsqueeze(-1)

        first = ps.tp_rank * vocab_local
        on_this_rank = (target_flat >= first) & (target_flat < first + vocab_local)
        local_index = torch.where(on_this_rank, target_flat - first, torch.zeros_like(target_flat))
        rows = torch.arange(shifted.shape[0], device=shifted.device)
        target_logit = torch.where(on_this_rank, shifted[rows, local_index], torch.zeros_like(row_max))

        per_token = [target_logit]
        if label_smoothing > 0:
            per_token.append(shifted.sum(dim=-1))
        exp = shifted.exp_()  # in place: the shifted logits are not needed again
        sums = comm.all_reduce(torch.stack([exp.sum(dim=-1), *per_token]), ps, "tp")
        log_sum_exp = sums[0].log()
        loss = log_sum_exp - sums[1]
        if label_smoothing > 0:
            smooth_loss = log_sum_exp - sums[2] / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * smooth_loss

        softmax = exp.div_(sums[0].unsqueeze(-1))
        ctx.save_for_backward(softmax, on_this_rank, local_index)
        ctx.label_smoothing, ctx.vocab_size, ctx.logits_dtype = label_smoothing, vocab_size, logits_local.dtype
        ctx.logits_shape = logits_local.shape
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, on_this_rank, local_index = ctx.saved_tensors
        # d loss / d logit_j = softmax_j - (1 - eps) [j == target] - eps / V
        grad_rows = grad_loss.reshape(-1, 1).to(softmax.dtype)
        grad = softmax * grad_rows
        rows = torch.arange(grad.shape[0], device=grad.device)
        hit = on_this_rank.to(softmax.dtype) * (1.0 - ctx.label_smoothing)
        grad[rows, local_index] -= hit * grad_rows.squeeze(-1)
        if ctx.label_smoothing > 0:
            grad -= (ctx.label_smoothing / ctx.vocab_size) * grad_rows
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                                 label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-token loss (shape of `target`) from logits sharded on the last (vocabulary) dim."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if logits_local.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits_local.shape)} and target {tuple(target.shape)} disagree; "
                         f"logits must be target's shape plus a vocabulary dimension")
    return _VocabParallelCrossEntropy.apply(logits_local, target, ps, float(label_smoothing))
