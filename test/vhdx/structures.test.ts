/**
 * Every on-disk structure round-trips (decode(encode(x)) deep-equals x; encode(decode(bytes)) gives the
 * bytes back), CRC-32C matches its known vectors, and real Windows 10 fragments decode as Windows wrote them.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { computeGeometry, decodeBatEntry, encodeBatEntry } from '../../src/formats/vhdx/bat.js';
import {
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_VIRTUAL_DISK_SIZE,
  PARENT_LOCATOR_TYPE_VHDX,
  REGION_BAT,
  REGION_METADATA,
} from '../../src/formats/vhdx/constants.js';
import {
  decodeFileIdentifier,
  decodeHeader,
  decodeRegionTable,
  encodeFileIdentifier,
  encodeHeader,
  encodeRegionTable,
  pickCurrentHeader,
  type RegionEntry,
  type RegionTable,
  type VhdxHeader,
} from '../../src/formats/vhdx/header.js';
import {
  decodeLogEntryAt,
  descriptorSectors,
  encodeLogEntry,
  findActiveSequence,
  type LogEntry,
  type LogOp,
} from '../../src/formats/vhdx/log.js';
import {
  decodeFileParameters,
  decodeMetadataTable,
  decodeParentLocator,
  decodeSectorSize,
  decodeVirtualDiskSize,
  encodeFileParameters,
  encodeMetadataTable,
  encodeParentLocator,
  encodeU32,
  encodeU64,
  formatLinkage,
  parseLinkage,
  type MetadataEntry,
  type ParentLocator,
} from '../../src/formats/vhdx/metadata.js';
import { TidemarkError } from '../../src/errors.js';
import { crc32c, crc32cWithZeroedField } from '../../src/util/crc32c.js';
import { nativeFs } from '../../src/util/native.js';
import { guidFromString, guidToString, newGuid, parseGuid } from '../../src/util/guid.js';

const KiB = 1024;
const MiB = 1024 * 1024;
const FRAGMENTS = '/work/shared/fixtures/vhdx/windows10-fragments';
const fragment = (name: string): Buffer => readFileSync(`${FRAGMENTS}/${name}`);

/** Buffers as hex strings: vitest's deep equality walks Buffers element by element, which is slow. */
function plain(v: unknown): unknown {
  if (Buffer.isBuffer(v)) return `<${v.toString('hex')}>`;
  if (Array.isArray(v)) return v.map(plain);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, plain(x)]));
  return v;
}

function ok<T>(v: T | string): T {
  if (typeof v === 'string') throw new Error(`decode failed: ${v}`);
  return v;
}

describe('CRC-32C', () => {
  it('matches the known vectors', () => {
    expect(crc32c(Buffer.from('123456789', 'latin1'))).toBe(0xe3069283);
    expect(crc32c(Buffer.alloc(32))).toBe(0x8a9136aa);
    expect(crc32c(Buffer.alloc(32, 0xff))).toBe(0x62a8ab43);
    expect(crc32c(new Uint8Array(0))).toBe(0);
  });

  it('is the same computed in pieces, at every split and alignment', () => {
    const data = Buffer.from('The quick brown fox jumps over the lazy dog, 0123456789 times over');
    const whole = crc32c(data);
    for (let cut = 0; cut <= data.length; cut++) {
      expect(crc32c(data.subarray(cut), crc32c(data.subarray(0, cut)))).toBe(whole);
    }
    // Unaligned views of a larger buffer (slicing-by-8 path vs byte path).
    const big = Buffer.alloc(100);
    big.write('123456789', 7, 'latin1');
    expect(crc32c(big.subarray(7, 16))).toBe(0xe3069283);
  });

  it('with a zeroed field equals the CRC of the copy with that field zeroed', () => {
    const b = Buffer.from(Array.from({ length: 64 }, (_, i) => (i * 37) & 0xff));
    const z = Buffer.from(b);
    z.writeUInt32LE(0, 4);
    expect(crc32cWithZeroedField(b, 4)).toBe(crc32c(z));
  });

  it('is the same on both sides of the native threshold, in pieces and on unaligned views', () => {
    // Large inputs go to the native CRC, small ones to the JS table: a bitwise reference decides both.
    const reference = (data: Uint8Array, crc = 0) => {
      let c = ~crc >>> 0;
      for (const byte of data) {
        c ^= byte;
        for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ 0x82f63b78 : c >>> 1;
      }
      return ~c >>> 0;
    };
    const big = Buffer.from(Array.from({ length: 70_000 }, (_, i) => (i * 7919 + (i >> 8)) & 0xff));
    for (const n of [0, 1, 7, 8, 511, 512, 513, 4096, 65_536, 69_997]) {
      const view = big.subarray(3, 3 + n);
      expect(crc32c(view), `${n} bytes`).toBe(reference(view));
      const cut = n >> 1;
      expect(crc32c(view.subarray(cut), crc32c(view.subarray(0, cut))), `${n} bytes in two`).toBe(reference(view));
      expect(crc32c(view, 0xdeadbeef), `${n} bytes continued`).toBe(reference(view, 0xdeadbeef));
    }
    expect(crc32c(new Uint8Array(big.buffer, big.byteOffset + 1, 1000))).toBe(reference(big.subarray(1, 1001)));
    // The addon's portable table (CPUs without the instruction) and its instruction path, each against the reference.
    const addon = nativeFs();
    for (const n of [0, 3, 8, 4097, 65_536]) {
      const view = big.subarray(5, 5 + n);
      expect(addon.crc32c(view, 0x1234, true), `${n} bytes, table`).toBe(reference(view, 0x1234));
      expect(addon.crc32c(view, 0x1234), `${n} bytes, instruction`).toBe(reference(view, 0x1234));
    }
  });
});

