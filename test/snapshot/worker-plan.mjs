// What a snapshot worker does to its files, derived from (seed, index) alone so the test process can
// recompute it. Plain ESM shared by snapshot-worker.mjs (which runs the built engine in dist/) and the tests.

import { mulberry32, rng } from '../helpers/prng.mjs';

/** mulberry32 in [0, 1): the tests' one generator (helpers/prng.mjs). */
export const mulberry = mulberry32;

/** `length` seeded random bytes, one draw each. */
export function randomBytes(seed, length) {
  return rng(seed).bytesEach(length);
}

/** The content file `index` starts with. */
export function initialContent(seed, index, size) {
  return randomBytes((Math.imul(seed, 2246822519) ^ Math.imul(index + 1, 3266489917)) >>> 0, size);
}

/**
 * Operation `i` over `files` files of up to about `maxSize` bytes: mostly a write (1 B to 192 KiB, now and
 * then past the end), one in ten a truncate (shorter or longer).
 */
export function planOp(seed, i, files, maxSize) {
  const next = mulberry((Math.imul(seed, 2654435761) ^ Math.imul(i + 1, 40503)) >>> 0);
  const file = Math.floor(next() * files);
  if (next() < 0.1) return { file, kind: 'truncate', size: Math.floor(next() * maxSize * 1.1) };
  const length = 1 + Math.floor(next() * (next() < 0.3 ? 192 * 1024 : 4096));
  const offset = Math.floor(next() * (maxSize + 65536));
  return { file, kind: 'write', offset, data: randomBytes(((seed ^ 0x5bd1e995) + i * 7919) >>> 0, length) };
}

/** Applies an operation to in-memory file contents (an array of Buffers); returns the new array. */
export function applyOp(contents, op) {
  const out = contents.slice();
  const cur = out[op.file];
  if (op.kind === 'truncate') {
    const next = Buffer.alloc(op.size);
    cur.copy(next, 0, 0, Math.min(cur.length, op.size));
    out[op.file] = next;
  } else {
    const end = op.offset + op.data.length;
    const next = Buffer.alloc(Math.max(cur.length, end));
    cur.copy(next);
    op.data.copy(next, op.offset);
    out[op.file] = next;
  }
  return out;
}
