# Stops the units on erase (not upgrade), only where systemd runs.
if [ "$1" -eq 0 ] && [ -d /run/systemd/system ]; then
    systemctl stop outrelay-relay.service outrelay-controller.service outrelay-agent.service >/dev/null 2>&1 || :
fi
