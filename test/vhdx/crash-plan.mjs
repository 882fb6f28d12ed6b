// The writes a crash worker makes, derived from (seed, index) so the test can recompute them.
// Sector-aligned (512 bytes) so every sector holds exactly one write's bytes or older content.
export function planWrite(seed, i, size) {
  let a = (seed * 2654435761 + i * 40503 + 1) >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const sectors = 1 + Math.floor(next() * (next() < 0.2 ? 4096 : 64));
  const total = size / 512;
  const first = Math.floor(next() * (total - sectors));
  const data = Buffer.alloc(sectors * 512);
  // Each sector names its write and its position, so a sector read back says where it came from.
  for (let s = 0; s < sectors; s++) {
    data.writeUInt32LE(i + 1, s * 512);
    data.writeUInt32LE(first + s, s * 512 + 4);
    data.fill((i * 31 + s) & 0xff, s * 512 + 8, s * 512 + 512);
  }
  return { offset: first * 512, data };
}
