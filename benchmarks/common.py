"""Shared helpers of the benchmark scripts: process isolation, timing, tables, results.

Every benchmark measures each case in a fresh Python process (``run_case``) so
that peak resident memory (``ru_maxrss``) belongs to that case alone, and
writes its numbers to ``benchmarks/results/<name>.json`` next to a PNG plot.
The measurement discipline every script follows (``run_rounds``, ``LoadWatch``):
the load average is printed at the start and the end (a ratio measured while
other jobs ran is orientation only), the implementations or cases alternate
within each round, each round is a fresh process per case, tables report
medians over the rounds, and the results JSON keeps every run.
OpenMP is told to wait passively before torch is imported: with spinning
threads a small step on this shared 2-core machine runs several times slower.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BENCH_DIR = Path(__file__).resolve().parent
# Tests point this elsewhere so smoke runs never touch the committed plots.
RESULTS_DIR = Path(os.environ.get("PERCEIVER_AR_BENCH_RESULTS", BENCH_DIR / "results"))
CASE_MARK = "@@CASE@@"  # prefixes the one stdout line a case process reports


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def set_threads(threads: int) -> int:
    import torch

    torch.set_num_threads(threads)
    return torch.get_num_threads()


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def timed_blocks(fn: Callable[[], Any], repeats: int, min_block_s: float = 0.0) -> tuple[list[float], int]:
    """Seconds per call of ``fn``, from ``repeats`` timed blocks of k calls each, after a warm-up call.

    k is 1 unless one call takes less than ``min_block_s`` (small models): then
    each block runs enough calls to last about that long, so timer resolution
    and a single scheduler hiccup weigh less. Returns (times, k).
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    k = 1 if first >= min_block_s else max(1, int(min_block_s / max(first, 1e-6)))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        times.append((time.perf_counter() - t0) / k)
    return times, k


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# ----------------------------------------------------------------------------
# Measurement discipline: load average, alternating rounds of fresh processes
# ----------------------------------------------------------------------------


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (runnable processes; 2 cores here)."""
    return [round(x, 2) for x in os.getloadavg()]


class LoadWatch:
    """Prints the load average when a benchmark starts and ends and keeps both for its JSON.

    A load above the number of cores means other jobs competed for them: the
    ratios measured side by side still hold roughly, absolute times do not.
    """

    def __init__(self, name: str):
        self.name = name
        self.start = load_average()
        self.end: list[float] | None = None
        print(f"{name}: load average at start {self._fmt(self.start)} ({os.cpu_count()} cores)", flush=True)

    @staticmethod
    def _fmt(load: list[float]) -> str:
        return " / ".join(f"{x:.2f}" for x in load)

    def finish(self) -> dict[str, Any]:
        self.end = load_average()
        print(f"{self.name}: load average at end {self._fmt(self.end)}", flush=True)
        return {"load_average_start": self.start, "load_average_end": self.end, "cores": os.cpu_count()}


def alternating(names: Sequence[str], round_index: int) -> list[str]:
    """The order of round ``round_index``: rotated by one each round, so nobody always goes first."""
    names = list(names)
    if not names:
        return names
    r = round_index % len(names)
    return names[r:] + names[:r]


def run_rounds(
    script: str | Path,
    cases: dict[str, dict[str, Any]],
    rounds: int,
    *,
    python: Callable[[str], str] | None = None,
    src: Callable[[str], str | None] | None = None,
    inline: Callable[[str], Callable[[dict[str, Any]], dict[str, Any]] | None] | None = None,
    timeout: float = 3600.0,
    memory_limit_mb: float | None = None,
    describe: Callable[[str, dict[str, Any]], str] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run every case once per round, each in a fresh process, alternating the order.

    Returns every run of every case (failed runs as ``{"error": ...}``), in
    the order they ran. ``python`` and ``src`` name the interpreter and the
    source tree of a case by its name (ports run in their own environment, a
    patched tree of this library first on the path); ``inline`` gives, by name,
    the function that runs a case in this process instead (``--quick``), or None.
    """
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    for r in range(rounds):
        for name in alternating(list(cases), r):
            res = run_case(
                script,
                cases[name],
                python=python(name) if python else sys.executable,
                timeout=timeout,
                memory_limit_mb=memory_limit_mb,
                inline=inline(name) if inline else None,
                src=src(name) if src else None,
            )
            res["round"] = r + 1
            runs[name].append(res)
            msg = res.get("error") or (describe(name, res) if describe else "ok")
            print(f"round {r + 1}/{rounds} {name}: {msg}", flush=True)
    return runs