describe('GUIDs', () => {
  it('BAT region GUID: text <-> mixed-endian bytes', () => {
    const bytes = Buffer.from([
      0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08,
    ]);
    expect(guidToString(bytes)).toBe('2dc27766-f623-4200-9d64-115e9bfd4a08');
    expect(parseGuid('2DC27766-F623-4200-9D64-115E9BFD4A08')!.equals(bytes)).toBe(true);
    expect(parseGuid('{2dc27766-f623-4200-9d64-115e9bfd4a08}')!.equals(bytes)).toBe(true);
    expect(REGION_BAT.equals(bytes)).toBe(true);
    expect(parseGuid(guidToString(bytes))!.equals(bytes)).toBe(true);
  });

  it('random GUIDs round-trip through text, braces and upper case', () => {
    for (let i = 0; i < 100; i++) {
      const g = newGuid();
      expect(parseGuid(guidToString(g))!.equals(g)).toBe(true);
      expect(parseGuid(`{${guidToString(g).toUpperCase()}}`)!.equals(g)).toBe(true);
      expect(parseLinkage(formatLinkage(g))!.equals(g)).toBe(true);
    }
    for (const bad of ['not-a-guid', '', '2dc27766-f623-4200-9d64-115e9bfd4a0', '2dc27766f6234200 9d64115e9bfd4a08']) {
      expect(parseGuid(bad)).toBeUndefined();
    }
  });
});

describe('file identifier', () => {
  it('round-trips', () => {
    for (const creator of ['Tidemark', '', 'Microsoft Windows 10.0.19041.0', 'ünïcödé ✓', 'x'.repeat(255)]) {
      const id = { creator };
      const bytes = encodeFileIdentifier(id);
      expect(bytes.length).toBe(8 + 512);
      expect(decodeFileIdentifier(bytes)).toEqual(id);
      expect(encodeFileIdentifier(decodeFileIdentifier(bytes)).equals(bytes)).toBe(true);
    }
  });

  it('refuses a wrong signature with a TidemarkError', () => {
    const bytes = encodeFileIdentifier({ creator: 'x' });
    bytes[0] ^= 1;
    expect(() => decodeFileIdentifier(bytes)).toThrow(TidemarkError);
    expect(() => decodeFileIdentifier(new Uint8Array(3))).toThrow(TidemarkError);
  });

  it('Windows 10 fragment decodes and re-encodes to the same bytes', () => {
    const raw = fragment('file_identifier.1');
    const id = decodeFileIdentifier(raw);
    console.log(`file_identifier.1 creator: "${id.creator}"`);
    expect(id.creator).toBe('Microsoft Windows 10.0.19041.0');
    expect(encodeFileIdentifier(id).equals(raw)).toBe(true);
  });
});

