/**
 * The scripts inside the guest image (busybox sh): `/init` (PID 1), the clean-shutdown path that qemu-ga's
 * `guest-shutdown` and the guest's own poweroff/reboot/halt reach, the workloads, and the fsfreeze hook that
 * parks the workload between two steps while the file systems are frozen (so a frozen disk holds whole
 * SQLite transactions and the console counter is never behind the database).
 *
 * Busybox's shell prefers its own applets over anything in PATH (its mke2fs is ext2-only): every
 * e2fsprogs/sqlite3/qemu-ga tool is called by its full path, filled in by the builder.
 */

export const WORKLOADS = ['sqlite', 'shell', 'none'] as const;
export type Workload = (typeof WORKLOADS)[number];

export interface ScriptPaths {
  mke2fs: string;
  e2fsck: string;
  sqlite3: string;
  qemuGa: string;
}

/** The kernel command line a VM made from the image boots with (the workload is the caller's choice). */
export function defaultCmdline(workload: Workload = 'sqlite'): string {
  return `console=ttyS0 loglevel=4 tidemark.workload=${workload}`;
}

export function initScript(p: ScriptPaths): string {
  return `#!/bin/busybox sh
# Tidemark guest image: PID 1. Mounts, loads modules, finds and mounts the data disk, starts qemu-ga and
# the workload named on the kernel command line, then waits. Shutdown: /usr/lib/tidemark/stop-guest.
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /mnt/data /var/log /var/run/qemu-ga
/bin/busybox --install -s
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null || mdev -s
mkdir -p /dev/pts /dev/virtio-ports /run/tidemark
mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
log() { echo "tidemark-guest: $*"; }
arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "\${w#*=}";; esac; done; }

# Modules in dependency order (the kernel package has no modules.dep; the builder computed the order).
while read -r m; do
  [ -n "$m" ] && { insmod "$m" 2>/dev/null || log "could not load $m"; }
done < /etc/tidemark/modules
mdev -s 2>/dev/null

# qemu-ga opens /dev/virtio-ports/NAME, which only udev would create.
link_ports() {
  for d in /sys/class/virtio-ports/*; do
    [ -f "$d/name" ] || continue
    n=$(cat "$d/name"); [ -n "$n" ] && ln -sf "/dev/\${d##*/}" "/dev/virtio-ports/$n"
  done
}
i=0; while [ $i -lt 50 ] && [ ! -e /sys/class/virtio-ports/vport0p1 ] && [ -d /sys/bus/virtio ]; do
  [ -n "$(ls /sys/class/virtio-ports 2>/dev/null)" ] && break; sleep 0.1; i=$((i+1)); done
link_ports

# The data disk: tidemark.data=/dev/X, or the first disk found (disks are probed asynchronously: wait a bit).
DATA=$(arg tidemark.data)
if [ -z "$DATA" ]; then
  i=0
  while [ $i -lt 100 ]; do
    for b in $(ls /sys/block 2>/dev/null | grep -E '^(sd|vd)[a-z]+$' | sort); do DATA=/dev/$b; break; done
    [ -n "$DATA" ] && break; sleep 0.1; i=$((i+1))
  done
fi
BOOT=0
if [ -n "$DATA" ] && [ -b "$DATA" ]; then
  # ext4's superblock magic 0xEF53 at byte 1080; busybox has no blkid.
  if [ "$(od -An -tx1 -j1080 -N2 "$DATA" | tr -d ' \\n')" != "53ef" ]; then
    log "formatting $DATA as ext4"
    ${p.mke2fs} -q -F -t ext4 -L tidemark-data "$DATA" || log "mke2fs $DATA failed"
  else
    ${p.e2fsck} -p "$DATA" >/dev/null 2>&1; rc=$?
    [ $rc -ge 4 ] && log "e2fsck -p $DATA exited $rc"
  fi
  if mount -t ext4 "$DATA" /mnt/data; then
    BOOT=$(( $(cat /mnt/data/boot 2>/dev/null || echo 0) + 1 ))
    echo $BOOT > /mnt/data/boot.tmp && mv /mnt/data/boot.tmp /mnt/data/boot && sync
    log "data disk $DATA mounted at /mnt/data (boot $BOOT)"
  else
    log "could not mount $DATA"
  fi
else
  log "no data disk"
fi
echo $BOOT > /run/tidemark/boot

if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
  ${p.qemuGa} -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -t /var/run/qemu-ga \\
    -F/etc/qemu/fsfreeze-hook -l /var/log/qemu-ga.log &
  echo $! > /run/tidemark/qemu-ga.pid
  log "guest agent started"
else
  log "no guest-agent channel"
fi

WL=$(arg tidemark.workload); WL=\${WL:-none}
INTERVAL=$(arg tidemark.interval); INTERVAL=\${INTERVAL:-0.5}
case "$WL" in
  # Only the sqlite workload parks for a freeze (the fsfreeze hook waits for it): the shell's pid is not recorded.
  sqlite) /usr/lib/tidemark/workload "$WL" "$BOOT" "$INTERVAL" & echo $! > /run/tidemark/workload.pid ;;
  shell) /usr/lib/tidemark/workload "$WL" "$BOOT" "$INTERVAL" & ;;
  none) ;;
  *) log "unknown workload $WL (sqlite, shell or none)" ;;
esac
log "ready (workload $WL)"
while :; do sleep 3600; done
`;
}

