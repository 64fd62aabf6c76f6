#!/usr/bin/env python
"""Generate text from a checkpoint.

    python tools/generate.py --load runs/tiny/checkpoints --prompt "Once upon a time" --max-new-tokens 32
    torchrun --nproc-per-node 4 tools/generate.py --load CKPT --tensor-model-parallel-size 2 \\
        --prompts-file prompts.jsonl --out results.jsonl --temperature 0.8 --top-p 0.95 --seed 7
    python tools/generate.py --load CKPT --interactive

The checkpoint may have been saved at any tensor / pipeline / data-parallel layout and precision
level: it is loaded at this launch's tensor-parallel size (processes / TP ranks share the
prompts as data parallelism) and pipeline size 1. `--fp8-level` picks the GEMMs (default: the
checkpoint's level; at O3 the weights are held in FP8, one byte each). Prompts come from
`--prompt` (repeatable) or a JSON-lines file of {"prompt": "text"} or {"tokens": [ids]} objects;
results go to `--out` (or stdout) as JSON lines in prompt order: index, prompt, text, tokens,
logprobs (the model's log-probability of each new token) and finish_reason ("eod" or "length").
The tokenizer is the checkpoint run's, unless --tokenizer-* flags say otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from megatron.core.datasets.corpus_readers import json_lines  # noqa: E402
from megatron.core.inference import SamplingParams, generate  # noqa: E402
from megatron.core.parallel_state import ParallelState, init_distributed  # noqa: E402
from megatron.core.precision import LEVELS  # noqa: E402
from megatron.core.tokenizers.tokenizer import build_tokenizer  # noqa: E402
from megatron.training.cli import run_cli  # noqa: E402
from megatron.training.flags import TokenizerArgs  # noqa: E402
from megatron.training.inference_model import load_gpt_for_inference, tokenizer_config_of  # noqa: E402
from tools import OneLineErrorParser  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Generate text from an FP8-LM checkpoint")
    parser.add_argument("--load", required=True, help="checkpoint folder (its latest iteration)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    parser.add_argument("--prompts-file", help='JSON lines of {"prompt": "text"} or {"tokens": [ids]}')
    parser.add_argument("--out", help="JSON-lines output (default: stdout)")
    parser.add_argument("--interactive", action="store_true", help="read prompts from stdin, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k cut")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--no-stop-on-eod", action="store_true", help="keep generating past end-of-document")
    parser.add_argument("--micro-batch-size", type=int, default=8, help="prompts per forward pass and rank")
    parser.add_argument("--fp8-level", choices=("checkpoint",) + LEVELS, default="checkpoint")
    parser.add_argument("--fp8-recipe", default=None, help="default: the checkpoint run's")
    parser.add_argument("--params-dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype outside FP8 (default: the checkpoint run's)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute every position at every step")
    TokenizerArgs.add_to(parser)  # default: the checkpoint run's tokenizer
    return parser


def read_prompts(args, tokenizer) -> list[list[int]]:
    prompts = [tokenizer.tokenize(text) for text in args.prompt]
    if args.prompts_file:
        for where, record in json_lines(args.prompts_file, "--prompts-file"):
            if isinstance(record, dict) and isinstance(record.get("prompt"), str):
                prompts.append(tokenizer.tokenize(record["prompt"]))
            elif isinstance(record, dict) and isinstance(record.get("tokens"), list):
                prompts.append([int(t) for t in record["tokens"]])
            else:
                raise ValueError(f'{where} needs a "prompt" string or a "tokens" list')
    for index, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {index} is empty after tokenizing; give it some text")
    return prompts


def tokenizer_overrides(args) -> dict:
    """The --tokenizer-* flags given on the command line (they override the checkpoint's)."""
    return {name: getattr(args, name) for name in ("tokenizer_type", "tokenizer_model", "vocab_size")
            if getattr(args, name) is not None}


class Generator:
    """The loaded model and tokenizer, and the data-parallel share of prompts this rank runs."""

    def __init__(self, args):
        env = init_distributed(backend="gloo" if args.device == "cpu" else None)
        tp = args.tensor_model_parallel_size
        if env.world_size % tp:
            raise ValueError(f"{env.world_size} processes do not divide into --tensor-model-parallel-size {tp}")
        self.ps = ParallelState.build(tp, 1, device=None if args.device == "auto" else args.device) \
            if dist.is_initialized() else ParallelState.single(None if args.device == "auto" else args.device)
        dtype = DTYPES[args.params_dtype] if args.params_dtype else None
        level = None if args.fp8_level == "checkpoint" else args.fp8_level
        self.loaded = load_gpt_for_inference(args.load, self.ps, params_dtype=dtype, fp8_level=level,
                                             fp8_recipe=args.fp8_recipe)
        self.tokenizer = build_tokenizer(tokenizer_config_of(self.loaded.args, **tokenizer_overrides(args)))
        if self.tokenizer.vocab_size > self.loaded.config.unpadded_vocab_size:
            raise ValueError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the checkpoint's model a "
                             f"vocabulary of {self.loaded.config.unpadded_vocab_size}; give the checkpoint's tokenizer")
        self.params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_k=args.top_k, top_p=args.top_p, greedy=args.greedy, seed=args.seed,
                                     stop_on_eod=not args.no_stop_on_eod)
        self.args = args

    def run(self, prompts: list[list[int]]) -> list[dict]:
        """Every prompt's result (on rank 0; other ranks get None), in prompt order."""
        ps = self.ps
        mine = [i for i in range(len(prompts)) if i % ps.dp_size == ps.dp_rank]
        records = []
        step = self.args.micro_batch_size
        for start in range(0, len(mine), step):
            indices = mine[start:start + step]
            results = generate(self.loaded.model, [prompts[i] for i in indices], self.params,
                               vocab_size=self.tokenizer.vocab_size, eod_id=self.tokenizer.eod, ps=ps,
                               indices=indices, use_cache=not self.args.no_kv_cache)
            for index, result in zip(indices, results):
                records.append({"index": index, "prompt": self.tokenizer.detokenize(result.prompt),
                                "text": self.tokenizer.detokenize(result.tokens), "tokens": result.tokens,
                                "logprobs": result.logprobs, "finish_reason": result.finish_reason})
        if dist.is_initialized():
            gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
            dist.gather_object(records if ps.tp_rank == 0 else [], gathered, dst=0)
            if dist.get_rank() != 0:
                return None
            records = [r for part in gathered for r in part]
        return sorted(records, key=lambda r: r["index"])


def interactive(gen: Generator) -> None:
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    while True:
        line = None
        if rank0:
            try:
                line = input("prompt> ")
            except EOFError:
                line = None
        if dist.is_initialized():
            box = [line]
            dist.broadcast_object_list(box, src=0)
            line = box[0]
        if line is None or line.strip() in ("/quit", "/exit"):
            return
        if not line.strip():
            continue
        records = gen.run([gen.tokenizer.tokenize(line)])
        if rank0:
            print(records[0]["text"], flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.interactive and not args.prompt and not args.prompts_file:
        raise ValueError("no prompts: give --prompt TEXT, --prompts-file FILE or --interactive")
    gen = Generator(args)
    if args.interactive:
        interactive(gen)
        return 0
    records = gen.run(read_prompts(args, gen.tokenizer))
    if records is None:
        return 0
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(lines)
        tmp.replace(out)
        print(f"> wrote {len(records)} results to {out}", file=sys.stderr, flush=True)
    else:
        sys.stdout.write(lines)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
