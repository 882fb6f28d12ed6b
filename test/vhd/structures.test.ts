/**
 * VHD structures as decode/encode pairs: footer (and the 511-byte form), dynamic header, parent locator
 * data (W2ru, W2ku, Wi2r, Wi2k, MacX, Mac alias records), BAT entries and sector bitmaps, the checksum,
 * CHS geometry and the size rules. Real bytes: a footer and a dynamic header `qemu-img create -f vpc`
 * wrote (kept here as hex), and files qemu-img makes at test time with sizes across the geometry's
 * bands, whose geometry and size we must compute the same way.
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import {
  batBytes,
  bitmapBit,
  bitmapRuns,
  blockLayout,
  decodeBatEntry,
  encodeBatEntry,
  setBitmapRange,
} from '../../src/formats/vhd/bat.js';
import { vhdChecksum } from '../../src/formats/vhd/checksum.js';
import { MAX_CHS_SECTORS, PLATFORM, fourCC, platformName } from '../../src/formats/vhd/constants.js';
import { decodeFooter, encodeFooter, uuidToString, vhdTimeToIso } from '../../src/formats/vhd/footer.js';
import { chsGeometry, chsRounded, chsSectors, qemuVisibleSize } from '../../src/formats/vhd/geometry.js';
import {
  decodeDynamicHeader,
  decodeUtf16BE,
  encodeDynamicHeader,
  encodeUtf16BE,
  locatorSpaceBytes,
} from '../../src/formats/vhd/header.js';
import {
  decodeLocatorData,
  encodeAlias,
  encodeLocatorData,
  posixToFileUrl,
  vhdParentCandidates,
} from '../../src/formats/vhd/locator.js';
import { requirePeers, run, tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;

/** The footer of `qemu-img create -f vpc -o subformat=dynamic d.vhd 10M` (QEMU 7.2): its first 85 bytes, zeros after. */
const QEMU_FOOTER_HEX =
  '636f6e6563746978000000020001000000000000000002003' +
  '2a88592716' +
  '56d75000500035769326b0000000000a0700000000000' +
  '00a07000012e041100000003ffffee6117a66bff27e14100aa338619275bec6d00';
/** Its dynamic header: the first 40 bytes, zeros after. */
const QEMU_HEADER_HEX = '6378737061727365ffffffffffffffff0000000000000600000100000000000600200000fffff471';

function fromHex(hex: string, length: number): Buffer {
  const b = Buffer.alloc(length);
  Buffer.from(hex, 'hex').copy(b);
  return b;
}

describe('checksum', () => {
  it("is the ones' complement of the byte sum, the field counted as zero", () => {
    const b = Buffer.alloc(16);
    b[0] = 1;
    b[1] = 2;
    b.writeUInt32BE(0xdeadbeef, 4); // the field: ignored
    b[15] = 0xff;
    expect(vhdChecksum(b, 4)).toBe(~(1 + 2 + 0xff) >>> 0);
  });
});

