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
# HAProxy, nginx and an iperf3 daemon are never started by apt: the benchmark
# starts its own, on loopback.
bash scripts/apt-install.sh haproxy nginx iperf3 wrk gcc libc6-dev util-linux
bash scripts/install.sh
exec .venv/bin/python benchmarks/forwarder_vs_haproxy.py "$@"
