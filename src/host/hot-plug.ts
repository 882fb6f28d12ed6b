/**
 * Hot-add of a disk to a running VM's SCSI controller, the guest's own recovery of it, and its hot-remove: the
 * 2012 R2 flow's auto-recovery inside the VM (HYPERV-BACKUP-MODEL.md §1.2). Hyper-V hot-adds the snapshot's copy
 * of the VHDX to the guest, whose VSS reverts it to the guest's point; only the SCSI controller supports hot-add,
 * so a VM without one cannot use the flow.
 *
 * The disk hot-added is an NBD export the backup application serves: a writable overlay over the snapshot's
 * read-only export, so the guest's recovery writes into the overlay and never into the snapshot. For a VM run by
 * QEMU this is real QMP (`blockdev-add` of the export, `device_add scsi-hd` on the VM's virtio-scsi controller
 * with a serial the guest finds it by; `device_del`, DEVICE_DELETED, `blockdev-del`) and the recovery runs through
 * the guest agent (`guest-exec` of `e2fsck -p` on each ext file system of the device). A VM with no QEMU process
 * (a disk-only VM) has no guest: the hot-add is modelled, nothing is attached, and the answer says so.
 */
import { randomUUID } from 'node:crypto';
import { TidemarkError } from '../errors.js';
import type { GuestAgentClient } from '../guest/client.js';
import type { VmDefinition } from './definition.js';
import type { LeaseInfo } from './leases.js';

/** What hot-plug needs of the host. */
export interface HotPlugHostAccess {
  definition(name: string): VmDefinition;
  /** The VM's QEMU process while one runs (undefined: a disk-only VM, or off). */
  qemu(name: string): HotPlugRuntime | undefined;
  checkLease(vm: string, lease: string | undefined): Promise<LeaseInfo | undefined>;
}

/** The part of a VM's runtime (vm-runtime.ts) hot-plug drives. */
export interface HotPlugRuntime {
  readonly state: string;
  qmpCommand<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T>;
  guestAgent(timeoutMs?: number): Promise<GuestAgentClient>;
}

export interface HotPlugRequest {
  /** The NBD export to hot-add, on a unix socket of this machine. */
  source: { socket: string; export: string };
  /** Run the guest's recovery of the disk's file systems once it is attached. */
  recover?: boolean;
  lease?: string;
}

export interface HotPlugInfo {
  id: string;
  vm: string;
  /** false: the VM has no guest (no QEMU process); the hot-add was modelled, nothing attached. */
  attached: boolean;
  /** The SCSI address (`scsiC-L`) the disk took, or null. */
  slot: string | null;
  /** The serial the guest sees (the guest finds the device by it). */
  serial: string;
  /** The device in the guest (`/dev/sdb`), or null. */
  guestDevice: string | null;
  /** What the guest's recovery did, or null when none ran. */
  recovery: string | null;
  note: string;
}

/** Where hot-added disks go on the first controller: far above the VM's own disks (scsi-id 0..15). */
const FIRST_HOTPLUG_TARGET = 64;
const GUEST_EXEC_TIMEOUT_MS = 120_000;

interface Plugged {
  info: HotPlugInfo;
  node: string;
  device: string;
}

export class HotPlugs {
  private readonly plugged = new Map<string, Plugged>();

  constructor(private readonly host: HotPlugHostAccess) {}

  list(vm: string): HotPlugInfo[] {
    return [...this.plugged.values()].filter((p) => p.info.vm === vm).map((p) => p.info);
  }

