#!/usr/bin/env bash
# Install everything anycast-lb needs on a Debian machine, idempotently:
#   - as root: FRR, nftables, iproute2 from apt (the lab and its tests need them;
#     FRR's own service is never started, the lab runs its daemons in namespaces);
#   - a virtual environment in .venv with anycast-lb, its lab and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    missing=()
    for pkg in frr nftables iproute2 procps; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "install: apt packages: ${missing[*]}" >&2
        apt-get update -qq
        # policy-rc.d keeps the package's init script from starting FRR in the
        # root namespace.
        created_policy=no
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
            chmod +x /usr/sbin/policy-rc.d
            created_policy=yes
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
        [ "$created_policy" = no ] || rm -f /usr/sbin/policy-rc.d
    fi
elif [ "$(id -u)" != 0 ]; then
    echo "install: not root: skipping apt packages (frr, nftables); the lab and its tests need root" >&2
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,lab]' >&2
echo "install: ok (.venv/bin/anycast-lb)" >&2
