"""Cross-entropy over logits sharded on the vocabulary dimension, without gathering the logits.

Rank r holds vocabulary entries [r * V_local, (r + 1) * V_local). The loss needs only three
per-token numbers summed across tensor-parallel ranks (after a max all-reduce for stability): the
sum of exponentials, the target's logit and, with label smoothing, the sum of logits. They travel
in one all-reduce. The result equals ``F.cross_entropy(full_logits, target, reduction="none",
label_smoothing=...)``.

Columns at and past `vocab_size` (the rows that pad the vocabulary to a multiple of
--make-vocab-size-divisible-by x TP) are no part of the distribution: the max, the sums and the
gradient cover the vocabulary's columns only, so the loss is that of the unpadded model whatever
the padding.
"""

from __future__ import annotations

import torch

from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_local, target, ps, label_smoothing, vocab_size):
        vocab_local = logits_local.shape[-1]
        first = ps.tp_rank * vocab_local
        real_local = min(max(vocab_size - first, 0), vocab_local)  # this shard's vocabulary columns
        # At least fp32: exp and log-sum over a large vocabulary lose too much in bf16.
        compute_dtype = torch.promote_types(logits_local.dtype, torch.float32)
        logits = logits_local.to(compute_dtype).reshape(-1, vocab_local)[:, :real_local]
        target_flat = target.reshape(-1)
        if real_local:
            row_max = logits.max(dim=-1).values
        else:  # a shard of padding only
            row_max = torch.full(target_flat.shape, float("-inf"), dtype=compute_dtype, device=logits.device)
        comm.all_reduce_max(row_max, ps, "tp")
        shifted = logits - row_max.unsqueeze(-1)

        on_this_rank = (target_flat >= first) & (target_flat < first + real_local)
        local_index = torch.where(on_this_rank, target_flat - first, torch.zeros_like(target_flat))
        rows = torch.arange(shifted.shape[0], device=shifted.device)
        target_logit = torch.where(on_this_rank, shifted[rows, local_index], torch.zeros_like(row_max)) \
            if real_local else torch.zeros_like(row_max)

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
        vocab_local = ctx.logits_shape[-1]
        if grad.shape[-1] < vocab_local:  # padding columns: no part of the loss
            grad = torch.cat([grad, grad.new_zeros(grad.shape[0], vocab_local - grad.shape[-1])], dim=-1)
        return grad.view(ctx.logits_shape).to(ctx.logits_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_local: torch.Tensor, target: torch.Tensor, ps: ParallelState,
                                 label_smoothing: float = 0.0, vocab_size: int | None = None) -> torch.Tensor:
    """Per-token loss (shape of `target`) from logits sharded on the last (vocabulary) dim, over the
    first `vocab_size` columns of the whole (default: all of them; the rest are padding)."""
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {label_smoothing}")
    if logits_local.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits_local.shape)} and target {tuple(target.shape)} disagree; "
                         f"logits must be target's shape plus a vocabulary dimension")
    padded = logits_local.shape[-1] * ps.tp_size
    vocab_size = padded if vocab_size is None else vocab_size
    if not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {padded}] (the logits' columns)")
    return _VocabParallelCrossEntropy.apply(logits_local, target, ps, float(label_smoothing), int(vocab_size))
