#!/usr/bin/env bash
# Install what the tests need (scripts/install.sh), type-check and lint, then
# run the whole suite:
# unit, component (real sockets on 127.0.0.1) and, as root, the lab tier
# (real FRR and ExaBGP in network namespaces). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Static checks first: mypy --strict on the package, ruff (rules in
# pyproject.toml) on the package, its tests and benchmarks.
.venv/bin/mypy anycast_lb
.venv/bin/ruff check anycast_lb tests benchmarks
exec .venv/bin/python -m pytest "$@"
