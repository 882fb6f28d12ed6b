#!/usr/bin/env bash
# The NBD server, tidemark against qemu-nbd, side by side on the same data, both over unix sockets.
#
# The data: a 4 GiB sparse raw disk holding 2 GiB of random data, 1 MiB pieces on every other MiB
# (as bench/vhdx-convert.sh makes it), converted once to a dynamic VHDX by qemu-img.
# read:   nbdcopy EXPORT null:            from `tidemark nbd serve --read-only` and `qemu-nbd -r -f vhdx`
#         serving that same VHDX (nbdcopy: 4 connections, many requests in flight, block status).
#         Each repetition starts both servers afresh: the first run after the start is "cold" (for
#         tidemark it includes V8 compiling the hot paths), the second "warm" (as a long-running server
#         serves); which server reads first alternates.
# write:  nbdcopy --flush SRC.raw EXPORT  into a fresh dynamic VHDX (qemu-img's default block size)
#         served writable by each server, a new server per run (cold); --flush makes both servers
#         make the data durable.
# Servers start before the clock and stop after it. Each repetition alternates which server goes
# first; medians of BENCH_REPS (default 3) of wall time, and of CPU time (server + nbdcopy, user +
# system) which is the steadier figure on a shared machine. Every result is verified (nbdcopy to a
# file and cmp for reads, qemu-img compare for writes), so the benchmark cannot lie.
#
# Environment: BENCH_REPS (3), BENCH_SIZE_GIB (4), BENCH_TMPDIR (default $TMPDIR or /tmp),
# BENCH_STRICT=1 (exit 1 when tidemark is slower than qemu-nbd in either direction).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${BENCH_REPS:-3}
SIZE_GIB=${BENCH_SIZE_GIB:-4}
TMPBASE=${BENCH_TMPDIR:-${TMPDIR:-/tmp}}

for tool in qemu-img qemu-nbd nbdcopy; do
  command -v $tool >/dev/null || { echo "nbd-serve: $tool is missing (sudo bash scripts/install-peers.sh)" >&2; exit 1; }
done
[ -f dist/cli/main.js ] || npm run build --silent
TIDEMARK=(node "$PWD/bin/tidemark.js")

