/**
 * The VHD engine on its own: create (fixed, dynamic, differencing; options and refusals), seeded writes
 * mirrored into an expected image and read back after reopening, the footer copies (a lost or damaged one
 * tolerated on read and restored by a writable open), the time stamp as a parent's identity, parent
 * locators (each form alone finds the parent; hostile ones are refused), and BAT entries that point
 * where no block may be (reads fail with a clear code, writes are refused).
 *
 * Seed: TIDEMARK_VHD_SEED (printed).
 */
import { existsSync, readFileSync, readdirSync, statSync, truncateSync, utimesSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { vhdChecksum } from '../../src/formats/vhd/checksum.js';
import { createVhd, newUniqueId } from '../../src/formats/vhd/create.js';
import { decodeFooter, encodeFooter } from '../../src/formats/vhd/footer.js';
import { chsGeometry, chsSectors } from '../../src/formats/vhd/geometry.js';
import { decodeDynamicHeader, encodeDynamicHeader } from '../../src/formats/vhd/header.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { KiB, MiB, expectSame, readWholeVhd, scribbleVhd } from './helpers.js';

const SEED = seedFrom('TIDEMARK_VHD_SEED', 20261206);
console.log(`vhd engine seed ${SEED} (TIDEMARK_VHD_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('vhd-engine')));
afterAll(async () => cleanup());

const f = (name: string) => path.join(dir, name);

async function expectCode(p: Promise<unknown>, code: string, words?: RegExp): Promise<TidemarkError> {
  let err: unknown;
  try {
    await p;
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${code}`).toBeInstanceOf(TidemarkError);
  expect((err as TidemarkError).code, (err as Error).message).toBe(code);
  if (words) expect((err as Error).message).toMatch(words);
  expect((err as Error).message).not.toMatch(/[\r\n]/);
  return err as TidemarkError;
}

function footerAt(file: string, at: 'end' | 'start') {
  const b = readFileSync(file);
  const ft = decodeFooter(at === 'end' ? b.subarray(b.length - 512) : b.subarray(0, 512));
  if (typeof ft === 'string') throw new Error(ft);
  return ft;
}

