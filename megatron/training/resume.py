"""Saving, resuming and stopping a run: the training loop's side of `megatron.core.checkpointing`.

A job split across SLURM allocations uses `--save`/`--load` with `--exit-duration-in-mins` or
`--exit-interval`; SIGTERM (what SLURM sends before the time limit) also saves and exits cleanly.
Every rank must take the same decision at the same iteration, so the stop flags are combined
across all ranks before anyone acts on them.
"""

from __future__ import annotations

import signal
import time

import torch

from megatron.core import checkpointing
from megatron.core.distributed import comm
from megatron.core.parallel_state import ParallelState
from megatron.core.tokenizers.tokenizer import tokenizer_fingerprint


def local_name(chunk: torch.nn.Module, name: str) -> str:
    """A parameter's name in the checkpoint when the model has no global naming of its own."""
    return name


def layout_of(ps: ParallelState, use_distributed_optimizer: bool) -> dict:
    return {"world_size": ps.world_size, "tp": ps.tp_size, "pp": ps.pp_size, "dp": ps.dp_size,
            "distributed_optimizer": bool(use_distributed_optimizer)}


def _plain(value):
    """Run flags as JSON-safe values for the checkpoint's common file."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def saved_fp8_min_features(load: str | None) -> int | None:
    """The FP8 size filter the checkpoint to resume from was trained with (None: no checkpoint,
    or one written before the filter was recorded). A resumed run keeps it, so that the same
    linears are FP8 whatever GPU it resumes on."""
    if not load:
        return None
    iteration = checkpointing.latest_iteration(load)
    if iteration is None:
        return None
    value = checkpointing.read_metadata(load, iteration).get("fp8_min_features")
    return value if type(value) is int and value >= 0 else None


class Checkpointer:
    """Saves and restores a run: the model, the optimizer and the RNG streams in each rank's file
    (`megatron.core.checkpointing`), and the run's stateful components (anything with
    `state_dict` / `load_state_dict`: the train state, the LR schedule, the FP8 auto-scaler, ...)
    in the common file. The loop hands its components over once and calls `save` / `load`; it
    does not know what a checkpoint holds. The train state's entries sit at the top of the common
    file, the others under their names, as checkpoints have always been written."""

    def __init__(self, args, ps: ParallelState, model: torch.nn.Module, optimizer, rng, *, train_state,
                 components: dict, layout: dict, global_name=local_name, signature: dict | None = None):
        """`global_name(chunk, name)`: a parameter's name in the checkpoint, the same under every
        layout (pipeline stages renumber layers); `signature`: what a checkpoint must agree on
        to load into this model (its architecture)."""
        self.args, self.ps, self.model, self.optimizer, self.rng = args, ps, model, optimizer, rng
        self.global_name, self.signature = global_name, signature or {}
        self.train_state = train_state
        self.components = {name: c for name, c in components.items() if c is not None}
        self.layout = layout
        self.last_saved_iteration: int | None = None
        self._tokenizer: dict | None = None

    @property
    def tokenizer(self) -> dict | None:
        """The run's tokenizer fingerprint, recorded in every checkpoint's metadata (RLHF checks a
        model's against the run's); None when the run has no loadable tokenizer."""
        if self._tokenizer is None:
            try:
                self._tokenizer = tokenizer_fingerprint(self.args.tokenizer.tokenizer_config())
            except (ValueError, OSError, AttributeError):
                return None
        return self._tokenizer

    def save(self) -> None:
        args, ps, iteration = self.args, self.ps, self.train_state.iteration
        payload = checkpointing.rank_payload(self.model, self.optimizer, ps, self.global_name, self.rng)
        common = dict(self.train_state.state_dict(), **{name: c.state_dict() for name, c in self.components.items()},
                      args={k: _plain(v) for k, v in args.flat().items()})
        metadata = {"format": checkpointing.FORMAT_VERSION, "iteration": iteration,
                    "model": self.signature, "layout": self.layout, "fp8_level": args.fp8_level,
                    "fp8_min_features": args.fp8_min_features, "tokenizer": self.tokenizer}
        start = time.perf_counter()
        folder = checkpointing.save_checkpoint(args.save, iteration, ps=ps, payload=payload, common=common,
                                               metadata=metadata)
        self.last_saved_iteration = iteration
        if ps.rank == 0:
            print(f"> saved checkpoint {folder} in {time.perf_counter() - start:.1f} s", flush=True)

    def load_weights(self, root: str) -> None:
        """Take only the weights of the checkpoint in `root` (any layout): a fresh optimizer whose
        masters follow them, iteration 0 - where a fine-tuning run starts."""
        result = checkpointing.load_checkpoint(
            root, ps=self.ps, model=self.model, optimizer=self.optimizer, global_name=self.global_name,
            model_config=self.signature, layout=self.layout, load_optim=False, load_rng=False, tracker=self.rng,
            verify_checksums=not self.args.no_verify_checkpoint_checksums)
        if result is None:
            raise ValueError(f"{root} holds no checkpoint to start from; pass a folder that --save (or "
                             f"tools/checkpoint/convert.py import) wrote")
        if self.ps.rank == 0:
            print(f"> starting from the weights of {root} (iteration {result[0].iteration})", flush=True)

    def load(self) -> bool:
        """Resume (or, with --finetune, take the weights) from `--load`; nothing there: start
        fresh. Returns whether a checkpoint was loaded."""
        args, ps = self.args, self.ps
        finetune = args.finetune
        result = checkpointing.load_checkpoint(
            args.load, ps=ps, model=self.model, optimizer=self.optimizer, global_name=self.global_name,
            model_config=self.signature, layout=self.layout,
            load_optim=not (finetune or args.no_load_optim), load_rng=not (finetune or args.no_load_rng),
            tracker=self.rng,
            verify_checksums=not self.args.no_verify_checkpoint_checksums)
        if result is None:
            if ps.rank == 0:
                print(f"> nothing to resume in {args.load}", flush=True)
            return False
        info, common = result
        if ps.rank == 0:
            how = "weights for fine-tuning" if finetune else "resuming"
            print(f"> loaded iteration {info.iteration} from {args.load} ({how})", flush=True)
        if finetune:
            return True
        self.train_state.load_state_dict(dict(common, iteration=info.iteration,
                                              consumed_samples=info.consumed_samples))
        self.last_saved_iteration = info.iteration
        for name, component in self.components.items():
            # Without optimizer state the schedule restarts too; a component the checkpoint
            # lacks (written before it existed) keeps its fresh state.
            if common.get(name) and not (args.no_load_optim and name == "scheduler"):
                component.load_state_dict(common[name])
        return True


class SigtermLatch:
    """Remembers a SIGTERM for the training loop to act on at its next iteration boundary.

    Installed once per process, as early as the entry point can (`megatron.training.cli.run_cli`,
    where the launcher asks for it) or else by `StopConditions`: a SIGTERM that arrives while the
    model is built or the data loaded is then honoured at the first point where a checkpoint can
    be saved instead of killing the process. Installing it unblocks SIGTERM, so one that a launcher
    held back (scripts/torchrun_graceful.py starts its workers with SIGTERM blocked) arrives now.
    The handler is the process's one SIGTERM disposition; the latch is found again through
    `signal.getsignal`, not through module state."""

    def __init__(self, previous):
        self.previous = previous
        self.received = False

    def __call__(self, signum, frame) -> None:
        self.received = True

    @staticmethod
    def current() -> SigtermLatch | None:
        handler = signal.getsignal(signal.SIGTERM)
        return handler if isinstance(handler, SigtermLatch) else None

    @classmethod
    def install(cls) -> SigtermLatch:
        """Install a latch (or return the one installed) and let held-back SIGTERMs in."""
        latch = cls.current()
        if latch is None:
            latch = cls(signal.getsignal(signal.SIGTERM))
            signal.signal(signal.SIGTERM, latch)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        return latch

    def uninstall(self) -> None:
        """Give SIGTERM back to the handler that was there before (a SIGTERM already received is
        not replayed: whoever installed the latch decides what it means)."""
        if signal.getsignal(signal.SIGTERM) is self:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)


class StopConditions:
    """--exit-interval, --exit-duration-in-mins and SIGTERM, agreed by all ranks. A SIGTERM
    received before training started (a latch installed at start-up) counts too."""

    def __init__(self, args, ps: ParallelState):
        self.args, self.ps = args, ps
        self.started = time.monotonic()
        self._owns_latch = SigtermLatch.current() is None
        self._latch = SigtermLatch.install()
        if self._latch.received and ps.rank == 0:
            print("> SIGTERM received during start-up: stopping after the first iteration", flush=True)

    @property
    def signalled(self) -> bool:
        return self._latch.received

    @signalled.setter
    def signalled(self, value: bool) -> None:
        self._latch.received = bool(value)

    def close(self) -> None:
        """Stop listening; a latch installed before training (by the entry point) stays until
        the entry point is done, so a SIGTERM during the final save does not cut it short."""
        if self._owns_latch:
            self._latch.uninstall()

    def reason(self, iteration: int) -> str | None:
        """Why to stop after `iteration`, the same on every rank, or None."""
        args = self.args
        local = 0
        if self.signalled:
            local = 1
        elif args.exit_duration_in_mins and time.monotonic() - self.started > args.exit_duration_in_mins * 60:
            local = 2
        flag = torch.tensor([local], dtype=torch.int32, device=self.ps.device)
        for group in ("tp", "dp", "pp"):
            if self.ps.group_size(group) > 1:
                comm.all_reduce_max(flag, self.ps, group)
        if int(flag.item()) == 1:
            return "SIGTERM received"
        if int(flag.item()) == 2:
            return f"--exit-duration-in-mins {args.exit_duration_in_mins} reached"
        if args.exit_interval and iteration % args.exit_interval == 0:
            return f"--exit-interval {args.exit_interval} reached"
        return None
