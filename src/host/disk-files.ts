/**
 * A VM's disk files by format: VHDX (change tracking, `.avhdx` children) or legacy VHD (no tracking, `.avhd`
 * children), told apart by their magic (`formats/detect.ts`), never by the file name. The host services ask here
 * for the format-specific steps (probe, child, offline merge, allocated extents) so each runs both alike.
 */
import { detectFormat } from '../formats/detect.js';
import { createVhd } from '../formats/vhd/create.js';
import { mergeVhd } from '../formats/vhd/merge.js';
import { VhdFile } from '../formats/vhd/vhd.js';
import { createVhdx } from '../formats/vhdx/create.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import { VHD_TRACKING_UNAVAILABLE } from '../disk/vhd-disk.js';
import { mergeWithTracking } from '../tracking/merge.js';
import { guidToString } from '../util/guid.js';

export { VHD_TRACKING_UNAVAILABLE };

export type HostDiskFormat = 'vhdx' | 'vhd';

/**
 * The format of a disk file the host runs: VHD when it carries a VHD footer, else VHDX. Anything that is not a VHD
 * goes to the VHDX reader, which reports what it is not (VHDX_CORRUPT for a damaged or unsigned file, as before VHD
 * disks were accepted; the format detection's name for qcow2 and the like).
 */
export async function diskFileFormat(file: string): Promise<HostDiskFormat> {
  return (await detectFormat(file)).format === 'vhd' ? 'vhd' : 'vhdx';
}

/** The extension of a checkpoint child of a disk of this format: Hyper-V's `.avhdx` and `.avhd`. */
export function childExtensionOf(format: HostDiskFormat): '.avhdx' | '.avhd' {
  return format === 'vhd' ? '.avhd' : '.avhdx';
}

/** Why a disk of this format can have no change tracking (null: it can). */
export function trackingUnavailable(format: HostDiskFormat): string | null {
  return format === 'vhd' ? VHD_TRACKING_UNAVAILABLE : null;
}

export interface DiskProbe {
  format: HostDiskFormat;
  virtualSize: number;
  /** VHDX: the virtual disk id; VHD: the base's unique id (a VHD chain has no shared id). */
  virtualDiskId: string;
  differencing: boolean;
}

/** What a disk to attach is: its format, size, id, and whether it is a differencing disk. */
export async function probeDiskFile(file: string, allowedRoots: string[]): Promise<DiskProbe> {
  const format = await diskFileFormat(file);
  if (format === 'vhd') {
    const f = await VhdFile.open(file, { allowedRoots, noParent: true });
    try {
      return {
        format,
        virtualSize: f.virtualSize,
        virtualDiskId: f.uniqueId,
        differencing: f.diskType === 'differencing',
      };
    } finally {
      await f.close();
    }
  }
  const f = await VhdxFile.open(file, { allowedRoots });
  try {
    return {
      format,
      virtualSize: f.virtualSize,
      virtualDiskId: guidToString(f.virtualDiskId),
      differencing: !!f.parent,
    };
  } finally {
    await f.close();
  }
}

/** Every file of the chain whose head is `file`, head first. */
export async function chainFiles(file: string, opts: { allowedRoots: string[] }): Promise<string[]> {
  if ((await diskFileFormat(file)) === 'vhd') {
    const f = await VhdFile.open(file, { allowedRoots: opts.allowedRoots });
    try {
      return f.chain().map((x) => x.path);
    } finally {
      await f.close();
    }
  }
  const f = await VhdxFile.open(file, { allowedRoots: opts.allowedRoots, noParent: false });
  try {
    return f.chain().map((x) => x.path);
  } finally {
    await f.close();
  }
}

/** Ranges any file of the chain whose head is `file` may hold data for (a VM that is off). */
export async function offlineAllocatedExtents(
  file: string,
  allowedRoots: string[],
  offset: number,
  length: number,
): Promise<{ offset: number; length: number }[]> {
  const d =
    (await diskFileFormat(file)) === 'vhd'
      ? await VhdFile.open(file, { allowedRoots })
      : await VhdxFile.open(file, { allowedRoots });
  try {
    return await d.allocatedExtents(offset, length);
  } finally {
    await d.close();
  }
}

/** Creates a checkpoint child over `parent` in the parent's format (the caller names it `childExtensionOf`). */
export async function createChildFile(child: string, parent: string, allowedRoots: string[]): Promise<void> {
  if ((await diskFileFormat(parent)) === 'vhd') {
    await createVhd(child, { parent, parentOpenOptions: { allowedRoots } });
  } else {
    await createVhdx(child, { parent, parentOpenOptions: { allowedRoots } });
  }
}

/**
 * Merges a differencing child into its parent offline: VHDX through the tracker's merge (the tracking binding
 * follows), VHD through the VHD engine's merge (no tracking to keep).
 */
export async function mergeChildFile(
  child: string,
  opts: { allowedRoots: string[] },
): Promise<{ parentPath: string; bytesCopied: number }> {
  if ((await diskFileFormat(child)) === 'vhd') {
    const r = await mergeVhd(child, { allowedRoots: opts.allowedRoots });
    return { parentPath: r.parentPath, bytesCopied: r.bytesCopied };
  }
  const r = await mergeWithTracking(child, { allowedRoots: opts.allowedRoots });
  return { parentPath: r.parentPath, bytesCopied: r.bytesCopied };
}
