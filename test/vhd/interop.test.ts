/**
 * The VHD interop matrix: {fixed, dynamic, differencing} × {512 KiB, 2 MiB blocks}. Seeded writes
 * (unaligned, straddling blocks, write-zeroes over data and over the parent) plus fixed edge cases go
 * through the engine and are mirrored into an expected raw image; then the engine, qemu-img (`-f vpc`,
 * sized by the footer's current size: `force_size_calc=current_size`), libvhdi (vhdimount, or pyvhdi
 * without FUSE; vhdiinfo) and 7-Zip (`-tvhd`) must all read the expected bytes, differencing chains
 * included. QEMU has no differencing VHDs: it refuses to create one (`-b` is "not supported for file
 * format 'vpc'") and opens a child as a standalone dynamic disk; the test asserts exactly that, and QEMU
 * reads the chain flattened by our convert instead.
 *
 * The other way round: files qemu-img creates (with and without force_size) and qemu-io writes read
 * identically through the engine, our writes into them read identically in QEMU, qemu-io can keep
 * writing after us, and a differencing disk we make over QEMU's file reads the same in every reader.
 *
 * Seeds: TIDEMARK_INTEROP_SEED (printed).
 */
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { convertVhdImage } from '../../src/formats/vhd/convert.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { qemuVisibleSize } from '../../src/formats/vhd/geometry.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { requirePeers, run, tempDir, vhdiInfo, vhdiRead } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import {
  KiB,
  MiB,
  expectSame,
  qemuInfoVhd,
  qemuIoWriteVhd,
  qemuReadVhd,
  qemuVpc,
  readWholeVhd,
  scribbleVhd,
  sevenZipVhd,
} from './helpers.js';

