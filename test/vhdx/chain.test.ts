/**
 * Differencing chains written by us (base ← c1 ← c2 ← c3): seeded writes at every level, including
 * partial sectors, partial blocks (sector bitmaps), whole blocks, and write-zeroes/trims over the
 * parent's data, tracked in an expected image per level. Every level reads as expected through the
 * engine and through libvhdi (vhdimount or pyvhdi); 7zz reads the top. Then
 * flattening (convert to one VHDX, fixed or dynamic, and to raw) and merging from the top down to the
 * base keep the content, and the merged base passes qemu-img check and compare. The same for a chain
 * of 4096-byte sectors (7zz and libvhdi only: QEMU reads no 4096-byte sectors) and for a chain over a
 * base qemu-img made. Parent locators: allowed roots, DataWriteGuid checks (ours and the peers'),
 * chains moved together, decoys and hostile paths.
 *
 * Seeds: TIDEMARK_CHAIN_SEED (printed).
 */
import {
  copyFileSync,
  existsSync,
  mkdirSync,
  readFileSync,
  renameSync,
  rmSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { convertImage } from '../../src/formats/vhdx/convert.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { vhdxInfo } from '../../src/formats/vhdx/info.js';
import { mergeIntoParent } from '../../src/formats/vhdx/merge.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import {
  qemuImgCheck,
  qemuImgCompare,
  qemuImgConvertToRaw,
  qemuImgCreateVhdx,
  qemuIoWrite,
  requirePeers,
  sevenZipExtract,
  tempDir,
  vhdiInfo,
  vhdiRead,
} from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { scribble } from '../helpers/scribble.js';
import { readWholeVhdx } from '../helpers/vhdx.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_CHAIN_SEED', 4242);
console.log(`chain seed ${SEED} (set TIDEMARK_CHAIN_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('chain')));
afterAll(async () => cleanup());

function firstDiff(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `lengths ${a.length} and ${b.length}`;
  if (a.equals(b)) return 'equal';
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return `first difference at byte ${i}: ${a[i]} vs ${b[i]}`;
  return 'equal';
}

function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  expect(firstDiff(actual, expected), what).toBe('equal');
}

/**
 * libvhdi's view of every level of a chain (vhdimount or pyvhdi, whichever works here): each file read
 * through its own parents, base first.
 */
async function vhdiLevels(files: string[]): Promise<Buffer[]> {
  const out: Buffer[] = [];
  for (const f of files) out.push(await vhdi(f));
  return out;
}

async function vhdi(file: string): Promise<Buffer> {
  const raw = await vhdiRead(file, `${file}.vhdi.raw`);
  try {
    return readFileSync(raw);
  } finally {
    rmSync(raw);
  }
}

async function currentDataWriteGuid(file: string): Promise<string> {
  const disk = await VhdxFile.open(file, { noParent: true });
  try {
    return Buffer.from(disk.header.dataWriteGuid).toString('hex');
  } finally {
    await disk.close();
  }
}

async function sevenZip(file: string): Promise<Buffer> {
  const out = `${file}.7z.raw`;
  await sevenZipExtract(file, out);
  try {
    return readFileSync(out);
  } finally {
    rmSync(out);
  }
}

/**
 * One level's writes, mirrored into `expected`: seeded random writes/zeroes/trims, then writes and
 * zeroes aimed at what the parent provides: sub-sector writes (read-modify-write of a parent sector),
 * runs of sectors (partially present blocks: sector bitmaps), a whole block, partial write-zeroes and
 * trims, and a whole block zeroed and another trimmed over the parent's data.
 */
async function writeLevel(file: string, expected: Buffer, seed: number): Promise<void> {
  const disk = await VhdxFile.open(file, { writable: true });
  try {
    const r = rng(seed + 1);
    const lss = disk.logicalSectorSize;
    const bs = disk.blockSize;
    const size = expected.length;
    const blocks = Math.floor(size / bs);
    const put = async (offset: number, length: number) => {
      const data = r.bytes(length);
      await disk.write(data, offset);
      data.copy(expected, offset);
    };
    const zero = async (kind: 'zero' | 'trim', offset: number, length: number) => {
      if (kind === 'zero') await disk.writeZeroes(offset, length);
      else await disk.trim(offset, length);
      expected.fill(0, offset, offset + length);
    };
    await scribble(disk, expected, seed, 40);
    for (let i = 0; i < 12; i++) await put(r.int(size - 8), 1 + r.int(7)); // partial sectors
    for (let i = 0; i < 16; i++) {
      const n = lss * (1 + r.int(16));
      await put(r.int((size - n) / lss) * lss, n); // whole sectors: bitmap bits
    }
    await put(r.int(blocks) * bs, bs); // a whole block at once
    await zero('zero', r.int(size - 9000), 1 + r.int(9000)); // partial, unaligned
    await zero('trim', r.int(size - 9000), 1 + r.int(9000));
    await zero('zero', r.int(blocks) * bs, bs); // whole blocks over the parent's data
    await zero('trim', r.int(blocks) * bs, bs);
    await zero('trim', r.int(blocks - 1) * bs + 512, bs); // a block and a bit of the next, sector-aligned
  } finally {
    await disk.close();
  }
}

/** Builds base ← c1 ← ... with the given child block sizes; returns the files and each level's content. */
async function buildChain(
  names: string[],
  base: { size: number; blockSize: number; type: 'fixed' | 'dynamic'; logicalSectorSize: 512 | 4096 },
  childBlockSizes: number[],
  seed: number,
): Promise<{ files: string[]; levels: Buffer[] }> {
  const files = names.map((n) => path.join(dir, n));
  const expected = Buffer.alloc(base.size);
  await createVhdx(files[0], base);
  await writeLevel(files[0], expected, seed);
  const levels = [Buffer.from(expected)];
  for (let i = 1; i < files.length; i++) {
    await createVhdx(files[i], { parent: files[i - 1], blockSize: childBlockSizes[i - 1] });
    await writeLevel(files[i], expected, seed + i * 100);
    levels.push(Buffer.from(expected));
  }
  return { files, levels };
}

const SIZE = 24 * MiB + 64 * 1024;

describe.skipIf(requirePeers('qemu-img', 'qemu-io', '7zz', 'libvhdi', 'vhdiinfo').skip)('chains written by us', () => {
  it('depth 4 (512-byte sectors): engine, libvhdi and 7zz agree; flattening and merging keep the content', async () => {
    const seed = SEED;
    const where = `(seed ${seed})`;
    const { files, levels } = await buildChain(
      ['base.vhdx', 'c1.avhdx', 'c2.avhdx', 'c3.avhdx'],
      { size: SIZE, blockSize: 2 * MiB, type: 'dynamic', logicalSectorSize: 512 },
      [2 * MiB, MiB, 4 * MiB],
      seed,
    );
    for (let i = 0; i < files.length; i++) {
      expectSame(await readWholeVhdx(files[i]), levels[i], `level ${i} through the engine ${where}`);
      const report = await checkVhdx(files[i]);
      expect(report.errors, `check level ${i}`).toEqual([]);
      expect(report.warnings, `check level ${i}`).toEqual([]);
    }
    for (let i = 1; i < files.length; i++) {
      // The writes did reach the sector-bitmap machinery at every level.
      const info = await vhdxInfo(files[i]);
      expect(info.type).toBe('differencing');
      expect(info.bat.payload.partially_present, `level ${i} has partially present blocks`).toBeGreaterThan(0);
      expect(info.bat.sectorBitmap.present, `level ${i} has a sector bitmap`).toBe(1);
      expect(info.chain.map((c) => c.path)).toEqual(files.slice(0, i + 1).reverse());
    }
    const top = files[3];
    expectSame(await sevenZip(top), levels[3], `7zz reads the chain ${where}`);
    (await vhdiLevels(files)).forEach((b, i) => expectSame(b, levels[i], `libvhdi level ${i} ${where}`));

    // Flatten the chain: a dynamic VHDX, a fixed one with another block size, and a raw image.
    const expectedRaw = path.join(dir, 'expected.raw');
    writeFileSync(expectedRaw, levels[3]);
    await convertImage(top, path.join(dir, 'flat.raw'));
    expectSame(readFileSync(path.join(dir, 'flat.raw')), levels[3], 'flattened to raw');
    for (const [name, opts] of [
      ['flat.vhdx', {}],
      ['flat-fixed.vhdx', { type: 'fixed', blockSize: MiB }],
    ] as const) {
      const flat = path.join(dir, name);
      await convertImage(top, flat, opts);
      const info = await vhdxInfo(flat);
      expect(info.type).toBe(opts.type ?? 'dynamic');
      expect(info.hasParent).toBe(false);
      expectSame(await readWholeVhdx(flat), levels[3], `${name} through the engine`);
      const check = await qemuImgCheck(flat);
      expect(check.ok, `qemu-img check ${name}: ${check.output}`).toBe(true);
      const cmp = await qemuImgCompare(flat, 'vhdx', expectedRaw, 'raw');
      expect(cmp.identical, `qemu-img compare ${name}: ${cmp.output}`).toBe(true);
    }
    expectSame(await sevenZip(path.join(dir, 'flat.vhdx')), levels[3], '7zz reads the flattened file');

    // Merge from the top down: c3 into c2, then c2 into c1, then c1 into the base.
    for (let i = 3; i >= 1; i--) {
      const r = await mergeIntoParent(files[i]);
      expect(r.parentPath).toBe(files[i - 1]);
      expect(existsSync(files[i]), `${files[i]} is gone after its merge`).toBe(false);
      expectSame(
        await readWholeVhdx(files[i - 1]),
        levels[3],
        `${path.basename(files[i - 1])} after merging ${i} ${where}`,
      );
      expect((await checkVhdx(files[i - 1])).errors).toEqual([]);
      if (i > 1) {
        // The shortened chain still satisfies the peers' parent checks.
        expectSame(await sevenZip(files[i - 1]), levels[3], `7zz after merging ${i}`);
        expectSame(await vhdi(files[i - 1]), levels[3], `libvhdi after merging ${i}`);
      }
    }
    const check = await qemuImgCheck(files[0]);
    expect(check.ok, check.output).toBe(true);
    const cmp = await qemuImgCompare(files[0], 'vhdx', expectedRaw, 'raw');
    expect(cmp.identical, cmp.output).toBe(true);
    expectSame(await sevenZip(files[0]), levels[3], '7zz reads the merged base');
  });

  it('depth 3 over a fixed base with 4096-byte sectors: 7zz and libvhdi read it; merges keep it', async () => {
    const seed = SEED + 7;
    const where = `(seed ${seed})`;
    const { files, levels } = await buildChain(
      ['k-base.vhdx', 'k-c1.avhdx', 'k-c2.avhdx', 'k-c3.avhdx'],
      { size: 20 * MiB, blockSize: MiB, type: 'fixed', logicalSectorSize: 4096 },
      [4 * MiB, MiB, 2 * MiB],
      seed,
    );
    for (let i = 0; i < files.length; i++) {
      expectSame(await readWholeVhdx(files[i]), levels[i], `level ${i} through the engine ${where}`);
      expect((await checkVhdx(files[i])).errors).toEqual([]);
    }
    for (let i = 1; i < files.length; i++) {
      const info = await vhdxInfo(files[i]);
      expect(info.logicalSectorSize).toBe(4096);
      expect(info.bat.payload.partially_present).toBeGreaterThan(0);
    }
    const top = files[3];
    expectSame(await sevenZip(top), levels[3], `7zz reads a 4096-byte-sector chain ${where}`);
    (await vhdiLevels(files)).forEach((b, i) => expectSame(b, levels[i], `libvhdi level ${i} ${where}`));
    expect(await vhdiInfo(top)).toMatch(/Bytes per sector\s*:\s*4096 bytes/);

    await convertImage(top, path.join(dir, 'k-flat.raw'));
    expectSame(readFileSync(path.join(dir, 'k-flat.raw')), levels[3], 'flattened to raw');
    await convertImage(top, path.join(dir, 'k-flat.vhdx'));
    expect((await vhdxInfo(path.join(dir, 'k-flat.vhdx'))).logicalSectorSize).toBe(4096); // kept from the source
    expectSame(await readWholeVhdx(path.join(dir, 'k-flat.vhdx')), levels[3], 'flattened to VHDX');
    expectSame(await sevenZip(path.join(dir, 'k-flat.vhdx')), levels[3], '7zz reads the flattened VHDX');
    for (let i = 3; i >= 1; i--) await mergeIntoParent(files[i]);
    expectSame(await readWholeVhdx(files[0]), levels[3], `merged base ${where}`);
    const report = await checkVhdx(files[0]);
    expect(report.errors).toEqual([]);
    expect((await vhdxInfo(files[0])).type).toBe('fixed');
    expectSame(await sevenZip(files[0]), levels[3], '7zz reads the merged base');
    // QEMU cannot check it: it opens no 4096-byte-sector file.
    expect((await qemuImgCheck(files[0])).output).toMatch(/Operation not supported/);
  });

  it('children over a base qemu-img made: the peers accept our linkage to it; merged back, qemu-img agrees', async () => {
    const seed = SEED + 11;
    const where = `(seed ${seed})`;
    const base = path.join(dir, 'q-base.vhdx');
    await qemuImgCreateVhdx(base, SIZE, { subformat: 'dynamic', blockSize: MiB });
    await qemuIoWrite(base, [
      { offset: 0, length: 3 * MiB + 512, pattern: 0x21 },
      { offset: 10 * MiB - 4096, length: 8192, pattern: 0x22 },
      { offset: SIZE - MiB, length: MiB, pattern: 0x23 },
    ]);
    await qemuImgConvertToRaw(base, 'vhdx', `${base}.raw`);
    const expected = readFileSync(`${base}.raw`);
    const levels = [Buffer.from(expected)];
    const files = [base, path.join(dir, 'q-c1.avhdx'), path.join(dir, 'q-c2.avhdx')];
    for (let i = 1; i < files.length; i++) {
      await createVhdx(files[i], { parent: files[i - 1] });
      await writeLevel(files[i], expected, seed + i);
      levels.push(Buffer.from(expected));
    }
    expectSame(await readWholeVhdx(files[2]), levels[2], `engine ${where}`);
    expectSame(await sevenZip(files[2]), levels[2], `7zz ${where}`);
    (await vhdiLevels(files)).forEach((b, i) => expectSame(b, levels[i], `libvhdi level ${i} ${where}`));
    await mergeIntoParent(files[2]);
    await mergeIntoParent(files[1]);
    writeFileSync(`${base}.expected`, levels[2]);
    const check = await qemuImgCheck(base);
    expect(check.ok, check.output).toBe(true);
    const cmp = await qemuImgCompare(base, 'vhdx', `${base}.expected`, 'raw');
    expect(cmp.identical, `${cmp.output} ${where}`).toBe(true);
  });
});

describe('parent locators', () => {
  it('a parent in another directory opens only when that directory is allowed', async () => {
    mkdirSync(path.join(dir, 'bases'), { recursive: true });
    mkdirSync(path.join(dir, 'kids'), { recursive: true });
    const parent = path.join(dir, 'bases', 'p.vhdx');
    const child = path.join(dir, 'kids', 'k.avhdx');
    await createVhdx(parent, { size: 8 * MiB });
    const p = await VhdxFile.open(parent, { writable: true });
    await p.write(Buffer.alloc(4096, 0x5a), 4096);
    await p.close();
    await createVhdx(child, { parent });
    // Default: only the child's own directory.
    const err = await VhdxFile.open(child).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TidemarkError);
    expect((err as TidemarkError).code).toBe('PATH_NOT_ALLOWED');
    // Allowing some other directory does not help either.
    await expect(
      VhdxFile.open(child, { allowedRoots: [path.join(dir, 'kids'), path.join(dir, 'elsewhere')] }),
    ).rejects.toMatchObject({ code: 'PATH_NOT_ALLOWED' });
    const ok = await VhdxFile.open(child, { allowedRoots: [path.join(dir, 'kids'), path.join(dir, 'bases')] });
    try {
      expect(ok.parentLink?.foundBy).toBe('relative_path');
      expect(ok.parent?.path).toBe(parent);
      expect((await ok.readAt(4096, 4096)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    } finally {
      await ok.close();
    }
  });

  it('a symlink beside the child that leads out of the allowed directories is not followed', async () => {
    mkdirSync(path.join(dir, 's-outside'), { recursive: true });
    mkdirSync(path.join(dir, 's-kids'), { recursive: true });
    const real = path.join(dir, 's-outside', 'p.vhdx');
    const link = path.join(dir, 's-kids', 'p.vhdx');
    await createVhdx(real, { size: 8 * MiB });
    symlinkSync(real, link);
    await createVhdx(path.join(dir, 's-kids', 'c.avhdx'), { parent: link });
    // Every locator entry names s-kids/p.vhdx, which resolves to s-outside: refused.
    await expect(VhdxFile.open(path.join(dir, 's-kids', 'c.avhdx'))).rejects.toMatchObject({
      code: 'PATH_NOT_ALLOWED',
    });
    const ok = await VhdxFile.open(path.join(dir, 's-kids', 'c.avhdx'), {
      allowedRoots: [path.join(dir, 's-kids'), path.join(dir, 's-outside')],
    });
    expect(ok.parent?.path).toBe(real);
    await ok.close();
  });

  it('a decoy with the parent’s name beside the child is refused, not silently used', async () => {
    mkdirSync(path.join(dir, 'd-bases'), { recursive: true });
    mkdirSync(path.join(dir, 'd-kids'), { recursive: true });
    const parent = path.join(dir, 'd-bases', 'p.vhdx');
    const child = path.join(dir, 'd-kids', 'k.avhdx');
    await createVhdx(parent, { size: 8 * MiB });
    await createVhdx(child, { parent });
    await createVhdx(path.join(dir, 'd-kids', 'p.vhdx'), { size: 8 * MiB }); // same name, another disk
    await expect(VhdxFile.open(child)).rejects.toMatchObject({ code: 'PARENT_MISMATCH' });
  });

  it.skipIf(requirePeers('7zz', 'libvhdi').skip)(
    'a parent modified after the child was made is refused (DataWriteGuid), by us and by both peers',
    async () => {
      const parent = path.join(dir, 'm.vhdx');
      const child = path.join(dir, 'm-child.avhdx');
      await createVhdx(parent, { size: 8 * MiB });
      await createVhdx(child, { parent });
      const c = await VhdxFile.open(child, { writable: true });
      await c.write(Buffer.alloc(512, 7), 0);
      await c.close();
      expect((await readWholeVhdx(child)).subarray(0, 512).equals(Buffer.alloc(512, 7))).toBe(true);
      // Reading the parent changes nothing; opening it writable without writing changes nothing visible.
      const ro = await VhdxFile.open(parent, { writable: true });
      await ro.close();
      await expect(readWholeVhdx(child)).resolves.toBeDefined();

      const p = await VhdxFile.open(parent, { writable: true });
      await p.write(Buffer.alloc(512, 1), MiB);
      await p.close();
      const err = await VhdxFile.open(child).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(TidemarkError);
      expect((err as TidemarkError).code).toBe('PARENT_MISMATCH');
      expect((err as TidemarkError).message).toMatch(/DataWriteGuid/);
      // 7-Zip refuses the child ("Unsupported Method"); libvhdi too ("mismatch in identifier").
      await expect(sevenZipExtract(child, `${child}.7z.raw`)).rejects.toThrow(/Unsupported Method/);
      await expect(vhdiRead(child, `${child}.vhdi.raw`)).rejects.toThrow(/mismatch in identifier/);
    },
  );

  it.skipIf(requirePeers('7zz', 'libvhdi').skip)(
    'a chain moved together still opens through relative_path, in ours and in the peers',
    async () => {
      // Same directory: relative_path .\b.vhdx
      mkdirSync(path.join(dir, 'a'), { recursive: true });
      await createVhdx(path.join(dir, 'a', 'b.vhdx'), { size: 8 * MiB });
      await createVhdx(path.join(dir, 'a', 'c.avhdx'), { parent: path.join(dir, 'a', 'b.vhdx') });
      const w = await VhdxFile.open(path.join(dir, 'a', 'c.avhdx'), { writable: true });
      await w.write(Buffer.alloc(1000, 0x33), 700);
      await w.close();
      const before = await readWholeVhdx(path.join(dir, 'a', 'c.avhdx'));
      renameSync(path.join(dir, 'a'), path.join(dir, 'moved'));
      const moved = path.join(dir, 'moved', 'c.avhdx');
      const d = await VhdxFile.open(moved);
      try {
        expect(d.parentLink?.foundBy).toBe('relative_path');
        expect(d.parent?.path).toBe(path.join(dir, 'moved', 'b.vhdx'));
      } finally {
        await d.close();
      }
      expectSame(await readWholeVhdx(moved), before, 'moved chain through the engine');
      expectSame(await sevenZip(moved), before, 'moved chain through 7zz');
      expectSame(await vhdi(moved), before, 'moved chain through libvhdi');

      // The child alone, without its parent (all its paths stale): PARENT_NOT_FOUND, naming what was tried.
      copyFileSync(moved, path.join(dir, 'orphan.avhdx'));
      const err = await VhdxFile.open(path.join(dir, 'orphan.avhdx')).catch((e: unknown) => e);
      expect((err as TidemarkError).code).toBe('PARENT_NOT_FOUND');
      expect((err as TidemarkError).message).toContain('relative_path');

      // A writable open refreshes the stale absolute path (through the metadata log) without touching
      // the child's DataWriteGuid (not a guest-visible change); the peers still follow the locator.
      const dwgBefore = await currentDataWriteGuid(moved);
      const rw = await VhdxFile.open(moved, { writable: true });
      await rw.close();
      const after = await vhdxInfo(moved);
      expect(after.parentLocator?.entries.relative_path).toBe('.\\b.vhdx');
      expect(after.parentLocator?.entries.absolute_win32_path).toBe(
        `\\\\?\\Z:${path.join(dir, 'moved', 'b.vhdx').split('/').join('\\')}`,
      );
      expect(await currentDataWriteGuid(moved)).toBe(dwgBefore);
      expect((await checkVhdx(moved)).errors).toEqual([]);
      expectSame(await readWholeVhdx(moved), before, 'refreshed chain through the engine');
      expectSame(await sevenZip(moved), before, 'refreshed chain through 7zz');
      expectSame(await vhdi(moved), before, 'refreshed chain through libvhdi');

      // Different directories: relative_path ..\bases\p.vhdx, the tree moved as a whole.
      const root = path.join(dir, 'tree');
      mkdirSync(path.join(root, 'bases'), { recursive: true });
      mkdirSync(path.join(root, 'kids'), { recursive: true });
      await createVhdx(path.join(root, 'bases', 'p.vhdx'), { size: 8 * MiB });
      await createVhdx(path.join(root, 'kids', 'k.avhdx'), { parent: path.join(root, 'bases', 'p.vhdx') });
      expect((await vhdxInfo(path.join(root, 'kids', 'k.avhdx'))).parentLocator?.entries.relative_path).toBe(
        '..\\bases\\p.vhdx',
      );
      const root2 = path.join(dir, 'tree-moved');
      renameSync(root, root2);
      const k = await VhdxFile.open(path.join(root2, 'kids', 'k.avhdx'), { allowedRoots: [root2] });
      try {
        expect(k.parentLink?.foundBy).toBe('relative_path');
        expect(k.parent?.path).toBe(path.join(root2, 'bases', 'p.vhdx'));
      } finally {
        await k.close();
      }
    },
  );

  it('repairing a parent (check --repair of a damaged header) keeps its children linked', async () => {
    const parent = path.join(dir, 'r.vhdx');
    const child = path.join(dir, 'r-child.avhdx');
    await createVhdx(parent, { size: 8 * MiB, blockSize: MiB });
    const p = await VhdxFile.open(parent, { writable: true });
    await p.write(Buffer.alloc(4096, 0x42), 0);
    await p.close();
    await createVhdx(child, { parent });
    const damaged = readFileSync(parent);
    damaged.fill(0, 64 * 1024, 68 * 1024); // header 1
    writeFileSync(parent, damaged);
    const report = await checkVhdx(parent, { repair: true });
    expect(report.repaired.join(' ')).toMatch(/header 1 rewritten/);
    expect(report.warnings).toEqual([]);
    // A repair is no guest-visible change: the DataWriteGuid, and so the child's linkage, still hold.
    expect((await readWholeVhdx(child)).subarray(0, 4096).equals(Buffer.alloc(4096, 0x42))).toBe(true);
    expect((await checkVhdx(child)).errors).toEqual([]);
  });

  it('a locator pointing outside the allowed roots is never opened', async () => {
    mkdirSync(path.join(dir, 'evil'), { recursive: true });
    await createVhdx(path.join(dir, 'evil', 'e.vhdx'), { size: 8 * MiB });
    await createVhdx(path.join(dir, 'evil', 'e.avhdx'), { parent: path.join(dir, 'evil', 'e.vhdx') });
    const disk = await VhdxFile.open(path.join(dir, 'evil', 'e.avhdx'), { writable: true, noParent: true });
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
    const err = await VhdxFile.open(path.join(dir, 'evil', 'e.avhdx')).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(TidemarkError);
    expect((err as TidemarkError).code).toBe('PATH_NOT_ALLOWED');
    expect((err as TidemarkError).message).toContain('outside the allowed directories');
  });
});