describe('footer', () => {
  it('decodes the footer qemu-img wrote, field by field', () => {
    const f = decodeFooter(fromHex(QEMU_FOOTER_HEX, 512));
    if (typeof f === 'string') throw new Error(f);
    expect(f.features).toBe(2);
    expect(f.version).toBe(0x00010000);
    expect(f.dataOffset).toBe(512n);
    expect(f.timeStamp).toBe(0x32a88592);
    expect(vhdTimeToIso(f.timeStamp)).toMatch(/^2026-/);
    expect(f.creatorApp).toBe('qemu');
    expect(f.creatorVersion).toBe(0x00050003);
    expect(f.creatorHostOs).toBe('Wi2k');
    expect(f.originalSize).toBe(10514432n);
    expect(f.currentSize).toBe(10514432n);
    expect(f.geometry).toEqual({ cylinders: 302, heads: 4, sectorsPerTrack: 17 });
    expect(f.diskType).toBe(3);
    expect(f.checksum).toBe(0xffffee61);
    expect(uuidToString(f.uniqueId)).toBe('17a66bff-27e1-4100-aa33-8619275bec6d');
    expect(f.savedState).toBe(0);
    // Re-encoding gives the same bytes.
    expect(encodeFooter(f).equals(fromHex(QEMU_FOOTER_HEX, 512))).toBe(true);
  });

  it('round-trips every field; a flipped byte or a wrong cookie is reported, not thrown', () => {
    const f = {
      features: 3,
      version: 0x00010000,
      dataOffset: 0xffffffffffffffffn,
      timeStamp: 123456789,
      creatorApp: 'tdmk',
      creatorVersion: 0x00010002,
      creatorHostOs: 'Mac ',
      originalSize: 5n * 2n ** 40n,
      currentSize: 2040n * 2n ** 30n,
      geometry: { cylinders: 65535, heads: 16, sectorsPerTrack: 255 },
      diskType: 2,
      uniqueId: Buffer.from('00112233445566778899aabbccddeeff', 'hex'),
      savedState: 1,
    };
    const enc = encodeFooter(f);
    expect(enc.length).toBe(512);
    const dec = decodeFooter(enc);
    expect(dec).toEqual({ ...f, checksum: enc.readUInt32BE(64), length: 512 });
    for (const at of [8, 30, 47, 60, 70, 84, 300]) {
      const bad = Buffer.from(enc);
      bad[at] ^= 0x40;
      expect(decodeFooter(bad)).toMatch(/checksum mismatch/);
    }
    const cookie = Buffer.from(enc);
    cookie.write('conectiz', 0, 'latin1');
    expect(decodeFooter(cookie)).toBe('cookie is not "conectix"');
    expect(decodeFooter(enc.subarray(0, 100))).toMatch(/length 100/);
  });

  it('decodes the 511-byte footer of Virtual PC before 2004 (checksum over 511 bytes)', () => {
    const f = decodeFooter(fromHex(QEMU_FOOTER_HEX, 512));
    if (typeof f === 'string') throw new Error(f);
    const old = encodeFooter(f).subarray(0, 511);
    old.writeUInt32BE(vhdChecksum(old, 64), 64); // the same sum: the dropped byte is a reserved zero
    const dec = decodeFooter(old);
    expect(typeof dec).toBe('object');
    expect((dec as { length: number }).length).toBe(511);
  });
});

