import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { computeGeometry, decodeBatEntry, encodeBatEntry } from '../../src/formats/vhdx/bat.js';
import { PARENT_LOCATOR_TYPE_VHDX, REGION_BAT, REGION_METADATA } from '../../src/formats/vhdx/constants.js';
import {
  decodeFileIdentifier,
  decodeHeader,
  decodeRegionTable,
  encodeFileIdentifier,
  encodeHeader,
  encodeRegionTable,
  pickCurrentHeader,
  type VhdxHeader,
} from '../../src/formats/vhdx/header.js';
import { decodeLogEntryAt, encodeLogEntry, findActiveSequence, type LogOp } from '../../src/formats/vhdx/log.js';
import {
  decodeFileParameters,
  decodeMetadataTable,
  decodeParentLocator,
  encodeFileParameters,
  encodeMetadataTable,
  encodeParentLocator,
} from '../../src/formats/vhdx/metadata.js';
import { crc32c } from '../../src/util/crc32c.js';
import { guidFromString, guidToString, newGuid, parseGuid } from '../../src/util/guid.js';
import { fragmentPath } from '../helpers/fixtures.js';

const fragment = (name: string) => readFileSync(fragmentPath(name));

describe('CRC-32C', () => {
  it('matches the standard check values', () => {
    expect(crc32c(Buffer.from('123456789'))).toBe(0xe3069283);
    expect(crc32c(Buffer.alloc(32))).toBe(0x8a9136aa);
    expect(crc32c(Buffer.alloc(32, 0xff))).toBe(0x62a8ab43);
    // chaining equals one pass
    const data = Buffer.from('The quick brown fox jumps over the lazy dog');
    expect(crc32c(data.subarray(10), crc32c(data.subarray(0, 10)))).toBe(crc32c(data));
  });
});

describe('GUIDs', () => {
  it('use the mixed-endian byte order of VHDX', () => {
    expect(REGION_BAT.toString('hex')).toBe('6677c22d23f600429d64115e9bfd4a08');
    expect(guidToString(REGION_BAT)).toBe('2dc27766-f623-4200-9d64-115e9bfd4a08');
    const g = newGuid();
    expect(parseGuid(`{${guidToString(g).toUpperCase()}}`)!.equals(g)).toBe(true);
    expect(parseGuid('not-a-guid')).toBeUndefined();
  });
});

describe('Windows 10 fragments', () => {
  it('file identifier', () => {
    const id = decodeFileIdentifier(fragment('file_identifier.1'));
    expect(id.creator).toBe('Microsoft Windows 10.0.19041.0');
    expect(decodeFileIdentifier(encodeFileIdentifier(id)).creator).toBe(id.creator);
  });

  it('header: stored CRC 0x9f69b235 validates, and re-encoding gives the same bytes', () => {
    const raw = fragment('image_header.1');
    const h = decodeHeader(raw, 65536) as VhdxHeader;
    expect(typeof h).toBe('object');
    expect(h.checksum).toBe(0x9f69b235);
    expect(h.sequenceNumber).toBe(6n);
    expect(h.version).toBe(1);
    expect(h.logVersion).toBe(0);
    expect(h.logLength).toBe(1024 * 1024);
    expect(h.logOffset).toBe(1024 * 1024);
    expect(encodeHeader(h).equals(raw)).toBe(true);
    const bad = Buffer.from(raw);
    bad[100] ^= 1;
    expect(decodeHeader(bad, 65536)).toMatch(/checksum mismatch/);
  });

  it('region table: CRC 0xc66b8cae over the full 64 KiB', () => {
    const table = Buffer.alloc(64 * 1024);
    fragment('region_table.1').copy(table);
    const t = decodeRegionTable(table);
    if (typeof t === 'string') throw new Error(t);
    expect(t.checksum).toBe(0xc66b8cae);
    expect(t.entries.map((e) => guidToString(e.guid))).toEqual([
      guidToString(REGION_BAT),
      guidToString(REGION_METADATA),
    ]);
    expect(t.entries[0]).toMatchObject({ fileOffset: 3 * 2 ** 20, length: 2 ** 20, required: true });
    expect(encodeRegionTable(t.entries).equals(table)).toBe(true);
  });

  it('metadata table header and entry', () => {
    const table = Buffer.alloc(64 * 1024);
    fragment('metadata_table_header.1').copy(table, 0);
    // place the one entry we have as entry 0 and declare one entry
    fragment('metadata_table_entry.1').copy(table, 32);
    expect(table.readUInt16LE(10)).toBe(5);
    table.writeUInt16LE(1, 10);
    const [e] = decodeMetadataTable(table, 2 * 2 ** 20, 2 ** 20);
    expect(guidToString(e.itemId)).toBe('caa16737-fa36-4d43-b3b6-33f0aa44e76b');
    expect(e).toMatchObject({ offset: 65536, length: 8, isUser: false, isVirtualDisk: false, isRequired: true });
    expect(encodeMetadataTable([e]).equals(table)).toBe(true);
  });

  it('parent locator header and first entry', () => {
    const header = fragment('parent_locator_header.1');
    const entry = fragment('parent_locator_entry.1');
    expect(header.subarray(0, 16).equals(PARENT_LOCATOR_TYPE_VHDX)).toBe(true);
    expect(header.readUInt16LE(18)).toBe(5);
    expect(entry.readUInt32LE(0)).toBe(80);
    expect(entry.readUInt32LE(4)).toBe(108);
    expect(entry.readUInt16LE(8)).toBe(28); // "parent_linkage" in UTF-16
    expect(entry.readUInt16LE(10)).toBe(76); // "{guid}" in UTF-16
  });
});