describe('create', () => {
  it('fixed: the data then the footer; dynamic: footer copy, header, BAT, footer', async () => {
    await createVhd(f('c-fixed.vhd'), { size: 3 * MiB, type: 'fixed' });
    expect(statSync(f('c-fixed.vhd')).size).toBe(3 * MiB + 512);
    const ff = footerAt(f('c-fixed.vhd'), 'end');
    expect(ff).toMatchObject({ diskType: 2, dataOffset: 0xffffffffffffffffn, creatorApp: 'tdmk', features: 2 });
    expect(ff.currentSize).toBe(BigInt(3 * MiB));
    expect(ff.geometry).toEqual(chsGeometry(6144));

    await createVhd(f('c-dyn.vhd'), { size: 5 * MiB + 512, blockSize: 512 * KiB });
    const b = readFileSync(f('c-dyn.vhd'));
    expect(b.length).toBe(512 + 1024 + 512 + 512); // 11 entries fit one sector
    expect(b.subarray(0, 512).equals(b.subarray(b.length - 512))).toBe(true);
    const h = decodeDynamicHeader(b.subarray(512, 1536), 512);
    expect(h).toMatchObject({ tableOffset: 1536, maxTableEntries: 11, blockSize: 512 * KiB });
    expect(b.subarray(1536, 1536 + 44).equals(Buffer.alloc(44, 0xff))).toBe(true);
    expect((await readWholeVhd(f('c-dyn.vhd'))).equals(Buffer.alloc(5 * MiB + 512))).toBe(true);
    // Nothing left behind under a temporary name.
    expect(readdirSync(dir).filter((n) => n.includes('tidemark-tmp'))).toEqual([]);
  });

  it('--chs-size rounds the size up to a whole geometry', async () => {
    await createVhd(f('c-chs.vhd'), { size: 10 * MiB, chsAligned: true });
    const ft = footerAt(f('c-chs.vhd'), 'end');
    expect(ft.currentSize).toBe(10514432n);
    expect(chsSectors(ft.geometry) * 512).toBe(10514432);
  });

  it('refuses what cannot be made, with INVALID_ARGUMENT or ALREADY_EXISTS', async () => {
    await expectCode(createVhd(f('x.vhd'), {}), 'INVALID_ARGUMENT', /--size/);
    await expectCode(createVhd(f('x.vhd'), { size: 1000 }), 'INVALID_ARGUMENT', /multiple of 512/);
    await expectCode(createVhd(f('x.vhd'), { size: 0 }), 'INVALID_ARGUMENT');
    await expectCode(createVhd(f('x.vhd'), { size: 2041 * 2 ** 30 }), 'INVALID_ARGUMENT', /2040 GiB/);
    await expectCode(createVhd(f('x.vhd'), { size: MiB, blockSize: 4 * MiB }), 'INVALID_ARGUMENT', /block size/);
    await expectCode(createVhd(f('c-fixed.vhd'), { size: MiB }), 'ALREADY_EXISTS');
    await expectCode(createVhd(f('x.vhd'), { parent: f('c-dyn.vhd'), size: MiB }), 'INVALID_ARGUMENT');
    await expectCode(createVhd(f('x.vhd'), { parent: f('missing.vhd') }), 'NOT_FOUND');
    expect(existsSync(f('x.vhd'))).toBe(false);
    expect(readdirSync(dir).filter((n) => n.includes('tidemark-tmp'))).toEqual([]);
  });

  it('a differencing disk records the parent: unique id, time stamp, name, and W2ru, W2ku, MacX locators', async () => {
    await createVhd(f('p-base.vhd'), { size: 4 * MiB, blockSize: MiB });
    await createVhd(f('p-child.vhd'), { parent: f('p-base.vhd') });
    const parent = footerAt(f('p-base.vhd'), 'end');
    const child = await VhdFile.open(f('p-child.vhd'));
    try {
      expect(child.diskType).toBe('differencing');
      expect(child.virtualSize).toBe(4 * MiB);
      expect(child.blockSize).toBe(MiB); // the parent's
      expect(child.header!.parentUniqueId.equals(parent.uniqueId)).toBe(true);
      expect(child.header!.parentTimeStamp).toBe(parent.timeStamp);
      expect(child.header!.parentName).toBe('p-base.vhd');
      expect(child.locators.map((l) => [l.data?.platform, l.data?.value])).toEqual([
        ['W2ru', '.\\p-base.vhd'],
        ['W2ku', `Z:${f('p-base.vhd').split('/').join('\\')}`],
        ['MacX', `file://localhost${f('p-base.vhd')}`],
      ]);
      expect(child.parentLink).toMatchObject({ path: f('p-base.vhd'), foundBy: 'W2ru', timeStampFrom: 'footer' });
      expect(child.warnings).toEqual([]);
    } finally {
      await child.close();
    }
  });
});

describe('writes read back', () => {
  const cases: ['fixed' | 'dynamic', number][] = [
    ['fixed', 2 * MiB],
    ['dynamic', 512 * KiB],
    ['dynamic', 2 * MiB],
  ];
  it.each(cases)('%s, %i-byte blocks: seeded writes, zeroes and trims, across reopen', async (type, bs) => {
    const size = 9 * MiB + 3 * 512;
    const file = f(`w-${type}-${bs}.vhd`);
    await createVhd(file, { size, type, blockSize: bs });
    const expected = Buffer.alloc(size);
    const seed = SEED + bs + (type === 'fixed' ? 1 : 0);
    let disk = await VhdFile.open(file, { writable: true });
    await scribbleVhd(disk, expected, seed, 60, bs);
    expectSame(await disk.readAt(0, size), expected, `same session (seed ${seed})`);
    await disk.close();
    expectSame(await readWholeVhd(file), expected, `after reopening (seed ${seed})`);
    // A second session keeps going.
    disk = await VhdFile.open(file, { writable: true });
    await scribbleVhd(disk, expected, seed + 1, 30, bs);
    await disk.close();
    expectSame(await readWholeVhd(file), expected, `second session (seed ${seed})`);
    // The file ends with the footer; dynamic disks keep the same bytes at offset 0.
    const b = readFileSync(file);
    expect(decodeFooter(b.subarray(b.length - 512))).toMatchObject({ currentSize: BigInt(size) });
    if (type === 'dynamic') expect(b.subarray(0, 512).equals(b.subarray(b.length - 512))).toBe(true);
    else expect(b.length).toBe(size + 512);
  });

  it('dynamic: all-zero writes into unallocated blocks allocate nothing; a whole zeroed block is given back', async () => {
    const file = f('z-dyn.vhd');
    await createVhd(file, { size: 4 * MiB, blockSize: MiB });
    const disk = await VhdFile.open(file, { writable: true });
    await disk.write(Buffer.alloc(MiB), MiB);
    expect(await disk.allocatedExtents()).toEqual([]);
    await disk.write(Buffer.alloc(100, 7), 2 * MiB + 10);
    expect(await disk.allocatedExtents()).toEqual([{ offset: 2 * MiB, length: MiB }]);
    await disk.writeZeroes(2 * MiB, MiB);
    expect(await disk.allocatedExtents()).toEqual([]);
    expect((await disk.readAt(2 * MiB, 200)).equals(Buffer.alloc(200))).toBe(true);
    await disk.close();
    expect((await readWholeVhd(file)).equals(Buffer.alloc(4 * MiB))).toBe(true);
  });

  it('rejects ranges outside the disk and writes to a read-only open', async () => {
    const disk = await VhdFile.open(f('z-dyn.vhd'));
    try {
      await expectCode(disk.read(Buffer.alloc(10), 4 * MiB - 5), 'INVALID_ARGUMENT');
      await expectCode(disk.write(Buffer.alloc(10), 0), 'READ_ONLY');
      await expectCode(disk.readAt(0, 300 * MiB), 'LIMIT_EXCEEDED');
    } finally {
      await disk.close();
    }
    await expectCode(disk.read(Buffer.alloc(1), 0), 'CLOSED');
  });
});