def ok_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r]


def median_of(runs: Sequence[dict[str, Any]], key: str) -> float | None:
    """The median of ``key`` over the runs that have it (None if none has)."""
    xs = [r[key] for r in runs if "error" not in r and r.get(key) is not None]
    return median(xs) if xs else None


def matvec_bandwidth(size: int, repeats: int) -> dict[str, Any]:
    """Memory bandwidth as a large fp32 matrix-vector product reads it: 4 size^2 bytes per product.

    The matrix (1 GiB at size 16384) is far larger than any cache here, so
    every product streams it from memory once, as a decode step streams the
    weights. Run in its own process like the other cases.
    """
    import torch

    a = torch.randn(size, size)
    x = torch.randn(size)
    times = timed(lambda: torch.mv(a, x), repeats=repeats, warmup=2)
    return {"gb_per_s": 4 * size * size / median(times) / 1e9, "times": times, "size": size}


def report_case(result: dict[str, Any]) -> None:
    """Called inside a case process: hand its result back to the parent."""
    result.setdefault("peak_rss_mb", peak_rss_mb())
    print(CASE_MARK + json.dumps(result), flush=True)


def script_main(run_one: Callable[[dict[str, Any]], dict[str, Any]], main: Callable[[], int | None]) -> None:
    """A benchmark's entry point: the one case given by ``--case`` (in its fresh process), else ``main``."""
    case = case_argument()
    if case is not None:
        report_case(run_one(case))
    else:
        sys.exit(main())


