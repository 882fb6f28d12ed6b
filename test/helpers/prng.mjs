// The one seeded PRNG of the tests (mulberry32): plain ESM, so the worker scripts that run outside vitest
// (crash and snapshot workers) import the same code as the TypeScript tests. A printed seed replays the
// same case only while every caller draws from this one implementation: do not change a sequence here.

/** mulberry32 as 32-bit unsigned words. */
export function mulberry32Words(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** mulberry32 as numbers in [0, 1). */
export function mulberry32(seed) {
  const word = mulberry32Words(seed);
  return () => word() / 4294967296;
}

/**
 * A seeded generator with the helpers the tests use. `bytes` packs whole words (little-endian) and draws
 * one number per tail byte; `bytesEach` draws one number per byte (the older, slower layout some tests
 * keep so their printed seeds still replay).
 */
export function rng(seed) {
  const next = mulberry32(seed);
  const fill = (b) => {
    const words = b.length >>> 2;
    for (let i = 0; i < words; i++) b.writeUInt32LE((next() * 4294967296) >>> 0, i * 4);
    for (let i = words * 4; i < b.length; i++) b[i] = (next() * 256) | 0;
    return b;
  };
  return {
    next,
    int: (n) => Math.floor(next() * n),
    chance: (p) => next() < p,
    pick: (xs) => xs[Math.floor(next() * xs.length)],
    u32: () => (next() * 4294967296) >>> 0,
    bytes: (n) => fill(Buffer.alloc(n)),
    bytesEach: (n) => {
      const b = Buffer.alloc(n);
      for (let i = 0; i < n; i++) b[i] = (next() * 256) | 0;
      return b;
    },
  };
}
