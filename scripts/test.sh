#!/usr/bin/env bash
# Installs everything (scripts/setup.sh), then runs the whole test suite: lint, types, and
# pytest (unit tests and end-to-end tests that boot real guests). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
.venv/bin/ruff check metald tests bench
.venv/bin/ruff format --check metald tests bench
.venv/bin/mypy metald
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
