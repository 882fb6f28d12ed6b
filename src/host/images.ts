/**
 * Image management (Hyper-V's Msvm_ImageManagementService): change queries on a VM's disks or a disk file in the
 * store (GetVirtualDiskChanges), disk files made, inspected and merged in the store; and the disk-file steps the
 * other services share (tracking started, a chain settled before it is served, attached paths checked).
 */
import path from 'node:path';
import type { OpenedDisk } from '../disk/open.js';
import { TidemarkError } from '../errors.js';
import { vhdInfo, type VhdInfo } from '../formats/vhd/info.js';
import { createVhdx } from '../formats/vhdx/create.js';
import { vhdxInfo, type VhdxInfo } from '../formats/vhdx/info.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import { ChangeTracker, trackingPaths, type ChangesResult, type TrackingFiles } from '../tracking/tracker.js';
import { guidToString } from '../util/guid.js';
import { checkFileType } from '../util/safe-open.js';
import { supportsRct } from './config-version.js';
import { diskFileFormat, mergeChildFile, offlineAllocatedExtents, VHD_TRACKING_UNAVAILABLE } from './disk-files.js';
import type { VmDefinition } from './definition.js';
import { privateFiles } from './store-access.js';
import type { VmStore } from './vm-store.js';

/** What image management needs of the host. */
export interface ImageHostAccess {
  store: Pick<VmStore, 'root' | 'get' | 'all' | 'abs' | 'diskOptions' | 'inStore'>;
  /** The open disk of a running VM's slot, if it runs. */
  runningDisk(vm: string, slot: string): OpenedDisk | undefined;
  /** CONFLICT when a running VM's chain holds the file. */
  assertNotOpen(file: string): void;
}

export class Images {
  constructor(private readonly host: ImageHostAccess) {}

  /**
   * GetVirtualDiskChanges: ranges changed since `limitId` (a sealed RCT id), paged by offset and length.
   * `target` is a VM disk (`{ vm, slot }`) or a disk file in the store.
   */
  async virtualDiskChanges(
    target: { vm: string; slot: string } | { path: string },
    limitId: string,
    offset = 0,
    length?: number,
    maxRanges?: number,
  ): Promise<ChangesResult & { virtualDiskId: string }> {
    const { store } = this.host;
    if (!('vm' in target)) {
      const file = store.inStore(target.path);
      return this.offlineChanges(file, limitId, offset, length, maxRanges, [store.root]);
    }
    const def = store.get(target.vm);
    const att = def.disks.find((d) => d.slot === target.slot);
    if (!att) throw new TidemarkError('NOT_FOUND', `${target.vm} has no disk at ${target.slot}`);
    const open = this.host.runningDisk(target.vm, target.slot);
    if (limitId === '*') {
      // Everything allocated (a first or full backup): answered with or without change tracking.
      const len = length ?? att.virtualSize - offset;
      const ranges = open
        ? await open.file.allocatedExtents(offset, len)
        : await offlineAllocatedExtents(store.abs(def, att.head), store.diskOptions(def).allowedRoots, offset, len);
      const capped = maxRanges !== undefined && ranges.length > maxRanges ? ranges.slice(0, maxRanges) : ranges;
      const processedLength =
        capped === ranges ? len : capped[capped.length - 1].offset + capped[capped.length - 1].length - offset;
      return {
        ranges: capped,
        processedLength,
        totalBytes: capped.reduce((n, r) => n + r.length, 0),
        virtualDiskId: att.virtualDiskId,
      };
    }
    if (!supportsRct(def.configVersion)) {
      throw new TidemarkError(
        'MISSING_CHANGE_TRACKING_INFORMATION',
        `${target.vm} has configuration version ${def.configVersion}: change tracking needs 6.2 or later`,
      );
    }
    if (open) return { ...(await open.changes(limitId, offset, length, maxRanges)), virtualDiskId: att.virtualDiskId };
    return this.offlineChanges(
      store.abs(def, att.head),
      limitId,
      offset,
      length,
      maxRanges,
      store.diskOptions(def).allowedRoots,
    );
  }