const SEED = seedFrom('TIDEMARK_INTEROP_SEED', 20261206);
console.log(`vhd interop seed ${SEED} (set TIDEMARK_INTEROP_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('vhd-interop')));
afterAll(async () => cleanup());

const peersMissing = requirePeers('qemu-img', 'qemu-io', '7zz', 'libvhdi', 'vhdiinfo').skip;

/**
 * Edge cases the random writes may miss, mirrored into `expected`: a write straddling the first block
 * boundary, a sub-sector write, partial zeroing on both sides of a boundary, a whole block zeroed then
 * partly rewritten, the last block in full then zeroed, the last 4 KiB and the very last byte.
 */
async function edgeOps(disk: VhdFile, expected: Buffer, bs: number, seed: number): Promise<void> {
  const r = rng(seed);
  const size = expected.length;
  const put = async (offset: number, length: number) => {
    const data = r.bytes(length);
    await disk.write(data, offset);
    data.copy(expected, offset);
  };
  const zero = async (offset: number, length: number) => {
    await disk.writeZeroes(offset, length);
    expected.fill(0, offset, offset + length);
  };
  await put(bs - 3 * 512 - 7, bs + 123); // across blocks 0 → 1 → 2, unaligned at both ends
  await put(4093, 777); // crosses a 4 KiB boundary, sub-sector on both sides
  await put(bs + 5, 3); // inside one sector
  await zero(bs - 1000, 3000); // partial on both sides of a boundary
  await zero(0, bs); // block 0 whole
  await put(3 * 512 + 1, 10); // ...and rewritten in part
  const last = Math.floor((size - 1) / bs) * bs;
  await put(last, size - last); // the last (partial) block in full
  await zero(last, size - last); // ...zeroed whole
  await put(size - 4096, 4096);
  await put(size - 1, 1);
}

/** Every reader's view of `file` (a chain through its directory) against `expected`. */
async function allReadersAgree(file: string, expected: Buffer, where: string): Promise<void> {
  expectSame(await readWholeVhd(file), expected, `engine ${where}`);
  await vhdiRead(file, `${file}.vhdi.raw`);
  expectSame(readFileSync(`${file}.vhdi.raw`), expected, `libvhdi ${where}`);
  await sevenZipVhd(file, `${file}.7z.raw`);
  expectSame(readFileSync(`${file}.7z.raw`), expected, `7zz ${where}`);
  rmSync(`${file}.vhdi.raw`);
  rmSync(`${file}.7z.raw`);
}

describe.skipIf(peersMissing)('files we write, read by the engine, qemu-img, libvhdi and 7zz', () => {
  const cases: ['fixed' | 'dynamic' | 'differencing', number][] = [];
  for (const type of ['fixed', 'dynamic', 'differencing'] as const)
    for (const bs of [512 * KiB, 2 * MiB]) cases.push([type, bs]);

  it.each(cases)('%s, %i-byte blocks', async (type, bs) => {
    const size = 13 * MiB + 64 * KiB; // a partial last block either way
    const seed = SEED + bs / KiB + (type === 'fixed' ? 1 : type === 'differencing' ? 2 : 0);
    const where = `(${type}, ${bs}, seed ${seed})`;
    const expected = Buffer.alloc(size);
    const file = path.join(dir, `m-${type}-${bs}.vhd`);
    if (type === 'differencing') {
      // The parent has data of its own, in the other block size; the child writes over and beside it.
      const base = path.join(dir, `m-base-${bs}.vhd`);
      await createVhd(base, { size, blockSize: bs === 2 * MiB ? 512 * KiB : 2 * MiB });
      const p = await VhdFile.open(base, { writable: true });
      await scribbleVhd(p, expected, seed + 10, 40);
      await p.close();
      await createVhd(file, { parent: base, blockSize: bs });
    } else {
      await createVhd(file, { size, type, blockSize: bs });
    }
    const disk = await VhdFile.open(file, { writable: true });
    try {
      expect(disk.diskType).toBe(type);
      const r = rng(seed + 20);
      for (let i = 0; i < 25; i++) {
        // Small writes first: in a child, blocks that stay partly the parent's.
        const data = r.bytes(1 + r.int(4000));
        const at = r.int(size - data.length);
        await disk.write(data, at);
        data.copy(expected, at);
      }
      await scribbleVhd(disk, expected, seed, 50, bs);
      await edgeOps(disk, expected, bs, seed + 1);
    } finally {
      await disk.close();
    }
    const report = await checkVhd(file);
    expect(report.errors, `check ${where}`).toEqual([]);
    expect(report.warnings, `check ${where}`).toEqual([]);
    await allReadersAgree(file, expected, where);
    const info = await vhdiInfo(file);
    expect(info).toMatch(new RegExp(`Media size\\s*:.*\\(${size} bytes\\)`));
    expect(info).toMatch(
      new RegExp(`Disk type\\s*:\\s*${{ fixed: 'Fixed', dynamic: 'Dynamic', differencing: 'Differential' }[type]}`),
    );

    if (type !== 'differencing') {
      await qemuReadVhd(file, `${file}.q.raw`);
      expectSame(readFileSync(`${file}.q.raw`), expected, `qemu-img ${where}`);
      rmSync(`${file}.q.raw`);
      // Without force_size_calc QEMU sizes "tdmk" files by their CHS geometry, as qemuVisibleSize says.
      const d = await VhdFile.open(file);
      expect((await qemuInfoVhd(file))['virtual-size']).toBe(qemuVisibleSize({ ...d.footer, currentSize: size }));
      await d.close();
    } else {
      // QEMU opens a child as a dynamic disk of its own, without a backing file: it cannot read the chain.
      const qi = await qemuInfoVhd(file);
      expect(qi['backing-filename']).toBeUndefined();
      const flat = `${file}.flat.vhd`;
      await convertVhdImage(file, flat);
      await qemuReadVhd(flat, `${flat}.q.raw`);
      expectSame(readFileSync(`${flat}.q.raw`), expected, `qemu-img, the chain flattened ${where}`);
      rmSync(`${flat}.q.raw`);
    }
  });

  it('QEMU refuses to create a differencing VHD', async () => {
    await createVhd(path.join(dir, 'qb.vhd'), { size: 4 * MiB });
    const r = await run(
      'qemu-img',
      ['create', '-f', 'vpc', '-b', path.join(dir, 'qb.vhd'), '-F', 'vpc', path.join(dir, 'qc.vhd')],
      {
        allowFail: true,
      },
    );
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/Backing file not supported for file format 'vpc'/);
  });

  it('--chs-size: QEMU sizes the disk the same without force_size_calc', async () => {
    const file = path.join(dir, 'chs.vhd');
    await createVhd(file, { size: 10 * MiB, chsAligned: true });
    const d = await VhdFile.open(file, { writable: true });
    await d.write(Buffer.alloc(4096, 0x66), d.virtualSize - 4096);
    const size = d.virtualSize;
    await d.close();
    expect((await qemuInfoVhd(file))['virtual-size']).toBe(size);
    await run('qemu-img', ['convert', '-f', 'vpc', '-O', 'raw', file, `${file}.raw`]);
    const raw = readFileSync(`${file}.raw`);
    expect(raw.length).toBe(size);
    expect(raw.subarray(size - 4096).equals(Buffer.alloc(4096, 0x66))).toBe(true);
  });
});

/** qemu-io pattern writes: block-straddling, sub-sector, at the end, and random. */
function qemuWrites(seed: number, size: number): { offset: number; length: number; pattern: number }[] {
  const r = rng(seed);
  const out = [
    { offset: 0, length: 64 * KiB, pattern: 0x11 },
    { offset: 3 * MiB + 512, length: 5 * MiB, pattern: 0x22 },
    { offset: 2 * MiB - 700, length: 1400, pattern: 0x33 },
    { offset: size - MiB, length: MiB, pattern: 0x44 },
    { offset: 1000, length: 100, pattern: 0x55 },
  ];
  for (let i = 0; i < 6; i++) {
    const length = 1 + r.int(3 * MiB);
    out.push({ offset: r.int(size - length), length, pattern: 0x60 + i });
  }
  return out;
}

describe.skipIf(peersMissing)('files qemu-img creates and qemu-io writes', () => {
  const cases: ['fixed' | 'dynamic', boolean][] = [
    ['dynamic', false],
    ['dynamic', true],
    ['fixed', false],
    ['fixed', true],
  ];
  it.each(cases)('qemu-img %s (force_size %s): we read it, QEMU reads us, and back', async (subformat, force) => {
    const file = path.join(dir, `q-${subformat}-${force}.vhd`);
    const seed = SEED + 1000 + (subformat === 'fixed' ? 1 : 0) + (force ? 2 : 0);
    const where = `(seed ${seed})`;
    await run('qemu-img', [
      'create',
      '-q',
      '-f',
      'vpc',
      '-o',
      `subformat=${subformat}${force ? ',force_size=on' : ''}`,
      file,
      String(40 * MiB),
    ]);
    let disk = await VhdFile.open(file);
    const size = disk.virtualSize;
    expect(size).toBe(force ? 40 * MiB : (await qemuInfoVhd(file))['virtual-size']);
    expect(disk.footer.creatorApp).toBe(force ? 'qem2' : 'qemu');
    await disk.close();
    await qemuIoWriteVhd(file, qemuWrites(seed, size));
    await run('qemu-io', ['--image-opts', '-c', `write -z ${3 * MiB + 4096} ${2 * MiB + 512}`, qemuVpc(file)]);
    await qemuReadVhd(file, `${file}.q.raw`);
    const expected = readFileSync(`${file}.q.raw`);
    expect(expected.length).toBe(size);
    expectSame(await readWholeVhd(file), expected, `engine reads qemu-io's writes ${where}`);
    expect((await checkVhd(file)).errors).toEqual([]);

    // Our writes into QEMU's file.
    disk = await VhdFile.open(file, { writable: true });
    try {
      await scribbleVhd(disk, expected, seed, 30, 2 * MiB);
      await edgeOps(disk, expected, 2 * MiB, seed + 1);
    } finally {
      await disk.close();
    }
    rmSync(`${file}.q.raw`);
    await qemuReadVhd(file, `${file}.q.raw`);
    expectSame(readFileSync(`${file}.q.raw`), expected, `qemu-img after our writes ${where}`);
    // Plain -f vpc opens it too (QEMU's own sizing of its own creator).
    expect((await qemuInfoVhd(file))['virtual-size']).toBe(size);

    // QEMU writes again over ours; the engine agrees with it.
    await qemuIoWriteVhd(file, qemuWrites(seed + 2, size));
    rmSync(`${file}.q.raw`);
    await qemuReadVhd(file, `${file}.q.raw`);
    const again = readFileSync(`${file}.q.raw`);
    expectSame(await readWholeVhd(file), again, `engine after qemu-io wrote again ${where}`);
    expect((await checkVhd(file)).errors).toEqual([]);
    rmSync(`${file}.q.raw`);

    if (subformat === 'dynamic') {
      // A child of QEMU's file: every reader follows the chain.
      const child = path.join(dir, `q-child-${force}.vhd`);
      await createVhd(child, { parent: file, blockSize: 512 * KiB });
      const c = await VhdFile.open(child, { writable: true });
      try {
        await scribbleVhd(c, again, seed + 3, 20, 512 * KiB);
      } finally {
        await c.close();
      }
      await allReadersAgree(child, again, `child of qemu-img's file ${where}`);
    }
  });
});

