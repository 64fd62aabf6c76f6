"""Named random-number streams, so dropout matches across tensor-parallel ranks where activations
are replicated and differs where they are sharded.

As in Megatron, the default generator is the data-parallel stream (same on every tensor-parallel
rank of a pipeline stage); `fork(MODEL_PARALLEL_RNG)` swaps in a stream that differs per
tensor-parallel rank for the duration of a block, then puts the default stream back untouched.
Streams are saved as the global generators' states (CPU always, plus the CUDA generator of the
tracker's device), so any op that draws from the default generator (dropout included) is covered.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from megatron.core.parallel_state import ParallelState

MODEL_PARALLEL_RNG = "model-parallel-rng"
# Megatron's offsets, kept so seeds mean the same thing as in Megatron runs.
PIPELINE_SEED_STRIDE = 100
MODEL_PARALLEL_SEED_OFFSET = 2718

RNGState = dict[str, torch.Tensor]


class RNGStatesTracker:
    """Named generator states; `fork(name)` runs a block on that stream and advances it."""

    def __init__(self, device: torch.device | str | None = None):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._states: dict[str, RNGState] = {}
        self._seeds: set[int] = set()

    # ----- the generators this tracker swaps -----------------------------------------------------
    def _capture(self) -> RNGState:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _restore(self, state: RNGState) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda":
            if "cuda" not in state:
                raise ValueError("this RNG state was saved without a CUDA generator; "
                                 "load it into a tracker built with device='cpu'")
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # ----- public API ---------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self._states)

    def reset(self) -> None:
        self._states.clear()
        self._seeds.clear()

    def add(self, name: str, seed: int) -> None:
        """Creates stream `name` from `seed` without disturbing the current default stream."""
        if name in self._states:
            raise ValueError(f"RNG state {name!r} already exists; call reset() before adding it again")
        if seed in self._seeds:
            # Two streams from one seed would draw identical masks, silently correlating dropout.
            raise ValueError(f"seed {seed} is already used by another RNG state; pick a distinct seed")
        outer = self._capture()
        torch.manual_seed(seed)
        self._states[name] = self._capture()
        self._restore(outer)
        self._seeds.add(seed)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_RNG):
        """Runs the block on stream `name`; the stream keeps its advance, the default stream resumes."""
        if name not in self._states:
            raise ValueError(f"RNG state {name!r} was never added (known: {self.names}); "
                             f"call add({name!r}, seed) or model_parallel_seed() first")
        outer = self._capture()
        self._restore(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._capture()
            self._restore(outer)

    def get_states(self) -> dict[str, RNGState]:
        """Copies of every stream, for checkpoints."""
        return {name: {key: t.clone() for key, t in state.items()} for name, state in self._states.items()}

    def set_states(self, states: dict[str, RNGState]) -> None:
        """Replaces the streams with checkpointed ones (seed bookkeeping is not restored)."""
        self._states = {name: {key: t.clone() for key, t in state.items()} for name, state in states.items()}


def model_parallel_seed(ps: ParallelState, seed: int, device: torch.device | str | None = None) -> RNGStatesTracker:
    """Seeds the default generators with Megatron's rule and returns a tracker holding the
    tensor-parallel stream.

    default stream       = seed + 100 * pp_rank              (same across tp and dp ranks)
    "model-parallel-rng" = seed + 100 * pp_rank + 2718 + tp_rank  (differs across tp ranks)
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    stage_seed = seed + PIPELINE_SEED_STRIDE * ps.pp_rank
    random.seed(stage_seed)
    np.random.seed(stage_seed % 2**32)
    torch.manual_seed(stage_seed)  # CPU and every CUDA device
    tracker = RNGStatesTracker(device if device is not None else ps.device)
    tracker.add(MODEL_PARALLEL_RNG, stage_seed + MODEL_PARALLEL_SEED_OFFSET + ps.tp_rank)
    return tracker
