#!/bin/sh
# Creates the daemon users and the admin group, /run/outrelay, and tells systemd about the
# units only where systemd runs. Never starts a unit: the operator enables them after editing
# /etc/outrelay/*.toml. On an upgrade, a running relay is handed over to the new binary.
set -e
# An upgrade hands a running relay over to the new binary (issue 20: its listening sockets
# pass to the new process, so no connection is refused; agents move on GOAWAY). A failed
# hand-over leaves the old relay serving and says why here.
relay_handover() {
    sock=/run/outrelay/relay.sock
    [ -S "$sock" ] || return 0
    if ! outrelay-relay upgrade --admin-socket "$sock" --timeout-s 30; then
        echo "outrelay: the running relay was not handed over to the new binary; it keeps" \
            "serving the old one until restarted" >&2
    fi
}
if true; then
    if command -v systemd-sysusers >/dev/null 2>&1; then
        systemd-sysusers outrelay.conf
    else
        getent group outrelay-admin >/dev/null || addgroup --system outrelay-admin
        for d in relay controller agent; do
            getent passwd "outrelay-$d" >/dev/null ||
                adduser --system --group --no-create-home --home "/var/lib/outrelay-$d" \
                    --gecos "OutRelay $d" "outrelay-$d"
        done
    fi
    if command -v systemd-tmpfiles >/dev/null 2>&1; then
        systemd-tmpfiles --create outrelay.conf || true
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
    # $1: the number of versions installed after this one (2 or more on an upgrade).
    if [ "$1" -ge 2 ]; then
        relay_handover
    fi
fi
exit 0
