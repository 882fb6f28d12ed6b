/**
 * Direct (page-cache-bypassing) writes: exactly the bytes given land in the file, aligned or not, direct or
 * buffered, at every size around the alignment; aligned memory is found where the file system takes O_DIRECT.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DIRECT_ALIGN, DIRECT_MIN_BYTES, DirectWriter, openDirect } from '../../src/util/direct-io.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const SEED = seedFrom('TIDEMARK_DIRECT_SEED', 5);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('direct-io'));
});
afterAll(async () => cleanup?.());

describe(`direct writes (seed ${SEED})`, () => {
  it('write exactly the given bytes at sizes around the alignment, from aligned and unaligned memory', async () => {
    const r = rng(SEED);
    const w = new DirectWriter(dir);
    try {
      const sizes = [0, 1, DIRECT_ALIGN - 1, DIRECT_MIN_BYTES, DIRECT_MIN_BYTES + 123, 3 * 2 ** 20, 3 * 2 ** 20 + 4095];
      let n = 0;
      for (const size of sizes) {
        const aligned = await w.buffer(size + DIRECT_ALIGN);
        r.bytes(aligned.length).copy(aligned);
        for (const data of [
          aligned.subarray(0, size),
          aligned.subarray(1, size + 1),
          Buffer.from(aligned.subarray(0, size)),
        ]) {
          for (const sync of [false, true]) {
            const f = path.join(dir, `f${++n}`);
            await w.writeNewFile(f, data, sync);
            expect((await readFile(f)).equals(data), `${size} bytes, sync ${sync}`).toBe(true);
            expect((await stat(f)).mode & 0o777).toBe(0o600);
          }
        }
      }
      // A new file only: an existing one is never overwritten.
      await writeFile(path.join(dir, 'exists'), 'x');
      await expect(w.writeNewFile(path.join(dir, 'exists'), Buffer.alloc(DIRECT_MIN_BYTES), false)).rejects.toThrow(
        /EEXIST/,
      );
    } finally {
      await w.close();
    }
  });

  it('where the file system takes O_DIRECT (as this test directory does on Linux ext4), buffers come aligned', async () => {
    await writeFile(path.join(dir, 'probe'), '');
    const probe = await openDirect(path.join(dir, 'probe'));
    const w = new DirectWriter(dir);
    try {
      const b = await w.buffer(DIRECT_MIN_BYTES);
      expect(b.length).toBe(DIRECT_MIN_BYTES);
      expect(w.isAligned(b)).toBe(probe !== null);
      expect(w.isAligned(b.subarray(DIRECT_ALIGN))).toBe(probe !== null);
      expect(w.isAligned(b.subarray(16))).toBe(false);
      expect(w.isAligned(Buffer.alloc(DIRECT_MIN_BYTES))).toBe(false);
    } finally {
      await probe?.close();
      await w.close();
    }
  });
});
