#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: ruff, mypy --strict, the import
# check (no cycles, upper layers import lower ones only), pytest.
# Extra arguments are passed to one pytest run of the whole tree (e.g. scripts/test.sh -k nbd).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
echo "== ruff"; ruff check src tests bench
echo "== mypy"; mypy
echo "== imports"; python scripts/check_imports.py
echo "== pytest"
check() {  # pytest's exit code; "no tests collected" (5) is a failure too
    if [ "$1" -eq 5 ]; then
        echo "test.sh: pytest collected no tests; that is a failure" >&2
        return 1
    fi
    return "$1"
}
set +e
if [ "$#" -gt 0 ]; then
    pytest -q -p no:cacheprovider "$@"
    check $?
    exit $?
fi
# The whole suite: unit and property tests spread over every core (pytest-xdist; they
# share no ports, names or files), then the end-to-end tests one at a time (they use
# fixed namespace names and boot guests that want a core each).
pytest -q -p no:cacheprovider -n auto tests/unit tests/property
check $?
fast=$?
pytest -q -p no:cacheprovider tests/e2e
check $?
e2e=$?
set -e
[ "$fast" -eq 0 ] && [ "$e2e" -eq 0 ]
