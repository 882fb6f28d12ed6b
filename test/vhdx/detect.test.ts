/**
 * Disk formats are recognised by their magic, never guessed (src/formats/detect.ts): files made by
 * `qemu-img create -f vpc|qcow2|qcow|qed|vmdk|vdi|parallels` (VHD fixed and dynamic, the VMDK subformats)
 * and raw files. The VHDX engine and `vhdx convert` refuse the other formats as NOT_SUPPORTED naming
 * them, and write nothing; a raw file that happens to carry a magic still converts with `sourceFormat: 'raw'`.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { detectFormat, detectFromBytes, type DiskFormat } from '../../src/formats/detect.js';
import { convertImage } from '../../src/formats/vhdx/convert.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { requirePeers, run, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_DETECT_SEED', 1313);
console.log(`detect seed ${SEED} (set TIDEMARK_DETECT_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('detect'));
});
afterAll(async () => cleanup?.());

async function expectRejects(p: Promise<unknown>, code: string, match?: RegExp): Promise<TidemarkError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(TidemarkError);
  const t = err as TidemarkError;
  expect(t.code, t.message).toBe(code);
  expect(t.message).not.toMatch(/[\r\n]/);
  if (match) expect(t.message).toMatch(match);
  return t;
}

describe('detectFromBytes', () => {
  const head = (text: string, size = 4096) => {
    const b = Buffer.alloc(size);
    b.write(text, 0, 'latin1');
    return b;
  };
  const none = Buffer.alloc(0);

  it('names each magic at offset 0', () => {
    const cases: [Buffer, DiskFormat][] = [
      [head('vhdxfile'), 'vhdx'],
      [head('conectix'), 'vhd'],
      [head('QFI\xfb\0\0\0\x03'), 'qcow2'],
      [head('QFI\xfb\0\0\0\x02'), 'qcow2'],
      [head('QFI\xfb\0\0\0\x01'), 'qcow'],
      [head('QED\0'), 'qed'],
      [head('KDMV'), 'vmdk'],
      [head('COWD'), 'vmdk'],
      [head('# Disk DescriptorFile\nversion=1\n'), 'vmdk'],
      [head('# Disk descriptor written by hand\r\n\r\nversion=1\r\nCID=fffffffe\r\n'), 'vmdk'],
      [head('WithoutFreeSpace'), 'parallels'],
      [head('WithouFreSpacExt'), 'parallels'],
      [head('LUKS\xba\xbe'), 'luks'],
    ];
    for (const [b, f] of cases) expect(detectFromBytes(b, none, b.length).format, b.toString('latin1', 0, 16)).toBe(f);
    const vdi = Buffer.alloc(512);
    vdi.writeUInt32LE(0xbeda107f, 0x40);
    expect(detectFromBytes(vdi, none, 512).format).toBe('vdi');
  });

  it('finds a VHD footer (512 or 511 bytes) whose checksum holds, and a DMG trailer at the end', () => {
    // The footer checksum (at 64): the ones' complement of the byte sum with that field taken as zero.
    const seal = (f: Buffer) => {
      let sum = 0;
      for (let i = 0; i < f.length; i++) if (i < 64 || i >= 68) sum += f[i];
      f.writeUInt32BE(~sum >>> 0, 64);
      return f;
    };
    const footer = Buffer.alloc(512);
    footer.write('conectix', 0, 'latin1');
    footer.writeUInt32BE(0x00010000, 12);
    expect(detectFromBytes(Buffer.alloc(4096), seal(footer), 10 * MiB)).toMatchObject({ format: 'vhd' });
    const old = Buffer.alloc(512);
    old.write('conectix', 1, 'latin1');
    seal(old.subarray(1)).copy(old, 1);
    expect(detectFromBytes(Buffer.alloc(4096), old, 10 * MiB)).toMatchObject({ format: 'vhd' });
    // The cookie alone (a raw disk whose last sector merely starts with it) is not a VHD.
    const cookieOnly = Buffer.alloc(512);
    cookieOnly.write('conectix', 0, 'latin1');
    expect(detectFromBytes(Buffer.alloc(4096), cookieOnly, 10 * MiB)).toMatchObject({ format: 'raw' });
    const koly = Buffer.alloc(512);
    koly.write('koly', 0, 'latin1');
    koly.writeUInt32BE(4, 4);
    koly.writeUInt32BE(512, 8);
    expect(detectFromBytes(Buffer.alloc(4096), koly, 10 * MiB)).toMatchObject({ format: 'dmg' });
  });

  it('raw: random bytes, zeros, tiny and empty files, magics in the wrong place', () => {
    const r = rng(SEED);
    for (let i = 0; i < 200; i++) expect(detectFromBytes(r.bytes(4096), r.bytes(512), MiB).format).toBe('raw');
    expect(detectFromBytes(Buffer.alloc(4096), Buffer.alloc(512), MiB).format).toBe('raw');
    expect(detectFromBytes(none, none, 0).format).toBe('raw');
    expect(detectFromBytes(Buffer.from('QFI'), Buffer.from('QFI'), 3).format).toBe('raw');
    expect(detectFromBytes(head('xvhdxfile'), none, 4096).format).toBe('raw');
    expect(detectFromBytes(head('# a shell script\necho version=1\n'), none, 4096).format).toBe('raw');
    expect(detectFromBytes(head('version=12\n'), none, 4096).format).toBe('raw');
    const late = Buffer.alloc(512);
    late.write('conectix', 8, 'latin1'); // not where a footer is
    expect(detectFromBytes(Buffer.alloc(4096), late, MiB).format).toBe('raw');
  });
});

const qemu = requirePeers('qemu-img');

describe.skipIf(qemu.skip)('files made by qemu-img, and raw files', () => {
  interface Made {
    file: string;
    format: DiskFormat;
    name: RegExp;
  }
  const made: Made[] = [];

  beforeAll(async () => {
    const mk = async (name: string, fmt: string, opts: string[], format: DiskFormat, label: RegExp) => {
      const file = path.join(dir, name);
      await run('qemu-img', ['create', '-q', '-f', fmt, ...opts, file, '64M']);
      made.push({ file, format, name: label });
    };
    await mk('dyn.vhd', 'vpc', [], 'vhd', /is a VHD disk/);
    await mk('fixed.vhd', 'vpc', ['-o', 'subformat=fixed'], 'vhd', /is a VHD disk \(a "conectix" footer at the end\)/);
    await mk('q2.qcow2', 'qcow2', [], 'qcow2', /is a qcow2 disk/);
    await mk('q1.qcow', 'qcow', [], 'qcow', /is a qcow \(version 1\) disk/);
    await mk('d.qed', 'qed', [], 'qed', /is a QED disk/);
    await mk('sparse.vmdk', 'vmdk', [], 'vmdk', /is a VMDK disk \(a "KDMV"/);
    await mk('stream.vmdk', 'vmdk', ['-o', 'subformat=streamOptimized'], 'vmdk', /is a VMDK disk/);
    await mk('flat.vmdk', 'vmdk', ['-o', 'subformat=monolithicFlat'], 'vmdk', /text descriptor/);
    await mk('d.vdi', 'vdi', [], 'vdi', /is a VDI disk/);
    await mk('d.parallels', 'parallels', [], 'parallels', /is a Parallels disk/);
  });

  it('each is named by its magic', async () => {
    for (const m of made) expect((await detectFormat(m.file)).format, m.file).toBe(m.format);
    // The flat extent of a monolithicFlat VMDK is raw data: only its descriptor is a VMDK.
    expect((await detectFormat(path.join(dir, 'flat-flat.vmdk'))).format).toBe('raw');
  });

  it('VHDX files (ours and qemu-img`s) and raw files', async () => {
    const ours = path.join(dir, 'ours.vhdx');
    await createVhdx(ours, { size: 8 * MiB });
    const theirs = path.join(dir, 'theirs.vhdx');
    await run('qemu-img', ['create', '-q', '-f', 'vhdx', theirs, '8M']);
    const raw = path.join(dir, 'random.raw');
    writeFileSync(raw, rng(SEED + 1).bytes(3 * MiB + 17));
    const zeros = path.join(dir, 'zeros.raw');
    await run('qemu-img', ['create', '-q', '-f', 'raw', zeros, '16M']);
    const empty = path.join(dir, 'empty.raw');
    writeFileSync(empty, '');
    expect((await detectFormat(ours)).format).toBe('vhdx');
    expect((await detectFormat(theirs)).format).toBe('vhdx');
    for (const f of [raw, zeros, empty]) expect((await detectFormat(f)).format, f).toBe('raw');
  });

  it('VhdxFile.open refuses each one as NOT_SUPPORTED naming its format, writable or not', async () => {
    for (const m of made) {
      const before = readFileSync(m.file);
      for (const writable of [false, true]) {
        const err = await expectRejects(VhdxFile.open(m.file, { writable }), 'NOT_SUPPORTED', m.name);
        expect(err.message).toContain(m.file);
        expect(err.details.format).toBe(m.format);
      }
      expect(readFileSync(m.file).equals(before), `${m.file} changed`).toBe(true);
    }
    // A raw file is not a VHDX either, and is not called anything else.
    const raw = path.join(dir, 'random.raw');
    await expectRejects(VhdxFile.open(raw), 'VHDX_CORRUPT', /not a VHDX file/);
  });

  it('a VHD parent named by a child`s locator is refused the same way', async () => {
    const sub = path.join(dir, 'chain');
    mkdirSync(sub);
    const parent = path.join(sub, 'base.vhdx');
    await createVhdx(parent, { size: 64 * MiB });
    const child = path.join(sub, 'child.avhdx');
    await createVhdx(child, { parent });
    // Replace the parent with a VHD under the same name.
    await run('qemu-img', ['create', '-q', '-f', 'vpc', '-o', 'subformat=fixed', parent, '64M']);
    await expectRejects(VhdxFile.open(child), 'NOT_SUPPORTED', /base\.vhdx is a VHD disk/);
  });

  it('vhdx convert refuses VHD, qcow2, VMDK (...) as NOT_SUPPORTED and creates nothing', async () => {
    for (const m of made) {
      for (const out of ['out.vhdx', 'out.raw']) {
        const dst = path.join(dir, `${path.basename(m.file)}.${out}`);
        await expectRejects(convertImage(m.file, dst), 'NOT_SUPPORTED', m.name);
        expect(existsSync(dst), dst).toBe(false);
      }
    }
    expect(readdirSync(dir).filter((n) => n.includes('.out.'))).toEqual([]);
    // Asking for VHDX does not make a VHD one.
    await expectRejects(
      convertImage(made[0].file, path.join(dir, 'forced.vhdx'), { sourceFormat: 'vhdx' }),
      'NOT_SUPPORTED',
    );
    expect(existsSync(path.join(dir, 'forced.vhdx'))).toBe(false);
  });

  it('sourceFormat raw converts any file byte for byte, magic or not', async () => {
    const src = made.find((m) => m.file.endsWith('dyn.vhd'))!.file;
    const dst = path.join(dir, 'asraw.vhdx');
    const r = await convertImage(src, dst, { sourceFormat: 'raw' });
    expect(r.sourceFormat).toBe('raw');
    const bytes = readFileSync(src);
    expect(r.virtualSize).toBe(Math.ceil(bytes.length / 512) * 512);
    const d = await VhdxFile.open(dst);
    try {
      const back = await d.readAt(0, bytes.length);
      expect(back.equals(bytes)).toBe(true);
    } finally {
      await d.close();
    }
  });
});
