#!/usr/bin/env bash
# The whole test suite (`npm test`): peers (installed when run as root), a build (TypeScript and the native
# addon), then vitest.
# Extra arguments go to vitest, e.g. `npm test -- test/peers.test.ts`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-peers.sh
npm run build --silent
# The native addon (image locks, SEEK_DATA) is required: this fails loudly when it cannot be built.
npm run build:native --silent
if [ "${CI:-}" = "true" ] || [ "${CI:-}" = "1" ]; then
  # In CI every interop test must run: a missing peer fails the suite instead of skipping.
  export TIDEMARK_REQUIRE_PEERS=1
fi
# exec: the script's exit status is vitest's.
exec npx vitest run "$@"
