/** Seeded writes, write-zeroes and trims through the engine, mirrored into an expected image. */
import type { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { rng } from './random.js';

const MiB = 2 ** 20;

/**
 * Seeded writes, write-zeroes and trims through the engine, mirrored into `expected`: unaligned
 * offsets and lengths, half of them straddling a block boundary.
 */
export async function scribble(disk: VhdxFile, expected: Buffer, seed: number, ops: number): Promise<void> {
  const r = rng(seed);
  const size = expected.length;
  const blocks = Math.ceil(size / disk.blockSize);
  for (let i = 0; i < ops; i++) {
    const kind = r.next();
    const len = 1 + r.int(r.next() < 0.3 ? 4 * MiB : 64 * 1024);
    const near = r.next() < 0.5 ? r.int(blocks) * disk.blockSize - r.int(len) : r.int(size);
    const offset = Math.max(0, Math.min(size - 1, near));
    const n = Math.min(len, size - offset);
    if (kind < 0.8) {
      const data = r.bytes(n);
      await disk.write(data, offset);
      data.copy(expected, offset);
    } else if (kind < 0.9) {
      await disk.writeZeroes(offset, n);
      expected.fill(0, offset, offset + n);
    } else {
      await disk.trim(offset, n);
      expected.fill(0, offset, offset + n);
    }
    if (r.next() < 0.1) await disk.flush();
  }
}