describe('dynamic header', () => {
  it('decodes the header qemu-img wrote', () => {
    const h = decodeDynamicHeader(fromHex(QEMU_HEADER_HEX, 1024), 512);
    expect(h.dataOffset).toBe(0xffffffffffffffffn);
    expect(h.tableOffset).toBe(1536);
    expect(h.headerVersion).toBe(0x00010000);
    expect(h.maxTableEntries).toBe(6);
    expect(h.blockSize).toBe(2 * MiB);
    expect(h.checksum).toBe(0xfffff471);
    expect(h.parentName).toBe('');
    expect(h.locators.every((l) => l.code === 0)).toBe(true);
  });

  it('round-trips parent fields and eight locator entries', () => {
    const locators = Array.from({ length: 8 }, (_, i) => ({
      code: [PLATFORM.W2ru, PLATFORM.W2ku, PLATFORM.MacX, PLATFORM.Mac][i % 4],
      dataSpace: i + 1,
      dataLength: 100 + i,
      reserved: 0,
      dataOffset: 4096 * (i + 1),
    }));
    const h = {
      tableOffset: 1536,
      maxTableEntries: 1000,
      blockSize: 512 * 1024,
      parentUniqueId: Buffer.from('ffeeddccbbaa99887766554433221100', 'hex'),
      parentTimeStamp: 0x7fffffff,
      parentName: 'päřent ☃ disk.vhd',
      locators,
    };
    const enc = encodeDynamicHeader(h);
    const dec = decodeDynamicHeader(enc, 512);
    expect(dec).toMatchObject({ ...h, headerVersion: 0x00010000, dataOffset: 0xffffffffffffffffn });
    // UTF-16 big-endian in the file.
    expect(enc.subarray(64, 68).toString('hex')).toBe('00700' + '0e4');
  });

  it('checks cookie, checksum and version first, and bounds what the fields claim', () => {
    const good = encodeDynamicHeader({
      tableOffset: 1536,
      maxTableEntries: 10,
      blockSize: 2 * MiB,
      parentUniqueId: Buffer.alloc(16),
      parentTimeStamp: 0,
      parentName: '',
      locators: [],
    });
    const fix = (b: Buffer) => (b.writeUInt32BE(vhdChecksum(b, 36), 36), b);
    const cases: [string, (b: Buffer) => void, string, string][] = [
      ['cookie', (b) => b.write('xxsparse', 0, 'latin1'), 'VHD_CORRUPT', 'cookie'],
      ['checksum', (b) => (b[100] ^= 1), 'VHD_CORRUPT', 'checksum'],
      ['version 2', (b) => fix((b.writeUInt32BE(0x00020000, 24), b)), 'VHD_UNSUPPORTED', 'version'],
      ['block size 3 MiB', (b) => fix((b.writeUInt32BE(3 * MiB, 32), b)), 'VHD_CORRUPT', 'block size'],
      ['block size 256', (b) => fix((b.writeUInt32BE(256, 32), b)), 'VHD_CORRUPT', 'block size'],
      ['block size 512 MiB', (b) => fix((b.writeUInt32BE(512 * MiB, 32), b)), 'VHD_CORRUPT', 'block size'],
      ['2^32-1 entries', (b) => fix((b.writeUInt32BE(0xffffffff, 28), b)), 'LIMIT_EXCEEDED', 'BAT entries'],
      ['table offset 2^63', (b) => fix((b.writeBigUInt64BE(1n << 63n, 16), b)), 'VHD_CORRUPT', 'table offset'],
      ['table offset unaligned', (b) => fix((b.writeBigUInt64BE(1537n, 16), b)), 'VHD_CORRUPT', 'table offset'],
    ];
    for (const [name, mutate, code, words] of cases) {
      const b = Buffer.from(good);
      mutate(b);
      let err: unknown;
      try {
        decodeDynamicHeader(b, 512);
      } catch (e) {
        err = e;
      }
      expect(err, name).toBeInstanceOf(TidemarkError);
      expect((err as TidemarkError).code, name).toBe(code);
      expect((err as Error).message, name).toContain(words);
    }
    let short: unknown;
    try {
      decodeDynamicHeader(good.subarray(0, 100), 512);
    } catch (e) {
      short = e;
    }
    expect((short as TidemarkError).code).toBe('VHD_TRUNCATED');
  });

  it('UTF-16 big-endian strings stop at NUL and are cut at a whole character', () => {
    expect(decodeUtf16BE(Buffer.from('0041004200000043', 'hex'))).toBe('AB');
    const long = encodeUtf16BE('x'.repeat(400), 512);
    expect(long.length).toBe(512);
    expect(decodeUtf16BE(long)).toBe('x'.repeat(255)); // the last unit stays NUL
  });

  it("reads a locator's data space in sectors, or in bytes as Windows wrote it", () => {
    expect(locatorSpaceBytes(1)).toBe(512);
    expect(locatorSpaceBytes(511)).toBe(511 * 512);
    expect(locatorSpaceBytes(512)).toBe(512);
    expect(locatorSpaceBytes(1024)).toBe(1024);
    expect(locatorSpaceBytes(1000)).toBeUndefined();
  });
});

