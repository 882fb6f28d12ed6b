/**
 * Where new blocks go and what their unwritten bytes read: a block placed at the end of the file reads
 * zeros wherever it was not written, even over bytes a crash left past the last structure; zeroing the
 * never-written parts of a fresh block writes nothing to the file (nbdcopy and qemu-img zero every gap
 * between data), while zeroing bytes once written does write. A seeded mix of writes, write-zeroes and
 * trims over a few blocks checks the content against an expected image, before and after reopening,
 * and against qemu-img.
 *
 * Seed: TIDEMARK_ALLOC_SEED (printed).
 */
import { appendFileSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { qemuImgConvertToRaw, requirePeers, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { readWholeVhdx } from '../helpers/vhdx.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_ALLOC_SEED', 20261124);
console.log(`allocation seed ${SEED} (set TIDEMARK_ALLOC_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('alloc')));
afterAll(async () => cleanup());

/** Bytes the host file system holds for `file`. */
const allocatedBytes = (file: string) => statSync(file).blocks * 512;

describe('block allocation', () => {
  it('a block placed over bytes a crash left past the last structure reads zeros where unwritten', async () => {
    const file = path.join(dir, 'stale-tail.vhdx');
    await createVhdx(file, { size: 16 * MiB, blockSize: MiB });
    // What a crash between writing a new block's data and committing its BAT entry leaves behind.
    appendFileSync(file, Buffer.alloc(4 * MiB, 0xab));
    const disk = await VhdxFile.open(file, { writable: true });
    const data = Buffer.alloc(4096, 0x5a);
    await disk.write(data, 3 * MiB);
    await disk.close();
    const expected = Buffer.alloc(16 * MiB);
    data.copy(expected, 3 * MiB);
    expect((await readWholeVhdx(file)).equals(expected)).toBe(true);
  });

  it('zeroing the never-written parts of fresh blocks writes nothing; zeroing written bytes does', async () => {
    const file = path.join(dir, 'fresh.vhdx');
    await createVhdx(file, { size: 64 * MiB, blockSize: 4 * MiB });
    const before = allocatedBytes(file);
    const disk = await VhdxFile.open(file, { writable: true });
    const expected = Buffer.alloc(64 * MiB);
    // nbdcopy's pattern over a sparse source: 1 MiB of data, then write-zeroes for the 1 MiB gap.
    for (let at = 0; at < 64 * MiB; at += 2 * MiB) {
      const piece = Buffer.alloc(MiB, (at / MiB) | 1);
      await disk.write(piece, at);
      piece.copy(expected, at);
      await disk.writeZeroes(at + MiB, MiB);
    }
    await disk.flush();
    const grown = allocatedBytes(file) - before;
    // 32 MiB of data (plus metadata and log), not the 64 MiB the blocks span.
    expect(grown).toBeLessThan(40 * MiB);
    // Zeroing written bytes must reach the file: the first half of every block goes back to zeros.
    for (let at = 0; at < 64 * MiB; at += 4 * MiB) {
      await disk.writeZeroes(at, MiB);
      expected.fill(0, at, at + MiB);
    }
    // Writing into a gap that was zeroed while fresh, then zeroing part of it again.
    await disk.write(Buffer.alloc(8192, 0x77), MiB + 4096);
    expected.fill(0x77, MiB + 4096, MiB + 4096 + 8192);
    await disk.writeZeroes(MiB + 8192, 512);
    expected.fill(0, MiB + 8192, MiB + 8192 + 512);
    expect((await disk.readAt(0, 64 * MiB)).equals(expected)).toBe(true);
    await disk.close();
    expect((await readWholeVhdx(file)).equals(expected)).toBe(true);
  });

  it.skipIf(requirePeers('qemu-img').skip)(
    `seeded writes, write-zeroes and trims read back exactly, here and in qemu-img (seed ${SEED})`,
    async () => {
      const r = rng(SEED);
      const size = 8 * MiB;
      const file = path.join(dir, 'mix.vhdx');
      await createVhdx(file, { size, blockSize: MiB });
      const expected = Buffer.alloc(size);
      let disk = await VhdxFile.open(file, { writable: true });
      const rounds = Number(process.env.TIDEMARK_ALLOC_ROUNDS ?? 400);
      for (let i = 0; i < rounds; i++) {
        const sectors = 1 + r.int(r.next() < 0.2 ? 4096 : 64);
        const length = sectors * 512;
        const offset = r.int((size - length) / 512 + 1) * 512;
        const op = r.int(10);
        if (op < 5) {
          const data = r.bytes(length);
          await disk.write(data, offset);
          data.copy(expected, offset);
        } else if (op < 8) {
          await disk.writeZeroes(offset, length, { noHole: r.next() < 0.5 });
          expected.fill(0, offset, offset + length);
        } else {
          await disk.trim(offset, length);
          expected.fill(0, offset, offset + length);
        }
        if (i % 50 === 49) {
          expect((await disk.readAt(0, size)).equals(expected), `after op ${i}`).toBe(true);
          await disk.close();
          disk = await VhdxFile.open(file, { writable: true });
        }
      }
      await disk.close();
      expect((await readWholeVhdx(file)).equals(expected)).toBe(true);
      const raw = path.join(dir, 'mix.raw');
      await qemuImgConvertToRaw(file, 'vhdx', raw);
      expect(readFileSync(raw).equals(expected)).toBe(true);
    },
  );
});
