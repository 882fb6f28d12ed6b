/**
 * Opening a host disk by its format: VHDX (`VirtualDisk`, with change tracking) or legacy VHD
 * (`VhdVirtualDisk`, without), told apart by their magic (`formats/detect.ts`), never by the file name.
 * Any other format is refused with NOT_SUPPORTED naming it.
 *
 * `HostDisk` is what the host, the NBD server and the snapshot sets use of an open disk, and what both
 * devices implement alike: a caller written against it runs VHDX and VHD disks the same way. Checkpoint
 * children are named by the caller: `.avhdx` for a VHDX head, `.avhd` for a VHD head (`childExtension`).
 */
import { TidemarkError } from '../errors.js';
import { detectOpenFile, unsupportedFormatError, type Detection } from '../formats/detect.js';
import type { ChangeTracker, ChangesResult } from '../tracking/tracker.js';
import { NodeFile } from '../util/file.js';
import type { BlockDevice } from './device.js';
import { VhdVirtualDisk } from './vhd-disk.js';
import {
  VirtualDisk,
  type OnlineMergeOptions,
  type OnlineMergeResult,
  type VirtualDiskOptions,
} from './virtual-disk.js';

/** The open head file as the host looks at it: its path, its chain's paths, what is allocated. */
export interface HostDiskFile {
  readonly path: string;
  chain(): readonly { readonly path: string }[];
  /** Ranges any file of the chain may hold data for (a full backup reads only these). */
  allocatedExtents(offset?: number, length?: number): Promise<{ offset: number; length: number }[]>;
}

/** What the host uses of a running disk, implemented alike by `VirtualDisk` (VHDX) and `VhdVirtualDisk`. */
export interface HostDisk extends BlockDevice {
  /** The head's path. */
  readonly path: string;
  readonly file: HostDiskFile;
  /** The change tracker; always undefined for VHD. */
  readonly changeTracker: ChangeTracker | undefined;

  pause(): Promise<void>;
  resume(): void;
  precreateChild(childPath: string, opts?: { blockSize?: number }): Promise<void>;
  prepareChild(
    childPath: string,
    opts?: { blockSize?: number; precreated?: boolean },
  ): Promise<{ id?: string; parentPath: string }>;
  switchHead(filePath: string): Promise<void>;
  mergeHeadOnline(opts?: OnlineMergeOptions): Promise<OnlineMergeResult>;
  changes(sinceId: string, offset?: number, length?: number, maxRanges?: number): Promise<ChangesResult>;
  seal(): Promise<string | undefined>;
  close(): Promise<void>;
}

/** The device `openDisk` returns: narrow it by `instanceof` (or `format` on the VHD one). */
export type OpenedDisk = VirtualDisk | VhdVirtualDisk;

// Both devices are HostDisks (a compile-time check: this fails to type-check if one drifts).
const _hostDisks: [HostDisk, HostDisk] = [undefined as unknown as VirtualDisk, undefined as unknown as VhdVirtualDisk];
void _hostDisks;

/** The extension of a checkpoint child for a head of this format: Hyper-V's `.avhdx` and `.avhd`. */
export function childExtension(disk: OpenedDisk): '.avhdx' | '.avhd' {
  return disk instanceof VhdVirtualDisk ? '.avhd' : '.avhdx';
}

/**
 * Opens the disk at `filePath` as the device of its format: a VHDX as `VirtualDisk` (all options), a VHD
 * as `VhdVirtualDisk` (`tracking` does not apply: VHD has none). The format is read through `openFile`
 * when given (a storage snapshot's view). Other formats: NOT_SUPPORTED, naming the format.
 */
export async function openDisk(filePath: string, opts: VirtualDiskOptions = {}): Promise<OpenedDisk> {
  const d = await detectDiskFormat(filePath, opts.openFile);
  if (d.format === 'vhdx') return VirtualDisk.open(filePath, opts);
  if (d.format === 'vhd') {
    return VhdVirtualDisk.open(filePath, {
      readOnly: opts.readOnly,
      allowedRoots: opts.allowedRoots,
      pathMap: opts.pathMap,
      openFile: opts.openFile,
    });
  }
  if (d.format === 'raw') {
    throw new TidemarkError(
      'NOT_SUPPORTED',
      `${filePath} is a raw image (no VHDX or VHD signature), which Tidemark's disk layer does not run: convert it first, e.g. qemu-img convert -f raw -O vhdx ${filePath} OUT.vhdx`,
      { path: filePath, format: 'raw' },
    );
  }
  throw unsupportedFormatError(filePath, d, { reader: "Tidemark's disk layer (VHDX and VHD)" });
}

async function detectDiskFormat(filePath: string, openFile: VirtualDiskOptions['openFile']): Promise<Detection> {
  const file = openFile ? await openFile(filePath, false) : await NodeFile.open(filePath, 'r');
  try {
    return await detectOpenFile(file);
  } finally {
    await file.close();
  }
}