describe('parent locator data', () => {
  it('W2ru, W2ku: UTF-16LE paths; Wi2r, Wi2k: ANSI; trailing NULs dropped', () => {
    for (const [p, enc] of [
      ['W2ru', 'utf16le'],
      ['W2ku', 'utf16le'],
      ['Wi2r', 'latin1'],
      ['Wi2k', 'latin1'],
    ] as const) {
      const value = p.endsWith('u') ? 'C:\\dïr\\parent ☃.vhd' : 'C:\\dir\\parent.vhd';
      const data = encodeLocatorData(p, value);
      expect(data.equals(Buffer.from(value, enc))).toBe(true);
      expect(decodeLocatorData(PLATFORM[p], data)).toEqual({ platform: p, value });
      expect(decodeLocatorData(PLATFORM[p], Buffer.concat([data, Buffer.alloc(4)]))).toEqual({ platform: p, value });
    }
    expect(decodeLocatorData(PLATFORM.W2ru, Buffer.alloc(3, 0x41))).toMatch(/odd length/);
    expect(decodeLocatorData(PLATFORM.W2ku, Buffer.alloc(4))).toBe('empty path');
    expect(decodeLocatorData(0x41424344, Buffer.alloc(4, 1))).toMatch(/unknown platform code 0x41424344/);
    expect(decodeLocatorData(PLATFORM.W2ku, Buffer.alloc(0))).toBe('no data');
  });

  it('MacX: a file URL with each segment percent-encoded, decoded back to the POSIX path', () => {
    const p = '/srv/disks #1/päřent?.vhd';
    const url = posixToFileUrl(p);
    expect(url).toBe('file://localhost/srv/disks%20%231/p%C3%A4%C5%99ent%3F.vhd');
    const d = decodeLocatorData(PLATFORM.MacX, encodeLocatorData('MacX', p));
    expect(d).toEqual({ platform: 'MacX', value: url, posixPath: p });
    expect(decodeLocatorData(PLATFORM.MacX, Buffer.from('file:///a/b.vhd'))).toMatchObject({ posixPath: '/a/b.vhd' });
    // Another host's URL is kept for info but leads to no path here.
    expect(decodeLocatorData(PLATFORM.MacX, Buffer.from('file://nas/a/b.vhd'))).toEqual({
      platform: 'MacX',
      value: 'file://nas/a/b.vhd',
    });
    expect(decodeLocatorData(PLATFORM.MacX, Buffer.from('file://localhost/%E0%A4%A'))).toMatch(/malformed/);
  });

  it('Mac: a version-2 alias record with the file name, the POSIX path and its mount point', () => {
    const alias = encodeAlias('/Users/me/VMs/parent disk.vhd');
    expect(alias.readUInt16BE(6)).toBe(2);
    expect(alias.readUInt16BE(4)).toBe(alias.length);
    expect(alias[50]).toBe('parent disk.vhd'.length);
    expect(decodeLocatorData(PLATFORM.Mac, alias)).toEqual({
      platform: 'Mac',
      value: 'alias: parent disk.vhd at /Users/me/VMs/parent disk.vhd',
      posixPath: '/Users/me/VMs/parent disk.vhd',
      fileName: 'parent disk.vhd',
    });
    // A mount point other than / is joined to the volume-relative path.
    const onVolume = Buffer.from(alias);
    const i = onVolume.indexOf(Buffer.from([0, 19, 0, 1, 0x2f]));
    expect(i).toBeGreaterThan(0);
    const withMount = Buffer.concat([
      onVolume.subarray(0, i),
      Buffer.from([0, 19, 0, 12]),
      Buffer.from('/Volumes/Ext'),
      Buffer.from([0xff, 0xff, 0, 0]),
    ]);
    withMount.writeUInt16BE(withMount.length, 4);
    expect(decodeLocatorData(PLATFORM.Mac, withMount)).toMatchObject({
      posixPath: '/Volumes/Ext/Users/me/VMs/parent disk.vhd',
    });
    expect(decodeLocatorData(PLATFORM.Mac, alias.subarray(0, 100))).toMatch(/shorter than 150/);
    const v3 = Buffer.from(alias);
    v3.writeUInt16BE(3, 6);
    expect(decodeLocatorData(PLATFORM.Mac, v3)).toMatch(/version 3 is not supported/);
    const overrun = Buffer.from(alias);
    overrun.writeUInt16BE(0x7fff, 152); // the first tag claims more than the record holds
    expect(decodeLocatorData(PLATFORM.Mac, overrun)).toMatch(/runs past the record/);
  });

  it('candidates in order W2ru, W2ku, MacX, Mac, Wi2r, Wi2k, then each file name beside the child', () => {
    const child = '/vm/disks/child.vhd';
    const locs = [
      { platform: 'Mac' as const, value: 'alias', posixPath: '/vm/a/p.vhd', fileName: 'p.vhd' },
      { platform: 'W2ku' as const, value: 'D:\\images\\base.vhd' },
      { platform: 'W2ru' as const, value: '..\\base\\base.vhd' },
      { platform: 'MacX' as const, value: 'file://localhost/vm/x/base.vhd', posixPath: '/vm/x/base.vhd' },
      { platform: 'Wi2k' as const, value: 'Z:\\vm\\old.vhd' },
    ];
    const c = vhdParentCandidates(child, locs, 'header-name.vhd', {
      allowedRoots: ['/vm'],
      pathMap: { 'D:': '/mnt/d' },
    });
    expect(c.map((x) => [x.key, x.hostPath])).toEqual([
      ['W2ru', '/vm/base/base.vhd'],
      ['W2ku', '/mnt/d/images/base.vhd'],
      ['MacX', '/vm/x/base.vhd'],
      ['Mac', '/vm/a/p.vhd'],
      ['Wi2k', '/vm/old.vhd'],
      ['same_directory', '/vm/disks/base.vhd'],
      ['same_directory', '/vm/disks/p.vhd'],
      ['same_directory', '/vm/disks/old.vhd'],
      ['same_directory', '/vm/disks/header-name.vhd'],
    ]);
    // Without a mapping for D:, W2ku leads nowhere (but its name is still tried beside the child).
    const unmapped = vhdParentCandidates(child, [locs[1]], '', { allowedRoots: ['/vm'] });
    expect(unmapped).toEqual([
      { key: 'W2ku', value: 'D:\\images\\base.vhd', hostPath: undefined },
      { key: 'same_directory', value: 'base.vhd', hostPath: '/vm/disks/base.vhd' },
    ]);
  });

  it('platform codes are their four characters', () => {
    expect(fourCC(PLATFORM.W2ru)).toBe('W2ru');
    expect(fourCC(PLATFORM.Mac)).toBe('Mac ');
    expect(fourCC(0x00ff4142)).toBe('\\x00\\xffAB');
    expect(platformName(PLATFORM.MacX)).toBe('MacX');
    expect(platformName(0)).toBeUndefined();
  });
});

