#!/usr/bin/env bash
# Run the tests on every other supported Python (3.11 is the one .venv uses):
# for each version, a virtual environment .venv-3.X with anycast-lb and its
# test extra, then the unit tier in it (and the component tier with
# TIERS="unit component").
#   bash scripts/test-pythons.sh                       # 3.12 and 3.13, unit tier
#   PYTHON_VERSIONS="3.13" TIERS="unit component" bash scripts/test-pythons.sh -x
# Interpreters are looked up as $PYENV_ROOT/versions/3.X.*/bin/python3.X
# (pyenv's layout; PYENV_ROOT defaults to ~/.pyenv), then as python3.X on
# PATH. A version that is found nowhere is skipped with a message, unless
# REQUIRE_ALL=1 (then it fails). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSIONS=${PYTHON_VERSIONS:-"3.12 3.13"}
TIERS=${TIERS:-unit}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
REQUIRE_ALL=${REQUIRE_ALL:-0}

find_python() {
    # Newest patch release of $1 under pyenv, else python$1 on PATH.
    local version=$1 candidate found=""
    for candidate in "$PYENV_ROOT"/versions/"$version".*/bin/python"$version"; do
        [ -x "$candidate" ] && found=$candidate
    done
    if [ -z "$found" ] && command -v "python$version" >/dev/null 2>&1; then
        found=$(command -v "python$version")
    fi
    printf '%s' "$found"
}

# uv (the test extra puts it in .venv) installs in seconds from its cache
# where pip takes minutes; pip is the fallback.
UV=""
if [ -x .venv/bin/python ] && .venv/bin/python -m uv --version >/dev/null 2>&1; then
    UV=".venv/bin/python -m uv"
fi

paths=()
for tier in $TIERS; do
    paths+=("tests/$tier")
done

status=0
for version in $PYTHON_VERSIONS; do
    python=$(find_python "$version")
    if [ -z "$python" ]; then
        if [ "$REQUIRE_ALL" = 1 ]; then
            echo "test-pythons: Python $version not found" >&2
            exit 1
        fi
        echo "test-pythons: Python $version not found (pyenv under $PYENV_ROOT or python$version on PATH): skipped" >&2
        continue
    fi
    venv=.venv-$version
    # A venv made by another interpreter (or a half-made one) is rebuilt.
    if [ ! -x "$venv/bin/python" ] || [ "$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" != "$version" ]; then
        rm -rf "$venv"
        if [ -n "$UV" ]; then
            $UV venv -q --python "$python" "$venv" >&2
        else
            "$python" -m venv "$venv"
        fi
    fi
    if [ -n "$UV" ]; then
        $UV pip install -q --python "$venv/bin/python" -e '.[test]' >&2
    else
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -e '.[test]' >&2
    fi
    echo "test-pythons: $("$venv/bin/python" -V) in $venv: ${paths[*]}" >&2
    # -p no:cacheprovider: the cache of .venv's runs is not shared.
    if ! "$venv/bin/python" -m pytest -p no:cacheprovider -q "${paths[@]}" "$@"; then
        echo "test-pythons: FAILED on Python $version" >&2
        status=1
    fi
done
exit $status
