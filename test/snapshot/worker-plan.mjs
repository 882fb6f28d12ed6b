// What a snapshot worker does to its files, derived from (seed, index) alone so the test process can
// recompute it. Plain ESM shared by snapshot-worker.mjs (which runs the built engine in dist/) and the tests.

/** mulberry32: the same generator as test/helpers/random.ts. */
export function mulberry(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** `length` seeded random bytes. */
export function randomBytes(seed, length) {
  const next = mulberry(seed);
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (next() * 256) | 0;
  return b;
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
