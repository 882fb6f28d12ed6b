/**
 * Merge and convert: a child merged into its (fixed, dynamic or differencing) parent leaves the parent
 * reading what the child did, the child gone, and the parent with a new identity its other children
 * refuse; conversions in every direction between VHD, VHDX and raw keep the bytes, skip what is
 * unallocated or zero, and flatten chains.
 *
 * Seed: TIDEMARK_VHD_SEED (printed).
 */
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { vhdChecksum } from '../../src/formats/vhd/checksum.js';
import { convertVhdImage, probeImageFormat } from '../../src/formats/vhd/convert.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { decodeFooter } from '../../src/formats/vhd/footer.js';
import { mergeVhd } from '../../src/formats/vhd/merge.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { readWholeVhdx } from '../helpers/vhdx.js';
import { KiB, MiB, expectSame, readWholeVhd, scribbleVhd } from './helpers.js';

const SEED = seedFrom('TIDEMARK_VHD_SEED', 20261206);
console.log(`vhd chain seed ${SEED} (TIDEMARK_VHD_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('vhd-chain')));
afterAll(async () => cleanup());

const f = (name: string) => path.join(dir, name);

/** A parent of `type` with data, and a child with partial and whole blocks over it. */
async function chain(tag: string, type: 'fixed' | 'dynamic', parentBs: number, childBs: number, seed: number) {
  const size = 6 * MiB + 512;
  const expected = Buffer.alloc(size);
  await createVhd(f(`${tag}-base.vhd`), { size, type, blockSize: parentBs });
  let d = await VhdFile.open(f(`${tag}-base.vhd`), { writable: true });
  await scribbleVhd(d, expected, seed, 30);
  await d.close();
  const parentView = Buffer.from(expected);
  await createVhd(f(`${tag}-child.vhd`), { parent: f(`${tag}-base.vhd`), blockSize: childBs });
  d = await VhdFile.open(f(`${tag}-child.vhd`), { writable: true });
  const r = rng(seed + 1);
  for (let i = 0; i < 15; i++) {
    const data = r.bytes(1 + r.int(5000));
    const at = r.int(size - data.length);
    await d.write(data, at);
    data.copy(expected, at);
  }
  await scribbleVhd(d, expected, seed + 2, 20);
  await d.close();
  return { expected, parentView };
}

describe('merge', () => {
  const cases: ['fixed' | 'dynamic', number, number][] = [
    ['dynamic', 512 * KiB, 2 * MiB],
    ['dynamic', 2 * MiB, 512 * KiB],
    ['fixed', 2 * MiB, 512 * KiB],
  ];
  it.each(cases)(
    'into a %s parent (%i / %i-byte blocks): the parent reads what the child did',
    async (type, pbs, cbs) => {
      const tag = `m-${type}-${pbs}`;
      const seed = SEED + pbs + cbs;
      const { expected } = await chain(tag, type, pbs, cbs, seed);
      await createVhd(f(`${tag}-sibling.vhd`), { parent: f(`${tag}-base.vhd`) });
      expectSame(await readWholeVhd(f(`${tag}-child.vhd`)), expected, `chain before (seed ${seed})`);
      const before = decodeFooter(readFileSync(f(`${tag}-base.vhd`)).subarray(-512));
      const result = await mergeVhd(f(`${tag}-child.vhd`));
      expect(result.parentPath).toBe(f(`${tag}-base.vhd`));
      expect(result.bytesCopied).toBeGreaterThan(0);
      expect(existsSync(f(`${tag}-child.vhd`))).toBe(false);
      expectSame(await readWholeVhd(f(`${tag}-base.vhd`)), expected, `merged parent (seed ${seed})`);
      const after = decodeFooter(readFileSync(f(`${tag}-base.vhd`)).subarray(-512));
      expect((after as { timeStamp: number }).timeStamp).toBeGreaterThan((before as { timeStamp: number }).timeStamp);
      // The other child of the parent sees changed data under it: it refuses the parent now.
      await expect(VhdFile.open(f(`${tag}-sibling.vhd`))).rejects.toMatchObject({ code: 'PARENT_MISMATCH' });
    },
  );

  it('the middle of a chain of three: the top merges into the middle, which stays a child of the base', async () => {
    const { expected } = await chain('m3', 'dynamic', 512 * KiB, 2 * MiB, SEED + 3);
    await createVhd(f('m3-top.vhd'), { parent: f('m3-child.vhd'), blockSize: 512 * KiB });
    const d = await VhdFile.open(f('m3-top.vhd'), { writable: true });
    await scribbleVhd(d, expected, SEED + 4, 20);
    await d.close();
    await mergeVhd(f('m3-top.vhd'));
    const mid = await VhdFile.open(f('m3-child.vhd'));
    try {
      expect(mid.parentLink?.path).toBe(f('m3-base.vhd'));
      expectSame(await mid.readAt(0, mid.virtualSize), expected, 'merged middle through the base');
    } finally {
      await mid.close();
    }
  });

  it('refuses a disk that is not a child, and a chain whose sizes differ', async () => {
    await createVhd(f('lonely.vhd'), { size: MiB });
    await expect(mergeVhd(f('lonely.vhd'))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await createVhd(f('rs-base.vhd'), { size: MiB });
    await createVhd(f('rs-child.vhd'), { parent: f('rs-base.vhd') });
    // The child says it is bigger than its parent (both footers, checksums fixed).
    const b = readFileSync(f('rs-child.vhd'));
    for (const at of [0, b.length - 512]) {
      b.writeBigUInt64BE(BigInt(2 * MiB), at + 48);
      b.writeUInt32BE(vhdChecksum(b.subarray(at, at + 512), 64), at + 64);
    }
    writeFileSync(f('rs-child.vhd'), b);
    await expect(mergeVhd(f('rs-child.vhd'))).rejects.toMatchObject({ code: 'VHD_UNSUPPORTED' });
    expect(existsSync(f('rs-child.vhd'))).toBe(true);
  });
});

describe('convert', () => {
  it('probes formats: VHD (dynamic, fixed), VHDX, raw (also a raw disk whose last bytes look like a broken footer)', async () => {
    await createVhd(f('p-dyn.vhd'), { size: MiB });
    await createVhd(f('p-fix.vhd'), { size: MiB, type: 'fixed' });
    await createVhdx(f('p.vhdx'), { size: MiB });
    writeFileSync(f('p.raw'), Buffer.alloc(4096, 1));
    const fake = Buffer.alloc(4096);
    fake.write('conectix', 4096 - 512, 'latin1');
    writeFileSync(f('p-fake.raw'), fake);
    expect(await probeImageFormat(f('p-dyn.vhd'))).toBe('vhd');
    expect(await probeImageFormat(f('p-fix.vhd'))).toBe('vhd');
    expect(await probeImageFormat(f('p.vhdx'))).toBe('vhdx');
    expect(await probeImageFormat(f('p.raw'))).toBe('raw');
    expect(await probeImageFormat(f('p-fake.raw'))).toBe('raw');
  });

  it('raw → VHD (dynamic and fixed) → raw, a size that is not whole sectors padded; zeros and holes skipped', async () => {
    const size = 5 * MiB + 1000;
    const raw = Buffer.alloc(size);
    const r = rng(SEED + 50);
    r.bytes(700 * KiB).copy(raw, 100);
    r.bytes(3000).copy(raw, 4 * MiB);
    writeFileSync(f('src.raw'), raw);
    for (const type of ['dynamic', 'fixed'] as const) {
      const res = await convertVhdImage(f('src.raw'), f(`c-${type}.vhd`), { type, blockSize: 512 * KiB });
      expect(res).toMatchObject({ sourceFormat: 'raw', format: 'vhd', virtualSize: 5 * MiB + 1024 });
      expect(res.bytesWritten).toBeLessThan(MiB);
      expect(res.bytesSkipped).toBe(res.virtualSize - res.bytesWritten);
      const back = await readWholeVhd(f(`c-${type}.vhd`));
      expectSame(back.subarray(0, size), raw, `raw → ${type} VHD`);
      expect(back.subarray(size).equals(Buffer.alloc(24))).toBe(true);
      const d = await VhdFile.open(f(`c-${type}.vhd`));
      expect(d.diskType).toBe(type);
      if (type === 'dynamic') expect((await d.allocatedExtents()).length).toBe(2); // blocks 0-1 and 8
      await d.close();
      const out = await convertVhdImage(f(`c-${type}.vhd`), f(`c-${type}.raw`));
      expect(out).toMatchObject({ sourceFormat: 'vhd', format: 'raw' });
      expectSame(readFileSync(f(`c-${type}.raw`)).subarray(0, size), raw, `${type} VHD → raw`);
    }
  });

  it('a differencing chain → one VHD and one VHDX (flattened), and VHDX → VHD back, byte for byte', async () => {
    const { expected } = await chain('cv', 'dynamic', 2 * MiB, 512 * KiB, SEED + 60);
    const a = await convertVhdImage(f('cv-child.vhd'), f('cv-flat.vhd'));
    expect(a.sourceFormat).toBe('vhd');
    expect(a.format).toBe('vhd');
    const flat = await VhdFile.open(f('cv-flat.vhd'));
    expect(flat.diskType).toBe('dynamic');
    expect(flat.blockSize).toBe(512 * KiB); // the source's
    await flat.close();
    expectSame(await readWholeVhd(f('cv-flat.vhd')), expected, 'chain → VHD');
    const b = await convertVhdImage(f('cv-child.vhd'), f('cv-flat.vhdx'), { blockSize: MiB });
    expect(b.format).toBe('vhdx');
    expectSame(await readWholeVhdx(f('cv-flat.vhdx')), expected, 'chain → VHDX');
    const x = await VhdxFile.open(f('cv-flat.vhdx'));
    expect(x.blockSize).toBe(MiB);
    await x.close();
    const c = await convertVhdImage(f('cv-flat.vhdx'), f('cv-back.vhd'), { type: 'fixed' });
    expect(c).toMatchObject({ sourceFormat: 'vhdx', format: 'vhd' });
    expectSame(await readWholeVhd(f('cv-back.vhd')), expected, 'VHDX → VHD');
    expect(statSync(f('cv-back.vhd')).size).toBe(expected.length + 512);
  });

  it('a VHDX with 4096-byte sectors converts to VHD; --chs-size rounds the output up', async () => {
    await createVhdx(f('s4k.vhdx'), { size: 10 * MiB, logicalSectorSize: 4096, blockSize: MiB });
    const x = await VhdxFile.open(f('s4k.vhdx'), { writable: true });
    await x.write(Buffer.alloc(8192, 0x44), 10 * MiB - 8192);
    await x.close();
    const r = await convertVhdImage(f('s4k.vhdx'), f('s4k.vhd'), { chsAligned: true });
    expect(r.virtualSize).toBe(10 * MiB);
    const d = await VhdFile.open(f('s4k.vhd'));
    expect(d.virtualSize).toBe(10514432); // rounded to a whole geometry
    expect((await d.readAt(10 * MiB - 8192, 8192)).equals(Buffer.alloc(8192, 0x44))).toBe(true);
    expect((await d.readAt(10 * MiB, 10514432 - 10 * MiB)).equals(Buffer.alloc(10514432 - 10 * MiB))).toBe(true);
    await d.close();
  });

  it('refusals: an existing output, options the output format does not take, an empty source', async () => {
    writeFileSync(f('exists.vhd'), 'x');
    await expect(convertVhdImage(f('src.raw'), f('exists.vhd'))).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    expect(readFileSync(f('exists.vhd'), 'utf8')).toBe('x');
    await expect(convertVhdImage(f('src.raw'), f('o.raw'), { type: 'fixed' })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
    });
    await expect(convertVhdImage(f('src.raw'), f('o.vhdx'), { chsAligned: true })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
    });
    writeFileSync(f('empty.raw'), '');
    await expect(convertVhdImage(f('empty.raw'), f('e.vhd'))).rejects.toBeInstanceOf(TidemarkError);
    expect(existsSync(f('e.vhd'))).toBe(false);
  });
});