describe('round trips', () => {
  it('header', () => {
    const h = {
      sequenceNumber: 123456789012n,
      fileWriteGuid: newGuid(),
      dataWriteGuid: newGuid(),
      logGuid: newGuid(),
      logVersion: 0,
      version: 1,
      logLength: 2 ** 20,
      logOffset: 2 ** 20,
    };
    const d = decodeHeader(encodeHeader(h), 0) as VhdxHeader;
    expect({ ...d, checksum: 0 }).toEqual({ ...h, checksum: 0 });
  });

  it('current header choice', () => {
    const base = {
      fileWriteGuid: newGuid(),
      dataWriteGuid: newGuid(),
      logGuid: newGuid(),
      logVersion: 0,
      version: 1,
      logLength: 2 ** 20,
      logOffset: 2 ** 20,
      checksum: 0,
    };
    const a = { ...base, sequenceNumber: 5n };
    const b = { ...base, sequenceNumber: 6n };
    expect(pickCurrentHeader(a, b)!.slot).toBe(1);
    expect(pickCurrentHeader(b, a)!.slot).toBe(0);
    expect(pickCurrentHeader(a, a)!.slot).toBe(0); // equal sequence numbers (Disk2vhd) are accepted
    expect(pickCurrentHeader('bad', a)!.slot).toBe(1);
    expect(pickCurrentHeader('bad', 'bad')).toBeUndefined();
  });

  it('file parameters, parent locator', () => {
    for (const p of [
      { blockSize: 2 ** 20, leaveBlockAllocated: true, hasParent: false },
      { blockSize: 2 ** 28, leaveBlockAllocated: false, hasParent: true },
    ]) {
      expect(decodeFileParameters(encodeFileParameters(p), 0)).toEqual(p);
    }
    const loc = {
      locatorType: PARENT_LOCATOR_TYPE_VHDX,
      entries: [
        ['parent_linkage', '{83ed0ec3-24c8-49a6-a959-5e4bf1288bfb}'],
        ['relative_path', '..\\..\\path2\\sub3\\parent.vhdx'],
        ['absolute_win32_path', '\\\\?\\d:\\path2\\sub3\\parent.vhdx'],
      ] as [string, string][],
    };
    expect(decodeParentLocator(encodeParentLocator(loc), 0)).toEqual(loc);
  });

  it('BAT entries and geometry', () => {
    for (const [state, offset] of [
      [6, 3 * 2 ** 20],
      [7, 2 ** 44],
      [0, 0],
      [2, 0],
    ]) {
      const [lo, hi] = encodeBatEntry(state, offset);
      expect(decodeBatEntry(lo, hi)).toEqual({ state, offset, reservedBits: 0 });
    }
    const g = computeGeometry(2 ** 30, 32 * 2 ** 20, 512, false);
    expect(g.chunkRatio).toBe(128);
    expect(g.dataBlocks).toBe(32);
    expect(g.batEntries).toBe(32);
    const d = computeGeometry(2 ** 30, 2 ** 21, 512, true);
    expect(d.chunkRatio).toBe(2048);
    expect(d.batEntries).toBe(2049);
    expect(computeGeometry(64 * 2 ** 40, 2 ** 20, 4096, false).chunkRatio).toBe(32768);
  });

  it('log entries: data and zero descriptors, a second descriptor sector, wrap-around', () => {
    const logGuid = newGuid();
    const ops: LogOp[] = [];
    for (let i = 0; i < 130; i++)
      ops.push({ kind: 'data', fileOffset: 3 * 2 ** 20 + i * 4096, data: Buffer.alloc(4096, i) });
    ops.push({ kind: 'zero', fileOffset: 8 * 2 ** 20, length: 64 * 1024 });
    const entry = encodeLogEntry({
      tail: 0,
      sequenceNumber: 0x1234567890n,
      logGuid,
      flushedFileOffset: 16 * 2 ** 20,
      lastFileOffset: 20 * 2 ** 20,
      ops,
    });
    expect(entry.length).toBe((2 + 130) * 4096);
    const log = Buffer.alloc(2 ** 20);
    // Place it so that it wraps around the end of the ring.
    const pos = log.length - 8 * 4096;
    entry.copy(log, pos, 0, 8 * 4096);
    entry.copy(log, 0, 8 * 4096);
    log.writeUInt32LE(pos, pos + 12); // tail = itself
    // re-encode at the right tail so the CRC matches
    const placed = encodeLogEntry({
      tail: pos,
      sequenceNumber: 0x1234567890n,
      logGuid,
      flushedFileOffset: 16 * 2 ** 20,
      lastFileOffset: 20 * 2 ** 20,
      ops,
    });
    placed.copy(log, pos, 0, 8 * 4096);
    placed.copy(log, 0, 8 * 4096);
    const ctx = { logOffset: 2 ** 20, logLength: 2 ** 20, logGuid };
    const decoded = decodeLogEntryAt(log, pos, ctx);
    if (typeof decoded === 'string') throw new Error(decoded);
    expect(decoded.ops).toEqual(ops);
    expect(findActiveSequence(log, ctx).map((e) => e.sequenceNumber)).toEqual([0x1234567890n]);
    expect(decodeLogEntryAt(log, pos, { ...ctx, logGuid: newGuid() })).toMatch(/LogGuid/);
  });

  it('log: the newest valid sequence wins and stale entries are ignored', () => {
    const logGuid = newGuid();
    const ctx = { logOffset: 2 ** 20, logLength: 2 ** 20, logGuid };
    const log = Buffer.alloc(2 ** 20);
    const op = (b: number): LogOp[] => [{ kind: 'data', fileOffset: 4 * 2 ** 20, data: Buffer.alloc(4096, b) }];
    encodeLogEntry({ tail: 0, sequenceNumber: 10n, logGuid, flushedFileOffset: 0, lastFileOffset: 0, ops: op(1) }).copy(
      log,
      0,
    );
    encodeLogEntry({
      tail: 8192,
      sequenceNumber: 11n,
      logGuid,
      flushedFileOffset: 0,
      lastFileOffset: 0,
      ops: op(2),
    }).copy(log, 8192);
    // an entry of another LogGuid with a higher sequence number must not count
    encodeLogEntry({
      tail: 16384,
      sequenceNumber: 99n,
      logGuid: guidFromString('00000000-0000-0000-0000-000000000001'),
      flushedFileOffset: 0,
      lastFileOffset: 0,
      ops: op(3),
    }).copy(log, 16384);
    const seq = findActiveSequence(log, ctx);
    expect(seq.map((e) => e.sequenceNumber)).toEqual([11n]);
    expect((seq[0].ops[0] as { data: Buffer }).data[0]).toBe(2);
  });
});