def run_case(
    script: str | Path,
    case: dict[str, Any],
    python: str = sys.executable,
    timeout: float = 3600.0,
    memory_limit_mb: float | None = None,
    extra_args: Sequence[str] = (),
    inline: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    src: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``python script --case JSON`` in a fresh process and return its report.

    A case that crashes, grows past ``memory_limit_mb`` of resident memory
    (polled every 0.2 s, then killed) or times out comes back as
    ``{"error": ...}`` so the caller can say where a model stops fitting.
    ``inline`` runs the case in this process instead (``--quick`` smoke
    tests: no torch start-up per case, memory numbers meaningless). ``src``
    puts another source tree of the library first on the path (for example
    one with a proposed patch applied). ``env`` adds to (or overrides) the
    case's environment, which otherwise is this one with ``OMP_WAIT_POLICY=PASSIVE``.
    """
    if inline is not None:
        result = inline(case)
        result.setdefault("peak_rss_mb", peak_rss_mb())
        return result
    cmd = [python, str(script), *extra_args, "--case", json.dumps(case)]
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **(env or {})}
    paths = (src or "", str(BENCH_DIR), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    t0 = time.monotonic()
    killed = None
    while proc.poll() is None:
        time.sleep(0.2)
        if time.monotonic() - t0 > timeout:
            killed = f"timed out after {timeout:.0f} s"
        elif memory_limit_mb is not None and _rss_of(proc.pid) > memory_limit_mb:
            killed = f"does not fit: over {memory_limit_mb / 1024:.0f} GB resident"
        if killed:
            proc.kill()
            break
    stdout, stderr = proc.communicate()
    if killed:
        return {"error": killed}
    for line in stdout.splitlines():
        if line.startswith(CASE_MARK):
            return json.loads(line[len(CASE_MARK) :])
    tail = " | ".join((stderr or stdout).strip().splitlines()[-3:])[-300:]
    return {"error": f"failed (exit {proc.returncode}): {tail}"}


def _rss_of(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def machine_info(threads: int) -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def format_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` holds (key, header, format) triples."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, fmt in columns:
            v = row.get(key)
            line.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    out = [" | ".join(c.rjust(w) for c, w in zip(r, widths, strict=False)) for r in cells]
    out.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(out)


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---:" for _ in columns) + "|"
    body = []
    for row in rows:
        vals = []
        for key, _, fmt in columns:
            v = row.get(key)
            vals.append("-" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(vals) + " |")
    return "\n".join([head, sep, *body])


def save_results(name: str, payload: dict[str, Any], out_dir: Path | None = None) -> Path:
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def report_table(
    name: str,
    title: str,
    rows: list[dict[str, Any]],
    columns: list[tuple[str, str, str]],
    payload: dict[str, Any],
) -> Path:
    """Print ``title`` and the table of ``rows``; save ``payload`` with the rows and their markdown table."""
    print(f"\n{title}")
    print(format_table(rows, columns))
    return save_results(name, {**payload, "rows": rows, "markdown": markdown_table(rows, columns)})


def grouped_bars(
    ax: Any,
    rows: list[dict[str, Any]],
    group: Callable[[dict[str, Any]], Any],
    series: Callable[[dict[str, Any]], Any],
    value: str,
    label: Callable[[Any], str] = str,
    note: Callable[[dict[str, Any]], str | None] | None = None,
) -> list[Any]:
    """Bars of ``row[value]``: a cluster per ``group(row)``, a colour per ``series(row)``, first-seen order.

    Rows without ``value`` leave a gap; ``note(row)``, where given and not
    None, is written above that row's bar. Returns the groups (the x
    positions 0, 1, ...).
    """
    groups = list(dict.fromkeys(group(r) for r in rows))
    names = list(dict.fromkeys(series(r) for r in rows))
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        drawn = [r for r in rows if series(r) == name and value in r]
        if not drawn:
            continue
        offset = width * (j - (len(names) - 1) / 2)
        xs = [groups.index(group(r)) + offset for r in drawn]
        ax.bar(xs, [r[value] for r in drawn], width=width, color=f"C{j}", label=label(name))
        for x, r in zip(xs, drawn, strict=True):
            text = note(r) if note else None
            if text:
                ax.annotate(text, (x, r[value]), ha="center", va="bottom", fontsize=7)
    return groups


def new_figure(**kwargs: Any):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(**kwargs)


def save_figure(fig: Any, name: str, out_dir: Path | None = None, tight: bool = True) -> Path:
    """``fig`` as ``<name>.png`` in the results folder; ``tight=False`` keeps the caller's layout."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ----------------------------------------------------------------------------
# A training step of this library, shared by the benchmarks
# ----------------------------------------------------------------------------


def build_model(overrides: dict[str, Any], seed: int = 0):
    import torch

    from perceiver_ar.config import PerceiverARConfig
    from perceiver_ar.model import PerceiverAR

    torch.manual_seed(seed)
    return PerceiverAR(PerceiverARConfig(**overrides))


def random_batch(batch: int, length: int, vocab: int = 259, seed: int = 0):
    """Full rows of random data tokens, inputs and next-token targets [B, T]."""
    import torch

    g = torch.Generator().manual_seed(seed)
    events = torch.randint(3, vocab, (batch, length + 1), generator=g)
    return events[:, :-1], events[:, 1:]


def make_train_step(model, inputs, targets, num_latents: int | None = None, lr: float = 1e-4):
    """A closure running forward, loss, backward and one AdamW step."""
    import torch

    from perceiver_ar.loss import perceiver_ar_loss

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)  # as the trainer's

    def step() -> float:
        out = model(inputs, num_latents=num_latents)
        loss = perceiver_ar_loss(out.logits, targets, out.latent_index).mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def make_forward(model, inputs, num_latents: int | None = None):
    import torch

    model.eval()

    def forward() -> None:
        with torch.no_grad():
            model(inputs, num_latents=num_latents)

    return forward


def case_argument(argv: list[str] | None = None) -> dict[str, Any] | None:
    """The ``--case JSON`` argument when this process is a case runner, else None."""
    argv = sys.argv[1:] if argv is None else argv
    if "--case" in argv:
        return json.loads(argv[argv.index("--case") + 1])
    return None
