#!/usr/bin/env bash
# Issue 17's measurements (eBPF steering), one outrelay-bench command per table, in sequence:
#
#   l1         leases: a LEASE_PORTS-port lease range (10,000) leased on every port, TCP leases
#              and TCP+UDP leases, relay with [ebpf] mode = "off" against lookup = true:
#              relay fds, RSS, sockets and slab per lease; GRANTS leases (200) timed from
#              LEASE_GRANT to the first accepted connect. A setup whose listeners would pass
#              the relay's open-file limit stops at the largest count that fits and
#              extrapolates (fds at 10k).
#   r1         connrate through the SNI path, relay with WORKERS workers, [ebpf] off against
#              reuseport = true (EBPF, same rounds): conn/s, first-byte p99, relay CPU per
#              connection, each also x the first setup
#   r1-pinned  the same with the relay on PIN_TARGETS and the load on PIN_LOAD (only when
#              both are set: on 2 cores there is nothing to pin to)
#   r2         connrate through a TCP lease, [ebpf] off against lookup = true: the lease
#              connections through the per-worker sk_lookup sockets
#
# Each writes OUT/<table>.md (the Markdown table), OUT/<table>.json (every sample) and
# OUT/<table>.log (progress); OUT/issue17.md is all the tables in order.
#
# Usage:
#   bench/issue17.sh run OUT
#
# Everything runs in a network namespace of its own (unshare -n, loopback up) when NETNS=1 (the
# default; needs root): the sk_lookup program attaches to the namespace, so nothing else on the
# box (other relays, their tests) shares its lease range, and /proc/net/sockstat counts only
# this run's sockets. NETNS=0 runs in the caller's namespace.
#
# Knobs (environment): ROUNDS (3), WORKERS (2: relay workers of every table), LEASE_PORTS
# (10000), GRANTS (200), CONNRATE_S (3), CONCURRENCY (32), EBPF (off,reuseport: r1's setups,
# the first is the reference), PIN_TARGETS / PIN_LOAD (unset: no r1-pinned; on the 16-core
# device: WORKERS=14 PIN_TARGETS=0-13 PIN_LOAD=14-15), ONLY ("l1 r1": a subset of the tables),
# NETNS (1).
#
# Measured on the shared 2-core box (2026-12-06) at ROUNDS=3: 622 s of tables (l1 576, r1 23,
# r2 23) plus the build; figures in docs/benchmarks.md, "Issue 17".
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The outrelay target runs the binaries in <repo>/target/release: build there.
export CARGO_TARGET_DIR="$repo/target"

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 64
}

case "${1:-}" in
run) out=${2:?run needs an output directory} ;;
*) usage ;;
esac

if [ "${ISSUE17_IN_NETNS:-0}" != 1 ]; then
    mkdir -p "$out"
    out=$(cd "$out" && pwd)
    cargo build --release -q -p outrelay-relay -p outrelay-agent -p outrelay-cli -p outrelay-bench
    if [ "${NETNS:-1}" = 1 ]; then
        echo "issue17: into a network namespace of its own (NETNS=0: stay here)" >&2
        exec unshare -n env ISSUE17_IN_NETNS=1 "$0" run "$out"
    fi
else
    ip link set lo up
fi

rounds=${ROUNDS:-3}
workers=${WORKERS:-2}
lease_ports=${LEASE_PORTS:-10000}
grants=${GRANTS:-200}
connrate_s=${CONNRATE_S:-3}
concurrency=${CONCURRENCY:-32}
ebpf=${EBPF:-off,reuseport}
only=${ONLY:-l1 r1 r1-pinned r2}
bench="$CARGO_TARGET_DIR/release/outrelay-bench"
mkdir -p "$out"

# table NAME ARGS...: one outrelay-bench run into OUT/NAME.{md,json,log}, timed.
table() {
    local name=$1
    shift
    case " $only " in *" $name "*) ;; *) return 0 ;; esac
    local start=$SECONDS
    echo "issue17: $name: outrelay-bench $*" >&2
    "$bench" "$@" --json "$out/$name.json" >"$out/$name.md" 2>"$out/$name.log"
    echo "issue17: $name done in $((SECONDS - start)) s" >&2
}

table l1 run leases --relay-workers "$workers" --relay-ebpf off,lookup \
    --lease-ports "$lease_ports" --grants "$grants" --rounds "$rounds"
table r1 run connrate --targets outrelay --paths sni --relay-workers "$workers" \
    --relay-ebpf "$ebpf" --rounds "$rounds" --duration-s "$connrate_s" \
    --concurrency "$concurrency"
if [ -n "${PIN_TARGETS:-}" ] && [ -n "${PIN_LOAD:-}" ]; then
    table r1-pinned run connrate --targets outrelay --paths sni --relay-workers "$workers" \
        --relay-ebpf "$ebpf" --pin-targets "$PIN_TARGETS" --pin-load "$PIN_LOAD" \
        --rounds "$rounds" --duration-s "$connrate_s" --concurrency "$concurrency"
fi
table r2 run connrate --targets outrelay --paths tcp --relay-workers "$workers" \
    --relay-ebpf off,lookup --rounds "$rounds" --duration-s "$connrate_s" \
    --concurrency "$concurrency"

{
    echo "# Issue 17's run ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    for name in l1 r1 r1-pinned r2; do
        [ -s "$out/$name.md" ] || continue
        echo "## $name"
        echo
        cat "$out/$name.md"
        echo
    done
} >"$out/issue17.md"
echo "issue17: all tables in $out/issue17.md (${SECONDS} s)" >&2