describe('header', () => {
  const sample = (over: Partial<VhdxHeader> = {}): Omit<VhdxHeader, 'checksum'> => ({
    sequenceNumber: 0x0123456789abcdefn,
    fileWriteGuid: newGuid(),
    dataWriteGuid: newGuid(),
    logGuid: newGuid(),
    logVersion: 0,
    version: 1,
    logLength: MiB,
    logOffset: MiB,
    ...over,
  });

  it('round-trips (decode(encode) and encode(decode))', () => {
    for (const h of [
      sample(),
      sample({ sequenceNumber: 0xffffffffffffffffn, logLength: 0xfff00000, logOffset: 2 ** 52 }),
      sample({ sequenceNumber: 0n, logGuid: Buffer.alloc(16), logLength: 0, logOffset: 0 }),
    ]) {
      const bytes = encodeHeader(h);
      expect(bytes.length).toBe(4 * KiB);
      const d = ok(decodeHeader(bytes, 64 * KiB));
      const { checksum, ...rest } = d;
      expect(rest).toEqual(h);
      expect(checksum).toBe(bytes.readUInt32LE(4));
      expect(encodeHeader(d).equals(bytes)).toBe(true);
    }
  });

  it('a flipped bit anywhere in the 4 KiB fails the checksum; a bad signature is named', () => {
    const bytes = encodeHeader(sample());
    for (const at of [8, 16, 70, 100, 4095]) {
      const bad = Buffer.from(bytes);
      bad[at] ^= 0x10;
      expect(decodeHeader(bad, 0)).toMatch(/checksum mismatch/);
    }
    const badSig = Buffer.from(bytes);
    badSig[0] = 0;
    expect(decodeHeader(badSig, 0)).toMatch(/signature/);
    expect(decodeHeader(bytes.subarray(0, 100), 0)).toMatch(/short/);
  });

  it('current header choice (equal sequence numbers accepted, as Disk2vhd writes them)', () => {
    const a = { ...sample({ sequenceNumber: 5n }), checksum: 0 };
    const b = { ...sample({ sequenceNumber: 6n }), checksum: 0 };
    expect(pickCurrentHeader(a, b)!.slot).toBe(1);
    expect(pickCurrentHeader(b, a)!.slot).toBe(0);
    expect(pickCurrentHeader(a, a)!.slot).toBe(0);
    expect(pickCurrentHeader('bad', a)!.slot).toBe(1);
    expect(pickCurrentHeader(a, 'bad')!.slot).toBe(0);
    expect(pickCurrentHeader('bad', 'bad')).toBeUndefined();
  });

  it('Windows 10 fragment: stored CRC 0x9f69b235 validates and re-encodes byte for byte', () => {
    const raw = fragment('image_header.1');
    expect(raw.length).toBe(4 * KiB);
    expect(raw.readUInt32LE(4)).toBe(0x9f69b235);
    expect(crc32cWithZeroedField(raw, 4)).toBe(0x9f69b235);
    const h = ok(decodeHeader(raw, 64 * KiB));
    expect(h.checksum).toBe(0x9f69b235);
    expect(h.sequenceNumber).toBe(6n);
    expect(h.version).toBe(1);
    expect(h.logVersion).toBe(0);
    expect(h.logLength).toBe(MiB);
    expect(h.logOffset).toBe(MiB);
    expect(guidToString(h.logGuid)).toBe('00000000-0000-0000-0000-000000000000');
    expect(encodeHeader(h).equals(raw)).toBe(true);
  });
});

