#!/usr/bin/env python
"""Exact-match evaluation of a checkpoint on held-out instruction data, by greedy generation.

    python tools/sft_eval.py --load runs/sft-demo/checkpoints --input data/builtin-sft/test.jsonl \\
        --max-samples 150 --out runs/sft-demo/eval.json

Each record (any format tools/preprocess_sft.py reads, as JSON lines) is a conversation ending
with an assistant turn: the model is given the turns before it, rendered with the chat template
the training data used (the tokenizer's, or the default), and generates greedily until
end-of-document or a budget of the reference's length plus a few tokens. A sample matches when
the generated text, stripped of surrounding white space, equals the reference. The response loss
is the mean cross-entropy of the answers' target tokens (the loss finetune_sft.py trains and
validates on) with the whole conversation given. Prints both and writes them, with every sample's
prompt, reference and answer, to `--out` as JSON. The model
is loaded at the launch's tensor-parallel size from any saved layout (`tools/generate.py`).

`--samples-per-prompt N` scores N sampled answers per question (`--temperature`, `--top-k`,
`--seed`) instead of the greedy one: the match rate is then the expected exact-match reward of
the policy an RLHF run trains (`make rlhf`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from megatron.core.datasets.chat_template import load_chat_template  # noqa: E402
from megatron.core.datasets.corpus_readers import json_lines  # noqa: E402
from megatron.core.datasets.sft_formats import FieldNames, detect_format, to_conversation  # noqa: E402
from megatron.core.inference import SamplingParams  # noqa: E402
from megatron.training.cli import run_cli  # noqa: E402
from tools import OneLineErrorParser  # noqa: E402
from tools.generate import Generator  # noqa: E402

EXTRA_TOKENS = 4


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(description="Exact-match evaluation by greedy generation")
    parser.add_argument("--load", required=True, help="checkpoint folder")
    parser.add_argument("--input", required=True, help="JSON lines of conversations ending with the answer")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N records only")
    parser.add_argument("--chat-template", default="auto", help="auto (the tokenizer's, else the default), "
                        "default, or a .jinja file: as tools/preprocess_sft.py was given")
    parser.add_argument("--out", help="JSON file for the score and every sample's answer")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--fp8-level", default="checkpoint", help="as tools/generate.py")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--response-key", default=None,
                        help="the field holding the answer in prompt/response records (default: response; "
                             "the built-in RLHF prompts: answer)")
    parser.add_argument("--samples-per-prompt", type=int, default=0,
                        help="score N sampled answers per question instead of the greedy one (the mean match is "
                             "then an RLHF policy's expected exact-match reward)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --samples-per-prompt)")
    parser.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    parser.add_argument("--seed", type=int, default=1234, help="sampling seed (answer i of question q: its own stream)")
    return parser


def read_samples(path: Path, limit: int | None, response_key: str | None = None) -> list[tuple[list[dict], str]]:
    """(conversation before the answer, the answer) per record."""
    samples = []
    names = FieldNames(response=response_key)
    for where, record in json_lines(path, "--input"):
        conversation = to_conversation(record, detect_format(record, names, where), names, where)
        if conversation[-1]["role"] != "assistant":
            raise ValueError(f"{where}: the conversation must end with the assistant's answer to compare with")
        samples.append((conversation[:-1], conversation[-1]["content"]))
        if limit is not None and len(samples) == limit:
            break
    if not samples:
        raise ValueError(f"--input {path} holds no records")
    return samples


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    generator_args = build_generator_args(args)
    gen = Generator(generator_args)
    samples = read_samples(Path(args.input), args.max_samples, args.response_key)
    template = load_chat_template(gen.tokenizer, args.chat_template)
    prompts = [[int(t) for t in template.prompt_tokens(turns, where=f"{args.input} record {i + 1}")]
               for i, (turns, _) in enumerate(samples)]
    budget = max(len(gen.tokenizer.tokenize(answer)) for _, answer in samples) + EXTRA_TOKENS
    draws = max(args.samples_per_prompt, 1)
    if args.samples_per_prompt < 0:
        raise ValueError(f"--samples-per-prompt must be >= 0, got {args.samples_per_prompt}")
    if args.samples_per_prompt:
        gen.params = SamplingParams(max_new_tokens=budget, temperature=args.temperature, top_k=args.top_k,
                                    seed=args.seed)
    else:
        gen.params = SamplingParams(max_new_tokens=budget, greedy=True)
    loss = response_loss(gen.loaded.model, template, samples, args.input)
    records = gen.run([prompt for prompt in prompts for _ in range(draws)])
    if records is None:  # not rank 0
        return 0
    results = []
    for index, record in enumerate(records):
        turns, answer = samples[index // draws]
        results.append({"prompt": turns[-1]["content"], "reference": answer, "answer": record["text"].strip(),
                        "match": record["text"].strip() == answer.strip()})
    matches = sum(r["match"] for r in results)
    summary = {"checkpoint": args.load, "input": args.input, "samples": len(results),
               "sampling": {"samples_per_prompt": args.samples_per_prompt, "temperature": args.temperature,
                            "top_k": args.top_k, "seed": args.seed} if args.samples_per_prompt else "greedy",
               "exact_match": matches,
               "exact_match_rate": matches / len(results), "response_loss": loss, "template": template.description,
               "results": results}
    print(f"> exact match: {matches}/{len(results)} = {100 * matches / len(results):.1f}%, response loss "
          f"{loss:.4f} ({args.load})", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(out)
    return 0


@torch.no_grad()
def response_loss(model, template, samples, where: str) -> float:
    """Mean cross-entropy over the answers' target tokens, each conversation whole."""
    total, count = 0.0, 0
    model.eval()
    for index, (turns, answer) in enumerate(samples):
        encoded = template.encode(turns + [{"role": "assistant", "content": answer}], where=f"{where} record {index + 1}")
        device = next(model.parameters()).device
        tokens = torch.as_tensor(encoded.tokens, device=device)[None]
        mask = torch.as_tensor(encoded.loss_mask[1:], dtype=torch.float64, device=device)
        losses = model(tokens[:, :-1], tokens[:, 1:])[0].double()
        total += float((losses * mask).sum())
        count += int(mask.sum())
    return total / max(count, 1)


def build_generator_args(args):
    """tools/generate.py's settings for greedy answers from this tool's flags."""
    from tools.generate import build_parser as generate_parser

    argv = ["--load", args.load, "--tensor-model-parallel-size", str(args.tensor_model_parallel_size),
            "--micro-batch-size", str(args.micro_batch_size), "--fp8-level", args.fp8_level, "--device", args.device,
            "--greedy", "--prompt", "unused"]
    return generate_parser().parse_args(argv)


if __name__ == "__main__":
    sys.exit(run_cli(main))
