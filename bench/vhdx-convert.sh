#!/usr/bin/env bash
# raw ↔ VHDX conversion, tidemark against qemu-img, side by side on the same data.
#
# The data: a 4 GiB sparse raw disk holding 2 GiB of random data, 1 MiB pieces on every other MiB.
# raw → VHDX:  node bin/tidemark.js vhdx convert SRC DST.vhdx --block-size B
#              qemu-img convert -f raw -O vhdx -o subformat=dynamic SRC DST.vhdx
#              (B is qemu-img's default block size for this virtual size, read from a probe file)
# VHDX → raw:  both tools convert the same VHDX (made once by qemu-img, outside the timing).
# Caches cannot be dropped without root, so every timed run starts after `sync`, the pairs alternate
# (tidemark first in odd repetitions, qemu-img first in even ones), and each time includes a closing
# `sync` so both tools pay for getting their output to the disk (qemu-img convert defaults to
# cache=unsafe for its output and never flushes it; tidemark fdatasyncs). Medians of BENCH_REPS
# (default 3) of wall time and of CPU time (user + system) are reported: on a shared machine CPU time
# is the steadier of the two. Every output is compared with `qemu-img compare` so the benchmark cannot lie.
#
# Environment: BENCH_REPS (3), BENCH_SIZE_GIB (4), BENCH_TMPDIR (default $TMPDIR or /tmp),
# BENCH_STRICT=1 (exit 1 when tidemark is slower than qemu-img in either direction).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${BENCH_REPS:-3}
SIZE_GIB=${BENCH_SIZE_GIB:-4}
TMPBASE=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}

command -v qemu-img >/dev/null || { echo "vhdx-convert: qemu-img is missing (sudo bash scripts/install-peers.sh)" >&2; exit 1; }
[ -f dist/cli/main.js ] || npm run build --silent
TIDEMARK=(node "$PWD/bin/tidemark.js")

WORK=$(mktemp -d "$TMPBASE/tidemark-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
SRC=$WORK/src.raw

echo "vhdx-convert: $SIZE_GIB GiB raw, random 1 MiB pieces on every other MiB, in $WORK"
node bench/lib/sparse-random.mjs "$SRC" "$SIZE_GIB"
sync

# qemu-img's default block size for a dynamic VHDX of this size, so both tools use the same.
qemu-img create -q -f vhdx -o subformat=dynamic "$WORK/probe.vhdx" "${SIZE_GIB}G"
BLOCK=$("${TIDEMARK[@]}" vhdx info --json "$WORK/probe.vhdx" | node -e 'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).blockSize))')
rm -f "$WORK/probe.vhdx"
echo "block size: $((BLOCK / 1048576)) MiB (qemu-img's default), logical sectors 512"

# The VHDX both tools convert back to raw.
qemu-img convert -f raw -O vhdx -o subformat=dynamic "$SRC" "$WORK/ref.vhdx"
sync

# timed OUTPUT CMD...: removes OUTPUT, syncs, runs CMD and a closing sync; prints "wall cpu" seconds
# (cpu: user + system time of the tool and the sync, from bash's `time`).
timed() {
  local out=$1; shift
  rm -f "$out"
  sync
  local TIMEFORMAT='%3R %3U %3S' t
  t=$( { time { "$@" >/dev/null; sync; }; } 2>&1 )
  awk '{ printf "%.3f %.3f", $1, $2 + $3 }' <<<"$t"
}
verify() { # verify FMT_A A FMT_B B LABEL
  if ! qemu-img compare -q -f "$1" -F "$3" "$2" "$4"; then
    echo "vhdx-convert: $5 differs from the source: the result is wrong" >&2
    exit 1
  fi
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -a ours_to qemu_to ours_from qemu_from ours_to_cpu qemu_to_cpu ours_from_cpu qemu_from_cpu
# record NAME "wall cpu": appends wall to NAME and cpu to NAME_cpu.
record() {
  local -n w=$1 c=${1}_cpu
  w+=("${2% *}")
  c+=("${2#* }")
}
for ((r = 1; r <= REPS; r++)); do
  for tool in $( ((r % 2)) && echo "ours qemu" || echo "qemu ours"); do
    if [ "$tool" = ours ]; then
      record ours_to "$(timed "$WORK/ours.vhdx" "${TIDEMARK[@]}" vhdx convert "$SRC" "$WORK/ours.vhdx" --block-size "$BLOCK")"
      verify raw "$SRC" vhdx "$WORK/ours.vhdx" "tidemark's VHDX"
      record ours_from "$(timed "$WORK/ours.raw" "${TIDEMARK[@]}" vhdx convert "$WORK/ref.vhdx" "$WORK/ours.raw")"
      verify raw "$SRC" raw "$WORK/ours.raw" "tidemark's raw"
    else
      record qemu_to "$(timed "$WORK/qemu.vhdx" qemu-img convert -f raw -O vhdx -o subformat=dynamic "$SRC" "$WORK/qemu.vhdx")"
      verify raw "$SRC" vhdx "$WORK/qemu.vhdx" "qemu-img's VHDX"
      record qemu_from "$(timed "$WORK/qemu.raw" qemu-img convert -f vhdx -O raw "$WORK/ref.vhdx" "$WORK/qemu.raw")"
      verify raw "$SRC" raw "$WORK/qemu.raw" "qemu-img's raw"
    fi
  done
  echo "repetition $r (wall s / cpu s): raw→vhdx tidemark ${ours_to[-1]}/${ours_to_cpu[-1]}, qemu-img ${qemu_to[-1]}/${qemu_to_cpu[-1]};" \
    "vhdx→raw tidemark ${ours_from[-1]}/${ours_from_cpu[-1]}, qemu-img ${qemu_from[-1]}/${qemu_from_cpu[-1]}"
done

usage() { du -k "$1" | awk '{ printf "%.2f GiB", $1 / 1048576 }'; }
echo
echo "outputs on disk: tidemark VHDX $(usage "$WORK/ours.vhdx"), qemu-img VHDX $(usage "$WORK/qemu.vhdx"); tidemark raw $(usage "$WORK/ours.raw"), qemu-img raw $(usage "$WORK/qemu.raw")"
echo
fail=0
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
printf '%-12s %11s %11s %9s   %11s %11s %9s\n' direction "tidemark" "qemu-img" "ratio" "tidemark" "qemu-img" "ratio"
printf '%-12s %35s   %35s\n' "" "---------- wall time (s) ----------" "------------ CPU (s) ------------"
for dir in to from; do
  declare -n o=ours_$dir q=qemu_$dir oc=ours_${dir}_cpu qc=qemu_${dir}_cpu
  mo=$(median "${o[@]}") mq=$(median "${q[@]}") co=$(median "${oc[@]}") cq=$(median "${qc[@]}")
  r=$(ratio "$mo" "$mq")
  label=$([ $dir = to ] && echo "raw → vhdx" || echo "vhdx → raw")
  printf '%-12s %11s %11s %9s   %11s %11s %9s\n' "$label" "$mo" "$mq" "$r" "$co" "$cq" "$(ratio "$co" "$cq")"
  awk -v x="$r" 'BEGIN { exit !(x > 1.0) }' && fail=1
  unset -n o q oc qc
done
echo "(medians of $REPS; ratio = tidemark/qemu-img, goal ≤ 1.00 on wall time. Each time includes a closing"
echo " sync: qemu-img convert writes with cache=unsafe and never flushes its output, tidemark fdatasyncs.)"
if [ "$fail" = 1 ] && [ "${BENCH_STRICT:-}" = 1 ]; then exit 1; fi
exit 0