describe('region table', () => {
  const entries = (): RegionEntry[] => [
    { guid: REGION_METADATA, fileOffset: 2 * MiB, length: MiB, required: true },
    { guid: REGION_BAT, fileOffset: 3 * MiB, length: 4 * MiB, required: true },
    { guid: newGuid(), fileOffset: 2 ** 40, length: 0xfff00000, required: false },
  ];

  it('round-trips with 0, 3 and 2047 entries', () => {
    const many: RegionEntry[] = Array.from({ length: 2047 }, (_, i) => ({
      guid: newGuid(),
      fileOffset: (i + 1) * MiB,
      length: MiB,
      required: i % 2 === 0,
    }));
    for (const list of [[], entries(), many]) {
      const bytes = encodeRegionTable(list);
      expect(bytes.length).toBe(64 * KiB);
      const t = ok(decodeRegionTable(bytes));
      expect(plain(t.entries)).toEqual(plain(list));
      expect(t.checksum).toBe(bytes.readUInt32LE(4));
      expect(encodeRegionTable(t.entries).equals(bytes)).toBe(true);
    }
  });

  it('rejects a bad checksum, a bad signature and too many entries', () => {
    const bytes = encodeRegionTable(entries());
    const bad = Buffer.from(bytes);
    bad[64 * KiB - 1] = 1; // the checksum covers the whole 64 KiB, padding included
    expect(decodeRegionTable(bad)).toMatch(/checksum/);
    const sig = Buffer.from(bytes);
    sig[0] = 0x52;
    expect(decodeRegionTable(sig)).toMatch(/signature/);
    const many = Buffer.from(bytes);
    many.writeUInt32LE(2048, 8);
    many.writeUInt32LE(crc32cWithZeroedField(many, 4), 4);
    expect(decodeRegionTable(many)).toMatch(/exceeds/);
  });

  it('Windows 10 fragment (80 bytes, zero padded to 64 KiB): CRC 0xc66b8cae', () => {
    const raw = fragment('region_table.1');
    expect(raw.length).toBe(80);
    const table = Buffer.alloc(64 * KiB);
    raw.copy(table);
    expect(crc32cWithZeroedField(table, 4)).toBe(0xc66b8cae);
    const t: RegionTable = ok(decodeRegionTable(table));
    expect(t.checksum).toBe(0xc66b8cae);
    expect(t.entries).toEqual([
      { guid: REGION_BAT, fileOffset: 3 * MiB, length: MiB, required: true },
      { guid: REGION_METADATA, fileOffset: 2 * MiB, length: MiB, required: true },
    ]);
    expect(encodeRegionTable(t.entries).equals(table)).toBe(true);
  });
});

