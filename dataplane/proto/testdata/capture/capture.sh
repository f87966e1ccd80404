#!/usr/bin/env bash
# README: regenerates ../client_hello/*.bin (real ClientHello first flights from rustls,
# openssl, curl and, if installed, chromium; all traffic stays on 127.0.0.1) and MANIFEST.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=$here/../client_hello
name=demo.outrelay.test
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
manifest=("# <file> sni= alpn= ech= records=   (regenerate with capture/capture.sh)")

note() { # note FILE TOOL...: MANIFEST comment + data line for FILE
    manifest+=("# $1: ${*:2}, $(stat -c %s "$out/$1") bytes" "$(python3 "$here/hello.py" describe "$out/$1")")
}

capture() { # capture FILE CMD: run shell command CMD (sees $PORT) against a one-shot listener
    timeout 60 python3 "$here/hello.py" listen "$out/$1" >"$tmp/port" &
    local pid=$!
    while [ ! -s "$tmp/port" ]; do kill -0 "$pid"; sleep 0.1; done
    PORT=$(cat "$tmp/port") timeout 30 bash -c "$2" </dev/null >/dev/null 2>&1 || true  # we hang up
    rm "$tmp/port"; wait "$pid"
}

export CARGO_TARGET_DIR=$here/target
cargo run -q --release --manifest-path "$here/Cargo.toml" -- "$out"
rustls=$(grep -A1 '^name = "rustls"$' "$here/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')
note rustls_pq.bin "rustls $rustls (aws-lc-rs provider, X25519MLKEM768 key share)"
note rustls_ech_grease.bin "rustls $rustls (aws-lc-rs provider, EchMode::Grease)"
note rustls_no_sni.bin "rustls $rustls (aws-lc-rs provider, ServerName 127.0.0.1)"
note rustls_fragmented.bin "rustls $rustls (aws-lc-rs provider, max_fragment_size 512)"

ossl=$(openssl version | cut -d' ' -f1,2)
capture openssl_tls13.bin "openssl s_client -connect 127.0.0.1:\$PORT -servername $name -alpn h2,http/1.1"
note openssl_tls13.bin "$ossl s_client -servername $name -alpn h2,http/1.1"
capture openssl_no_sni.bin 'openssl s_client -connect 127.0.0.1:$PORT -noservername'
note openssl_no_sni.bin "$ossl s_client -noservername"

capture curl.bin "curl -sk --resolve $name:\$PORT:127.0.0.1 https://$name:\$PORT/"
note curl.bin "$(curl --version | head -1 | cut -d' ' -f1-4)"

if command -v chromium >/dev/null; then
    capture chromium.bin "chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
        --disable-component-update --disable-sync --no-first-run --user-data-dir=$tmp/chromium \
        --host-resolver-rules='MAP $name 127.0.0.1' --dump-dom https://$name:\$PORT/"
    note chromium.bin "$(chromium --version 2>/dev/null | head -1 | cut -d' ' -f1,2) headless"
elif [ -f "$out/chromium.bin" ]; then   # keep the earlier capture and its comment
    echo "chromium not installed: keeping the existing chromium.bin" >&2
    manifest+=("$(grep '^# chromium.bin:' "$out/MANIFEST")" "$(python3 "$here/hello.py" describe "$out/chromium.bin")")
fi

printf '%s\n' "${manifest[@]}" >"$out/MANIFEST"
cat "$out/MANIFEST"