describe('BAT and sector bitmaps', () => {
  it('entries are sector numbers, 0xFFFFFFFF unallocated', () => {
    expect(decodeBatEntry(0xffffffff)).toBeUndefined();
    expect(decodeBatEntry(4)).toBe(2048);
    expect(encodeBatEntry(2048)).toBe(4);
    expect(encodeBatEntry(undefined)).toBe(0xffffffff);
    expect(() => encodeBatEntry(2049)).toThrow(RangeError);
    expect(() => encodeBatEntry(0xffffffff * 512)).toThrow(RangeError);
    expect(batBytes(6)).toBe(512);
    expect(batBytes(129)).toBe(1024);
  });

  it('a bitmap is one bit per sector, most significant bit first, padded to whole sectors', () => {
    expect(blockLayout(10 * MiB, 2 * MiB)).toEqual({
      blockSize: 2 * MiB,
      bitmapBytes: 512,
      sectorsPerBlock: 4096,
      dataBlocks: 5,
    });
    expect(blockLayout(MiB + 1, 512 * 1024).bitmapBytes).toBe(512); // 1024 sectors: 128 bytes, padded
    expect(blockLayout(MiB, 512 * 1024).dataBlocks).toBe(2);
    expect(blockLayout(MiB, 256 * MiB).bitmapBytes).toBe(65536);
    const bm = Buffer.alloc(16);
    setBitmapRange(bm, 0, 1, true);
    expect(bm[0]).toBe(0x80);
    setBitmapRange(bm, 9, 27, true); // partial bytes on both sides, two whole bytes between
    expect(bm.subarray(0, 4).toString('hex')).toBe('807fffe0');
    expect(bitmapBit(bm, 8)).toBe(false);
    expect(bitmapBit(bm, 9)).toBe(true);
    setBitmapRange(bm, 10, 12, false);
    expect(bm[1]).toBe(0x4f);
  });

  it('runs of equal bits, whole bytes skipped', () => {
    const bm = Buffer.alloc(64);
    setBitmapRange(bm, 3, 5, true);
    setBitmapRange(bm, 100, 300, true);
    const runs: [number, number, boolean][] = [];
    bitmapRuns(bm, 0, 512, (a, b, p) => runs.push([a, b, p]));
    expect(runs).toEqual([
      [0, 3, false],
      [3, 5, true],
      [5, 100, false],
      [100, 300, true],
      [300, 512, false],
    ]);
    const sub: [number, number, boolean][] = [];
    bitmapRuns(bm, 4, 101, (a, b, p) => sub.push([a, b, p]));
    expect(sub).toEqual([
      [4, 5, true],
      [5, 100, false],
      [100, 101, true],
    ]);
    // The same as checking every bit.
    const rnd = Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 37) & 0xff));
    let s = 0;
    bitmapRuns(rnd, 7, 500, (a, b, p) => {
      expect(a).toBe(s === 0 ? 7 : s);
      for (let x = a; x < b; x++) expect(bitmapBit(rnd, x)).toBe(p);
      s = b;
    });
    expect(s).toBe(500);
  });
});