describe('metadata table and items', () => {
  const sample = (): MetadataEntry[] => [
    {
      itemId: ITEM_FILE_PARAMETERS,
      offset: 64 * KiB,
      length: 8,
      isUser: false,
      isVirtualDisk: false,
      isRequired: true,
    },
    {
      itemId: ITEM_VIRTUAL_DISK_SIZE,
      offset: 64 * KiB + 8,
      length: 8,
      isUser: false,
      isVirtualDisk: true,
      isRequired: true,
    },
    {
      itemId: ITEM_VIRTUAL_DISK_ID,
      offset: 64 * KiB + 16,
      length: 16,
      isUser: false,
      isVirtualDisk: true,
      isRequired: true,
    },
    {
      itemId: ITEM_LOGICAL_SECTOR_SIZE,
      offset: 64 * KiB + 32,
      length: 4,
      isUser: false,
      isVirtualDisk: true,
      isRequired: true,
    },
    {
      itemId: ITEM_PHYSICAL_SECTOR_SIZE,
      offset: 64 * KiB + 36,
      length: 4,
      isUser: false,
      isVirtualDisk: true,
      isRequired: true,
    },
    {
      itemId: ITEM_PARENT_LOCATOR,
      offset: 64 * KiB + 40,
      length: 300,
      isUser: false,
      isVirtualDisk: false,
      isRequired: true,
    },
    // a user item with the same GUID as a system item is a different item
    {
      itemId: ITEM_PARENT_LOCATOR,
      offset: 128 * KiB,
      length: MiB - 128 * KiB,
      isUser: true,
      isVirtualDisk: false,
      isRequired: false,
    },
    { itemId: newGuid(), offset: 0, length: 0, isUser: false, isVirtualDisk: true, isRequired: false },
  ];

  it('table round-trips', () => {
    for (const list of [[], sample()]) {
      const bytes = encodeMetadataTable(list);
      expect(bytes.length).toBe(64 * KiB);
      const d = decodeMetadataTable(bytes, 2 * MiB, MiB);
      expect(d).toEqual(list);
      expect(encodeMetadataTable(d).equals(bytes)).toBe(true);
    }
  });

  it('table rejects items outside the region, overlaps and repeats with a TidemarkError', () => {
    const cases: MetadataEntry[][] = [
      [{ ...sample()[0], offset: MiB - 4 }],
      [{ ...sample()[0], offset: 100 }],
      [sample()[0], { ...sample()[1], offset: 64 * KiB + 4 }],
      [sample()[0], { ...sample()[0], offset: 64 * KiB + 8 }],
      [{ ...sample()[0], offset: 64 * KiB + 8, length: 0 }],
    ];
    for (const list of cases) {
      expect(() => decodeMetadataTable(encodeMetadataTable(list), 2 * MiB, MiB)).toThrow(TidemarkError);
    }
  });

  it('file parameters round-trip', () => {
    for (let shift = 20; shift <= 28; shift++) {
      for (const flags of [0, 1, 2, 3]) {
        const p = { blockSize: 2 ** shift, leaveBlockAllocated: (flags & 1) !== 0, hasParent: (flags & 2) !== 0 };
        const bytes = encodeFileParameters(p);
        expect(bytes.length).toBe(8);
        expect(decodeFileParameters(bytes, 0)).toEqual(p);
        expect(encodeFileParameters(decodeFileParameters(bytes, 0)).equals(bytes)).toBe(true);
      }
    }
    for (const bs of [0, 512 * KiB, 3 * MiB, 512 * MiB, 0xffffffff]) {
      const bytes = encodeFileParameters({ blockSize: MiB, leaveBlockAllocated: false, hasParent: false });
      bytes.writeUInt32LE(bs >>> 0, 0);
      expect(() => decodeFileParameters(bytes, 0)).toThrow(TidemarkError);
    }
  });

  it('sector sizes and virtual disk size round-trip', () => {
    for (const s of [512, 4096] as const) expect(decodeSectorSize(encodeU32(s), 'lss', 0)).toBe(s);
    expect(() => decodeSectorSize(encodeU32(1024), 'lss', 0)).toThrow(TidemarkError);
    for (const v of [512, MiB, 2 ** 40, 64 * 2 ** 40]) {
      expect(decodeVirtualDiskSize(encodeU64(v), 512, 0)).toBe(v);
      expect(encodeU64(decodeVirtualDiskSize(encodeU64(v), 512, 0)).equals(encodeU64(v))).toBe(true);
    }
    for (const v of [0, 513, 64 * 2 ** 40 + 4096]) {
      expect(() => decodeVirtualDiskSize(encodeU64(v), 512, 0)).toThrow(TidemarkError);
    }
    expect(() => decodeVirtualDiskSize(encodeU64(512), 4096, 0)).toThrow(TidemarkError);
  });

  it('Windows 10 fragments: table header and the file parameters entry', () => {
    const header = fragment('metadata_table_header.1');
    const entry = fragment('metadata_table_entry.1');
    expect(header.length).toBe(32);
    expect(entry.length).toBe(32);
    const table = Buffer.alloc(64 * KiB);
    header.copy(table, 0);
    entry.copy(table, 32);
    expect(table.toString('latin1', 0, 8)).toBe('metadata');
    const count = table.readUInt16LE(10);
    expect(count).toBe(5); // Windows' table lists 5 items; the fragment holds only the first entry
    // As cut, entries 1..4 are all zero: four copies of the same (zero) item, which a decoder must refuse.
    expect(() => decodeMetadataTable(table, 2 * MiB, MiB)).toThrow(TidemarkError);
    table.writeUInt16LE(1, 10);
    const d = decodeMetadataTable(table, 2 * MiB, MiB);
    expect(d).toHaveLength(1);
    expect(guidToString(d[0].itemId)).toBe('caa16737-fa36-4d43-b3b6-33f0aa44e76b');
    expect(d[0]).toMatchObject({ offset: 64 * KiB, length: 8, isUser: false, isVirtualDisk: false, isRequired: true });
    expect(entry.readUInt32LE(24)).toBe(4); // flags: IsRequired only
    expect(encodeMetadataTable(d).equals(table)).toBe(true);
  });
});