export function workloadScript(p: ScriptPaths): string {
  return `#!/bin/busybox sh
# tidemark workload sqlite|shell BOOT INTERVAL
# sqlite: one row per step into /mnt/data/wl.db (boot number, a counter that continues across boots), the
# counter printed on the console after its transaction committed. Parks between steps while
# /run/tidemark/pause exists (the fsfreeze hook), ends between steps when /run/tidemark/stop appears.
WL=$1; BOOT=$2; INTERVAL=$3
R=/run/tidemark
case "$WL" in
  shell)
    while [ ! -e $R/stop ]; do setsid cttyhack sh </dev/console >/dev/console 2>&1; sleep 1; done
    exit 0 ;;
esac
DB=/mnt/data/wl.db
SQL=${p.sqlite3}
grep -q ' /mnt/data ' /proc/mounts || { echo "tidemark-wl: no data disk mounted, the sqlite workload does not run"; exit 1; }
$SQL $DB "CREATE TABLE IF NOT EXISTS wl(id INTEGER PRIMARY KEY, boot INTEGER NOT NULL, n INTEGER NOT NULL, at TEXT NOT NULL);" >/dev/null
n=$($SQL $DB "SELECT COALESCE(MAX(n),0) FROM wl;")
echo "tidemark-wl start boot=$BOOT n=$n"
while [ ! -e $R/stop ]; do
  if [ -e $R/pause ]; then
    touch $R/paused
    while [ -e $R/pause ] && [ ! -e $R/stop ]; do sleep 0.05; done
    rm -f $R/paused
    continue
  fi
  m=$((n+1))
  if $SQL $DB "INSERT INTO wl(boot,n,at) VALUES($BOOT,$m,datetime('now'));"; then
    n=$m
    echo "tidemark-wl boot=$BOOT n=$n"
  else
    echo "tidemark-wl insert failed at n=$m"
  fi
  sleep $INTERVAL
done
echo "tidemark-wl stopped boot=$BOOT n=$n"
`;
}

/** The fsfreeze hook (run by the package's /etc/qemu/fsfreeze-hook): park the workload, then let qemu-ga freeze. */
export function freezeHookScript(): string {
  return `#!/bin/busybox sh
R=/run/tidemark
case "$1" in
  freeze)
    [ -e $R/workload.pid ] && kill -0 "$(cat $R/workload.pid)" 2>/dev/null || exit 0
    touch $R/pause
    i=0; while [ ! -e $R/paused ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
    [ -e $R/paused ] || { echo "workload did not park within 10 s" >&2; rm -f $R/pause; exit 1; }
    echo "tidemark-guest: workload parked for a freeze" >/dev/console ;;
  thaw)
    rm -f $R/pause
    echo "tidemark-guest: thawed" >/dev/console ;;
esac
exit 0
`;
}

/**
 * The guest's clean stop: end the workload between two steps, stop qemu-ga, unmount the data disk, sync,
 * then power off (or reboot/halt). /sbin/shutdown (what qemu-ga's guest-shutdown runs), /sbin/poweroff,
 * /sbin/reboot and /sbin/halt all come here.
 */
export function stopGuestScript(): string {
  return `#!/bin/busybox sh
# stop-guest poweroff|reboot|halt
ACTION=\${1:-poweroff}
R=/run/tidemark
exec >/dev/console 2>&1
echo "tidemark-guest: stopping ($ACTION)"
touch $R/stop
rm -f $R/pause
if [ -e $R/workload.pid ]; then
  p=$(cat $R/workload.pid); i=0
  while kill -0 "$p" 2>/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  kill "$p" 2>/dev/null
fi
sync
if grep -q ' /mnt/data ' /proc/mounts; then
  umount /mnt/data 2>/dev/null || { sleep 0.5; umount /mnt/data 2>/dev/null; } || mount -o remount,ro /mnt/data
fi
sync
echo "tidemark-guest: data disk unmounted; $ACTION"
[ -e $R/qemu-ga.pid ] && kill "$(cat $R/qemu-ga.pid)" 2>/dev/null
case "$ACTION" in
  reboot) reboot -f ;;
  halt) halt -f ;;
  *) poweroff -f ;;
esac
`;
}

/** /sbin/shutdown as qemu-ga calls it: `-P +0 "msg"` (power off), `-r` (reboot), `-H`/`-h` (halt). */
export function shutdownScript(): string {
  return `#!/bin/busybox sh
a=poweroff
for o in "$@"; do case "$o" in -r) a=reboot ;; -H|-h) a=halt ;; -P) a=poweroff ;; esac; done
exec /usr/lib/tidemark/stop-guest $a
`;
}

export function actionScript(action: 'poweroff' | 'reboot' | 'halt'): string {
  return `#!/bin/busybox sh\nexec /usr/lib/tidemark/stop-guest ${action}\n`;
}
