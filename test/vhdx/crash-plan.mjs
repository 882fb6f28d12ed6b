// The writes a crash worker makes, derived from (seed, index) alone so the test process can recompute them.
// Plain ESM shared by the worker (which runs the built engine in dist/) and crash.test.ts.
//
// Writes are whole 512-byte sectors, and every sector names its write, its own position and the seed,
// so a sector read back after a crash says exactly which write it came from (or that it is garbage).

import { mulberry32 } from '../helpers/prng.mjs';

export const SECTOR = 512;

/** mulberry32 in [0, 1): the tests' one generator (helpers/prng.mjs). */
export const mulberry = mulberry32;

/**
 * Write `i` of the trial with `seed` on a disk of `size` bytes: mostly small (1–64 sectors, so blocks
 * keep being allocated one by one through the run), one in five up to 2 MiB (spanning blocks).
 */
export function planWrite(seed, i, size) {
  const next = mulberry((Math.imul(seed, 2654435761) ^ Math.imul(i + 1, 40503)) >>> 0);
  const total = size / SECTOR;
  const sectors = 1 + Math.floor(next() * (next() < 0.2 ? 4096 : 64));
  const first = Math.floor(next() * (total - sectors + 1));
  const data = Buffer.alloc(sectors * SECTOR);
  for (let s = 0; s < sectors; s++) fillSector(data.subarray(s * SECTOR, (s + 1) * SECTOR), seed, i, first + s);
  return { offset: first * SECTOR, data };
}

/** The content write `i` puts into virtual sector `sector`. */
export function fillSector(buf, seed, i, sector) {
  buf.writeUInt32LE(i + 1, 0);
  buf.writeUInt32LE(sector, 4);
  buf.writeUInt32LE(seed >>> 0, 8);
  buf.fill((i * 31 + sector) & 0xff, 12, SECTOR);
}

/** Which write a sector claims to come from (-1 when it does not carry this seed's tag). */
export function sectorWriteIndex(buf, seed) {
  if (buf.readUInt32LE(8) !== seed >>> 0) return -1;
  return buf.readUInt32LE(0) - 1;
}