describe('differencing disks', () => {
  it("partial writes keep the parent's other sectors; zeroes hide the parent; a chain of three reads through", async () => {
    const base = f('d-base.vhd');
    await createVhd(base, { size: 6 * MiB, blockSize: 512 * KiB });
    const expected = Buffer.alloc(6 * MiB);
    let disk = await VhdFile.open(base, { writable: true });
    await scribbleVhd(disk, expected, SEED + 100, 40);
    await disk.close();
    for (const [name, parent, bs] of [
      ['d-mid.vhd', base, 2 * MiB],
      ['d-top.vhd', f('d-mid.vhd'), 512 * KiB],
    ] as const) {
      await createVhd(f(name), { parent, blockSize: bs });
      disk = await VhdFile.open(f(name), { writable: true });
      // Single sectors and odd bytes first: blocks that stay partly the parent's.
      const r = rng(SEED + bs);
      for (let i = 0; i < 20; i++) {
        const data = r.bytes(1 + r.int(3000));
        const at = r.int(6 * MiB - data.length);
        await disk.write(data, at);
        data.copy(expected, at);
      }
      await disk.writeZeroes(MiB + 100, 700 * KiB); // over parent data, partial blocks both sides
      expected.fill(0, MiB + 100, MiB + 100 + 700 * KiB);
      await scribbleVhd(disk, expected, SEED + bs + 1, 30);
      await disk.close();
      expectSame(await readWholeVhd(f(name)), expected, `${name} (seed ${SEED})`);
    }
    const top = await VhdFile.open(f('d-top.vhd'));
    try {
      expect(top.chain().map((d) => path.basename(d.path))).toEqual(['d-top.vhd', 'd-mid.vhd', 'd-base.vhd']);
    } finally {
      await top.close();
    }
  });

  it('a parent changed after its child was made is refused (PARENT_MISMATCH); another disk too', async () => {
    await createVhd(f('m-base.vhd'), { size: 2 * MiB });
    await createVhd(f('m-child.vhd'), { parent: f('m-base.vhd') });
    const before = footerAt(f('m-base.vhd'), 'end').timeStamp;
    // Opening the parent writable without changing it keeps its identity.
    await (await VhdFile.open(f('m-base.vhd'), { writable: true })).close();
    expect(footerAt(f('m-base.vhd'), 'end').timeStamp).toBe(before);
    await (await VhdFile.open(f('m-child.vhd'))).close();
    // A write gives the parent a new time stamp, at both footer copies.
    const p = await VhdFile.open(f('m-base.vhd'), { writable: true });
    await p.write(Buffer.alloc(512, 1), 0);
    await p.close();
    const after = footerAt(f('m-base.vhd'), 'end');
    expect(after.timeStamp).toBeGreaterThan(before);
    expect(footerAt(f('m-base.vhd'), 'start').timeStamp).toBe(after.timeStamp);
    await expectCode(VhdFile.open(f('m-child.vhd')), 'PARENT_MISMATCH', /modified after this disk was created/);
    // Another disk with the same name: a different unique id.
    await createVhd(f('m2-base.vhd'), { size: 2 * MiB });
    await createVhd(f('m2-child.vhd'), { parent: f('m2-base.vhd') });
    const b = readFileSync(f('m2-base.vhd'));
    await import('node:fs/promises').then((fs) => fs.unlink(f('m2-base.vhd')));
    await createVhd(f('m2-base.vhd'), { size: 2 * MiB });
    expect(readFileSync(f('m2-base.vhd')).equals(b)).toBe(false);
    await expectCode(VhdFile.open(f('m2-child.vhd')), 'PARENT_MISMATCH', /unique id/);
  });

  it("accepts a parent time stamp equal to the parent file's mtime (Virtual PC, Xen)", async () => {
    await createVhd(f('t-base.vhd'), { size: 2 * MiB });
    await createVhd(f('t-child.vhd'), { parent: f('t-base.vhd') });
    const child = readFileSync(f('t-child.vhd'));
    // Virtual PC recorded the parent file's mtime, later than the parent's creation (its footer time stamp).
    const mtime = footerAt(f('t-base.vhd'), 'end').timeStamp + 1000; // VHD seconds
    child.writeUInt32BE(mtime, 512 + 56);
    child.writeUInt32BE(vhdChecksum(child.subarray(512, 1536), 36), 512 + 36);
    writeFileSync(f('t-child.vhd'), child);
    await expectCode(VhdFile.open(f('t-child.vhd')), 'PARENT_MISMATCH');
    const unix = mtime + 946684800;
    utimesSync(f('t-base.vhd'), unix, unix);
    const d = await VhdFile.open(f('t-child.vhd'));
    expect(d.parentLink?.timeStampFrom).toBe('mtime');
    await d.close();
  });

  it('each locator form alone finds the parent (W2ru, W2ku, MacX, Mac, and the name beside the child)', async () => {
    await createVhd(f('l-base.vhd'), { size: 2 * MiB });
    for (const [form, key] of [
      [['W2ru'], 'W2ru'],
      [['W2ku'], 'W2ku'],
      [['MacX'], 'MacX'],
      [['Mac'], 'Mac'],
      [['Wi2r'], 'Wi2r'],
      [['Wi2k'], 'Wi2k'],
      [[], 'same_directory'],
    ] as const) {
      const name = `l-child-${key}.vhd`;
      await createVhd(f(name), { parent: f('l-base.vhd'), locators: [...form] });
      const d = await VhdFile.open(f(name));
      expect(d.parentLink?.foundBy, name).toBe(key);
      await d.close();
    }
  });

  it('a locator outside the allowed directories is refused, and the file is not opened', async () => {
    await createVhd(f('h-base.vhd'), { size: 2 * MiB });
    await createVhd(f('h-child.vhd'), { parent: f('h-base.vhd'), locators: ['W2ku'] });
    // Only the child's directory's subdirectory is allowed: the parent lies outside.
    const sub = f('sub');
    await import('node:fs/promises').then((fs) => fs.mkdir(sub));
    await expectCode(VhdFile.open(f('h-child.vhd'), { allowedRoots: [sub] }), 'PATH_NOT_ALLOWED', /h-base/);
    // Missing parent: every path tried is listed.
    await import('node:fs/promises').then((fs) => fs.rename(f('h-base.vhd'), f('h-base.moved')));
    await expectCode(VhdFile.open(f('h-child.vhd')), 'PARENT_NOT_FOUND', /W2ku=.*not found.*same_directory/);
    // noParent opens the child alone; reads that need the parent say so.
    const d = await VhdFile.open(f('h-child.vhd'), { noParent: true });
    await expectCode(d.readAt(0, 512), 'PARENT_NOT_FOUND');
    await d.close();
  });
});