describe('CHS geometry and size rules', () => {
  it("follows the specification's bands", () => {
    expect(chsGeometry(20480)).toEqual({ cylinders: 301, heads: 4, sectorsPerTrack: 17 });
    expect(chsGeometry(2 * 2 ** 21)).toEqual({ cylinders: 4161, heads: 16, sectorsPerTrack: 63 });
    expect(chsGeometry(65535 * 16 * 63)).toEqual({ cylinders: 16191, heads: 16, sectorsPerTrack: 255 }); // >= switches to 255
    expect(chsGeometry(65535 * 16 * 63 - 1).sectorsPerTrack).toBe(63);
    expect(chsGeometry(10 * MAX_CHS_SECTORS)).toEqual({ cylinders: 65535, heads: 16, sectorsPerTrack: 255 });
  });

  it('rounds a size up to a whole geometry as qemu-img does; geometry never describes more than asked', () => {
    expect(chsRounded(10 * MiB)).toEqual({
      size: 10514432,
      geometry: { cylinders: 302, heads: 4, sectorsPerTrack: 17 },
    });
    for (let s = 1; s < 300000; s += 997) {
      expect(chsSectors(chsGeometry(s))).toBeLessThanOrEqual(s);
      const r = chsRounded(s * 512);
      expect(r.size).toBeGreaterThanOrEqual(s * 512);
      expect(chsSectors(r.geometry) * 512).toBe(r.size);
    }
    // Past the largest geometry: the size is kept, the geometry is the largest.
    expect(chsRounded(200 * 2 ** 30)).toEqual({ size: 200 * 2 ** 30, geometry: chsGeometry(MAX_CHS_SECTORS) });
  });

  it("QEMU's size: CHS unless the creator is one it knows to use the current size, or CHS is the maximum", () => {
    const g = chsGeometry(20480);
    expect(qemuVisibleSize({ creatorApp: 'tdmk', currentSize: 10 * MiB, geometry: g })).toBe(20468 * 512);
    expect(qemuVisibleSize({ creatorApp: 'win ', currentSize: 10 * MiB, geometry: g })).toBe(10 * MiB);
    expect(qemuVisibleSize({ creatorApp: 'qem2', currentSize: 10 * MiB, geometry: g })).toBe(10 * MiB);
    const max = chsGeometry(MAX_CHS_SECTORS);
    expect(qemuVisibleSize({ creatorApp: 'vpc ', currentSize: 200 * 2 ** 30, geometry: max })).toBe(200 * 2 ** 30);
  });
});