  /** Hot-adds the export to the VM's first SCSI controller (modelled without a guest) and recovers it if asked. */
  async add(vm: string, req: HotPlugRequest): Promise<HotPlugInfo> {
    const def = this.host.definition(vm);
    await this.host.checkLease(vm, req.lease);
    requireScsi(def);
    const id = randomUUID();
    const serial = `TMHP${id.replace(/-/g, '').slice(0, 16)}`;
    const rt = this.host.qemu(vm);
    if (!rt) {
      const info: HotPlugInfo = {
        id,
        vm,
        attached: false,
        slot: null,
        serial,
        guestDevice: null,
        recovery: null,
        note: 'modelled: the VM has no guest (no QEMU process): nothing hot-added, nothing recovered inside it',
      };
      this.plugged.set(id, { info, node: '', device: '' });
      return info;
    }
    if (rt.state !== 'Running')
      throw new TidemarkError('CONFLICT', `${vm} is ${rt.state}: a disk is hot-added only to a running VM`);
    const target = FIRST_HOTPLUG_TARGET + this.list(vm).length;
    const node = `hotplug-${id.slice(0, 8)}`;
    const device = `hotplug-dev-${id.slice(0, 8)}`;
    await rt.qmpCommand('blockdev-add', {
      driver: 'nbd',
      'node-name': node,
      server: { type: 'unix', path: req.source.socket },
      export: req.source.export,
    });
    try {
      await rt.qmpCommand('device_add', {
        driver: 'scsi-hd',
        drive: node,
        bus: 'scsi0.0',
        'scsi-id': target,
        lun: 0,
        serial,
        id: device,
      });
    } catch (err) {
      await rt.qmpCommand('blockdev-del', { 'node-name': node }).catch(() => undefined);
      throw err;
    }
    const info: HotPlugInfo = {
      id,
      vm,
      attached: true,
      slot: `scsi0-${target}`,
      serial,
      guestDevice: null,
      recovery: null,
      note: `hot-added to the guest on scsi0-${target} (serial ${serial})`,
    };
    this.plugged.set(id, { info, node, device });
    if (req.recover) {
      try {
        const r = await recoverInGuest(rt, serial);
        info.guestDevice = r.device;
        info.recovery = r.outcome;
        info.note += `, as ${r.device}: ${r.outcome}`;
      } catch (err) {
        await this.remove(vm, id, req.lease).catch(() => undefined);
        throw err;
      }
    }
    return info;
  }

  /** Hot-removes a disk `add` attached: device_del, until the device is gone, then its block node. */
  async remove(vm: string, id: string, lease?: string): Promise<HotPlugInfo> {
    const p = this.plugged.get(id);
    if (!p || p.info.vm !== vm) throw new TidemarkError('NOT_FOUND', `${vm} has no hot-added disk ${id}`);
    await this.host.checkLease(vm, lease);
    if (p.info.attached) {
      const rt = this.host.qemu(vm);
      if (rt) {
        await rt.qmpCommand('device_del', { id: p.device }).catch((err: unknown) => {
          if (!/not found/i.test(String(err))) throw err;
        });
        // DEVICE_DELETED comes once the guest let go of it: wait until the device is gone.
        const deadline = Date.now() + 30_000;
        for (;;) {
          const peripherals = await rt.qmpCommand<{ name: string }[]>('qom-list', { path: '/machine/peripheral' });
          if (!peripherals.some((x) => x.name === p.device)) break;
          if (Date.now() > deadline)
            throw new TidemarkError('TIMEOUT', `${vm}: the guest did not release hot-added disk ${p.info.slot}`);
          await new Promise((r) => setTimeout(r, 100));
        }
        // The device leaves /machine/peripheral a moment before it lets go of its block node: retry while in use.
        for (let i = 0; ; i++) {
          try {
            await rt.qmpCommand('blockdev-del', { 'node-name': p.node });
            break;
          } catch (err) {
            if (!/in use/i.test(String(err)) || Date.now() > deadline) throw err;
            await new Promise((r) => setTimeout(r, 50 + 10 * i));
          }
        }
      }
    }
    this.plugged.delete(id);
    return p.info;
  }
}

/** A VM without a SCSI controller cannot take a hot-added disk: only SCSI supports hot-add (as in Hyper-V). */
export function requireScsi(def: Pick<VmDefinition, 'name' | 'scsiControllers'>): void {
  if (def.scsiControllers > 0) return;
  throw new TidemarkError(
    'CONFLICT',
    `${def.name} has no SCSI controller: the 2012 R2 flow hot-adds the snapshot's disk to the guest, which only ` +
      `SCSI supports: add a SCSI controller to the VM (tidemark vm set ${def.name} --scsi-controllers 1, with the VM off) or back it up with --flow 2016`,
  );
}