describe.skipIf(peersMissing)('peer quirks the matrix relies on', () => {
  it("libvhdi and 7-Zip find a child's parent by name beside it; 7-Zip also checks the unique id", async () => {
    const base = path.join(dir, 'quirk-base.vhd');
    const child = path.join(dir, 'quirk-child.vhd');
    await createVhd(base, { size: 2 * MiB });
    await createVhd(child, { parent: base, locators: [] }); // the header's parent name only
    const data = Buffer.alloc(2 * MiB);
    await sevenZipVhd(child, `${child}.7z.raw`);
    expect(readFileSync(`${child}.7z.raw`).equals(data)).toBe(true);
    await vhdiRead(child, `${child}.vhdi.raw`);
    expect(readFileSync(`${child}.vhdi.raw`).equals(data)).toBe(true);
    // Another disk under the parent's name: 7-Zip refuses the chain.
    rmSync(base);
    await createVhd(base, { size: 2 * MiB });
    await expect(sevenZipVhd(child, `${child}.7z2.raw`)).rejects.toThrow(/7zz/);
  });

  it('libvhdi 20210425 misreads bitmap bytes that are not 0x00 or 0xff: why children are written in 4 KiB units', async () => {
    // A child whose block 1 holds sector 3 only (bitmap byte 0x10), its data area zeros elsewhere: every
    // reader must take sectors 0-2 and 4-7 from the parent. libvhdi shifts each bit without masking,
    // so after sector 3 the rest of the byte reads as present (zeros from the child's data area).
    const base = path.join(dir, 'bm-base.vhd');
    const child = path.join(dir, 'bm-child.vhd');
    const bs = 512 * KiB;
    await createVhd(base, { size: 4 * bs, blockSize: bs });
    const p = await VhdFile.open(base, { writable: true });
    await p.write(Buffer.alloc(4 * bs, 0xaa), 0);
    await p.close();
    await createVhd(child, { parent: base, blockSize: bs });
    const c = await VhdFile.open(child, { writable: true });
    await c.write(Buffer.alloc(512, 0x11), bs + 3 * 512);
    await c.close();
    // What the engine wrote: the whole 4 KiB unit, bitmap byte 0xff. Make it the single sector it stands for.
    const b = readFileSync(child);
    const bitmapAt = b.readUInt32BE(1536 + 4) * 512;
    expect(b[bitmapAt]).toBe(0xff);
    b[bitmapAt] = 0x10;
    b.fill(0, bitmapAt + 512, bitmapAt + 512 + 3 * 512);
    b.fill(0, bitmapAt + 512 + 4 * 512, bitmapAt + 512 + 8 * 512);
    writeFileSync(child, b);
    const want = Buffer.alloc(4 * bs, 0xaa);
    want.fill(0x11, bs + 3 * 512, bs + 4 * 512);
    expectSame(await readWholeVhd(child), want, 'engine');
    await sevenZipVhd(child, `${child}.7z.raw`);
    expectSame(readFileSync(`${child}.7z.raw`), want, '7zz');
    await vhdiRead(child, `${child}.vhdi.raw`);
    const vhdi = readFileSync(`${child}.vhdi.raw`);
    expect(vhdi.subarray(bs + 4 * 512, bs + 8 * 512).equals(Buffer.alloc(4 * 512))).toBe(true); // misread
    expect(vhdi.subarray(bs, bs + 3 * 512).equals(Buffer.alloc(3 * 512, 0xaa))).toBe(true);
  });
});
