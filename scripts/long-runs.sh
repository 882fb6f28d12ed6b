#!/usr/bin/env bash
# The fuzz and crash suites at ten times their CI counts (issue 14), one file at a time; each log goes to
# $LONG_DIR (default /tmp/tidemark-long-runs) and a line per suite to stdout. Build first (`npm run build`,
# `npm run build:native`). About two hours on an idle 2-core machine; not part of `npm test`.
# LONG_ONLY=name,name runs only those suites (the names printed, e.g. LONG_ONLY=vhd-crash,host-crash).
set -uo pipefail
cd "$(dirname "$0")/.."
export CI=true TIDEMARK_REQUIRE_PEERS=1
LONG_DIR=${LONG_DIR:-/tmp/tidemark-long-runs}
mkdir -p "$LONG_DIR"
run() {
  local name=$1 files=$2
  shift 2
  if [[ -n ${LONG_ONLY:-} && ",$LONG_ONLY," != *",$name,"* ]]; then return; fi
  local start
  start=$(date +%s)
  # shellcheck disable=SC2086
  env "$@" npx vitest run $files --maxWorkers=1 >"$LONG_DIR/$name.log" 2>&1
  echo "$name: exit $? in $(($(date +%s) - start)) s ($*)"
}
run vhdx-fuzz test/vhdx/fuzz.test.ts TIDEMARK_FUZZ_CASES=100000
run repo-models "test/repository/envelope.test.ts test/repository/prune.test.ts" TIDEMARK_FUZZ_CASES=3000
run vhd-fuzz test/vhd/fuzz.test.ts TIDEMARK_VHD_FUZZ_CASES=100000
run nbd test/nbd/protocol.test.ts TIDEMARK_NBD_CASES=500
run guest "test/guest/framing.test.ts test/guest/agent.test.ts" TIDEMARK_GUEST_CASES=2000
run vss test/vss/model.test.ts TIDEMARK_VSS_CASES=600
run pack test/repository/pack.test.ts TIDEMARK_PACK_TRIALS=3000
run hostile-repos test/repository/hostile.test.ts TIDEMARK_HOSTILE_REPO_CASES=10000 TIDEMARK_HOSTILE_REPO_CLI_CASES=40
run vhdx-crash test/vhdx/crash.test.ts TIDEMARK_CRASH_TRIALS=2000
run rct-crash test/tracking/crash.test.ts TIDEMARK_CRASH_TRIALS=2000
run repair-crash test/vhdx/repair-crash.test.ts TIDEMARK_REPAIR_CRASH_TRIALS=240
run vhd-crash test/vhd/crash.test.ts TIDEMARK_VHD_CRASH_TRIALS=800
run backup-crash test/backup/crash.test.ts TIDEMARK_BACKUP_CRASH_TRIALS=500
run host-crash test/host/crash.test.ts TIDEMARK_HOST_CRASH_TRIALS=500
run snapshot-crash test/snapshot/crash.test.ts TIDEMARK_SNAPSHOT_CRASH_TRIALS=80
run never-miss test/tracking/never-miss.test.ts TIDEMARK_RCT_OPS=20000
run lineage test/backup/adversary.test.ts TIDEMARK_LINEAGE_TRIALS=2000
