"""The training loop takes a task, not a GPT: a model that is no GPT (a scalar regression head, the
shape of a reward model) trains through the same `Trainer`, with checkpoints, and matches plain
PyTorch AdamW step for step."""

from __future__ import annotations

import json

import torch
import torch.nn as nn

from megatron.core.parallel_state import ParallelState
from megatron.training.config import parse_config
from megatron.training.training import Trainer, TrainingTask

FEATURES, SAMPLES, STEPS, LR = 8, 64, 6, 1e-2


class Regression(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=gen)
        self.y = self.x @ torch.linspace(-1, 1, FEATURES) + 0.1 * torch.randn(n, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))


def regression_task() -> TrainingTask:
    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["x"]).squeeze(-1)

        def loss_fn(out):
            loss = (out - batch["y"]).square().mean()
            return loss, {"mse": loss.detach()}
        return output, loss_fn

    return TrainingTask(model_provider=lambda config, ps, rng: make_model(), forward_step=forward_step,
                        datasets_provider=lambda config, num_samples: (Regression(SAMPLES, 1), None, None),
                        tokens_per_sample=1, loss_key="mse")


def loop_args(tmp_path, *extra):
    args = parse_config(["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "1", "--seq-length", "1",
                       "--train-iters", str(STEPS), "--lr", str(LR), "--lr-decay-style", "constant", "--lr-decay-iters", "100",
                       "--weight-decay", "0", "--clip-grad", "0", "--micro-batch-size", "4",
                       "--global-batch-size", "8", "--log-interval", "1", "--eval-iters", "0", "--device", "cpu",
                       "--metrics-file", str(tmp_path / "metrics.jsonl"), *extra])
    return args.for_world(1)


def reference_losses() -> tuple[list[float], nn.Module]:
    model, data = make_model(), Regression(SAMPLES, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for step in range(STEPS):
        idx = torch.arange(step * 8, step * 8 + 8)
        optimizer.zero_grad()
        total = 0.0
        for micro in idx.split(4):  # two micro-batches of 4, each loss / 2 as the schedule does
            loss = (model(data.x[micro]).squeeze(-1) - data.y[micro]).square().mean()
            (loss / 2).backward()
            total += loss.item() / 2
        optimizer.step()
        losses.append(total)
    return losses, model


def test_a_task_that_is_not_a_gpt_trains_through_the_loop(tmp_path, capsys):
    ps = ParallelState.single()
    trainer = Trainer(loop_args(tmp_path, "--save", str(tmp_path / "ckpt")), ps, regression_task())
    try:
        state = trainer.train()
    finally:
        trainer.close()
    expected, reference = reference_losses()
    assert state.iteration == STEPS
    torch.testing.assert_close(torch.tensor(state.losses), torch.tensor(expected), rtol=1e-6, atol=1e-7)
    for mine, theirs in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in records] == state.losses  # the task's loss key is what the loop logs
    assert "| mse: " in capsys.readouterr().out

    # The checkpoint it wrote resumes into the same task.
    resumed = Trainer(loop_args(tmp_path, "--load", str(tmp_path / "ckpt"), "--train-iters", str(STEPS + 2)),
                      ps, regression_task())
    try:
        assert resumed.state.iteration == STEPS
        for mine, saved in zip(resumed.model.parameters(), trainer.model.parameters()):
            assert torch.equal(mine, saved)
        resumed.train()
    finally:
        resumed.close()
    assert resumed.state.iteration == STEPS + 2
