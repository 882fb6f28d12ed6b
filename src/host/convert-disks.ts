/**
 * Convert-VHD of each legacy VHD disk of a VM, then Set-VMHardDiskDrive onto the new VHDX: `vm convert-disks NAME
 * --to vhdx`. A VM on VHD has no resilient change tracking; on VHDX (and, with `vm upgrade`, a configuration version
 * from 6.2) its backups become incremental.
 *
 * Crash safety, as the other multi-file operations of the store (vm-store.ts "the journal"):
 *   1. the intent is journaled in the definition (`pending: convert-disks`, every file it may make);
 *   2. per disk, the VHDX is written beside the VHD under a temporary name by the one converter
 *      (tracking/convert.ts, durable when it returns: the VHDX's close commits it), renamed to its name and the
 *      folder fsynced; tracking files are made when the configuration version has RCT;
 *   3. ONE definition write commits: the attachments name the new files and the journal becomes `delete-files` of
 *      the old VHDs;
 *   4. the VHDs are unlinked and the journal cleared.
 * Killed before 3, the next start removes what 2 made (vm-store.ts rolls back); killed after it, the next start
 * unlinks the VHDs left (vm-store.ts finishes `delete-files`). Either way the VM opens with its content exact.
 */
import { lstat, rename, unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import { VhdFile } from '../formats/vhd/vhd.js';
import { convertDisk } from '../tracking/convert.js';
import { trackingPaths } from '../tracking/tracker.js';
import { syncDirectory } from '../util/atomic.js';
import { supportsRct } from './config-version.js';
import type { VmDefinition } from './definition.js';
import { diskFileFormat, probeDiskFile } from './disk-files.js';
import { enableTracking } from './images.js';
import type { HostLog } from './log.js';
import { privateFiles } from './store-access.js';

/** The formats `convert-disks` converts to (Convert-VHD to VHD is not needed: VHD is what a VM leaves). */
export const CONVERT_TARGETS = ['vhdx'] as const;
export type ConvertTarget = (typeof CONVERT_TARGETS)[number];

/**
 * The points between durable steps, in order (per disk: copying, written, renamed, tracked). A test seam: crash
 * tests stop the host at each one (HostOptions.hooks); nothing else uses it.
 */
export type ConvertStep = 'journaled' | 'copying' | 'written' | 'renamed' | 'tracked' | 'committed' | 'unlinked';
export type ConvertDisksHook = (step: ConvertStep, slot: string | null) => void | Promise<void>;

export interface ConvertedDisk {
  slot: string;
  /** The VHD it was (absolute; now deleted). */
  from: string;
  /** The VHDX it is (absolute). */
  to: string;
  virtualSize: number;
  /** Bytes of data the VHDX received (unallocated and zero ranges are not written). */
  bytesWritten: number;
}

export interface SkippedDisk {
  slot: string;
  file: string;
  reason: string;
}

export interface ConvertDisksResult {
  converted: ConvertedDisk[];
  skipped: SkippedDisk[];
  /** The new disks have change tracking (the configuration version has RCT). */
  tracking: boolean;
}

/** What the conversion needs of the store (vm-store.ts). */
export interface ConvertStoreAccess {
  abs(def: VmDefinition, p: string): string;
  rel(def: VmDefinition, p: string): string;
  save(def: VmDefinition): Promise<void>;
  diskOptions(def: VmDefinition): { allowedRoots: string[] };
}

/** The files a not yet committed conversion of a disk may have made: removed when it rolls back. */
export function conversionLeftovers(to: string, temp: string): string[] {
  const t = trackingPaths(to);
  return [temp, to, t.rct, t.mrt];
}

/**
 * Refusals first (CONFLICT with what to do): checkpoints, reference points, a disk running on a differencing
 * child. The VM being off, its lease and its journal are the caller's (vm-lifecycle.ts).
 */
export function checkConvertible(def: VmDefinition): void {
  const what = 'Convert-VHD needs a disk without children';
  if (def.checkpoints.length > 0) {
    throw new TidemarkError(
      'CONFLICT',
      `${def.name} has ${def.checkpoints.length} checkpoint(s): delete them first (tidemark checkpoint delete ${def.name} ID; ${what})`,
    );
  }
  if (def.referencePoints.length > 0) {
    throw new TidemarkError(
      'CONFLICT',
      `${def.name} has ${def.referencePoints.length} reference point(s): destroy them first (tidemark refpoint destroy ${def.name} ID; they name the disks being replaced)`,
    );
  }
  const child = def.disks.find((d) => d.head !== d.base);
  if (child) {
    throw new TidemarkError(
      'CONFLICT',
      `${def.name} ${child.slot} runs on a differencing disk (${child.head}): merge it into its parent first (${what})`,
    );
  }
}

/**
 * Converts every VHD disk of the VM (off, checked) to a VHDX beside it and points the definition at them. A failure
 * before the commit removes what was made and leaves the VM as it was; the error is thrown.
 */
export async function convertVmDisks(
  def: VmDefinition,
  store: ConvertStoreAccess,
  log: HostLog,
  hook: ConvertDisksHook = () => undefined,
): Promise<ConvertDisksResult> {
  const { allowedRoots } = store.diskOptions(def);
  const tracking = supportsRct(def.configVersion);
  const skipped: SkippedDisk[] = [];
  const plan: { slot: string; from: string; to: string; temp: string; fixed: boolean }[] = [];
  for (const att of def.disks) {
    const from = store.abs(def, att.base);
    if ((await diskFileFormat(from)) !== 'vhd') {
      skipped.push({ slot: att.slot, file: from, reason: 'already VHDX' });
      continue;
    }
    const parsed = path.parse(from);
    const to = path.join(parsed.dir, `${parsed.name}.vhdx`);
    const temp = `${to}.converting`;
    for (const f of conversionLeftovers(to, temp)) {
      if (await occupied(f)) {
        throw new TidemarkError(
          'CONFLICT',
          `${def.name} ${att.slot}: ${f} exists, where the VHDX of ${from} would be made: move it away first`,
        );
      }
    }
    plan.push({ slot: att.slot, from, to, temp, fixed: await isFixedVhd(from, allowedRoots) });
  }
  if (plan.length === 0) return { converted: [], skipped, tracking };

  // 1. The intent, before any file is made.
  def.pending = {
    op: 'convert-disks',
    disks: plan.map((p) => ({
      slot: p.slot,
      from: store.rel(def, p.from),
      to: store.rel(def, p.to),
      temp: store.rel(def, p.temp),
    })),
  };
  await store.save(def);
  const converted: ConvertedDisk[] = [];
  const ids = new Map<string, { virtualDiskId: string; virtualSize: number }>();
  try {
    await hook('journaled', null);
    // 2. Each VHDX beside its VHD: temporary name, durable, renamed, tracked.
    for (const p of plan) {
      let copying = false;
      const r = await convertDisk(p.from, p.temp, {
        format: 'vhdx',
        sourceFormat: 'vhd',
        type: p.fixed ? 'fixed' : 'dynamic',
        allowedRoots,
        // Mid-copy (after the first piece): a hook that throws here fails the copy like an I/O error.
        onProgress: () => {
          if (copying) return;
          copying = true;
          void Promise.resolve(hook('copying', p.slot)).catch(() => undefined);
        },
      });
      await privateFiles(p.temp);
      await hook('written', p.slot);
      await rename(p.temp, p.to);
      await syncDirectory(path.dirname(p.to));
      await hook('renamed', p.slot);
      if (tracking) await enableTracking(p.to, allowedRoots);
      await hook('tracked', p.slot);
      const probe = await probeDiskFile(p.to, allowedRoots);
      ids.set(p.slot, { virtualDiskId: probe.virtualDiskId, virtualSize: probe.virtualSize });
      converted.push({
        slot: p.slot,
        from: p.from,
        to: p.to,
        virtualSize: r.virtualSize,
        bytesWritten: r.bytesWritten,
      });
    }
  } catch (err) {
    // Not committed: what was made goes, the VM stays on its VHDs.
    for (const p of plan) for (const f of conversionLeftovers(p.to, p.temp)) await unlink(f).catch(() => undefined);
    def.pending = null;
    await store.save(def);
    throw err;
  }

  // 3. The commit: one write points the attachments at the VHDX files and journals the VHDs for deletion.
  for (const p of plan) {
    const att = def.disks.find((d) => d.slot === p.slot)!;
    const rel = store.rel(def, p.to);
    att.base = rel;
    att.head = rel;
    Object.assign(att, ids.get(p.slot));
  }
  def.pending = { op: 'delete-files', files: plan.map((p) => store.rel(def, p.from)) };
  await store.save(def);
  await hook('committed', null);
  // 4. The VHDs go (the journal finishes this after a crash).
  for (const p of plan) await unlink(p.from).catch(() => undefined);
  await hook('unlinked', null);
  def.pending = null;
  await store.save(def);
  for (const c of converted) log.info(`${def.name} ${c.slot}: converted ${c.from} -> ${c.to}`);
  return { converted, skipped, tracking };
}

async function isFixedVhd(file: string, allowedRoots: string[]): Promise<boolean> {
  const f = await VhdFile.open(file, { allowedRoots, noParent: true });
  try {
    return f.diskType === 'fixed';
  } finally {
    await f.close();
  }
}

/** Anything at the path, a dangling link or a FIFO included (never opened). */
async function occupied(p: string): Promise<boolean> {
  return lstat(p).then(
    () => true,
    (e: NodeJS.ErrnoException) => e.code !== 'ENOENT',
  );
}
