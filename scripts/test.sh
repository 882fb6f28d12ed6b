#!/usr/bin/env bash
# The whole test suite: peers (installed when run as root), a build, then vitest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
npm run build --silent
if [ "${CI:-}" = "true" ]; then
  # In CI every interop test must run: a missing peer fails the suite instead of skipping.
  export TIDEMARK_REQUIRE_PEERS=1
fi
exec npx vitest run "$@"
