/**
 * The block allocation table and the sector bitmaps of dynamic and differencing disks. A BAT entry is a
 * big-endian u32: the sector where the block's bitmap starts, or 0xFFFFFFFF for a block not allocated.
 * The block's data follows its bitmap, which holds one bit per 512-byte sector (most significant bit
 * first), padded to a whole sector: 1 = this file holds the sector; 0 = zeros in a dynamic disk, the
 * parent's sector in a differencing disk.
 */
import { BAT_UNUSED, SECTOR } from './constants.js';

export interface BlockLayout {
  blockSize: number;
  /** Bytes of a block's sector bitmap (padded to whole sectors). */
  bitmapBytes: number;
  sectorsPerBlock: number;
  /** Blocks the virtual size needs (the BAT may hold more entries). */
  dataBlocks: number;
}

export function blockLayout(virtualSize: number, blockSize: number): BlockLayout {
  const sectorsPerBlock = blockSize / SECTOR;
  return {
    blockSize,
    bitmapBytes: Math.ceil(Math.ceil(sectorsPerBlock / 8) / SECTOR) * SECTOR,
    sectorsPerBlock,
    dataBlocks: Math.ceil(virtualSize / blockSize),
  };
}

/** BAT bytes on disk for `entries` entries: whole sectors. */
export function batBytes(entries: number): number {
  return Math.ceil((entries * 4) / SECTOR) * SECTOR;
}

/** The byte offset of a block's bitmap, or undefined for a block that is not allocated. */
export function decodeBatEntry(raw: number): number | undefined {
  return raw === BAT_UNUSED ? undefined : raw * SECTOR;
}

export function encodeBatEntry(bitmapOffset: number | undefined): number {
  if (bitmapOffset === undefined) return BAT_UNUSED;
  if (bitmapOffset % SECTOR !== 0 || bitmapOffset / SECTOR >= BAT_UNUSED) {
    throw new RangeError(`block offset ${bitmapOffset} is not a sector below 2^32 - 1`);
  }
  return bitmapOffset / SECTOR;
}

export function bitmapBit(bitmap: Uint8Array, sector: number): boolean {
  return (bitmap[sector >> 3] & (0x80 >> (sector & 7))) !== 0;
}

/** Sets or clears bits [s0, s1) of a bitmap, whole bytes at a time where it can. */
export function setBitmapRange(bitmap: Uint8Array, s0: number, s1: number, value: boolean): void {
  let s = s0;
  while (s < s1) {
    if ((s & 7) === 0 && s + 8 <= s1) {
      const bytes = (s1 - s) >> 3;
      bitmap.fill(value ? 0xff : 0, s >> 3, (s >> 3) + bytes);
      s += bytes * 8;
      continue;
    }
    if (value) bitmap[s >> 3] |= 0x80 >> (s & 7);
    else bitmap[s >> 3] &= ~(0x80 >> (s & 7));
    s++;
  }
}

/** Visits runs of equal bits over sectors [s0, s1): skips whole 0x00 / 0xff bytes at once. */
export function bitmapRuns(
  bitmap: Uint8Array,
  s0: number,
  s1: number,
  visit: (from: number, to: number, present: boolean) => void,
): void {
  if (s0 >= s1) return;
  let runStart = s0;
  let runValue = bitmapBit(bitmap, s0);
  let s = s0 + 1;
  while (s < s1) {
    if ((s & 7) === 0 && s + 8 <= s1) {
      const byte = bitmap[s >> 3];
      if (byte === (runValue ? 0xff : 0)) {
        s += 8;
        continue;
      }
    }
    const v = bitmapBit(bitmap, s);
    if (v !== runValue) {
      visit(runStart, s, runValue);
      runStart = s;
      runValue = v;
    }
    s++;
  }
  visit(runStart, s1, runValue);
}
