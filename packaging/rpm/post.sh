#!/bin/sh
# Creates the daemon users and the admin group, /run/outrelay, and tells systemd about the
# units only where systemd runs. Never starts a unit: the operator enables them after editing
# /etc/outrelay/*.toml.
set -e
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
fi
exit 0
