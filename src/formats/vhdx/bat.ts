/**
 * BAT geometry and entries (MS-VHDX 2.5). Entries are read through the metadata sector cache, so a
 * 512 MiB BAT (64 TiB in 1 MiB blocks) never has to sit in memory whole.
 */
import { MiB } from './constants.js';

export interface Geometry {
  virtualSize: number;
  blockSize: number;
  logicalSectorSize: number;
  hasParent: boolean;
  /** Payload blocks per sector bitmap block. */
  chunkRatio: number;
  dataBlocks: number;
  bitmapBlocks: number;
  batEntries: number;
  sectorsPerBlock: number;
}

export function computeGeometry(
  virtualSize: number,
  blockSize: number,
  logicalSectorSize: number,
  hasParent: boolean,
): Geometry {
  const chunkRatio = (2 ** 23 * logicalSectorSize) / blockSize;
  const dataBlocks = Math.ceil(virtualSize / blockSize);
  const bitmapBlocks = Math.ceil(dataBlocks / chunkRatio);
  const batEntries = hasParent
    ? bitmapBlocks * (chunkRatio + 1)
    : dataBlocks + Math.floor((dataBlocks - 1) / chunkRatio);
  return {
    virtualSize,
    blockSize,
    logicalSectorSize,
    hasParent,
    chunkRatio,
    dataBlocks,
    bitmapBlocks,
    batEntries,
    sectorsPerBlock: blockSize / logicalSectorSize,
  };
}

/** BAT region length for a new file: entries rounded up to 1 MiB. */
export function batRegionLength(g: Geometry): number {
  return Math.max(MiB, Math.ceil((g.batEntries * 8) / MiB) * MiB);
}

export function payloadBatIndex(g: Geometry, block: number): number {
  return block + Math.floor(block / g.chunkRatio);
}

export function bitmapBatIndex(g: Geometry, chunk: number): number {
  return chunk * (g.chunkRatio + 1) + g.chunkRatio;
}

export interface BatEntry {
  state: number;
  /** File offset in bytes (FileOffsetMB × 1 MiB). */
  offset: number;
  /** Non-zero reserved bits 3–19: a corrupt entry. */
  reservedBits: number;
}

export function decodeBatEntry(lo: number, hi: number): BatEntry {
  return { state: lo & 7, offset: ((lo >>> 20) + hi * 4096) * MiB, reservedBits: (lo >>> 3) & 0x1ffff };
}

export function encodeBatEntry(state: number, offset: number): [number, number] {
  const mb = offset / MiB;
  return [(((mb % 4096) << 20) | state) >>> 0, Math.floor(mb / 4096)];
}

/**
 * The BAT entries [first, first + n) chunk by chunk: entry `chunk * (chunkRatio + 1) + pos` for pos in
 * [from, to); pos === chunkRatio is the chunk's sector bitmap entry. Lets passes over the BAT account for
 * a piece of entries without visiting each one (an all-zero piece of a sparse disk's BAT).
 */
export function* chunkSpans(
  g: Geometry,
  first: number,
  n: number,
): Generator<{ chunk: number; from: number; to: number }> {
  const cr1 = g.chunkRatio + 1;
  for (let chunk = Math.floor(first / cr1); chunk * cr1 < first + n; chunk++) {
    const base = chunk * cr1;
    yield { chunk, from: Math.max(first, base) - base, to: Math.min(first + n, base + cr1) - base };
  }
}

/** How many payload entries of blocks inside the disk, and sector bitmap entries of chunks in use, [first, first + n) holds. */
export function countEntryKinds(g: Geometry, first: number, n: number): { payload: number; bitmap: number } {
  let payload = 0;
  let bitmap = 0;
  for (const { chunk, from, to } of chunkSpans(g, first, n)) {
    const blocksHere = Math.max(0, Math.min(g.chunkRatio, g.dataBlocks - chunk * g.chunkRatio));
    payload += Math.max(0, Math.min(to, blocksHere) - from);
    if (to > g.chunkRatio && chunk < g.bitmapBlocks) bitmap++;
  }
  return { payload, bitmap };
}
