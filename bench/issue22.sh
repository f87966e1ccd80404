#!/usr/bin/env bash
# Issue 22's measurements (many relays), one outrelay-bench command:
#
#   p6-relays  the mesh scenario (P6: one bulk stream over QUIC into the consumer agent's
#              listen address, out of the provider agent into the harness's sink) through
#              four targets interleaved in every round:
#                quinn-direct  a plain quinn client -> server transfer (P6's baseline)
#                outrelay      consumer -> relay -> provider (one standalone relay)
#                mesh-forward  consumer -> relay 1 -> FORWARD_STREAM -> relay 2 -> provider:
#                              a real outrelay-controller, both relays enrolled with it
#                              (token + `outrelay-relay enroll`), `[forward]` written out;
#                              relay CPU = both relays' sum
#                fallback      the outrelay mesh with both agents on the TCP/443 fallback
#                              (`[fallback] mode = "only"`)
#              Read "Gbit/s x outrelay" and "CPU per Gbit x outrelay" (forwarded vs single
#              relay, fallback vs QUIC) and "CPU per Gbit x quinn-direct" (P6: within 1.5 x).
#              Each mesh-forward / fallback measurement counts only if a relay counter shows
#              the stream took that path.
#   failover   the failover scenario: a controller, two enrolled relays, provider and
#              consumer agents on both (`ha_connections = 2`, QUIC idle timeout 2000 ms);
#              KILLS times: kill -9 of relay 1 (the consumer's new streams' relay), time
#              until a new stream through the consumer succeeds, relay 1 back on its port;
#              then the same with SIGTERM (GOAWAY, drain). Median (min-max) of each.
#
# Writes OUT/p6-relays.md (the Markdown table), OUT/p6-relays.json (every sample, for
# re-analysis) and OUT/p6-relays.log (progress), the same for OUT/failover.*, and prints the
# tables.
#
# Usage:
#   bench/issue22.sh run OUT
#
# Knobs (environment): ROUNDS (3), DURATION_S (5: seconds of each timed window, after a 1 s
# warm-up; a round takes about 4 x (DURATION_S + 3) s plus mesh-forward's set-up), TARGETS
# (quinn-direct,outrelay,mesh-forward,fallback; add quinn-direct-paced for P6 at equal rate),
# WORKERS (unset: the relay's default worker count), PIN_TARGETS / PIN_LOAD (unset: no
# pinning; taskset lists, e.g. on the 16-core device PIN_TARGETS=0-11 PIN_LOAD=12-15),
# KILLS (10: relay stops of each kind in failover, about 4 s each; 0 skips failover).
set -euo pipefail

# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cargo build --release -q -p outrelay-relay -p outrelay-agent -p outrelay-cli \
    -p outrelay-controller -p outrelay-bench

rounds=${ROUNDS:-3}
duration_s=${DURATION_S:-5}
targets=${TARGETS:-quinn-direct,outrelay,mesh-forward,fallback}
bench="$CARGO_TARGET_DIR/release/outrelay-bench"

args=(run mesh --targets "$targets" --rounds "$rounds" --duration-s "$duration_s")
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
echo "issue22: p6-relays: outrelay-bench ${args[*]}" >&2
"$bench" "${args[@]}" --json "$out/p6-relays.json" >"$out/p6-relays.md" 2>"$out/p6-relays.log"
echo "issue22: p6-relays done in $((SECONDS - start)) s; $out/p6-relays.{md,json,log}" >&2
cat "$out/p6-relays.md"

kills=${KILLS:-10}
if [ "$kills" -gt 0 ]; then
    fargs=(run failover --targets outrelay --rounds 1 --kills "$kills")
    if [ -n "${PIN_TARGETS:-}" ]; then
        fargs+=(--pin-targets "$PIN_TARGETS")
    fi
    if [ -n "${PIN_LOAD:-}" ]; then
        fargs+=(--pin-load "$PIN_LOAD")
    fi
    start=$SECONDS
    echo "issue22: failover: outrelay-bench ${fargs[*]}" >&2
    "$bench" "${fargs[@]}" --json "$out/failover.json" >"$out/failover.md" 2>"$out/failover.log"
    echo "issue22: failover done in $((SECONDS - start)) s; $out/failover.{md,json,log}" >&2
    cat "$out/failover.md"
fi
