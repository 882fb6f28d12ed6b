/**
 * `vhdx info`: every header, region, metadata item, parent locator key, the BAT state histogram and
 * the chain, as one JSON-ready object (the shape is documented in docs/cli.md and kept stable).
 */
import { TidemarkError } from '../../errors.js';
import { guidEquals, guidToString } from '../../util/guid.js';
import {
  BLOCK_STATE_NAMES,
  BlockState,
  HEADER_OFFSETS,
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_VIRTUAL_DISK_SIZE,
  MiB,
  REGION_BAT,
  REGION_METADATA,
  REGION_TABLE_OFFSETS,
  SB_PRESENT,
} from './constants.js';
import { hex, type VhdxHeader } from './header.js';
import { lowWords } from './placement.js';
import { countEntryKinds } from './bat.js';
import { isAllZero } from '../../util/zero.js';
import { VhdxFile, type OpenOptions } from './vhdx.js';

const ITEM_NAMES: [Buffer, string][] = [
  [ITEM_FILE_PARAMETERS, 'file_parameters'],
  [ITEM_VIRTUAL_DISK_SIZE, 'virtual_disk_size'],
  [ITEM_VIRTUAL_DISK_ID, 'virtual_disk_id'],
  [ITEM_LOGICAL_SECTOR_SIZE, 'logical_sector_size'],
  [ITEM_PHYSICAL_SECTOR_SIZE, 'physical_sector_size'],
  [ITEM_PARENT_LOCATOR, 'parent_locator'],
];

export function itemName(id: Buffer, isUser: boolean): string {
  return (!isUser && ITEM_NAMES.find(([g]) => guidEquals(g, id))?.[1]) || 'unknown';
}

function regionName(id: Buffer): string {
  return guidEquals(id, REGION_BAT) ? 'bat' : guidEquals(id, REGION_METADATA) ? 'metadata' : 'unknown';
}

function headerInfo(h: VhdxHeader | string, slot: 0 | 1, current: boolean) {
  const base = { slot: slot + 1, offset: HEADER_OFFSETS[slot] };
  if (typeof h === 'string') return { ...base, valid: false, current: false, problem: h };
  return {
    ...base,
    valid: true,
    current,
    sequenceNumber: h.sequenceNumber.toString(),
    checksum: `0x${hex(h.checksum)}`,
    fileWriteGuid: guidToString(h.fileWriteGuid),
    dataWriteGuid: guidToString(h.dataWriteGuid),
    logGuid: guidToString(h.logGuid),
    logVersion: h.logVersion,
    version: h.version,
    logOffset: h.logOffset,
    logLength: h.logLength,
  };
}

export interface BatHistogram {
  entries: number;
  payloadBlocks: number;
  sectorBitmapBlocks: number;
  chunkRatio: number;
  payload: Record<string, number>;
  sectorBitmap: Record<string, number>;
  /** Bytes of payload blocks allocated in the file (fully or partially present). */
  allocatedBytes: number;
}

/** Counts entry states, reading the BAT in 1 MiB pieces (a 64 TiB disk in 1 MiB blocks has 64 Mi entries). */
export async function batHistogram(disk: VhdxFile): Promise<BatHistogram> {
  const g = disk.geometry;
  const payload: Record<string, number> = {};
  const sectorBitmap: Record<string, number> = {};
  const payloadCounts = new Array<number>(8).fill(0);
  const bitmapCounts = new Array<number>(8).fill(0);
  const piece = Buffer.alloc(Math.min(MiB, g.batEntries * 8));
  const lows = lowWords(piece);
  let chunk = 0;
  let pos = 0; // index = chunk * (chunkRatio + 1) + pos
  for (let first = 0; first < g.batEntries; first += MiB / 8) {
    const view = piece.subarray(0, Math.min(MiB / 8, g.batEntries - first) * 8);
    await disk.readBatRaw(view, first);
    if (isAllZero(view)) {
      // A piece of a sparse disk's BAT: all NOT_PRESENT, counted without visiting each entry.
      const kinds = countEntryKinds(g, first, view.length / 8);
      payloadCounts[0] += kinds.payload;
      bitmapCounts[0] += kinds.bitmap;
      const next = first + view.length / 8;
      chunk = Math.floor(next / (g.chunkRatio + 1));
      pos = next - chunk * (g.chunkRatio + 1);
      continue;
    }
    for (let k = 0; k < view.length / 8; k++, pos === g.chunkRatio ? ((pos = 0), chunk++) : pos++) {
      const state = (lows ? lows[2 * k] : view.readUInt32LE(k * 8)) & 7;
      if (pos === g.chunkRatio) {
        if (chunk < g.bitmapBlocks) bitmapCounts[state]++;
      } else if (chunk * g.chunkRatio + pos < g.dataBlocks) payloadCounts[state]++;
    }
  }
  payloadCounts.forEach((n, state) => {
    if (n > 0) payload[BLOCK_STATE_NAMES[state] ?? `invalid_${state}`] = n;
  });
  bitmapCounts.forEach((n, state) => {
    if (n > 0) sectorBitmap[state === 0 ? 'not_present' : state === SB_PRESENT ? 'present' : `invalid_${state}`] = n;
  });
  const allocated = (payloadCounts[BlockState.FullyPresent] + payloadCounts[BlockState.PartiallyPresent]) * g.blockSize;
  return {
    entries: g.batEntries,
    payloadBlocks: g.dataBlocks,
    sectorBitmapBlocks: g.bitmapBlocks,
    chunkRatio: g.chunkRatio,
    payload,
    sectorBitmap,
    allocatedBytes: allocated,
  };
}

