"""The built-in RLHF data: tools/builtin_sft.py's questions about the standard library, as
preference pairs (for DPO and reward models) and as prompts with checkable answers (for PPO and
GRPO). Nothing is downloaded.

For every question of the built-in instruction set the chosen answer is the correct one and the
rejected answer a plausible wrong one:

    Which module does `json.dumps` come from?          chosen json     rejected pickle (also has a dumps)
    What is `json.dumps` called without its module?    chosen dumps    rejected loads (another json name)
    Is `json.JSONDecoder` a class or a function?       chosen class    rejected function

Wrong modules are, where there are any, other modules with a callable of the same name; wrong
names are other names of the same module in the same split. Choices are made by a hash of the
question, so the output is the same on every build. The test split is the names that
tools/builtin_sft.py holds out (`held_out`), so no test question is trained on and no held-out
function or class appears in the training files, not even in a rejected answer.

    python tools/builtin_rlhf.py                 # data/builtin-rlhf/: preferences-{train,test}.jsonl,
                                                 #   prompts-{train,test}.jsonl, manifest.json
    python tools/builtin_rlhf.py --print-args    # the rlhf/train_dpo.py data and tokenizer flags, on stdout
    python tools/builtin_rlhf.py --print-rl-args # rlhf/train_grpo.py's: the module questions

Records: preferences {"prompt", "chosen", "rejected"}; prompts {"prompt", "answer"} (all questions,
and module-prompts-*: the module questions alone, the GRPO demo's task: the answer is written in
the question, which the SFT model's samples get right about a fifth of the time). The tokenizer
is the built-in corpus's (`tools/builtin_corpus.py`, built first when missing); the manifest
records the longest pair in its tokens under the default chat template. A later call returns at
once when the folder is up to date.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import zlib
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron.core.tokenizers.tokenizer import TokenizerConfig  # noqa: E402
from tools import OneLineErrorParser, run_cli  # noqa: E402
from tools.builtin_corpus import REPO_ROOT, ensure_builtin_corpus  # noqa: E402
from tools.builtin_sft import SEQ_LENGTH, TEMPLATES, held_out, stdlib_names  # noqa: E402

BUILD_FORMAT = 2
DEFAULT_DIR = REPO_ROOT / "data" / "builtin-rlhf"
FILES = ("preferences-train.jsonl", "preferences-test.jsonl", "prompts-train.jsonl", "prompts-test.jsonl",
         "module-prompts-train.jsonl", "module-prompts-test.jsonl")
# The GRPO/PPO demo's task (`make rlhf`): the module questions, whose answer is in the question.
MODULE_QUESTION = TEMPLATES[0][0].split("`")[0]


def _pick(candidates: list[str], key: str) -> str:
    """One of the sorted `candidates`, chosen by a hash of `key` (the same on every build)."""
    return candidates[zlib.crc32(key.encode()) % len(candidates)]


class WrongAnswers:
    """Plausible wrong answers for the questions about `names` (all of one split)."""

    def __init__(self, names: list[tuple[str, str, str]]):
        self.modules = sorted({module for module, _, _ in names})
        self.modules_of: dict[str, set[str]] = defaultdict(set)  # name -> modules defining it
        self.names_in: dict[str, set[str]] = defaultdict(set)    # module -> its names
        for module, name, _ in names:
            self.modules_of[name].add(module)
            self.names_in[module].add(name)
        self.all_names = sorted({name for _, name, _ in names})

    def module(self, module: str, name: str) -> str:
        namesakes = sorted(self.modules_of[name] - {module})  # the most plausible mistake
        others = namesakes or [m for m in self.modules if m != module]
        return _pick(others, f"{module}.{name}/module")

    def name(self, module: str, name: str) -> str:
        siblings = sorted(self.names_in[module] - {name})
        others = siblings or [n for n in self.all_names if n != name]
        return _pick(others, f"{module}.{name}/name")

    @staticmethod
    def kind(kind: str) -> str:
        return "function" if kind == "class" else "class"


def split_records(names: list[tuple[str, str, str]]) -> tuple[list[dict], list[dict]]:
    """(preference records, prompt records) of one split's names, in the order of `names`."""
    wrong = WrongAnswers(names)
    preferences, prompts = [], []
    for module, name, kind in names:
        rejected = (wrong.module(module, name), wrong.name(module, name), wrong.kind(kind))
        for (question, answer), bad in zip(TEMPLATES, rejected):
            prompt, good = question.format(qualified=f"{module}.{name}"), answer(module, name, kind)
            assert good != bad, (module, name)
            preferences.append({"prompt": prompt, "chosen": good, "rejected": bad})
            prompts.append({"prompt": prompt, "answer": good})
    return preferences, prompts


