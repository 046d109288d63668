#!/bin/sh
# The whole test suite: lint, types, then every test (unit, integration as root and as an
# unprivileged user, security). Run scripts/install.sh once first.
set -eu
cd "$(dirname "$0")/.."
.venv/bin/ruff check sandbox tests bench
.venv/bin/mypy
status=0
.venv/bin/pytest -p no:cacheprovider "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
  exit 1
fi
exit "$status"
