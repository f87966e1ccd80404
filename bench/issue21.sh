#!/usr/bin/env bash
# Issue 21's measurements (bandwidth limits), two outrelay-bench runs:
#
#   overhead  P1 (bulk: iperf3 through a TCP lease) and P2 (bulk-sni: through the :443 SNI
#             path), 1 and 8 streams, each round with the relay's `[bandwidth]` lease and
#             tenant limits off and set to a rate never reached (NOT_REACHED, 1tbit): every
#             byte then takes tokens from two buckets per direction. Read the "x first setup"
#             columns: Gbit/s and Gbit/s per relay core with the limit over without it
#             (target: within 5 %).
#   tracking  P1 with the limit set to each of RATES (10mbit,100mbit,1gbit,10gbit): the
#             achieved rate (iperf3 receiver, median over the rounds) against the limit.
#             Writes OUT/tracking-summary.md: limit, streams, achieved, achieved / limit.
#
# Writes OUT/<run>.md (the table), OUT/<run>.json (every sample) and OUT/<run>.log, then
# prints the tables.
#
# Usage:
#   bench/issue21.sh run OUT [overhead|tracking]...   (default: both)
#
# Knobs (environment): ROUNDS (5 overhead, 3 tracking), DURATION_S (10), NOT_REACHED (1tbit),
# RATES (10mbit,100mbit,1gbit,10gbit), WORKERS (relay workers; unset: the relay's default),
# PIN_TARGETS / PIN_LOAD (taskset lists, e.g. on the 16-core device PIN_TARGETS=0-11
# PIN_LOAD=12-15).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CARGO_TARGET_DIR="$repo/target"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 64
}

case "${1:-}" in
run) out=${2:?run needs an output directory} ;;
*) usage ;;
esac
shift 2
runs=("$@")
[ ${#runs[@]} -gt 0 ] || runs=(overhead tracking)

mkdir -p "$out"
out=$(cd "$out" && pwd)
cargo build --release -q -p outrelay-relay -p outrelay-agent -p outrelay-cli -p outrelay-bench
bench="$CARGO_TARGET_DIR/release/outrelay-bench"
duration_s=${DURATION_S:-10}

common=(--targets outrelay --duration-s "$duration_s")
if [ -n "${WORKERS:-}" ]; then
    common+=(--relay-workers "$WORKERS")
fi
if [ -n "${PIN_TARGETS:-}" ]; then
    common+=(--pin-targets "$PIN_TARGETS")
fi
if [ -n "${PIN_LOAD:-}" ]; then
    common+=(--pin-load "$PIN_LOAD")
fi

one() { # one NAME SCENARIO ARGS...: one outrelay-bench run into OUT/NAME.{md,json,log}
    local name=$1 scenario=$2 start=$SECONDS
    shift 2
    echo "issue21: $name: outrelay-bench run $scenario ${common[*]} $*" >&2
    "$bench" run "$scenario" "${common[@]}" "$@" --json "$out/$name.json" \
        >"$out/$name.md" 2>"$out/$name.log"
    echo "issue21: $name done in $((SECONDS - start)) s; $out/$name.{md,json,log}" >&2
    cat "$out/$name.md"
}

for run in "${runs[@]}"; do
    case "$run" in
    overhead)
        bw="off,${NOT_REACHED:-1tbit}"
        one overhead-p1 bulk --relay-bandwidth "$bw" --rounds "${ROUNDS:-5}"
        one overhead-p2 bulk-sni --relay-bandwidth "$bw" --rounds "${ROUNDS:-5}"
        ;;
    tracking)
        one tracking bulk --relay-bandwidth "${RATES:-10mbit,100mbit,1gbit,10gbit}" \
            --rounds "${ROUNDS:-3}"
        python3 - "$out/tracking.json" >"$out/tracking-summary.md" <<'PY'
import json, statistics, sys
doc = json.load(open(sys.argv[1]))
units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
def limit_bps(setup):
    bw = [p for p in setup.split() if p.startswith("bw=")][0][3:]
    return float(bw[:-4]) * units[bw[-4]] if bw[-4] in units else float(bw[:-3])
rows = {}
for s in doc["result"]["samples"]:
    if "gbps" in s["metrics"]:
        rows.setdefault((s["setup"], s["variant"]), []).append(s["metrics"]["gbps"] * 1e9)
print("| limit | variant | achieved Mbit/s (median) | min-max | achieved / limit |")
print("|---|---|---|---|---|")
for (setup, variant), v in sorted(rows.items(), key=lambda kv: (limit_bps(kv[0][0]), kv[0][1])):
    lim, med = limit_bps(setup), statistics.median(v)
    print(f"| {setup.split('bw=')[1]} | {variant} | {med/1e6:.1f} | {min(v)/1e6:.1f}-{max(v)/1e6:.1f} | {med/lim:.3f} |")
PY
        cat "$out/tracking-summary.md"
        ;;
    *) usage ;;
    esac
done