def records(names) -> dict[str, list[dict]]:
    """Every file's records, by file name; the test split is builtin_sft's held-out names."""
    test_names = [n for n in names if held_out(n[0], n[1])]
    train_names = [n for n in names if not held_out(n[0], n[1])]
    out = {}
    for split, split_names in (("train", train_names), ("test", test_names)):
        out[f"preferences-{split}.jsonl"], out[f"prompts-{split}.jsonl"] = split_records(split_names)
        out[f"module-prompts-{split}.jsonl"] = [r for r in out[f"prompts-{split}.jsonl"]
                                                if r["prompt"].startswith(MODULE_QUESTION)]
    return out


def longest_pair_tokens(preferences: list[dict], tokenizer_model: Path) -> int:
    """The most tokens either side of a pair takes under the default chat template."""
    from megatron.core.datasets.chat_template import DefaultChatTemplate
    from megatron.core.tokenizers.tokenizer import build_tokenizer
    from rlhf.data import encode_pair

    template = DefaultChatTemplate(build_tokenizer(TokenizerConfig(
        tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(tokenizer_model))))
    longest = 0
    for index, record in enumerate(preferences):
        pair = encode_pair(record, template, f"record {index}")
        longest = max(longest, len(pair.chosen), len(pair.rejected))
    return longest


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def ensure_builtin_rlhf(data_dir: str | Path | None = None, *, tokenizer_model: str | Path | None = None,
                        log=None) -> dict:
    """Build data/builtin-rlhf (or `data_dir`) unless up to date; returns its manifest.
    `tokenizer_model`: the SentencePiece model to measure with (default: the built-in corpus's,
    built first when missing)."""
    log = log or (lambda message: None)
    target = Path(data_dir) if data_dir else DEFAULT_DIR
    if tokenizer_model is None:
        corpus = ensure_builtin_corpus(log=log)
        tokenizer_model, tokenizer_id = corpus.tokenizer_model, corpus.manifest.get("fingerprint")
    else:
        tokenizer_id = hashlib.sha256(Path(tokenizer_model).read_bytes()).hexdigest()
    names = stdlib_names()
    fingerprint = hashlib.sha256(json.dumps([BUILD_FORMAT, SEQ_LENGTH, names, str(tokenizer_model), tokenizer_id])
                                 .encode()).hexdigest()[:16]
    manifest_path = target / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("fingerprint") == fingerprint and all((target / f).is_file() for f in FILES):
            log(f"built-in RLHF data in {target} is up to date")
            return manifest
    files = records(names)
    # Recorded so a run can pick --seq-length (train_dpo.py leaves out pairs longer than it).
    longest = max(longest_pair_tokens(files[f"preferences-{split}.jsonl"], Path(tokenizer_model))
                  for split in ("train", "test"))
    staging = target.with_name(target.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file_name, rows in files.items():
        _write_jsonl(staging / file_name, rows)
    manifest = {"fingerprint": fingerprint, "names": len(names), "train_pairs": len(files["preferences-train.jsonl"]),
                "test_pairs": len(files["preferences-test.jsonl"]),
                "max_tokens": longest, "seq_length": SEQ_LENGTH, "tokenizer_model": str(tokenizer_model)}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log(f"built-in RLHF data: {manifest['train_pairs']:,} training and {manifest['test_pairs']:,} test pairs "
        f"(and as many prompts) in {target}")
    return manifest


def training_args(data_dir: Path, manifest: dict) -> list[str]:
    """The rlhf/train_dpo.py flags that train on the built-in pairs and validate on the held-out ones."""
    return ["--data-path", str(data_dir / "preferences-train.jsonl"),
            "--valid-data-path", str(data_dir / "preferences-test.jsonl"),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", manifest["tokenizer_model"]]


def rl_args(data_dir: Path, manifest: dict) -> list[str]:
    """The rlhf/train_grpo.py (and train_ppo.py) flags of the demo's task: the module questions."""
    return ["--data-path", str(data_dir / "module-prompts-train.jsonl"),
            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", manifest["tokenizer_model"]]


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="builtin_rlhf.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="output folder (default: data/builtin-rlhf)")
    parser.add_argument("--print-args", action="store_true", help="print the rlhf/train_dpo.py data flags only")
    parser.add_argument("--print-rl-args", action="store_true",
                        help="print the rlhf/train_grpo.py data flags (the module questions) only")
    parser.add_argument("--quiet", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = None if args.quiet else (lambda message: print(message, file=sys.stderr, flush=True))
    data_dir = Path(args.data_dir) if args.data_dir else DEFAULT_DIR
    manifest = ensure_builtin_rlhf(data_dir, log=log)
    if args.print_args:
        print(" ".join(training_args(data_dir, manifest)))
    elif args.print_rl_args:
        print(" ".join(rl_args(data_dir, manifest)))
    else:
        for file_name in FILES:
            print(f"{file_name}: {data_dir / file_name}")
        print(f"{manifest['train_pairs']:,} training and {manifest['test_pairs']:,} test pairs; the longest side "
              f"takes {manifest['max_tokens']} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
