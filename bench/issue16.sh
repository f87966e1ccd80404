#!/usr/bin/env bash
# Issue 16's measurements, one outrelay-bench command per table, run in sequence:
#
#   p3         connrate, SNI path and TCP lease, against haproxy, haproxy-chain, nginx, rathole
#   p3-pinned  the same with every target process on PIN_TARGETS and the load on PIN_LOAD:
#              conn/s per target core
#   p4         latency, 64 B ping-pong, added over direct
#   p1         bulk through a TCP lease, outrelay against outrelay-base (same run)
#   p2         bulk-sni through the SNI path, outrelay against outrelay-base (same run)
#   p8         scaling: connrate and bulk with the relay at each of WORKERS worker counts
#
# Each writes OUT/<table>.md (the Markdown table), OUT/<table>.json (every sample) and
# OUT/<table>.log (progress); OUT/issue16.md is all the tables in order.
#
# Usage:
#   bench/issue16.sh save-base DIR   # before the change: copy this tree's release binaries
#                                    # (relay, agent, CLI) into DIR
#   OUTRELAY_BASE_BIN=DIR bench/issue16.sh run OUT
#
# Without OUTRELAY_BASE_BIN the tables have no outrelay-base rows and no x base columns.
#
# Knobs (environment): ROUNDS (5), CONNRATE_S (3), BULK_S (4), CONCURRENCY (32: connrate's
# concurrent connections), ROUND_TRIPS (20000), PIN_TARGETS (0), PIN_LOAD (1), WORKERS (1,2),
# P8_PIN_TARGETS / P8_PIN_LOAD (unset: P8 unpinned; on the 16-core device: WORKERS=1,4,8,14
# P8_PIN_TARGETS=0-13 P8_PIN_LOAD=14-15), ONLY ("p3 p4": a subset of the tables; p8 includes
# p8-bulk), INSTALL_PEERS (1: --install-peers on the first table).
#
# Measured on the shared 2-core box (2026-12-06) at ROUNDS=1: 200 s of tables (p3 45, p3-pinned
# 28, p4 10, p1 44, p2 39, p8 15, p8-bulk 19) plus the build; ROUNDS=5: about 17 minutes plus
# the build.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The outrelay target runs the binaries in <repo>/target/release: build there.
export CARGO_TARGET_DIR="$repo/target"
bins=(outrelay-relay outrelay-agent outrelay)

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 64
}

case "${1:-}" in
save-base)
    dir=${2:?save-base needs a directory}
    mkdir -p "$dir"
    for b in "${bins[@]}"; do
        [ -x "$CARGO_TARGET_DIR/release/$b" ] || {
            echo "issue16: $CARGO_TARGET_DIR/release/$b not built" >&2
            exit 1
        }
        cp "$CARGO_TARGET_DIR/release/$b" "$dir/"
    done
    echo "issue16: base binaries in $dir (commit $(git -C "$repo" rev-parse --short HEAD))"
    echo "issue16: now OUTRELAY_BASE_BIN=$dir bench/issue16.sh run OUT"
    exit 0
    ;;
run) out=${2:?run needs an output directory} ;;
*) usage ;;
esac

rounds=${ROUNDS:-5}
connrate_s=${CONNRATE_S:-3}
bulk_s=${BULK_S:-4}
round_trips=${ROUND_TRIPS:-20000}
concurrency=${CONCURRENCY:-32}
pin_targets=${PIN_TARGETS:-0}
pin_load=${PIN_LOAD:-1}
workers=${WORKERS:-1,2}
only=${ONLY:-p3 p3-pinned p4 p1 p2 p8}
install=()
[ "${INSTALL_PEERS:-1}" = 1 ] && install=(--install-peers)

base=""
if [ -n "${OUTRELAY_BASE_BIN:-}" ]; then
    base=",outrelay-base"
else
    echo "issue16: OUTRELAY_BASE_BIN not set: no before/after comparison" >&2
fi

mkdir -p "$out"
cargo build --release -q -p outrelay-relay -p outrelay-agent -p outrelay-cli -p outrelay-bench
bench="$CARGO_TARGET_DIR/release/outrelay-bench"

# table NAME ARGS...: one outrelay-bench run into OUT/NAME.{md,json,log}, timed (ONLY=p8
# also runs p8-bulk).
table() {
    local name=$1
    shift
    case " $only " in *" ${name%-bulk} "*) ;; *) return 0 ;; esac
    local start=$SECONDS
    echo "issue16: $name: outrelay-bench $*" >&2
    "$bench" "$@" --json "$out/$name.json" >"$out/$name.md" 2>"$out/$name.log"
    echo "issue16: $name done in $((SECONDS - start)) s" >&2
    # Only the first run installs peers.
    install=()
}

# cpu_count LIST: how many CPUs a taskset list names (0-3,6 -> 5).
cpu_count() {
    local n=0 part parts
    IFS=, read -ra parts <<<"$1"
    for part in "${parts[@]}"; do
        if [[ $part == *-* ]]; then
            n=$((n + ${part#*-} - ${part%-*} + 1))
        else
            n=$((n + 1))
        fi
    done
    echo "$n"
}

peers=direct,haproxy,haproxy-chain,nginx,rathole,outrelay
table p3 run connrate --targets "$peers$base" --paths sni,tcp \
    --rounds "$rounds" --duration-s "$connrate_s" --concurrency "$concurrency" \
    "${install[@]}"
# One relay worker per pinned core, said explicitly rather than left to the relay's default.
table p3-pinned run connrate --targets "haproxy,haproxy-chain,rathole,outrelay" \
    --paths sni,tcp --pin-targets "$pin_targets" --pin-load "$pin_load" \
    --relay-workers "$(cpu_count "$pin_targets")" \
    --rounds "$rounds" --duration-s "$connrate_s" --concurrency "$concurrency" \
    "${install[@]}"
table p4 run latency --targets "direct,haproxy,haproxy-chain,rathole,outrelay$base" \
    --rounds "$rounds" --round-trips "$round_trips" "${install[@]}"
table p1 run bulk --targets "direct,haproxy,rathole,outrelay$base" \
    --rounds "$rounds" --duration-s "$bulk_s" "${install[@]}"
table p2 run bulk-sni --targets "direct,haproxy,outrelay$base" \
    --rounds "$rounds" --duration-s "$bulk_s" "${install[@]}"
p8_pin=()
[ -n "${P8_PIN_TARGETS:-}" ] && p8_pin+=(--pin-targets "$P8_PIN_TARGETS")
[ -n "${P8_PIN_LOAD:-}" ] && p8_pin+=(--pin-load "$P8_PIN_LOAD")
table p8 run connrate --targets outrelay --relay-workers "$workers" --paths sni,tcp \
    --rounds "$rounds" --duration-s "$connrate_s" --concurrency "$concurrency" \
    "${p8_pin[@]}" "${install[@]}"
table p8-bulk run bulk --targets outrelay --relay-workers "$workers" \
    --rounds "$rounds" --duration-s "$bulk_s" "${p8_pin[@]}" "${install[@]}"

{
    echo "# Issue 16's run ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    for name in p3 p3-pinned p4 p1 p2 p8 p8-bulk; do
        [ -s "$out/$name.md" ] || continue
        echo "## $name"
        echo
        cat "$out/$name.md"
        echo
    done
} >"$out/issue16.md"
echo "issue16: all tables in $out/issue16.md (${SECONDS} s)" >&2