  private async offlineChanges(
    file: string,
    limitId: string,
    offset: number,
    length: number | undefined,
    maxRanges: number | undefined,
    allowedRoots: string[],
  ): Promise<ChangesResult & { virtualDiskId: string }> {
    this.host.assertNotOpen(file);
    if ((await diskFileFormat(file)) === 'vhd') {
      throw new TidemarkError(
        'MISSING_CHANGE_TRACKING_INFORMATION',
        `${path.basename(file)}: ${VHD_TRACKING_UNAVAILABLE}: read it in full`,
        { id: limitId },
      );
    }
    const disk = await VhdxFile.open(file, { allowedRoots });
    try {
      const tracker = await ChangeTracker.attach(disk, { writable: false });
      if (!tracker) {
        throw new TidemarkError('MISSING_CHANGE_TRACKING_INFORMATION', `${path.basename(file)} has no change tracking`);
      }
      return {
        ...(await tracker.changes(limitId, offset, length, maxRanges)),
        virtualDiskId: guidToString(disk.virtualDiskId),
      };
    } finally {
      await disk.close();
    }
  }

  async diskInfo(file: string): Promise<VhdxInfo | VhdInfo> {
    const p = this.host.store.inStore(file);
    if ((await diskFileFormat(p)) === 'vhd') return vhdInfo(p, { allowedRoots: [this.host.store.root] });
    return vhdxInfo(p, { allowedRoots: [this.host.store.root] });
  }

  async createDisk(file: string, opts: { size: number; blockSize?: number; tracking?: boolean }): Promise<string> {
    const p = this.host.store.inStore(file);
    await createVhdx(p, { size: opts.size, blockSize: opts.blockSize });
    await privateFiles(p);
    if (opts.tracking !== false) await enableTracking(p, [path.dirname(p)]);
    return p;
  }

  /** Merges a differencing disk of the store into its parent, unless a VM (running or not) has it. */
  async mergeDisk(childPath: string): Promise<{ parentPath: string; bytesCopied: number }> {
    const { store } = this.host;
    const p = store.inStore(childPath);
    this.host.assertNotOpen(p);
    for (const def of store.all()) {
      if (usesFile(store, def, p)) {
        throw new TidemarkError('CONFLICT', `${p} belongs to VM ${def.name}: delete its checkpoint instead`);
      }
    }
    const r = await mergeChildFile(p, { allowedRoots: [store.root] });
    return { parentPath: r.parentPath, bytesCopied: r.bytesCopied };
  }
}

function usesFile(store: Pick<VmStore, 'abs'>, def: VmDefinition, file: string): boolean {
  return (
    def.disks.some((d) => store.abs(def, d.head) === file) ||
    def.checkpoints.some((c) => c.disks.some((d) => store.abs(def, d.file) === file))
  );
}

// ---------------------------------------------------------------- disk-file steps the services share

/**
 * Replays in place the log a crash left in a chain's parents (a reader replays it only in memory, and some
 * tools refuse such files), before the chain is opened for a running VM.
 */
export async function settleChain(head: string, allowedRoots: string[]): Promise<void> {
  // A VHD has no log: its writes are in place (a lost footer copy is restored when it is opened writable).
  if ((await diskFileFormat(head)) === 'vhd') return;
  const probe = await VhdxFile.open(head, { allowedRoots });
  const dirty = probe
    .chain()
    .slice(1)
    .filter((f) => f.replay && f.replay.entries > 0)
    .map((f) => f.path);
  await probe.close();
  for (const p of dirty) {
    const f = await VhdxFile.open(p, { writable: true, noParent: true, allowedRoots });
    await f.close();
  }
}

/**
 * Starts Tidemark's change tracking on the chain whose head is `file` (its files beside the base, made private)
 * when it has none (`reason`: why it starts again). A disk another product tracks is left alone (its files are
 * never modified): it is backed up in full until an administrator runs `rct enable --replace-foreign`.
 * Returns what it found: 'none' means it created them now; 'unavailable', a VHD (no tracking to start).
 */
export async function enableTracking(
  file: string,
  allowedRoots: string[],
  reason?: string,
): Promise<TrackingFiles['state'] | 'unavailable'> {
  // VHD has no change tracking: nothing to start (its disks are read in full, with the reason).
  if ((await diskFileFormat(file)) === 'vhd') return 'unavailable';
  const disk = await VhdxFile.open(file, { allowedRoots });
  try {
    const base = disk.chain().at(-1)!.path;
    const found = await ChangeTracker.inspect(base);
    if (found.state !== 'none') return found.state;
    await ChangeTracker.enable(disk, undefined, { reason });
    const files = trackingPaths(base);
    await privateFiles(files.rct, files.mrt);
    return 'none';
  } finally {
    await disk.close();
  }
}

/**
 * Disks attached by path must be disk files (not a FIFO, a socket, a directory): each named path (relative to
 * the store) is checked, without opening it, before any lock is taken.
 */
export async function checkDiskPaths(store: string, disks: { path?: string }[] | undefined): Promise<void> {
  for (const d of disks ?? []) if (d.path) await checkFileType(path.resolve(store, d.path), 'disk');
}