describe('parent locator', () => {
  const linkage = '{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}';
  const windowsLike = (): ParentLocator => ({
    locatorType: PARENT_LOCATOR_TYPE_VHDX,
    entries: [
      ['parent_linkage', linkage],
      ['parent_linkage2', '{00000000-0000-0000-0000-000000000000}'],
      ['relative_path', '..\\..\\path2\\sub3\\parent.vhdx'],
      ['volume_path', '\\\\?\\Volume{26a21bda-a627-11d7-9931-806e6f6e6963}\\path2\\sub3\\parent.vhdx'],
      ['absolute_win32_path', '\\\\?\\d:\\path2\\sub3\\parent.vhdx'],
    ],
  });

  it('round-trips', () => {
    for (const loc of [windowsLike(), { locatorType: newGuid(), entries: [] as [string, string][] }]) {
      const bytes = encodeParentLocator(loc);
      expect(decodeParentLocator(bytes, 0)).toEqual(loc);
      expect(encodeParentLocator(decodeParentLocator(bytes, 0)).equals(bytes)).toBe(true);
    }
  });

  it('rejects out-of-range, odd-sized and repeated keys with a TidemarkError', () => {
    const bytes = encodeParentLocator(windowsLike());
    const mutate = (f: (b: Buffer) => void) => {
      const b = Buffer.from(bytes);
      f(b);
      return b;
    };
    const bad = [
      mutate((b) => b.writeUInt16LE(1000, 18)), // count does not fit
      mutate((b) => b.writeUInt32LE(bytes.length, 20)), // key offset past the end
      mutate((b) => b.writeUInt16LE(27, 28)), // odd key length
      mutate((b) => b.writeUInt32LE(0, 24)), // value offset 0
      mutate((b) => b.writeUInt16LE(0, 30)), // empty value
      bytes.subarray(0, 19),
    ];
    for (const b of bad) expect(() => decodeParentLocator(b, 0)).toThrow(TidemarkError);
    const twice = encodeParentLocator({
      ...windowsLike(),
      entries: [
        ['k', 'a'],
        ['k', 'b'],
      ],
    });
    expect(() => decodeParentLocator(twice, 0)).toThrow(/twice/);
  });

  it('Windows 10 fragments: VHDX locator type, 5 keys, first key at 80 and its value at 108', () => {
    const header = fragment('parent_locator_header.1');
    const entry = fragment('parent_locator_entry.1');
    expect(header.length).toBe(20);
    expect(entry.length).toBe(12);
    expect(guidToString(header.subarray(0, 16))).toBe('b04aefb7-d19e-4a81-b789-25b8e9445913');
    expect(header.subarray(0, 16).equals(PARENT_LOCATOR_TYPE_VHDX)).toBe(true);
    expect(header.readUInt16LE(16)).toBe(0); // reserved
    expect(header.readUInt16LE(18)).toBe(5);
    expect(entry.readUInt32LE(0)).toBe(80); // key offset: right after the header and 5 entries
    expect(entry.readUInt32LE(4)).toBe(108); // value offset: right after "parent_linkage"
    expect(entry.readUInt16LE(8)).toBe(28); // "parent_linkage" in UTF-16LE
    expect(entry.readUInt16LE(10)).toBe(76); // "{guid}" in UTF-16LE
    // Our encoder lays a 5-key locator out exactly as Windows does.
    const ours = encodeParentLocator(windowsLike());
    expect(ours.subarray(0, 20).equals(header)).toBe(true);
    expect(ours.subarray(20, 32).equals(entry)).toBe(true);
    const decoded = decodeParentLocator(ours, 0);
    expect(decoded.entries[0]).toEqual(['parent_linkage', linkage]);
  });
});

