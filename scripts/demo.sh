#!/usr/bin/env bash
# Set up (if needed) and run the main job on the embedded demo. Extra arguments go to learner_jax.main.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
cd "$ROOT"
exec python -m learner_jax.main --config demo "$@"
