/** A small seeded PRNG (mulberry32) so random tests are reproducible: every test prints its seed. */
export function rng(seed: number): {
  next(): number;
  int(n: number): number;
  pick<T>(xs: T[]): T;
  bytes(n: number): Buffer;
} {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return {
    next,
    int: (n: number) => Math.floor(next() * n),
    pick: <T>(xs: T[]) => xs[Math.floor(next() * xs.length)],
    bytes: (n: number) => {
      const b = Buffer.allocUnsafe(n);
      const words = n >>> 2;
      for (let i = 0; i < words; i++) b.writeUInt32LE((next() * 4294967296) >>> 0, i * 4);
      for (let i = words * 4; i < n; i++) b[i] = (next() * 256) | 0;
      return b;
    },
  };
}

export function seedFrom(envName: string, fallback: number): number {
  const v = process.env[envName];
  return v ? Number(v) : fallback;
}