describe('BAT entries', () => {
  it('round-trip for every state and a range of offsets', () => {
    for (const state of [0, 1, 2, 3, 4, 5, 6, 7]) {
      for (const offset of [0, MiB, 3 * MiB, 4095 * MiB, 4096 * MiB, 2 ** 44, (2 ** 44 - 1) * MiB]) {
        const [lo, hi] = encodeBatEntry(state, offset);
        const d = decodeBatEntry(lo, hi);
        expect(d).toEqual({ state, offset, reservedBits: 0 });
        expect(encodeBatEntry(d.state, d.offset)).toEqual([lo, hi]);
      }
    }
  });

  it('decodes reserved bits and the 44-bit MiB offset from raw words', () => {
    const lo = (0xabc << 20) | (0x1ffff << 3) | 6;
    const d = decodeBatEntry(lo >>> 0, 0x12345);
    expect(d.state).toBe(6);
    expect(d.reservedBits).toBe(0x1ffff);
    expect(d.offset).toBe((0xabc + 0x12345 * 4096) * MiB);
    // Re-encoding drops the reserved bits (that is what check --repair relies on).
    expect(encodeBatEntry(d.state, d.offset)).toEqual([((0xabc << 20) | 6) >>> 0, 0x12345]);
  });

  it('geometry follows the MS-VHDX formulas', () => {
    const g = computeGeometry(2 ** 30, 32 * MiB, 512, false);
    expect(g).toMatchObject({ chunkRatio: 128, dataBlocks: 32, bitmapBlocks: 1, batEntries: 32 });
    const d = computeGeometry(2 ** 30, 2 * MiB, 512, true);
    expect(d).toMatchObject({ chunkRatio: 2048, dataBlocks: 512, bitmapBlocks: 1, batEntries: 2049 });
    const big = computeGeometry(2 ** 40, MiB, 512, false);
    expect(big.chunkRatio).toBe(4096);
    expect(big.batEntries).toBe(2 ** 20 + Math.floor((2 ** 20 - 1) / 4096));
    expect(computeGeometry(64 * 2 ** 40, MiB, 4096, false).chunkRatio).toBe(32768);
  });
});

