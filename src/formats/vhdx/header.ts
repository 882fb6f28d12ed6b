/**
 * Header section structures (MS-VHDX 2.2): the file type identifier, the two headers and the two
 * region tables, as decode/encode pairs. Decoders check bounds and signatures before reading fields
 * and throw VhdxCorruptError naming the structure and its offset.
 */
import { VhdxCorruptError } from '../../errors.js';
import { crc32cWithZeroedField } from '../../util/crc32c.js';
import { guidEquals, type Guid } from '../../util/guid.js';
import {
  HEADER_SIZE,
  MiB,
  REGION_BAT,
  REGION_METADATA,
  REGION_TABLE_SIZE,
  SIG_FILE,
  SIG_HEADER,
  SIG_REGION,
} from './constants.js';

export interface FileIdentifier {
  creator: string;
}

export function decodeFileIdentifier(buf: Uint8Array): FileIdentifier {
  if (buf.length < 8 || Buffer.from(buf.subarray(0, 8)).toString('latin1') !== SIG_FILE) {
    throw new VhdxCorruptError('file identifier', 0, 'signature is not "vhdxfile": not a VHDX file');
  }
  const raw = Buffer.from(buf.subarray(8, Math.min(buf.length, 8 + 512)));
  let text = raw.toString('utf16le');
  const nul = text.indexOf('\0');
  if (nul >= 0) text = text.slice(0, nul);
  return { creator: text };
}

export function encodeFileIdentifier(id: FileIdentifier): Buffer {
  const buf = Buffer.alloc(8 + 512);
  buf.write(SIG_FILE, 0, 'latin1');
  buf.write(id.creator.slice(0, 255), 8, 'utf16le');
  return buf;
}

export interface VhdxHeader {
  checksum: number;
  sequenceNumber: bigint;
  fileWriteGuid: Guid;
  dataWriteGuid: Guid;
  logGuid: Guid;
  logVersion: number;
  version: number;
  logLength: number;
  logOffset: number;
}

/** Decodes one 4 KiB header; returns the problem as a string when the slot is not valid. */
export function decodeHeader(buf: Uint8Array, offset: number): VhdxHeader | string {
  if (buf.length < HEADER_SIZE) return 'short read';
  const b = Buffer.from(buf.buffer, buf.byteOffset, HEADER_SIZE);
  if (b.readUInt32LE(0) !== SIG_HEADER) return 'signature is not "head"';
  const stored = b.readUInt32LE(4);
  const actual = crc32cWithZeroedField(b, 4);
  if (stored !== actual) return `checksum mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)})`;
  void offset;
  return {
    checksum: stored,
    sequenceNumber: b.readBigUInt64LE(8),
    fileWriteGuid: Buffer.from(b.subarray(16, 32)),
    dataWriteGuid: Buffer.from(b.subarray(32, 48)),
    logGuid: Buffer.from(b.subarray(48, 64)),
    logVersion: b.readUInt16LE(64),
    version: b.readUInt16LE(66),
    logLength: b.readUInt32LE(68),
    logOffset: Number(b.readBigUInt64LE(72)),
  };
}

export function encodeHeader(h: Omit<VhdxHeader, 'checksum'>): Buffer {
  const b = Buffer.alloc(HEADER_SIZE);
  b.writeUInt32LE(SIG_HEADER, 0);
  b.writeBigUInt64LE(h.sequenceNumber, 8);
  h.fileWriteGuid.copy(b, 16);
  h.dataWriteGuid.copy(b, 32);
  h.logGuid.copy(b, 48);
  b.writeUInt16LE(h.logVersion, 64);
  b.writeUInt16LE(h.version, 66);
  b.writeUInt32LE(h.logLength, 68);
  b.writeBigUInt64LE(BigInt(h.logOffset), 72);
  b.writeUInt32LE(crc32cWithZeroedField(b, 4), 4);
  return b;
}

/** The current header (MS-VHDX 2.2.2): the only valid one, or the valid one with the higher sequence. */
export function pickCurrentHeader(
  h1: VhdxHeader | string,
  h2: VhdxHeader | string,
): { header: VhdxHeader; slot: 0 | 1 } | undefined {
  if (typeof h1 === 'string' && typeof h2 === 'string') return undefined;
  if (typeof h1 === 'string') return { header: h2 as VhdxHeader, slot: 1 };
  if (typeof h2 === 'string') return { header: h1, slot: 0 };
  // Equal sequence numbers happen in real files (Disk2vhd writes two identical headers): take slot 0.
  return h2.sequenceNumber > h1.sequenceNumber ? { header: h2, slot: 1 } : { header: h1, slot: 0 };
}