WORK=$(mktemp -d "$TMPBASE/tidemark-nbd-bench.XXXXXX")
SERVER_PID=
READERS=()
cleanup() {
  for p in $SERVER_PID "${READERS[@]}"; do kill "$p" 2>/dev/null && wait "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
SRC=$WORK/src.raw

echo "nbd-serve: $SIZE_GIB GiB raw, random 1 MiB pieces on every other MiB, in $WORK"
node bench/lib/sparse-random.mjs "$SRC" "$SIZE_GIB"
qemu-img convert -f raw -O vhdx -o subformat=dynamic "$SRC" "$WORK/ref.vhdx"
sync
cat "$WORK/ref.vhdx" >/dev/null # in the page cache for both servers alike, whichever reads first

# start_server ours|qemu FILE SOCKET [ro]: runs the server in the background (SERVER_PID), waits for its socket.
start_server() {
  local which=$1 file=$2 sock=$3 ro=${4:-}
  rm -f "$sock"
  if [ "$which" = ours ]; then
    "${TIDEMARK[@]}" nbd serve "$file" --socket "$sock" ${ro:+--read-only} >/dev/null 2>"$WORK/server.log" &
  else
    # -t: keep serving after a client leaves; -e 16: nbdcopy opens several connections; cache=writeback (default).
    qemu-nbd -t -e 16 -f vhdx ${ro:+-r} -k "$sock" "$file" 2>"$WORK/server.log" &
  fi
  SERVER_PID=$!
  for _ in $(seq 1 200); do [ -S "$sock" ] && return 0; sleep 0.05; done
  echo "nbd-serve: $which did not start: $(cat "$WORK/server.log")" >&2
  exit 1
}
stop_server() {
  kill -INT "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=
}
uri() { # uri ours|qemu SOCKET FILE
  if [ "$1" = ours ]; then echo "nbd+unix:///$(basename "${3%.*}")?socket=$2"; else echo "nbd+unix:///?socket=$2"; fi
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# timed PID CMD...: runs CMD; prints "wall cpu" seconds (cpu: CMD's user+system, plus the server's).
timed() {
  local pid=$1; shift
  local before t after hz
  hz=$(getconf CLK_TCK)
  before=$(cpu_ticks "$pid")
  local TIMEFORMAT='%3R %3U %3S'
  t=$( { time "$@" >/dev/null 2>&1; } 2>&1 )
  after=$(cpu_ticks "$pid")
  awk -v t="$t" -v d=$((after - before)) -v hz="$hz" 'BEGIN { split(t, a, " "); printf "%.3f %.3f", a[1], a[2] + a[3] + d / hz }'
}
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -a ours_read qemu_read ours_write qemu_write ours_read_cpu qemu_read_cpu ours_write_cpu qemu_write_cpu
declare -a ours_cold qemu_cold ours_cold_cpu qemu_cold_cpu
record() {
  local -n w=$1 c=${1}_cpu
  w+=("${2% *}")
  c+=("${2#* }")
}

# The read servers: started once, kept for every read run.
declare -A READ_PID READ_URI
start_readers() {
  for which in ours qemu; do
    local sock=$WORK/$which-r.sock
    start_server "$which" "$WORK/ref.vhdx" "$sock" ro
    READ_PID[$which]=$SERVER_PID
    READERS+=("$SERVER_PID")
    SERVER_PID=
    READ_URI[$which]=$(uri "$which" "$sock" "$WORK/ref.vhdx")
  done
}
run_read() { # run_read ours|qemu [cold]
  record "$1_${2:-read}" "$(timed "${READ_PID[$1]}" nbdcopy "${READ_URI[$1]}" null:)"
}
verify_read() { # verify_read ours|qemu: outside the timing
  nbdcopy "${READ_URI[$1]}" "$WORK/check.raw"
  cmp -s "$SRC" "$WORK/check.raw" || { echo "nbd-serve: $1 read wrong data" >&2; exit 1; }
  rm -f "$WORK/check.raw"
}

run_write() { # run_write ours|qemu
  local file=$WORK/$1-w.vhdx sock=$WORK/$1-w.sock
  rm -f "$file"
  qemu-img create -q -f vhdx -o subformat=dynamic "$file" "${SIZE_GIB}G"
  sync
  start_server "$1" "$file" "$sock"
  local u
  u=$(uri "$1" "$sock" "$file")
  record "$1_write" "$(timed "$SERVER_PID" nbdcopy --flush "$SRC" "$u")"
  stop_server
  qemu-img compare -q -f raw -F vhdx "$SRC" "$file" || { echo "nbd-serve: $1 wrote a VHDX that differs" >&2; exit 1; }
  qemu-img check -q -f vhdx "$file" || { echo "nbd-serve: $1 wrote a VHDX that fails qemu-img check" >&2; exit 1; }
  rm -f "$file"
}

stop_readers() {
  for p in "${READ_PID[@]}"; do kill -INT "$p"; wait "$p" 2>/dev/null || true; done
  READERS=()
}
# Each repetition starts both read servers afresh: its first run on each is "cold", the next one "warm";
# the order alternates, so neither server always reads first.
for ((r = 1; r <= REPS; r++)); do
  start_readers
  order=$( ((r % 2)) && echo "ours qemu" || echo "qemu ours")
  for tool in $order; do run_read "$tool" cold; done
  ((r == 1)) && for tool in ours qemu; do verify_read "$tool"; done
  for tool in $order; do run_read "$tool"; done
  stop_readers
done
for ((r = 1; r <= REPS; r++)); do
  for tool in $( ((r % 2)) && echo "ours qemu" || echo "qemu ours"); do run_write "$tool"; done
  echo "repetition $r (wall s / cpu s): cold read tidemark ${ours_cold[r - 1]}/${ours_cold_cpu[r - 1]}," \
    "qemu-nbd ${qemu_cold[r - 1]}/${qemu_cold_cpu[r - 1]}; warm read tidemark ${ours_read[r - 1]}/${ours_read_cpu[r - 1]}," \
    "qemu-nbd ${qemu_read[r - 1]}/${qemu_read_cpu[r - 1]}; write tidemark ${ours_write[-1]}/${ours_write_cpu[-1]}," \
    "qemu-nbd ${qemu_write[-1]}/${qemu_write_cpu[-1]}"
done

echo
fail=0
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
printf '%-30s %9s %9s %7s   %9s %9s %7s\n' direction tidemark qemu-nbd ratio tidemark qemu-nbd ratio
printf '%-30s %27s   %27s\n' "" "------ wall time (s) ------" "--------- CPU (s) ---------"
for dir in cold read write; do
  declare -n o=ours_$dir q=qemu_$dir oc=ours_${dir}_cpu qc=qemu_${dir}_cpu
  mo=$(median "${o[@]}") mq=$(median "${q[@]}") co=$(median "${oc[@]}") cq=$(median "${qc[@]}")
  rt=$(ratio "$mo" "$mq")
  case $dir in
    cold) label="read, cold (fresh server)" ;;
    read) label="read, warm (second run)" ;;
    write) label="write (nbdcopy --flush raw ->)" ;;
  esac
  printf '%-30s %9s %9s %7s   %9s %9s %7s\n' "$label" "$mo" "$mq" "$rt" "$co" "$cq" "$(ratio "$co" "$cq")"
  awk -v x="$rt" 'BEGIN { exit !(x > 1.0) }' && fail=1
  unset -n o q oc qc
done
echo "(medians of $REPS; nbdcopy -> null: for reads; ratio = tidemark/qemu-nbd, goal ≤ 1.00 on wall time; CPU = server + nbdcopy.)"
if [ "$fail" = 1 ] && [ "${BENCH_STRICT:-}" = 1 ]; then exit 1; fi
exit 0
