/**
 * `checkVhd`: a clean file has no findings; each damage gives its finding code (errors for damage,
 * warnings for what still reads), and --repair restores a lost or damaged footer copy at either end.
 */
import { readFileSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { vhdChecksum } from '../../src/formats/vhd/checksum.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { decodeFooter, encodeFooter } from '../../src/formats/vhd/footer.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { tempDir } from '../helpers/peers.js';
import { KiB, MiB, expectSame, readWholeVhd, scribbleVhd } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('vhd-check')));
afterAll(async () => cleanup());

const f = (name: string) => path.join(dir, name);

async function dynamicDisk(name: string): Promise<{ file: string; expected: Buffer }> {
  const file = f(name);
  await createVhd(file, { size: 4 * MiB, blockSize: 512 * KiB });
  const expected = Buffer.alloc(4 * MiB);
  const d = await VhdFile.open(file, { writable: true });
  await scribbleVhd(d, expected, 4242, 25);
  await d.close();
  return { file, expected };
}

const codes = (r: { errors: { code: string }[]; warnings: { code: string }[] }) => ({
  errors: r.errors.map((e) => e.code),
  warnings: r.warnings.map((w) => w.code),
});

/** Rewrites the footer at the end (and at 0 for dynamic disks) with `change` applied, checksums fixed. */
function editFooters(file: string, change: (b: Buffer) => void, where: ('end' | 'start')[] = ['end', 'start']): void {
  const b = readFileSync(file);
  for (const w of where) {
    const at = w === 'end' ? b.length - 512 : 0;
    const ft = b.subarray(at, at + 512);
    change(ft);
    ft.writeUInt32BE(vhdChecksum(ft, 64), 64);
  }
  writeFileSync(file, b);
}

