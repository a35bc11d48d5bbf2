#!/usr/bin/env bash
# Sets everything up, then runs ferry's main end-to-end demo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/ferry demo "$@"
