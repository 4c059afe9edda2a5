#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh), then run the whole suite:
# unit, component (real sockets on 127.0.0.1) and, as root, the lab tier
# (real FRR and ExaBGP in network namespaces). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest "$@"
