#!/usr/bin/env bash
# Issue 19's measurement (stream resume), one outrelay-bench command:
#
#   p6-resume  the mesh scenario (P6: one bulk stream over QUIC, consumer agent -> relay ->
#              provider agent -> sink) with both agents' [resume] enabled = false and
#              enabled = true, interleaved in every round as setups resume=off and resume=on:
#              Gbit/s, relay CPU s per Gbit and the agents' CPU s per Gbit per setup, each
#              also x the first setup (resume=off by default, so the resume=on row's
#              "x first setup" columns are on / off; the issue's target: within 5 %).
#
# Writes OUT/p6-resume.md (the Markdown table), OUT/p6-resume.json (every sample, for
# re-analysis) and OUT/p6-resume.log (progress), then prints the table.
#
# Usage:
#   bench/issue19.sh run OUT
#
# Knobs (environment): ROUNDS (5), DURATION_S (10: seconds of each timed window, after a 1 s
# warm-up), RESUME (off,on: the setups in run order, the first is the reference), TARGETS
# (outrelay; quinn-direct,outrelay adds P6's ratio to plain quinn; outrelay,outrelay-base with
# OUTRELAY_BASE_BIN set measures a base build too), WORKERS (unset: the relay's default worker
# count), PIN_TARGETS / PIN_LOAD (unset: no pinning; taskset lists, e.g. on the 16-core device
# PIN_TARGETS=0-11 PIN_LOAD=12-15).
#
# The figures mean something only with a relay that offers resume: with one that does not,
# resume=on agents fall back to plain streams and both setups measure the same path.
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cargo build --release -q -p outrelay-relay -p outrelay-agent -p outrelay-cli -p outrelay-bench

rounds=${ROUNDS:-5}
duration_s=${DURATION_S:-10}
resume=${RESUME:-off,on}
targets=${TARGETS:-outrelay}
bench="$CARGO_TARGET_DIR/release/outrelay-bench"

args=(run mesh --targets "$targets" --agent-resume "$resume" --rounds "$rounds"
    --duration-s "$duration_s")
if [ -n "${WORKERS:-}" ]; then
    args+=(--relay-workers "$WORKERS")
fi
if [ -n "${PIN_TARGETS:-}" ]; then
    args+=(--pin-targets "$PIN_TARGETS")
fi
if [ -n "${PIN_LOAD:-}" ]; then
    args+=(--pin-load "$PIN_LOAD")
fi

start=$SECONDS
echo "issue19: p6-resume: outrelay-bench ${args[*]}" >&2
"$bench" "${args[@]}" --json "$out/p6-resume.json" >"$out/p6-resume.md" 2>"$out/p6-resume.log"
echo "issue19: p6-resume done in $((SECONDS - start)) s; $out/p6-resume.{md,json,log}" >&2
cat "$out/p6-resume.md"