describe('checkVhd', () => {
  it('clean files: fixed, dynamic and a differencing chain', async () => {
    await createVhd(f('fixed.vhd'), { size: MiB, type: 'fixed' });
    const { file } = await dynamicDisk('dyn.vhd');
    await createVhd(f('child.vhd'), { parent: file });
    for (const x of [f('fixed.vhd'), file, f('child.vhd')]) {
      const r = await checkVhd(x);
      expect(codes(r), x).toEqual({ errors: [], warnings: [] });
      expect(r.ok).toBe(true);
    }
  });

  it('a lost end footer: FOOTER_INVALID (a warning); --repair restores it and the data reads the same', async () => {
    const { file, expected } = await dynamicDisk('lost-end.vhd');
    const size = statSync(file).size;
    truncateSync(file, size - 512 + 100); // a torn footer
    const r = await checkVhd(file);
    expect(codes(r)).toEqual({ errors: [], warnings: ['FOOTER_INVALID', 'FILE_SIZE_UNALIGNED'] });
    expect(r.ok).toBe(true);
    const fixed = await checkVhd(file, { repair: true });
    expect(fixed.repaired.join()).toMatch(/footer at the end restored at offset/);
    expect(codes(fixed)).toEqual({ errors: [], warnings: [] });
    expect(statSync(file).size).toBe(size);
    expectSame(await readWholeVhd(file), expected, 'after the repair');
  });

  it('a damaged copy at 0: FOOTER_COPY_INVALID; copies that differ: FOOTERS_DIFFER; --repair fixes both', async () => {
    const { file } = await dynamicDisk('copy.vhd');
    const b = readFileSync(file);
    b[30] ^= 1;
    writeFileSync(file, b);
    expect(codes(await checkVhd(file)).warnings).toEqual(['FOOTER_COPY_INVALID']);
    expect((await checkVhd(file, { repair: true })).repaired).toEqual([
      'footer copy at offset 0 rewritten from the footer at the end',
    ]);
    expect(codes(await checkVhd(file)).warnings).toEqual([]);
    editFooters(file, (ft) => ft.writeUInt32BE(12345, 24), ['start']);
    expect(codes(await checkVhd(file)).warnings).toEqual(['FOOTERS_DIFFER']);
    await checkVhd(file, { repair: true });
    expect(codes(await checkVhd(file)).warnings).toEqual([]);
  });

  it('no valid footer at all: one error with the open failure, nothing repaired', async () => {
    const { file } = await dynamicDisk('none.vhd');
    const b = readFileSync(file);
    b[0] = 0;
    b[b.length - 512] = 0;
    writeFileSync(file, b);
    const r = await checkVhd(file, { repair: true });
    expect(r.ok).toBe(false);
    expect(codes(r)).toEqual({ errors: ['VHD_CORRUPT'], warnings: [] });
    expect(r.repaired[0]).toMatch(/^nothing repaired: footer/);
  });

  it('BAT damage: BAT_OFFSET_INVALID, BAT_BEYOND_EOF, OVERLAP (errors); BAT_BEYOND_SIZE (a warning)', async () => {
    const { file } = await dynamicDisk('bat.vhd');
    const b = readFileSync(file);
    const first = b.readUInt32BE(1536);
    expect(first).not.toBe(0xffffffff);
    b.writeUInt32BE(2, 1536 + 4 * 1); // inside the dynamic header
    b.writeUInt32BE(0x00ffffff, 1536 + 4 * 2); // far past the end
    b.writeUInt32BE(first + 1, 1536 + 4 * 3); // one sector into block 0's space
    writeFileSync(file, b);
    const r = await checkVhd(file);
    expect(r.ok).toBe(false);
    expect(codes(r).errors.sort()).toEqual(['BAT_BEYOND_EOF', 'BAT_OFFSET_INVALID', 'OVERLAP']);
    expect(r.errors.find((e) => e.code === 'BAT_BEYOND_EOF')!.offset).toBe(1536 + 8);
    // The repair cannot make such a disk writable: it says why, and changes nothing.
    const before = readFileSync(file);
    const rr = await checkVhd(file, { repair: true });
    expect(rr.repaired[0]).toMatch(/nothing repaired: .*cannot be written/);
    expect(readFileSync(file).equals(before)).toBe(true);

    // An entry past the blocks the size needs: allocated space that is never read.
    await createVhd(f('beyond.vhd'), { size: 4 * MiB, blockSize: 2 * MiB });
    const d = await VhdFile.open(f('beyond.vhd'), { writable: true });
    await d.write(Buffer.alloc(512, 1), 0);
    await d.close();
    const c = readFileSync(f('beyond.vhd'));
    const h = c.subarray(512, 1536);
    h.writeUInt32BE(3, 28); // three entries for a two-block disk
    h.writeUInt32BE(vhdChecksum(h, 36), 36);
    c.writeUInt32BE(c.readUInt32BE(1536), 1536 + 8);
    c.writeUInt32BE(0xffffffff, 1536);
    writeFileSync(f('beyond.vhd'), c);
    expect(codes(await checkVhd(f('beyond.vhd')))).toEqual({ errors: [], warnings: ['BAT_BEYOND_SIZE'] });
  });

  it('footer oddities: FEATURES_RESERVED, SAVED_STATE, GEOMETRY_EXCEEDS_SIZE; a truncated fixed disk: FIXED_TRUNCATED', async () => {
    await createVhd(f('odd.vhd'), { size: 2 * MiB, type: 'fixed' });
    editFooters(
      f('odd.vhd'),
      (ft) => {
        ft.writeUInt32BE(0, 8);
        ft[84] = 1;
        ft.writeUInt16BE(60000, 56);
      },
      ['end'],
    );
    expect(codes(await checkVhd(f('odd.vhd')))).toEqual({
      errors: [],
      warnings: ['FEATURES_RESERVED', 'SAVED_STATE', 'GEOMETRY_EXCEEDS_SIZE'],
    });
    await createVhd(f('short.vhd'), { size: 2 * MiB, type: 'fixed' });
    const b = readFileSync(f('short.vhd'));
    writeFileSync(f('short.vhd'), Buffer.concat([b.subarray(0, MiB), b.subarray(b.length - 512)]));
    const r = await checkVhd(f('short.vhd'));
    expect(codes(r)).toEqual({ errors: ['FIXED_TRUNCATED'], warnings: [] });
    const d = await VhdFile.open(f('short.vhd'));
    expect((await d.readAt(0, MiB)).length).toBe(MiB);
    await expect(d.readAt(MiB - 512, 1024)).rejects.toMatchObject({ code: 'VHD_TRUNCATED' });
    await d.close();
  });

  it('parent locators: LOCATOR_INVALID (a warning), LOCATOR_NO_PATH and the chain errors', async () => {
    await createVhd(f('base.vhd'), { size: 2 * MiB });
    await createVhd(f('kid.vhd'), { parent: f('base.vhd') });
    const b = readFileSync(f('kid.vhd'));
    const h = b.subarray(512, 1536);
    h.writeUInt32BE(0x7fffffff, 576 + 16 + 4); // locator 1 data far past the end
    h.writeUInt32BE(vhdChecksum(h, 36), 36);
    writeFileSync(f('kid.vhd'), b);
    expect(codes(await checkVhd(f('kid.vhd')))).toEqual({ errors: [], warnings: ['LOCATOR_INVALID'] });
    // No locator and no name: nothing leads to the parent.
    for (let i = 0; i < 8; i++) h.writeUInt32BE(0, 576 + i * 24);
    h.fill(0, 64, 576);
    h.writeUInt32BE(vhdChecksum(h, 36), 36);
    writeFileSync(f('kid.vhd'), b);
    expect(codes(await checkVhd(f('kid.vhd'))).errors).toEqual(['LOCATOR_NO_PATH', 'PARENT_NOT_FOUND']);
    // A changed parent.
    await createVhd(f('kid2.vhd'), { parent: f('base.vhd') });
    const p = await VhdFile.open(f('base.vhd'), { writable: true });
    await p.write(Buffer.alloc(512, 9), 0);
    await p.close();
    expect(codes(await checkVhd(f('kid2.vhd'))).errors).toEqual(['PARENT_MISMATCH']);
    // Outside the allowed directories.
    const r = await checkVhd(f('kid2.vhd'), { allowedRoots: [path.join(dir, 'nowhere')] });
    expect(codes(r).errors).toEqual(['PATH_NOT_ALLOWED']);
  });

  it('the repair keeps a parent the time stamp its children expect', async () => {
    await createVhd(f('pbase.vhd'), { size: 2 * MiB, blockSize: 512 * KiB });
    const w = await VhdFile.open(f('pbase.vhd'), { writable: true });
    await w.write(Buffer.alloc(MiB, 3), 0);
    await w.close();
    await createVhd(f('pkid.vhd'), { parent: f('pbase.vhd') });
    const size = statSync(f('pbase.vhd')).size;
    truncateSync(f('pbase.vhd'), size - 512);
    expect(codes(await checkVhd(f('pkid.vhd')))).toEqual({ errors: [], warnings: [] });
    await checkVhd(f('pbase.vhd'), { repair: true });
    const ft = decodeFooter(readFileSync(f('pbase.vhd')).subarray(size - 512));
    expect(typeof ft).toBe('object');
    expect(encodeFooter(ft as never).equals(readFileSync(f('pbase.vhd')).subarray(0, 512))).toBe(true);
    expect(codes(await checkVhd(f('pkid.vhd')))).toEqual({ errors: [], warnings: [] });
  });
});
