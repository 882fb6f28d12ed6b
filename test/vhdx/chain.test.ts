/**
 * Differencing chains: depth ≥ 3 written by us read identically in 7zz and vhdimount; merges keep the
 * content and pass qemu-img; flattening converts; parent locators are checked and confined.
 */
import { copyFileSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { convertImage } from '../../src/formats/vhdx/convert.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { mergeIntoParent } from '../../src/formats/vhdx/merge.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { missingPeers, qemuImgCheck, qemuImgCompare, sevenZipExtract, tempDir, vhdiExtract } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { scribble } from '../helpers/scribble.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_CHAIN_SEED', 4242);
console.log(`chain seed ${SEED} (TIDEMARK_CHAIN_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('chain')));
afterAll(async () => cleanup());

async function readAll(file: string, opts = {}): Promise<Buffer> {
  const disk = await VhdxFile.open(file, opts);
  try {
    return await disk.readAt(0, disk.virtualSize);
  } finally {
    await disk.close();
  }
}

async function writeInto(file: string, expected: Buffer, seed: number): Promise<void> {
  const disk = await VhdxFile.open(file, { writable: true });
  try {
    await scribble(disk, expected, seed, 50);
    // Small writes into blocks the parent provides: partially present blocks and sector bitmaps.
    const r = rng(seed + 1);
    for (let i = 0; i < 20; i++) {
      const n = 512 * (1 + r.int(16));
      const at = r.int(expected.length / 512 - 16) * 512 + (i % 3 === 0 ? 100 : 0);
      const data = r.bytes(n);
      await disk.write(data, at);
      data.copy(expected, at);
    }
  } finally {
    await disk.close();
  }
}

const SIZE = 48 * MiB + 64 * 1024;

describe.skipIf(missingPeers('qemu-img', '7zz', 'vhdimount'))('chains of depth 4', () => {
  it('read identically through the engine, 7zz and vhdimount; merge and flatten keep the content', async () => {
    const files = ['base.vhdx', 'c1.avhdx', 'c2.avhdx', 'c3.avhdx'].map((f) => path.join(dir, f));
    const expected = Buffer.alloc(SIZE);
    await createVhdx(files[0], { size: SIZE, blockSize: 2 * MiB });
    await writeInto(files[0], expected, SEED);
    const levels: Buffer[] = [Buffer.from(expected)];
    for (let i = 1; i < files.length; i++) {
      await createVhdx(files[i], { parent: files[i - 1], blockSize: i === 2 ? MiB : 2 * MiB });
      await writeInto(files[i], expected, SEED + i * 100);
      levels.push(Buffer.from(expected));
    }
    for (let i = 0; i < files.length; i++) {
      expect((await readAll(files[i])).equals(levels[i]), `level ${i} through the engine`).toBe(true);
      expect((await checkVhdx(files[i])).errors).toEqual([]);
    }
    const top = files[3];
    await sevenZipExtract(top, `${top}.7z.raw`);
    expect(readFileSync(`${top}.7z.raw`).equals(levels[3]), '7zz reads the chain').toBe(true);
    await vhdiExtract(top, `${top}.vhdi.raw`);
    expect(readFileSync(`${top}.vhdi.raw`).equals(levels[3]), 'vhdimount reads the chain').toBe(true);

    // Flatten the chain: one VHDX and a raw image.
    await convertImage(top, `${dir}/flat.vhdx`);
    await convertImage(top, `${dir}/flat.raw`);
    expect(readFileSync(`${dir}/flat.raw`).equals(levels[3])).toBe(true);
    expect((await qemuImgCheck(`${dir}/flat.vhdx`)).ok).toBe(true);
    expect((await qemuImgCompare(`${dir}/flat.vhdx`, 'vhdx', `${dir}/flat.raw`, 'raw')).identical).toBe(true);

    // Merge from the top down to the base; each step keeps what the chain reads.
    for (let i = 3; i >= 1; i--) {
      const r = await mergeIntoParent(files[i]);
      expect(r.parentPath).toBe(files[i - 1]);
      expect((await readAll(files[i - 1])).equals(levels[3]), `after merging ${i}`).toBe(true);
    }
    writeFileSync(`${dir}/expected.raw`, levels[3]);
    const check = await qemuImgCheck(files[0]);
    expect(check.ok, check.output).toBe(true);
    expect((await qemuImgCompare(files[0], 'vhdx', `${dir}/expected.raw`, 'raw')).identical).toBe(true);
  });
});

describe('parent locators', () => {
  it('a parent elsewhere opens only from an allowed directory', async () => {
    mkdirSync(`${dir}/bases`, { recursive: true });
    mkdirSync(`${dir}/kids`, { recursive: true });
    await createVhdx(`${dir}/bases/p.vhdx`, { size: 8 * MiB });
    await createVhdx(`${dir}/kids/k.avhdx`, { parent: `${dir}/bases/p.vhdx` });
    await expect(VhdxFile.open(`${dir}/kids/k.avhdx`)).rejects.toMatchObject({ code: 'PATH_NOT_ALLOWED' });
    const ok = await VhdxFile.open(`${dir}/kids/k.avhdx`, { allowedRoots: [`${dir}/kids`, `${dir}/bases`] });
    expect(ok.parentLink?.foundBy).toBe('relative_path');
    await ok.close();
  });

  it('a parent modified after the child was made is refused (DataWriteGuid)', async () => {
    await createVhdx(`${dir}/m.vhdx`, { size: 8 * MiB });
    await createVhdx(`${dir}/m-child.avhdx`, { parent: `${dir}/m.vhdx` });
    const p = await VhdxFile.open(`${dir}/m.vhdx`, { writable: true });
    await p.write(Buffer.alloc(512, 1), 0);
    await p.close();
    const err = await VhdxFile.open(`${dir}/m-child.avhdx`).catch((e) => e);
    expect(err).toBeInstanceOf(TidemarkError);
    expect(err.code).toBe('PARENT_MISMATCH');
  });

  it('a chain moved together still opens through relative_path; a parent gone is named', async () => {
    mkdirSync(`${dir}/a`, { recursive: true });
    await createVhdx(`${dir}/a/b.vhdx`, { size: 8 * MiB });
    await createVhdx(`${dir}/a/c.avhdx`, { parent: `${dir}/a/b.vhdx` });
    renameSync(`${dir}/a`, `${dir}/moved`);
    const d = await VhdxFile.open(`${dir}/moved/c.avhdx`);
    expect(d.parent?.path).toBe(`${dir}/moved/b.vhdx`);
    await d.close();
    copyFileSync(`${dir}/moved/c.avhdx`, `${dir}/orphan.avhdx`);
    const err = await VhdxFile.open(`${dir}/orphan.avhdx`).catch((e) => e);
    expect(err.code).toBe('PARENT_NOT_FOUND');
    expect(err.message).toContain('relative_path');
  });

  it('a locator pointing outside the allowed roots is never opened', async () => {
    mkdirSync(`${dir}/evil`, { recursive: true });
    await createVhdx(`${dir}/evil/e.vhdx`, { size: 8 * MiB });
    await createVhdx(`${dir}/evil/e.avhdx`, { parent: `${dir}/evil/e.vhdx` });
    const disk = await VhdxFile.open(`${dir}/evil/e.avhdx`, { writable: true, noParent: true });
    const loc = disk.parentLocator!;
    await disk.setParentLocator({
      locatorType: loc.locatorType,
      entries: [
        loc.entries[0],
        ['relative_path', '..\\..\\..\\..\\..\\..\\etc\\passwd'],
        ['absolute_win32_path', '\\\\?\\Z:\\etc\\passwd'],
      ],
    });
    await disk.close();
    const err = await VhdxFile.open(`${dir}/evil/e.avhdx`).catch((e) => e);
    expect(err).toBeInstanceOf(TidemarkError);
    expect(['PATH_NOT_ALLOWED', 'PARENT_NOT_FOUND']).toContain(err.code);
    expect(err.message).toContain('outside the allowed directories');
  });
});