export interface RegionEntry {
  guid: Guid;
  fileOffset: number;
  length: number;
  required: boolean;
}

export interface RegionTable {
  checksum: number;
  entries: RegionEntry[];
}

export const MAX_REGION_ENTRIES = 2047;

/** Decodes one 64 KiB region table; returns the problem as a string when the copy is not valid. */
export function decodeRegionTable(buf: Uint8Array): RegionTable | string {
  if (buf.length < REGION_TABLE_SIZE) return 'short read';
  const b = Buffer.from(buf.buffer, buf.byteOffset, REGION_TABLE_SIZE);
  if (b.readUInt32LE(0) !== SIG_REGION) return 'signature is not "regi"';
  const stored = b.readUInt32LE(4);
  const actual = crc32cWithZeroedField(b, 4);
  if (stored !== actual) return `checksum mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)})`;
  const count = b.readUInt32LE(8);
  if (count > MAX_REGION_ENTRIES) return `entry count ${count} exceeds ${MAX_REGION_ENTRIES}`;
  const entries: RegionEntry[] = [];
  for (let i = 0; i < count; i++) {
    const o = 16 + i * 32;
    const fileOffset = b.readBigUInt64LE(o + 16);
    if (fileOffset > BigInt(Number.MAX_SAFE_INTEGER)) return `entry ${i} file offset ${fileOffset} is out of range`;
    entries.push({
      guid: Buffer.from(b.subarray(o, o + 16)),
      fileOffset: Number(fileOffset),
      length: b.readUInt32LE(o + 24),
      required: (b.readUInt32LE(o + 28) & 1) === 1,
    });
  }
  return { checksum: stored, entries };
}

export function encodeRegionTable(entries: RegionEntry[]): Buffer {
  const b = Buffer.alloc(REGION_TABLE_SIZE);
  b.writeUInt32LE(SIG_REGION, 0);
  b.writeUInt32LE(entries.length, 8);
  entries.forEach((e, i) => {
    const o = 16 + i * 32;
    e.guid.copy(b, o);
    b.writeBigUInt64LE(BigInt(e.fileOffset), o + 16);
    b.writeUInt32LE(e.length, o + 24);
    b.writeUInt32LE(e.required ? 1 : 0, o + 28);
  });
  b.writeUInt32LE(crc32cWithZeroedField(b, 4), 4);
  return b;
}

/** Structural rules for region entries (alignment, uniqueness, known required regions). */
export function validateRegionTable(table: RegionTable, where: number): { bat: RegionEntry; metadata: RegionEntry } {
  const seen: Guid[] = [];
  let bat: RegionEntry | undefined;
  let metadata: RegionEntry | undefined;
  for (const [i, e] of table.entries.entries()) {
    if (seen.some((g) => guidEquals(g, e.guid))) {
      throw new VhdxCorruptError('region table', where, `entry ${i} repeats a region GUID`);
    }
    seen.push(e.guid);
    if (e.fileOffset < MiB || e.fileOffset % MiB !== 0) {
      throw new VhdxCorruptError(
        'region table',
        where,
        `entry ${i} file offset ${e.fileOffset} is not 1 MiB aligned past the header`,
      );
    }
    if (e.length === 0 || e.length % MiB !== 0) {
      throw new VhdxCorruptError(
        'region table',
        where,
        `entry ${i} length ${e.length} is not a non-zero multiple of 1 MiB`,
      );
    }
    if (guidEquals(e.guid, REGION_BAT)) bat = e;
    else if (guidEquals(e.guid, REGION_METADATA)) metadata = e;
    else if (e.required) {
      throw new VhdxCorruptError(
        'region table',
        where,
        `entry ${i} is an unknown region marked required`,
        'VHDX_UNSUPPORTED',
      );
    }
  }
  if (!bat) throw new VhdxCorruptError('region table', where, 'no BAT region');
  if (!metadata) throw new VhdxCorruptError('region table', where, 'no metadata region');
  return { bat, metadata };
}

export function hex(n: number): string {
  return n.toString(16).padStart(8, '0');
}