/**
 * In the guest, through qemu-ga's guest-exec: the device whose SCSI serial (VPD page 0x80) is `serial`, then
 * `e2fsck -p` on each ext file system on it (the whole device or its partitions). Exit status 4 or more of e2fsck:
 * not recovered.
 */
async function recoverInGuest(rt: HotPlugRuntime, serial: string): Promise<{ device: string; outcome: string }> {
  const script = [
    'export PATH=/usr/sbin:/usr/bin:/sbin:/bin',
    'dev=',
    'i=0',
    'while [ -z "$dev" ] && [ $i -lt 300 ]; do',
    '  for b in /sys/block/sd*; do',
    `    if [ -e "$b/device/vpd_pg80" ] && grep -q "${serial}" "$b/device/vpd_pg80" 2>/dev/null; then dev=/dev/\${b##*/}; fi`,
    '  done',
    '  [ -n "$dev" ] && [ -b "$dev" ] && break',
    '  dev=; i=$((i+1)); sleep 0.1',
    'done',
    `[ -z "$dev" ] && { echo "no device with serial ${serial}" >&2; exit 90; }`,
    'echo "device $dev"',
    'worst=0',
    'for p in "$dev" "$dev"[0-9]*; do',
    '  [ -b "$p" ] || continue',
    // ext4's superblock magic 0xEF53 at byte 1080 (busybox has no blkid)
    '  magic=$(od -An -tx1 -j1080 -N2 "$p" | tr -d " \\n")',
    '  [ "$magic" = "53ef" ] || continue',
    '  out=$(e2fsck -p "$p" 2>&1); rc=$?',
    '  echo "fs $p status $rc"',
    '  echo "$out" | grep -qi "recovering journal" && echo "replayed $p"',
    '  [ $rc -gt $worst ] && worst=$rc',
    '  [ $rc -ge 4 ] && echo "$out" >&2',
    'done',
    'exit $worst',
  ].join('\n');
  const ga = await rt.guestAgent(10_000);
  try {
    const { pid } = (await ga.execute(
      'guest-exec',
      { path: '/bin/sh', arg: ['-c', script], 'capture-output': true },
      { timeoutMs: 10_000 },
    )) as { pid: number };
    const deadline = Date.now() + GUEST_EXEC_TIMEOUT_MS;
    let st: { exited: boolean; exitcode?: number; 'out-data'?: string; 'err-data'?: string };
    for (;;) {
      st = (await ga.execute('guest-exec-status', { pid }, { timeoutMs: 10_000 })) as typeof st;
      if (st.exited) break;
      if (Date.now() > deadline) throw new TidemarkError('TIMEOUT', `the guest's recovery did not end in time`);
      await new Promise((r) => setTimeout(r, 100));
    }
    const out = Buffer.from(st['out-data'] ?? '', 'base64').toString();
    const err = Buffer.from(st['err-data'] ?? '', 'base64')
      .toString()
      .trim();
    const code = st.exitcode ?? 0;
    if (code === 90) throw new TidemarkError('IO_ERROR', `the guest does not see the hot-added disk: ${err}`);
    if (code >= 4)
      throw new TidemarkError('IO_ERROR', `the guest's e2fsck -p could not recover the disk (status ${code}): ${err}`);
    const device = /^device (\S+)/m.exec(out)?.[1] ?? '?';
    const fss = [...out.matchAll(/^fs (\S+) status (\d+)/gm)];
    if (fss.length === 0) return { device, outcome: 'no file system on the disk: nothing to recover' };
    const replayed = new Set([...out.matchAll(/^replayed (\S+)/gm)].map((m) => m[1]));
    const outcome = fss
      .map(
        ([, p, rc]) =>
          `e2fsck -p on ${p} in the guest: ${replayed.has(p) ? 'journal replayed, ' : ''}${rc === '0' ? 'clean' : 'errors corrected'}`,
      )
      .join('; ');
    return { device, outcome };
  } finally {
    await ga.close().catch(() => undefined);
  }
}
