#!/usr/bin/env bash
# Install everything anycast-lb needs on a Debian machine, idempotently:
#   - as root: FRR, nftables, iproute2 from apt (the lab and its tests need them;
#     FRR's own service is never started, the lab runs its daemons in namespaces);
#   - as root: Debian's etcd-server and etcd-client (the consensus tests and the
#     lab start their own members; the packaged etcd service is never started);
#   - as root: Debian's prometheus package for promtool (CI checks /metrics and
#     the alert rules in deploy/ with it; its service is never started);
#   - a virtual environment in .venv with anycast-lb, its lab and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    bash scripts/apt-install.sh frr nftables iproute2 procps etcd-server etcd-client prometheus systemd
elif [ "$(id -u)" != 0 ]; then
    echo "install: not root: skipping apt packages (frr, nftables, etcd); the lab and its tests need root" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lab]' >&2
echo "install: ok (.venv/bin/anycast-lb)" >&2
