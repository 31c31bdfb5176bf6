#!/usr/bin/env bash
# The version matrix: the test suite's fast part on the oldest and the newest supported torch, on every supported
# Python, and on the oldest supported Lightning, Transformers and Accelerate (docs/versions.md says why these).
# .ci/run runs the whole suite on the main combination first; this script adds the others, each in its own venv,
# with the versions pinned by a constraints file so that installing emakit's extras cannot move them.
#
# Usage: bash .ci/matrix.sh [LEG ...]   (no argument: every leg; `--list` prints them)
# EMAKIT_MATRIX_DIR    where the venvs go (default .ci-venvs/, git-ignored)
# EMAKIT_MATRIX_KEEP=1 keep each venv for the next run (default: removed after its legs, they are GBs each);
#                      a kept venv is reused only if it was built from the same pins.
# Exits non-zero if any leg fails, cannot be installed, or runs no test (pytest's exit code 5).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export PIP_DISABLE_PIP_VERSION_CHECK=1
dir=${EMAKIT_MATRIX_DIR:-$repo/.ci-venvs}
keep=${EMAKIT_MATRIX_KEEP:-0}

core="tests/compat tests/functional tests/averaging tests/algorithms tests/posthoc tests/time tests/trainer"
sharded="tests/posthoc/test_sharded.py tests/distributed/test_two_ranks.py"

# name | venv | python | pins (space-separated) | extras | pytest marker | test paths
# The oldest of everything together; then each Python with a newer torch (torch 2.4 has no wheel for Python 3.13;
# 2.9 is the first torch whose FSDP2 emakit shards with), then the framework floors on the newest torch, which is
# where old framework releases break (torch 2.6 made torch.load weights-only by default).
floors="lightning==2.6.0 transformers==4.47.0 accelerate==1.1.0"
legs=(
    "py3.10-torch2.4-oldest|py310-torch24|3.10.13|torch==2.4.1 $floors|test,lightning,transformers|not slow|$core tests/integrations"
    "py3.12-torch2.9|py312-torch29|3.12.1|torch==2.9.1|test|not slow|$core"
    "py3.12-torch2.9-fsdp2|py312-torch29|3.12.1|torch==2.9.1|test|slow|$sharded"
    "py3.13-torch2.13|py313-torch213|3.13.0|torch==2.13.0|test|not slow|$core"
    "py3.11-torch2.13-framework-floors|py311-floors|3.11.7|torch==2.13.0 $floors|test,lightning,transformers|not slow|tests/integrations"
)

if [[ "${1:-}" == "--list" ]]; then
    printf '%s\n' "${legs[@]}" | cut -d'|' -f1,3,4
    exit 0
fi
wanted=("$@")

python_for() { # the interpreter of a pyenv-installed Python version, or nothing
    local v=$1 p
    p=$(PYENV_VERSION=$v pyenv which python 2>/dev/null) || p=""
    if [[ -z "$p" && -x "$HOME/.pyenv/versions/$v/bin/python" ]]; then p="$HOME/.pyenv/versions/$v/bin/python"; fi
    echo "$p"
}

# Build (or reuse) one venv: torch first, pinned, then emakit editable with its extras under the same pins.
make_venv() {
    local venv=$1 py=$2 pins=$3 extras=$4 stamp interpreter
    stamp="$py|$pins|$extras|$(sha1sum pyproject.toml | cut -c1-12)"
    if [[ -f "$dir/$venv/.matrix-stamp" && "$(cat "$dir/$venv/.matrix-stamp")" == "$stamp" ]]; then
        echo "== reusing $dir/$venv"
        return 0
    fi
    interpreter=$(python_for "$py")
    if [[ -z "$interpreter" ]]; then
        echo "matrix: Python $py is not installed (pyenv install $py)" >&2
        return 1
    fi
    rm -rf "${dir:?}/$venv"
    "$interpreter" -m venv "$dir/$venv" || return 1
    tr ' ' '\n' <<<"$pins" >"$dir/$venv/constraints.txt"
    local torch_pin
    torch_pin=$(grep '^torch==' "$dir/$venv/constraints.txt")
    echo "== [${SECONDS}s] $venv: installing $torch_pin on Python $py"
    "$dir/$venv/bin/python" -m pip install --quiet "$torch_pin" || return 1
    echo "== [${SECONDS}s] $venv: installing emakit[$extras] with $pins"
    "$dir/$venv/bin/python" -m pip install --quiet -c "$dir/$venv/constraints.txt" -e ".[$extras]" || return 1
    echo "$stamp" >"$dir/$venv/.matrix-stamp"
}

count() { # count WORD LINE: the number before WORD in pytest's closing line, or 0
    local n
    n=$(grep -oE "[0-9]+ $1" <<<"$2" | head -1 | cut -d' ' -f1)
    echo "${n:-0}"
}

mkdir -p "$dir"
rows=()
status=0
total_passed=0
total_failed=0
built=()
for i in "${!legs[@]}"; do
    IFS='|' read -r name venv py pins extras marker paths <<<"${legs[$i]}"
    if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " == *" $name "* ]]; then continue; fi
    start=$SECONDS
    echo
    echo "=============== matrix leg $name (Python $py; $pins) ==============="
    if ! make_venv "$venv" "$py" "$pins" "$extras"; then
        rows+=("$name|$py|$pins|-|-|-|-|$((SECONDS - start))s|INSTALL FAILED")
        status=1
        continue
    fi
    built+=("$venv")
    versions=$("$dir/$venv/bin/python" -c "import sys, torch; print(f'{sys.version.split()[0]} torch {torch.__version__}')")
    echo "== [${SECONDS}s] $name: $versions; pytest -m '$marker' $paths"
    log="$dir/$name.log"
    # shellcheck disable=SC2086  # $paths is a list of test paths
    PYTHONPATH="$repo/src" "$dir/$venv/bin/python" -m pytest -q -p no:cacheprovider -m "$marker" $paths 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    closing=$(grep -E '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -1)
    passed=$(count passed "$closing")
    failed=$(count failed "$closing")
    errors=$(count error "$closing")
    skipped=$(count skipped "$closing")
    case $rc in
        0) result=ok ;;
        5) result="NO TESTS RAN" ;;
        *) result="FAILED (pytest exit $rc)" ;;
    esac
    if [[ $rc -ne 0 ]]; then status=1; fi
    total_passed=$((total_passed + passed))
    total_failed=$((total_failed + failed + errors))
    others=$(tr ' ' '\n' <<<"$pins" | grep -v '^torch==' | paste -sd' ')
    rows+=("$name|$versions|${others:--}|$passed|$failed|$errors|$skipped|$((SECONDS - start))s|$result")
    # The venv is removed once no later leg uses it, unless kept.
    if [[ "$keep" != 1 ]]; then
        later=0
        for j in "${!legs[@]}"; do
            if ((j > i)) && [[ "$(cut -d'|' -f2 <<<"${legs[$j]}")" == "$venv" ]]; then later=1; fi
        done
        if ((later == 0)); then rm -rf "${dir:?}/$venv"; fi
    fi
done

echo
echo "=============== version matrix ==============="
{
    echo "leg|python and torch|other pins|passed|failed|errors|skipped|time|result"
    printf '%s\n' "${rows[@]}"
} | column -t -s'|'
echo "matrix: $total_passed passed, $total_failed failed"
exit $status
