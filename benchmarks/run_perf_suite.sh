#!/usr/bin/env bash
# Every measurement of the performance issue in one command, for a QUIET machine.
#
# Run it alone: with other jobs on the cores, times and ratios drift (every
# script prints the load average at its start and end, and the summary keeps them).
#
#   bench_ports.py --compile --extra-src before=<tree of $BEFORE>
#       training tokens/s at N=256/M=64/D=64/L=2/B=2, N=1024/M=256/D=256/L=4/B=4,
#       N=4096/M=512/D=512/L=6/B=2, N=16384/M=1024/B=1 and the demo preset
#       (N=256/M=128/D=128/L=4/B=16): this library, the same library before the
#       performance work, perceiver-ar-pytorch and perceiver-io; greedy decoding at
#       N=1024 (prompt 769, 255 new), N=4096 (prompt 3840, 256 new) and N=16384
#       (prompt 16352, 32 new), prefill and decode apart, this library also with
#       the compiled step, bytes read per token, achieved GB/s and the machine's
#       bandwidth (a large matrix-vector product timed in the same run)
#   bench_vs_decoder.py
#       training step and peak memory, Perceiver AR (M=1024) against this library
#       with M=N and against the plain decoder (plain_decoder.py), N=1k..131k
#   bench_flops.py
#       achieved FLOP/s of a training step as a fraction of the measured fp32
#       matmul peak (N=4096/M=512/B=2, N=16384/M=1024/B=1, decoder-only N=4096)
#
# Each case runs in a fresh process, implementations alternate, medians of 3
# rounds; every run is kept in the JSON. Everything goes to $OUT (default
# benchmarks/results/perf_suite-<UTC time>): each script's JSON and PNG, its
# log, and perf_suite.md (every table, the load averages, the commands).
#
#   benchmarks/run_perf_suite.sh            # about 3 hours on the 2-core machine
#   BEFORE=<commit> OUT=<dir> benchmarks/run_perf_suite.sh
#   benchmarks/run_perf_suite.sh --quick    # the same pipeline at toy sizes (minutes): does it work?
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PY:-$ROOT/.venv/bin/python}
# The tree measured as "before": main just before the performance work landed.
BEFORE=${BEFORE:-a97d3c0}
QUICK=()
if [[ ${1:-} == "--quick" ]]; then
    QUICK=(--quick)
fi
OUT=${OUT:-$ROOT/benchmarks/results/perf_suite-$(date -u +%Y%m%dT%H%MZ)${QUICK:+-quick}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PERCEIVER_AR_BENCH_RESULTS=$OUT OMP_WAIT_POLICY=PASSIVE

if [[ ${#QUICK[@]} -eq 0 ]]; then
    echo "expected run time: about 3 hours (bench_ports ~100 min, bench_vs_decoder ~60 min, bench_flops ~8 min)"
    PORTS_ARGS=(--compile)
else
    echo "expected run time: a few minutes (--quick: toy sizes, one round)"
    PORTS_ARGS=(--compile --with-ports)
fi
echo "results: $OUT"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
if [[ ! -x benchmarks/.env-ports/bin/python ]]; then
    benchmarks/setup_ports.sh
fi

# The "before" tree: its src/ only, from git, measured side by side by bench_ports.
TREE=$(mktemp -d)
trap 'rm -rf "$TREE"' EXIT
git archive "$BEFORE" src | tar -x -C "$TREE"

run() {  # run NAME ARGS...: one script, its output to the terminal and to $OUT/NAME.log
    local name=$1
    shift
    echo "== $name $*"
    "$PY" "benchmarks/$name.py" "$@" 2>&1 | tee "$OUT/$name.log"
}
run bench_ports "${QUICK[@]}" "${PORTS_ARGS[@]}" --extra-src "before=$TREE/src"
run bench_vs_decoder "${QUICK[@]}"
run bench_flops "${QUICK[@]}"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" - "$OUT" "$BEFORE" "$(git rev-parse --short HEAD)" <<'PY'
"""perf_suite.md: every table of the run, with its load averages and command."""
import json
import sys
from pathlib import Path

out, before, head = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
lines = [f"# Performance suite ({head}; 'before' is {before})", ""]
for path in sorted(out.glob("*.json")):
    data = json.loads(path.read_text())
    machine = data.get("machine", {})
    lines += [f"## {path.stem}", ""]
    lines.append(
        f"load average {data.get('load_average_start')} -> {data.get('load_average_end')} "
        f"({data.get('cores')} cores); {machine.get('cpu')}, {machine.get('threads')} threads, "
        f"torch {machine.get('torch')}"
    )
    if data.get("bandwidth_gb_s"):
        lines.append(f"memory bandwidth (fp32 matrix-vector product): {data['bandwidth_gb_s']:.1f} GB/s")
    if data.get("matmul_peak_gflops"):
        lines.append(f"fp32 matmul peak runs (GFLOP/s): {data['matmul_peak_gflops']}")
    lines.append("")
    for key in sorted(k for k in data if k.startswith("markdown")):
        if data[key]:
            lines += [f"### {key.removeprefix('markdown').strip('_') or 'table'}", "", data[key], ""]
(out / "perf_suite.md").write_text("\n".join(lines) + "\n")
print(f"wrote {out / 'perf_suite.md'}")
PY