export async function vhdxInfo(path: string, opts: Pick<OpenOptions, 'allowedRoots' | 'pathMap'> = {}) {
  const disk = await VhdxFile.open(path, { ...opts, noParent: true });
  try {
    const locator = disk.parentLocator;
    const info = {
      path: disk.path,
      format: 'vhdx' as const,
      type: disk.diskType,
      creator: disk.identifier.creator,
      fileSize: disk.fileSize,
      virtualSize: disk.virtualSize,
      blockSize: disk.blockSize,
      logicalSectorSize: disk.logicalSectorSize,
      physicalSectorSize: disk.physicalSectorSize,
      virtualDiskId: guidToString(disk.virtualDiskId),
      leaveBlockAllocated: disk.params.leaveBlockAllocated,
      hasParent: disk.params.hasParent,
      headers: [0, 1].map((s) => headerInfo(disk.headerSlots[s], s as 0 | 1, disk.currentHeaderSlot === s)),
      regionTables: [0, 1].map((c) => {
        const t = disk.regionTables[c];
        const base = { copy: c + 1, offset: REGION_TABLE_OFFSETS[c], inUse: disk.regionTableInUse === c };
        if (typeof t === 'string') return { ...base, valid: false, problem: t };
        return {
          ...base,
          valid: true,
          checksum: `0x${hex(t.checksum)}`,
          entries: t.entries.map((e) => ({
            guid: guidToString(e.guid),
            name: regionName(e.guid),
            fileOffset: e.fileOffset,
            length: e.length,
            required: e.required,
          })),
        };
      }),
      log: {
        offset: disk.header.logOffset,
        length: disk.header.logLength,
        guid: guidToString(disk.header.logGuid),
        replayed: disk.replay ?? null,
      },
      metadata: {
        offset: disk.metadataRegion.fileOffset,
        length: disk.metadataRegion.length,
        items: disk.metadataEntries.map((e) => ({
          itemId: guidToString(e.itemId),
          name: itemName(e.itemId, e.isUser),
          offset: e.offset,
          length: e.length,
          isUser: e.isUser,
          isVirtualDisk: e.isVirtualDisk,
          isRequired: e.isRequired,
        })),
      },
      parentLocator: locator
        ? { type: guidToString(locator.locatorType), entries: Object.fromEntries(locator.entries) }
        : null,
      bat: await batHistogram(disk),
      chain: await chainInfo(path, opts),
      warnings: disk.warnings,
    };
    return info;
  } finally {
    await disk.close();
  }
}

export type VhdxInfo = Awaited<ReturnType<typeof vhdxInfo>>;

export interface ChainLink {
  path: string;
  type?: string;
  virtualSize?: number;
  dataWriteGuid?: string;
  parentLinkage?: string;
  parentLinkage2?: string;
  foundBy?: string;
  error?: { code: string; message: string };
}

/** The chain from `path` to its base; a link that cannot be opened is reported, not thrown. */
export async function chainInfo(
  path: string,
  opts: Pick<OpenOptions, 'allowedRoots' | 'pathMap'>,
): Promise<ChainLink[]> {
  let disk: VhdxFile;
  try {
    disk = await VhdxFile.open(path, opts);
  } catch (err) {
    if (!(err instanceof TidemarkError)) throw err;
    return [{ path, error: { code: err.code, message: err.message } }];
  }
  try {
    return disk.chain().map((d) => ({
      path: d.path,
      type: d.diskType,
      virtualSize: d.virtualSize,
      dataWriteGuid: guidToString(d.header.dataWriteGuid),
      parentLinkage: d.parentLocator?.entries.find(([k]) => k === 'parent_linkage')?.[1],
      parentLinkage2: d.parentLocator?.entries.find(([k]) => k === 'parent_linkage2')?.[1],
      foundBy: d.parentLink?.foundBy,
    }));
  } finally {
    await disk.close();
  }
}
