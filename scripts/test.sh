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
# A whole run (no arguments, as CI runs it) first runs the unit tier on the
# other supported Pythons, 3.12 and 3.13 (scripts/test-pythons.sh: each in
# its own .venv-3.X built by uv; a version not installed is skipped with a
# message). About 75 s of CPU for both; ANYCAST_LB_TEST_PYTHONS=0 skips it.
if [ $# -eq 0 ] && [ "${ANYCAST_LB_TEST_PYTHONS:-1}" != 0 ]; then
    bash scripts/test-pythons.sh
fi
exec .venv/bin/python -m pytest "$@"
