"""The global batch size of each iteration: constant, or ramped up (`--rampup-batch-size START
INCREMENT SAMPLES`) as Megatron-LM's `RampupBatchsizeNumMicroBatchesCalculator` ramps it.

The ramp goes from START to `--global-batch-size` in steps of INCREMENT, spread evenly over the
first SAMPLES consumed samples: with n = (global - START) / INCREMENT steps, an iteration that
starts after `consumed` samples takes

    START + INCREMENT * floor(consumed / (SAMPLES / n))     while consumed <= SAMPLES
    --global-batch-size                                     afterwards

It is a pure function of the consumed samples, which checkpoints keep, so a run resumed in the
middle of the ramp continues with the batch sizes of an uninterrupted one. The micro-batches per
iteration follow: the batch / (micro batch x data-parallel size).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchSchedule:
    global_batch_size: int
    rampup: tuple[int, int, int] | None = None  # (start, increment, samples)

    def __post_init__(self) -> None:
        if self.rampup is None:
            return
        start, increment, samples = self.rampup
        if start < 1 or increment < 1 or samples < 0:
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: the start batch and the increment "
                             "must be >= 1, the ramp-up samples >= 0")
        if start > self.global_batch_size or (self.global_batch_size - start) % increment:
            raise ValueError(f"--rampup-batch-size {start} {increment} {samples}: the batch must reach "
                             f"--global-batch-size ({self.global_batch_size}) from {start} in whole steps of "
                             f"{increment}; change the start, the increment or --global-batch-size")

    @property
    def ramps(self) -> bool:
        return self.rampup is not None and self.rampup[0] < self.global_batch_size

    def batch_sizes(self) -> list[int]:
        """Every global batch size the run takes (the ramp's steps, then the final one)."""
        if not self.ramps:
            return [self.global_batch_size]
        start, increment, _ = self.rampup
        return list(range(start, self.global_batch_size + 1, increment))

    def global_batch_at(self, consumed_samples: int) -> int:
        """The global batch of the iteration that starts after `consumed_samples`."""
        if not self.ramps:
            return self.global_batch_size
        start, increment, samples = self.rampup
        if consumed_samples > samples:
            return self.global_batch_size
        samples_per_increment = samples / ((self.global_batch_size - start) // increment)
        return start + int(consumed_samples / samples_per_increment) * increment

    def num_microbatches(self, consumed_samples: int, micro_batch_size: int, data_parallel_size: int) -> int:
        batch, per_micro_step = self.global_batch_at(consumed_samples), micro_batch_size * data_parallel_size
        assert batch % per_micro_step == 0, (batch, per_micro_step)  # checked once for every size (RunConfig)
        return batch // per_micro_step

    def iterations_for(self, train_samples: int) -> int:
        """--train-iters from --train-samples, as Megatron-LM's `update_train_iters` counts them:
        the ramp's iterations (the one that crosses the ramp's end included), then whole final
        batches; a partial last batch is dropped."""
        if not self.ramps:
            return train_samples // self.global_batch_size
        iterations = consumed = 0
        while consumed <= self.rampup[2] and consumed <= train_samples:
            consumed += self.global_batch_at(consumed)
            iterations += 1
        if train_samples > consumed:
            iterations += (train_samples - consumed) // self.global_batch_size
        return iterations

    def samples_for(self, train_iters: int) -> int:
        """The samples `train_iters` iterations consume (what the training data must hold)."""
        if not self.ramps:
            return train_iters * self.global_batch_size
        consumed = 0
        for _ in range(train_iters):
            batch = self.global_batch_at(consumed)
            if batch == self.global_batch_size:  # the ramp is over: the rest is constant
                return consumed + (train_iters - _) * batch
            consumed += batch
        return consumed
