"""Preprocessing throughput (1 and 2 workers) and GPTDataset index build time on the built-in
corpus.

    python bench/preprocess.py [--variant full|small] [--samples 1000000] [--seq-length 1024]

Prints a table and writes JSON (default bench/results/preprocess.json).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import numpy as np  # noqa: E402

from megatron.core.datasets.gpt_dataset import build_sample_indices  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.datasets.preprocessing import PreprocessConfig, preprocess  # noqa: E402
from megatron.core.tokenizers.tokenizer import TokenizerConfig  # noqa: E402
from bench.common import RESULTS, run_meta, save_results  # noqa: E402
from tools.builtin_corpus import ensure_builtin_corpus  # noqa: E402


def bench_preprocess(corpus, workers: int, scratch: str) -> dict:
    tokenizer = TokenizerConfig(tokenizer_type="SentencePieceTokenizer", tokenizer_model=str(corpus.tokenizer_model))
    result = preprocess(PreprocessConfig(input=str(corpus.corpus_jsonl), output_prefix=f"{scratch}/w{workers}",
                                         tokenizer=tokenizer, append_eod=True, workers=workers, show_progress=False))
    return {"workers": workers, "documents": result.num_documents, "tokens": result.num_tokens,
            "seconds": result.seconds, "documents_per_s": result.documents_per_second,
            "tokens_per_s": result.tokens_per_second}


def bench_indices(corpus, samples: int, seq_length: int) -> dict:
    dataset = IndexedDataset(corpus.data_prefix)
    started = time.perf_counter()
    build_sample_indices(dataset.sequence_lengths, np.arange(len(dataset)), samples, seq_length, seed=1234)
    return {"samples": samples, "seq_length": seq_length, "documents": len(dataset),
            "seconds": time.perf_counter() - started}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="full", choices=["full", "small"])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    corpus = ensure_builtin_corpus(variant=args.variant)
    rows = []
    print("| workers | documents | tokens | seconds | documents/s | tokens/s |\n|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        for workers in (1, 2):
            row = bench_preprocess(corpus, workers, scratch)
            rows.append(row)
            print(f"| {workers} | {row['documents']:,} | {row['tokens']:,} | {row['seconds']:.2f} | "
                  f"{row['documents_per_s']:,.0f} | {row['tokens_per_s']:,.0f} |", flush=True)
    indices = bench_indices(corpus, args.samples, args.seq_length)
    print(f"\nGPTDataset indices, {indices['samples']:,} samples of {indices['seq_length']} tokens over "
          f"{indices['documents']:,} documents: {indices['seconds']:.2f} s")
    meta = run_meta("preprocess.py", argv, variant=args.variant)
    save_results(args.out or RESULTS / "preprocess.json", meta, preprocess=rows, indices=indices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
