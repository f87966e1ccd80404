#!/usr/bin/env bash
# Issue 20's measurement (hitless upgrade), one outrelay-bench command:
#
#   upgrade  the upgrade scenario on the SNI path and a TCP lease (HAProxy: its SNI and TCP
#            frontends): per round, target and path an open-loop connection load (connect,
#            ClientHello, 1 KiB reply, close) at half of the maximum a short connrate run of
#            the same target measured (or RATE), 3 s before the hand-over, the hand-over, 5 s
#            after it ended: probes, refused, failed, first-byte p50/p99 before and during
#            (the second after it began) and the p99 bump, the hand-over's duration; for
#            outrelay also the time until the relay's admin socket counts every agent on the
#            new process and the UDP datagrams lost (one every millisecond through a UDP
#            lease). Targets: haproxy (master-worker, expose-fd listeners, kill -USR2: the
#            seamless reload), haproxy-classic (haproxy -sf without a hand-over) and outrelay
#            (outrelay-relay upgrade).
#
# Writes OUT/upgrade.md (the Markdown table), OUT/upgrade.json (every sample, for re-analysis)
# and OUT/upgrade.log (progress, with the first failed probes' reasons), then prints the table.
#
# Usage:
#   bench/issue20.sh run OUT
#
# Knobs (environment): ROUNDS (3), RATE (unset: half of the measured maximum; else conn/s
# per path), TARGETS (haproxy,haproxy-classic,outrelay), PATHS (sni,tcp), PIN_TARGETS /
# PIN_LOAD (unset: no pinning; taskset lists, e.g. on the 16-core device PIN_TARGETS=0-11
# PIN_LOAD=12-15).
#
# The outrelay rows need a relay with the `upgrade` command (issue 20); with an older build
# they say so ("failed: … has no `upgrade` command").
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cargo build --release -q -p outrelay-relay -p outrelay-agent -p outrelay-cli -p outrelay-bench

rounds=${ROUNDS:-3}
targets=${TARGETS:-haproxy,haproxy-classic,outrelay}
paths=${PATHS:-sni,tcp}
bench="$CARGO_TARGET_DIR/release/outrelay-bench"

args=(run upgrade --targets "$targets" --paths "$paths" --rounds "$rounds")
if [ -n "${RATE:-}" ]; then
    args+=(--rate "$RATE")
fi
if [ -n "${PIN_TARGETS:-}" ]; then
    args+=(--pin-targets "$PIN_TARGETS")
fi
if [ -n "${PIN_LOAD:-}" ]; then
    args+=(--pin-load "$PIN_LOAD")
fi

start=$SECONDS
echo "issue20: upgrade: outrelay-bench ${args[*]}" >&2
"$bench" "${args[@]}" --json "$out/upgrade.json" >"$out/upgrade.md" 2>"$out/upgrade.log"
echo "issue20: upgrade done in $((SECONDS - start)) s; $out/upgrade.{md,json,log}" >&2
cat "$out/upgrade.md"