describe('footer copies', () => {
  async function dynamicWithData(name: string): Promise<{ file: string; expected: Buffer }> {
    const file = f(name);
    await createVhd(file, { size: 3 * MiB, blockSize: 512 * KiB });
    const expected = Buffer.alloc(3 * MiB);
    const d = await VhdFile.open(file, { writable: true });
    await scribbleVhd(d, expected, SEED + 7, 20);
    await d.close();
    return { file, expected };
  }

  it('a lost end footer: read-only opens use the copy at 0 (with a warning); a writable open restores it', async () => {
    const { file, expected } = await dynamicWithData('fc-end.vhd');
    const size = statSync(file).size;
    truncateSync(file, size - 512); // as after a crash while a block was being added
    const ro = await VhdFile.open(file);
    expect(ro.warnings.join()).toMatch(/footer at the end is invalid/);
    expectSame(await ro.readAt(0, 3 * MiB), expected, 'read-only, footer lost');
    await ro.close();
    const rw = await VhdFile.open(file, { writable: true });
    expect(rw.repairs.join()).toMatch(/footer at the end restored/);
    await rw.close();
    expect(statSync(file).size).toBe(size);
    const again = await VhdFile.open(file);
    expect(again.warnings).toEqual([]);
    await again.close();
    expectSame(await readWholeVhd(file), expected, 'after the repair');
  });

  it('a damaged copy at 0: the end footer is used; a writable open rewrites the copy', async () => {
    const { file, expected } = await dynamicWithData('fc-start.vhd');
    const b = readFileSync(file);
    b[100] ^= 0xff;
    writeFileSync(file, b);
    const ro = await VhdFile.open(file);
    expect(ro.warnings.join()).toMatch(/copy at offset 0 is invalid \(checksum mismatch/);
    await ro.close();
    await (await VhdFile.open(file, { writable: true })).close();
    const c = readFileSync(file);
    expect(c.subarray(0, 512).equals(c.subarray(c.length - 512))).toBe(true);
    expectSame(await readWholeVhd(file), expected, 'after the repair');
  });

  it('both footers lost: VHD_CORRUPT naming both; not a VHD at all: the same', async () => {
    const { file } = await dynamicWithData('fc-both.vhd');
    const b = readFileSync(file);
    b[0] ^= 1;
    b[b.length - 512] ^= 1;
    writeFileSync(file, b);
    await expectCode(VhdFile.open(file), 'VHD_CORRUPT', /no valid footer: at the end: cookie.*at offset 0: cookie/);
    writeFileSync(f('text.vhd'), 'hello');
    await expectCode(VhdFile.open(f('text.vhd')), 'VHD_CORRUPT', /not a VHD/);
    writeFileSync(f('zeros.vhd'), Buffer.alloc(4096));
    await expectCode(VhdFile.open(f('zeros.vhd')), 'VHD_CORRUPT', /no valid footer/);
  });

  it('a fixed disk with a 511-byte footer (Virtual PC before 2004) opens; a writable open rewrites it as 512', async () => {
    const file = f('old511.vhd');
    const data = rng(SEED + 511).bytes(MiB);
    const footer = encodeFooter({
      features: 2,
      version: 0x00010000,
      dataOffset: 0xffffffffffffffffn,
      timeStamp: 1000,
      creatorApp: 'vpc ',
      creatorVersion: 0x00040000,
      creatorHostOs: 'Wi2k',
      originalSize: BigInt(MiB),
      currentSize: BigInt(MiB),
      geometry: chsGeometry(2048),
      diskType: 2,
      uniqueId: newUniqueId(),
      savedState: 0,
    }).subarray(0, 511);
    footer.writeUInt32BE(vhdChecksum(footer, 64), 64);
    writeFileSync(file, Buffer.concat([data, footer]));
    const d = await VhdFile.open(file);
    expect(d.warnings.join()).toMatch(/511 bytes/);
    expect((await d.readAt(0, MiB)).equals(data)).toBe(true);
    await d.close();
    const w = await VhdFile.open(file, { writable: true });
    expect(w.repairs).toEqual(['the 511-byte footer rewritten as 512 bytes']);
    await w.close();
    expect(statSync(file).size).toBe(MiB + 512);
    expect((await readWholeVhd(file)).equals(data)).toBe(true);
  });

  it('a fixed disk whose data starts with a VHD footer is still a fixed disk (the end footer decides)', async () => {
    const file = f('nested.vhd');
    await createVhd(file, { size: MiB, type: 'fixed' });
    await createVhd(f('inner.vhd'), { size: 64 * KiB });
    const inner = readFileSync(f('inner.vhd'));
    const d = await VhdFile.open(file, { writable: true });
    await d.write(inner, 0); // a guest stores a dynamic VHD at the start of its disk
    await d.close();
    const again = await VhdFile.open(file);
    expect(again.diskType).toBe('fixed');
    expect((await again.readAt(0, inner.length)).equals(inner)).toBe(true);
    await again.close();
  });
});

describe('hostile BAT entries', () => {
  /** A dynamic disk with block 1 allocated, then its BAT entry replaced by `sector`. */
  async function withBatEntry(name: string, sector: number): Promise<string> {
    const file = f(name);
    await createVhd(file, { size: 4 * MiB, blockSize: MiB });
    const d = await VhdFile.open(file, { writable: true });
    await d.write(Buffer.alloc(4096, 0x5a), MiB);
    await d.write(Buffer.alloc(4096, 0x5b), 3 * MiB);
    await d.close();
    const b = readFileSync(file);
    b.writeUInt32BE(sector, 1536 + 4);
    writeFileSync(file, b);
    return file;
  }

  it('a block inside the header or BAT: reads say VHD_CORRUPT, writable opens are refused', async () => {
    for (const [name, sector] of [
      ['hb-header.vhd', 1],
      ['hb-bat.vhd', 3],
      ['hb-copy.vhd', 0],
    ] as const) {
      const file = await withBatEntry(name, sector);
      const d = await VhdFile.open(file);
      await expectCode(d.readAt(MiB, 512), 'VHD_CORRUPT', /overlaps the/);
      expect((await d.readAt(3 * MiB, 4096)).equals(Buffer.alloc(4096, 0x5b))).toBe(true); // the rest reads
      await d.close();
      await expectCode(VhdFile.open(file, { writable: true }), 'VHD_CORRUPT', /cannot be written/);
    }
  });

  it('a block past the end of the file: VHD_TRUNCATED; over the footer: VHD_CORRUPT; over another block: refused for writes', async () => {
    const past = await withBatEntry('hb-past.vhd', 0x7fffffff);
    let d = await VhdFile.open(past);
    await expectCode(d.readAt(MiB + 512, 512), 'VHD_TRUNCATED', /past the end of the file/);
    await d.close();
    await expectCode(VhdFile.open(past, { writable: true }), 'VHD_CORRUPT', /extends past/);
    const size = statSync(past).size;
    const overFooter = await withBatEntry('hb-footer.vhd', (size - 512 - 4096) / 512);
    d = await VhdFile.open(overFooter);
    // The block's data starts 4 KiB before the end: its last 512 bytes there are the footer.
    await expectCode(d.readAt(MiB + 3584, 512), 'VHD_CORRUPT', /reaches into the footer/);
    await expectCode(d.readAt(MiB + 8 * KiB, 512), 'VHD_TRUNCATED');
    expect((await d.readAt(MiB, 3584)).length).toBe(3584);
    await d.close();
    // Block 1 pointing at block 3's space: both read block 3's bytes, and no writes are allowed.
    const b = readFileSync(past);
    const block3 = b.readUInt32BE(1536 + 12);
    const alias = await withBatEntry('hb-alias.vhd', block3);
    d = await VhdFile.open(alias);
    expect((await d.readAt(MiB, 4096)).equals(Buffer.alloc(4096, 0x5b))).toBe(true);
    await d.close();
    await expectCode(VhdFile.open(alias, { writable: true }), 'VHD_CORRUPT', /overlaps block/);
  });

  it('a dynamic header that claims too little BAT for the size, or lies past the end', async () => {
    const file = f('hh.vhd');
    await createVhd(file, { size: 4 * MiB, blockSize: MiB });
    const b = readFileSync(file);
    const h = decodeDynamicHeader(b.subarray(512, 1536), 512);
    encodeDynamicHeader({ ...h, maxTableEntries: 3 }).copy(b, 512);
    writeFileSync(f('hh-small.vhd'), b);
    await expectCode(VhdFile.open(f('hh-small.vhd')), 'VHD_CORRUPT', /cannot hold/);
    encodeDynamicHeader({ ...h, tableOffset: 1 << 30 }).copy(b, 512);
    writeFileSync(f('hh-far.vhd'), b);
    await expectCode(VhdFile.open(f('hh-far.vhd')), 'VHD_TRUNCATED', /BAT/);
  });
});
