#!/usr/bin/env bash
# Run the unit and component tiers N times in a row (default 20) and stop at
# the first failing run, so a flaky test is caught where it fails:
#   bash scripts/soak-tests.sh 20 [extra pytest arguments]
# Each run's output goes to soak-logs/run-K.log; the last line says how many
# runs passed. Needs the virtual environment of scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
shift || true
mkdir -p soak-logs
for k in $(seq 1 "$runs"); do
    started=$(date +%s)
    if ! .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit tests/component "$@" \
            > "soak-logs/run-$k.log" 2>&1; then
        tail -30 "soak-logs/run-$k.log"
        echo "soak: run $k of $runs failed (soak-logs/run-$k.log)"
        exit 1
    fi
    echo "soak: run $k of $runs passed in $(( $(date +%s) - started )) s: $(tail -1 "soak-logs/run-$k.log")"
done
echo "soak: $runs of $runs runs passed"
