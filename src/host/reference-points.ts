/**
 * Reference points (Hyper-V's Msvm_VirtualSystemReferencePointService): a recovery checkpoint converted into one
 * (its differencing disks merged back online, the RCT ids sealed at the checkpoint kept per virtual disk), one made
 * without a checkpoint (every disk's id sealed now), listed and destroyed. The previous backup's reference point is
 * what the next incremental asks changes since.
 */
import { randomUUID } from 'node:crypto';
import { openDisk, type OpenedDisk } from '../disk/open.js';
import { TidemarkError } from '../errors.js';
import type { Checkpoints } from './checkpoints.js';
import { describeOwner, type ReferencePoint, type ReferencePointOwner } from './definition.js';
import type { HostLog } from './log.js';
import type { LeaseRef, VmGuard, VmStore } from './vm-store.js';

/** What the reference-point service needs of the host. */
export interface ReferencePointHostAccess {
  store: Pick<VmStore, 'get' | 'save' | 'abs' | 'diskOptions' | 'assertNoPending'>;
  guard: VmGuard;
  /** The open disks of a running VM, by slot (undefined when it is off). */
  runningDisks(vm: string): Map<string, OpenedDisk> | undefined;
  /** A conversion removes the recovery checkpoint (merging it back) and records the point in the same journal. */
  checkpoints: Pick<Checkpoints, 'find' | 'remove'>;
  log: HostLog;
}

export class ReferencePoints {
  constructor(private readonly host: ReferencePointHostAccess) {}

  list(name: string): ReferencePoint[] {
    return structuredClone(this.host.store.get(name).referencePoints);
  }

  /**
   * ConvertToReferencePoint: the recovery checkpoint's .avhdx (or .avhd) files are merged back online (the VM stops
   * running on differencing disks) and the ids sealed at the checkpoint are kept per virtual disk.
   */
  async convert(
    name: string,
    checkpoint: string,
    opts: { owner?: ReferencePointOwner | null } & LeaseRef = {},
  ): Promise<ReferencePoint> {
    return this.host.guard.leased(name, opts.lease, 'refpoint convert', async () => {
      const def = this.host.store.get(name);
      const cp = this.host.checkpoints.find(def, checkpoint);
      if (cp.type !== 'recovery') {
        throw new TidemarkError(
          'CONFLICT',
          `checkpoint ${cp.name} is a ${cp.type} checkpoint; only recovery checkpoints convert`,
        );
      }
      const rp: ReferencePoint = {
        id: randomUUID(),
        createdAt: cp.createdAt,
        fromCheckpoint: cp.id,
        consistency: cp.consistency,
        virtualDiskIdentifiers: cp.disks.map((d) => d.virtualDiskId),
        resilientChangeTrackingIdentifiers: cp.disks.map((d) => d.rctId),
        owner: opts.owner ?? null,
      };
      await this.host.checkpoints.remove(def, cp, 'refpoint', rp);
      this.host.log.info(`reference point ${rp.id.slice(0, 8)} of ${name} for ${describeOwner(rp.owner)}`);
      return structuredClone(rp);
    });
  }

  /** CreateReferencePoint without a checkpoint: seals every disk's id now. */
  async create(name: string, opts: { owner?: ReferencePointOwner | null } = {}): Promise<ReferencePoint> {
    const { store } = this.host;
    return this.host.guard.locked(name, async () => {
      const def = store.get(name);
      store.assertNoPending(def);
      const ids: (string | null)[] = [];
      const running = this.host.runningDisks(name);
      for (const d of def.disks) {
        if (running) {
          ids.push((await running.get(d.slot)!.seal()) ?? null);
        } else {
          const disk = await openDisk(store.abs(def, d.head), store.diskOptions(def));
          try {
            ids.push((await disk.seal()) ?? null);
          } finally {
            await disk.close();
          }
        }
      }
      const rp: ReferencePoint = {
        id: randomUUID(),
        createdAt: new Date().toISOString(),
        fromCheckpoint: null,
        consistency: null,
        virtualDiskIdentifiers: def.disks.map((d) => d.virtualDiskId),
        resilientChangeTrackingIdentifiers: ids,
        owner: opts.owner ?? null,
      };
      def.referencePoints.push(rp);
      await store.save(def);
      return structuredClone(rp);
    });
  }

  async destroy(name: string, id: string): Promise<void> {
    return this.host.guard.locked(name, async () => {
      const def = this.host.store.get(name);
      const i = def.referencePoints.findIndex((r) => r.id === id);
      if (i < 0) throw new TidemarkError('NOT_FOUND', `${name} has no reference point ${id}`);
      def.referencePoints.splice(i, 1);
      await this.host.store.save(def);
    });
  }
}