const noQemu = requirePeers('qemu-img').skip;

describe.skipIf(noQemu)('files qemu-img creates', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => ({ dir, cleanup } = await tempDir('vhd-structures')));
  afterAll(async () => cleanup());

  // Sizes in each band of the algorithm: 17, 31 and 63 sectors per track, and 255 past 31.5 GiB.
  const sizes = [1 * MiB, 10 * MiB, 129 * MiB, 500 * MiB, 4 * 2 ** 30, 40 * 2 ** 30];
  it.each(sizes)('%i bytes: footers, header, BAT and geometry as we compute them', async (size) => {
    for (const [subformat, force] of [
      ['dynamic', false],
      ['dynamic', true],
      ['fixed', false],
    ] as const) {
      if (subformat === 'fixed' && size > 500 * MiB) continue;
      const file = path.join(dir, `q-${size}-${subformat}-${force}.vhd`);
      await run('qemu-img', [
        'create',
        '-q',
        '-f',
        'vpc',
        '-o',
        `subformat=${subformat}${force ? ',force_size=on' : ''}`,
        file,
        String(size),
      ]);
      // The head (footer copy, header, BAT) and the tail (footer): fixed files are hundreds of MiB.
      const fd = openSync(file, 'r');
      const length = fstatSync(fd).size;
      const head = Buffer.alloc(Math.min(length, 64 * 1024));
      const tail = Buffer.alloc(512);
      readSync(fd, head, 0, head.length, 0);
      readSync(fd, tail, 0, 512, length - 512);
      closeSync(fd);
      const end = decodeFooter(tail);
      if (typeof end === 'string') throw new Error(end);
      expect(end.creatorApp).toBe(force ? 'qem2' : 'qemu');
      // With force_size QEMU records the largest geometry (which makes it read the current size back).
      const { size: want, geometry } = force ? { size, geometry: chsGeometry(MAX_CHS_SECTORS) } : chsRounded(size);
      expect(end.currentSize).toBe(BigInt(want));
      expect(end.geometry).toEqual(geometry);
      expect(qemuVisibleSize({ ...end, currentSize: Number(end.currentSize) })).toBe(want);
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', 'vpc', file])).stdout);
      expect(info['virtual-size']).toBe(want);
      if (subformat === 'fixed') {
        expect(end.diskType).toBe(2);
        expect(end.dataOffset).toBe(0xffffffffffffffffn);
        expect(length).toBe(want + 512);
        continue;
      }
      expect(end.diskType).toBe(3);
      // The copy at offset 0 is the same bytes.
      expect(head.subarray(0, 512).equals(tail)).toBe(true);
      const h = decodeDynamicHeader(head.subarray(512, 1536), 512);
      expect(h.blockSize).toBe(2 * MiB);
      expect(h.tableOffset).toBe(1536);
      expect(h.maxTableEntries).toBe(Math.ceil(want / (2 * MiB)));
      const bat = head.subarray(1536, 1536 + h.maxTableEntries * 4);
      expect(bat.equals(Buffer.alloc(bat.length, 0xff))).toBe(true);
      expect(length).toBe(1536 + batBytes(h.maxTableEntries) + 512);
    }
  });
});