describe('log entries', () => {
  const logGuid = newGuid();
  const seqNo = 0x1234567890n;
  const makeOps = (nData: number, nZero: number): LogOp[] => {
    const ops: LogOp[] = [];
    for (let i = 0; i < nData + nZero; i++) {
      if (i % 3 === 2 && nZero > 0 && ops.filter((o) => o.kind === 'zero').length < nZero) {
        ops.push({ kind: 'zero', fileOffset: 64 * MiB + i * 64 * KiB, length: (i % 5) * 4 * KiB + 4 * KiB });
      } else if (ops.filter((o) => o.kind === 'data').length < nData) {
        const data = Buffer.alloc(4 * KiB);
        for (let j = 0; j < data.length; j++) data[j] = (i * 7 + j * 13) & 0xff;
        ops.push({ kind: 'data', fileOffset: 3 * MiB + i * 4 * KiB, data });
      } else {
        ops.push({ kind: 'zero', fileOffset: 64 * MiB + i * 64 * KiB, length: 4 * KiB });
      }
    }
    return ops;
  };
  const ctx = { logOffset: MiB, logLength: MiB, logGuid };

  it('descriptor sectors: 126 in the first, 128 in each following', () => {
    expect(descriptorSectors(0)).toBe(1);
    expect(descriptorSectors(126)).toBe(1);
    expect(descriptorSectors(127)).toBe(2);
    expect(descriptorSectors(254)).toBe(2);
    expect(descriptorSectors(255)).toBe(3);
  });

  for (const [nData, nZero] of [
    [0, 0],
    [1, 0],
    [0, 1],
    [3, 2],
    [100, 26], // exactly 126: one descriptor sector
    [100, 27], // 127: a second descriptor sector
    [200, 100], // 300: three descriptor sectors
  ]) {
    it(`round-trips with ${nData} data and ${nZero} zero descriptors`, () => {
      const ops = makeOps(nData, nZero);
      expect(ops.filter((o) => o.kind === 'data')).toHaveLength(nData);
      const fields = {
        tail: 8 * KiB,
        sequenceNumber: seqNo,
        logGuid,
        flushedFileOffset: 128 * MiB,
        lastFileOffset: 130 * MiB,
        ops,
      };
      const bytes = encodeLogEntry(fields);
      expect(bytes.length).toBe((descriptorSectors(ops.length) + nData) * 4 * KiB);
      expect(bytes.readUInt32LE(24)).toBe(ops.length);
      expect(bytes.readUInt32LE(4)).toBe(crc32cWithZeroedField(bytes, 4));
      const log = Buffer.alloc(ctx.logLength);
      bytes.copy(log, 8 * KiB);
      const d: LogEntry = ok(decodeLogEntryAt(log, 8 * KiB, ctx));
      const { position, entryLength, ...rest } = d;
      expect(position).toBe(8 * KiB);
      expect(entryLength).toBe(bytes.length);
      expect(plain(rest)).toEqual(plain(fields));
      expect(encodeLogEntry(rest).equals(bytes)).toBe(true);
      // and it is the active sequence
      expect(findActiveSequence(log, ctx).map((e) => e.position)).toEqual([8 * KiB]);
    });
  }

  it('an entry that wraps around the end of the ring decodes', () => {
    const ops = makeOps(130, 5);
    const pos = ctx.logLength - 8 * 4 * KiB;
    const bytes = encodeLogEntry({
      tail: pos,
      sequenceNumber: seqNo,
      logGuid,
      flushedFileOffset: 0,
      lastFileOffset: 0,
      ops,
    });
    const log = Buffer.alloc(ctx.logLength);
    bytes.copy(log, pos, 0, 8 * 4 * KiB);
    bytes.copy(log, 0, 8 * 4 * KiB);
    const d = ok(decodeLogEntryAt(log, pos, ctx));
    expect(plain(d.ops)).toEqual(plain(ops));
    expect(findActiveSequence(log, ctx).map((e) => e.sequenceNumber)).toEqual([seqNo]);
  });

  it('a wrong LogGuid, checksum, descriptor or data sector sequence number is not a valid entry', () => {
    const ops = makeOps(2, 1);
    const bytes = encodeLogEntry({
      tail: 0,
      sequenceNumber: seqNo,
      logGuid,
      flushedFileOffset: 0,
      lastFileOffset: 0,
      ops,
    });
    const at = (f: (b: Buffer) => void, fixCrc: boolean) => {
      const log = Buffer.alloc(ctx.logLength);
      bytes.copy(log);
      f(log);
      if (fixCrc) log.writeUInt32LE(crc32cWithZeroedField(log.subarray(0, bytes.length), 4), 4);
      return decodeLogEntryAt(log, 0, ctx);
    };
    expect(
      decodeLogEntryAt(Buffer.concat([bytes, Buffer.alloc(ctx.logLength - bytes.length)]), 0, {
        ...ctx,
        logGuid: newGuid(),
      }),
    ).toMatch(/LogGuid/);
    expect(at((b) => (b[200] ^= 1), false)).toMatch(/checksum/);
    expect(at((b) => b.writeBigUInt64LE(seqNo + 1n, 64 + 24), true)).toMatch(/sequence number mismatch/);
    expect(at((b) => b.writeUInt32LE(0, 4 * KiB + 4092), true)).toMatch(/sequence number mismatch/);
    expect(at((b) => b.writeUInt32LE(0x12345678, 64), true)).toMatch(/unknown signature/);
  });

  it('the newest valid sequence wins; entries of another LogGuid are ignored', () => {
    const log = Buffer.alloc(MiB);
    const c = { logOffset: MiB, logLength: MiB, logGuid };
    const op = (b: number): LogOp[] => [{ kind: 'data', fileOffset: 4 * MiB, data: Buffer.alloc(4096, b) }];
    const put = (pos: number, tail: number, seq: bigint, g = logGuid, b = 1) =>
      encodeLogEntry({
        tail,
        sequenceNumber: seq,
        logGuid: g,
        flushedFileOffset: 0,
        lastFileOffset: 0,
        ops: op(b),
      }).copy(log, pos);
    put(0, 0, 10n, logGuid, 1);
    put(8192, 8192, 11n, logGuid, 2);
    put(32768, 32768, 99n, guidFromString('00000000-0000-0000-0000-000000000001'), 3);
    const seq = findActiveSequence(log, c);
    expect(seq.map((e) => e.sequenceNumber)).toEqual([11n]);
    expect((seq[0].ops[0] as { data: Buffer }).data[0]).toBe(2);
    // A two-entry sequence whose head's tail points at the first entry replays both, oldest first.
    put(16384, 8192, 12n, logGuid, 4);
    expect(findActiveSequence(log, c).map((e) => e.sequenceNumber)).toEqual([11n, 12n]);
  });
});
