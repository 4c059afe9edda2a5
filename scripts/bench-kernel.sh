#!/usr/bin/env bash
# The kernel engine against no load balancer, the relay engine and HAProxy on
# a namespace topology with direct server return, and what flow survival
# costs the relay engine, in one run:
#   - as root: HAProxy, nginx (the backend), iperf3 (bulk), wrk (short
#     connections) and nftables from apt; no apt service is started
#     (policy-rc.d, see apt-install.sh);
#   - the virtual environment (scripts/install.sh);
#   - benchmarks/kernel_path.py with this script's arguments, e.g.
#       bash scripts/bench-kernel.sh --repeat 5 --duration 4 --nice -10
# Namespaces are named with the prefix of ANYCAST_LB_LAB_NS_PREFIX (default
# albb-) and deleted at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "bench-kernel: run as root (network namespaces, nftables)" >&2
    exit 2
fi
bash scripts/apt-install.sh haproxy nginx iperf3 wrk gcc libc6-dev nftables iproute2 util-linux
bash scripts/install.sh
exec .venv/bin/python benchmarks/kernel_path.py "$@"
