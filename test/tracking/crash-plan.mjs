// The operations a tracking crash worker performs, derived from (seed, index) alone, so the test process
// can recompute the content the disk had at every seal. Plain ESM, shared by crash-worker.mjs (which runs
// the built engine in dist/) and crash.test.ts.

import { mulberry32Words } from '../helpers/prng.mjs';

/** mulberry32 as 32-bit words: the tests' one generator (helpers/prng.mjs). */
export const words = mulberry32Words;

function opSeed(seed, i) {
  return (Math.imul(seed >>> 0, 2654435761) ^ Math.imul(i + 1, 40503) ^ 0x9e3779b9) >>> 0;
}

/**
 * Operation `i`: unaligned writes (most), write-zeroes, trims, flushes and seals. Writes are mostly
 * small, some up to 1 MiB; a third land near a 1 MiB block boundary, a few near the 64 MiB coarse-region
 * boundary, so the coarse map sees both regions.
 */
export function planOp(seed, i, size) {
  const w = words(opSeed(seed, i));
  const next = () => w() / 4294967296;
  const k = next();
  const kind = k < 0.72 ? 'write' : k < 0.78 ? 'zero' : k < 0.84 ? 'trim' : k < 0.92 ? 'flush' : 'seal';
  const length = 1 + Math.floor(next() * (next() < 0.15 ? 1024 * 1024 : 64 * 1024));
  const where = next();
  let near;
  if (where < 0.33) near = Math.floor(next() * (size / 2 ** 20 + 1)) * 2 ** 20 - Math.floor(next() * 4096);
  else if (where < 0.43) near = 64 * 2 ** 20 - Math.floor(next() * length);
  else near = Math.floor(next() * size);
  const offset = Math.max(0, Math.min(size - 1, near));
  return { kind, offset, length: Math.min(length, size - offset), dataSeed: w() };
}

/** The bytes write `op` puts at op.offset. */
export function opData(op) {
  const w = words(op.dataSeed);
  const n = op.length;
  const u32 = new Uint32Array((n >>> 2) + 1);
  for (let j = 0; j < u32.length; j++) u32[j] = w();
  return Buffer.from(u32.buffer, 0, n);
}
