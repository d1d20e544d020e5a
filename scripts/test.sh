#!/usr/bin/env bash
# Set up (if needed) and run the test suite. With no arguments: the default suite (tests marked slow excluded).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m slow` or `scripts/test.sh tests/test_config.py`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
[ $# -gt 0 ] || set -- -m "not slow"
exec python -m pytest "$@"
