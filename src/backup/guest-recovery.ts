/**
 * The backup application's side of the 2012 R2 flow's auto-recovery inside the VM (HYPERV-BACKUP-MODEL.md §1.2):
 *   1. per disk of the batch, a writable qcow2 overlay over the snapshot's read-only export, served over NBD on a
 *      unix socket (one qemu-storage-daemon per batch); the snapshot itself is never written;
 *   2. the host hot-adds each overlay to its VM's SCSI controller, the guest recovers it, the host hot-removes it
 *      (`POST /v1/vms/{vm}/hot-plug`, `DELETE /v1/vms/{vm}/hot-plug/{id}`: hot-plug.ts on the host);
 *   3. the overlays served read-only: what the guest's recovery wrote is what the overlay holds of its own.
 * A disk the recovery did not change reads as the snapshot holds it: the data phase reads the snapshot's export.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { forEachBounded } from '../util/bounded.js';
import {
  overlayBytes,
  startDaemon,
  stopDaemon,
  overlayBlockdevs,
  tlsArgs,
  type HostMountOptions,
  type MountDisk,
} from './auto-recovery.js';

const run = promisify(execFile);

export class GuestMount {
  private servePid: string | null = null;
  private readonly changed = new Map<string, number>();

  private constructor(
    private readonly dir: string,
    private readonly items: { d: MountDisk; i: number; overlay: string }[],
    private readonly opts: HostMountOptions,
    private writablePid: string | null,
  ) {}

  /** Where the overlays are served (writable while the guests recover them, then read-only). */
  get socket(): string {
    return path.join(this.dir, this.servePid ? 'nbd.sock' : 'hotplug.sock');
  }

  /** The NBD export the host hot-adds for a disk. */
  source(vm: string, slot: string): { socket: string; export: string } {
    return { socket: path.join(this.dir, 'hotplug.sock'), export: `hotplug/${vm}/${slot}` };
  }

  /** The overlay's read-only export of a disk the recovery changed, or undefined (read the snapshot's). */
  exportOf(vm: string, slot: string): string | undefined {
    return this.changedBytes(vm, slot) > 0 ? `recovered/${vm}/${slot}` : undefined;
  }

  /** Bytes the guest's recovery wrote into the disk's overlay (0: the disk reads as the snapshot holds it). */
  changedBytes(vm: string, slot: string): number {
    return this.changed.get(`${vm}/${slot}`) ?? 0;
  }

  /** Step 1: the overlays, served writable for the hot-add. */
  static async prepare(disks: MountDisk[], opts: HostMountOptions): Promise<GuestMount> {
    const dir = await mkdtemp(path.join(opts.workDir ?? os.tmpdir(), 'tidemark-guestrecovery-'));
    const items = disks.map((d, i) => ({ d, i, overlay: path.join(dir, `disk${i}.qcow2`) }));
    try {
      await forEachBounded(items, opts.parallel ?? 4, async (it) => {
        await run('qemu-img', ['create', '-q', '-f', 'qcow2', it.overlay, String(it.d.virtualSize)]);
      });
      const pid = path.join(dir, 'hotplug.pid');
      const m = new GuestMount(dir, items, opts, null);
      await startDaemon(m.daemonArgs(path.join(dir, 'hotplug.sock'), 'hotplug', false), pid);
      m.writablePid = pid;
      return m;
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  /** Step 3: once every disk is hot-removed, what the recovery changed, and the overlays served read-only. */
  async serve(): Promise<void> {
    if (this.writablePid) {
      await stopDaemon(this.writablePid);
      this.writablePid = null;
    }
    await forEachBounded(this.items, this.opts.parallel ?? 4, async (it) => {
      this.changed.set(`${it.d.vm}/${it.d.slot}`, await overlayBytes(it.overlay));
    });
    const pid = path.join(this.dir, 'serve.pid');
    await startDaemon(this.daemonArgs(path.join(this.dir, 'nbd.sock'), 'recovered', true), pid);
    this.servePid = pid;
  }

  /** Stops serving and removes the overlays. */
  async close(): Promise<void> {
    try {
      if (this.writablePid) await stopDaemon(this.writablePid);
      if (this.servePid) await stopDaemon(this.servePid);
    } finally {
      await rm(this.dir, { recursive: true, force: true });
    }
  }

  private daemonArgs(socket: string, prefix: string, readOnly: boolean): string[] {
    const nbd = this.opts.nbd;
    const tls = tlsArgs(this.opts);
    const args = [...tls, '--nbd-server', JSON.stringify({ addr: { type: 'unix', path: socket } })];
    for (const it of this.items) {
      args.push(
        ...overlayBlockdevs(nbd, it.d.export, it.i, it.overlay, readOnly, tls.length > 0),
        '--export',
        JSON.stringify({
          type: 'nbd',
          id: `n${it.i}`,
          'node-name': `o${it.i}`,
          name: `${prefix}/${it.d.vm}/${it.d.slot}`,
          writable: !readOnly,
        }),
      );
    }
    return args;
  }
}
