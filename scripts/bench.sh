#!/usr/bin/env bash
# Compare the anycast-lb forwarder with HAProxy on loopback, in one run:
#   - as root: HAProxy, nginx (backends), iperf3 (bulk), wrk (short
#     connections) and gcc (builds benchmarks/loadgen.c, the paced and UDP
#     load generator) from apt; no apt service is started (policy-rc.d);
#   - the virtual environment (scripts/install.sh);
#   - benchmarks/forwarder_vs_haproxy.py with this script's arguments, e.g.
#       bash scripts/bench.sh --quick
#       bash scripts/bench.sh --engine relay --extra-engine asyncio --out bench.json
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench: run as root (apt packages, RLIMIT_NOFILE for 10,000 connections)" >&2
    exit 2
fi
missing=()
for pkg in haproxy nginx iperf3 wrk gcc libc6-dev util-linux; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "bench: apt packages: ${missing[*]}" >&2
    apt-get update -qq
    # policy-rc.d keeps the packages' init scripts from starting HAProxy,
    # nginx or an iperf3 daemon: the benchmark starts its own, on loopback.
    created_policy=no
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        created_policy=yes
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    [ "$created_policy" = no ] || rm -f /usr/sbin/policy-rc.d
fi

bash scripts/install.sh
exec .venv/bin/python benchmarks/forwarder_vs_haproxy.py "$@"
