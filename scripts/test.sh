#!/usr/bin/env bash
# Sets everything up, then runs the whole test suite: ruff, mypy --strict, the import
# check (no cycles, upper layers import lower ones only), pytest.
# Extra arguments are passed to pytest (e.g. scripts/test.sh -k nbd).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
echo "== ruff"; ruff check src tests bench
echo "== mypy"; mypy
echo "== imports"; python scripts/check_imports.py
echo "== pytest"
set +e
pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
