#!/usr/bin/env bash
# The full test suite: set-up, then pytest. Exit status is pytest's, except that
# "no tests collected" (5) is not a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh || exit 1
.venv/bin/python -m pytest tests "$@"
rc=$?
[ "$rc" -eq 5 ] && rc=0
exit "$rc"
