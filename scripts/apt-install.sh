#!/usr/bin/env bash
# Install those of the given Debian packages that are missing, as root,
# without letting apt start any of their services: a policy-rc.d guard keeps
# the packages' init scripts from starting FRR, HAProxy, nginx and the like
# in the root namespace (anycast-lb starts its own daemons, in lab
# namespaces or on loopback). Used by install.sh and bench.sh.
#   bash scripts/apt-install.sh PACKAGE...
set -euo pipefail

missing=()
for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
[ ${#missing[@]} -gt 0 ] || exit 0

echo "apt-install: ${missing[*]}" >&2
apt-get update -qq
created_policy=no
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=yes
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
[ "$created_policy" = no ] || rm -f /usr/sbin/policy-rc.d
