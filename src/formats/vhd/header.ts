/**
 * The dynamic disk header (1024 bytes, big-endian, at the footer's data offset) of dynamic and
 * differencing disks, with its eight parent locator entries. A decode/encode pair: the decoder checks
 * length, cookie, checksum and version before it trusts a field, and bounds what the fields claim
 * (block size, table size) before anything is allocated from them.
 */
import { TidemarkError, VhdCorruptError } from '../../errors.js';
import { vhdChecksum } from './checksum.js';
import {
  COOKIE_DYNAMIC,
  DYNAMIC_HEADER_SIZE,
  FORMAT_VERSION,
  LOCATOR_ENTRIES,
  LOCATOR_ENTRY_SIZE,
  MAX_BLOCK_SIZE,
  MAX_TABLE_ENTRIES,
  MIN_BLOCK_SIZE,
  NO_OFFSET,
  PARENT_NAME_BYTES,
  SECTOR,
} from './constants.js';
import { hex } from './footer.js';

export interface LocatorEntry {
  /** Platform code (W2ru, W2ku, Mac, MacX, ... as a big-endian u32); 0 = unused. */
  code: number;
  /** Space reserved for the data: 512-byte sectors by the specification (some writers store bytes). */
  dataSpace: number;
  dataLength: number;
  reserved: number;
  dataOffset: number;
}

export interface DynamicHeader {
  /** Unused by the format: all ones. */
  dataOffset: bigint;
  tableOffset: number;
  headerVersion: number;
  maxTableEntries: number;
  blockSize: number;
  checksum: number;
  parentUniqueId: Buffer;
  /** Seconds since 2000: the parent's time stamp when this child was created (or last linked). */
  parentTimeStamp: number;
  /** The parent's file name (UTF-16 big-endian in the file). */
  parentName: string;
  locators: LocatorEntry[];
}

const FIELD_CHECKSUM = 36;

export function decodeDynamicHeader(buf: Uint8Array, where: number): DynamicHeader {
  const what = 'dynamic header';
  if (buf.length < DYNAMIC_HEADER_SIZE) throw new VhdCorruptError(what, where, 'short read', 'VHD_TRUNCATED');
  const b = Buffer.from(buf.buffer, buf.byteOffset, DYNAMIC_HEADER_SIZE);
  if (b.toString('latin1', 0, 8) !== COOKIE_DYNAMIC) throw new VhdCorruptError(what, where, 'cookie is not "cxsparse"');
  const stored = b.readUInt32BE(FIELD_CHECKSUM);
  const actual = vhdChecksum(b, FIELD_CHECKSUM);
  if (stored !== actual) {
    throw new VhdCorruptError(what, where, `checksum mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)})`);
  }
  const headerVersion = b.readUInt32BE(24);
  if (headerVersion >>> 16 !== FORMAT_VERSION >>> 16) {
    throw new VhdCorruptError(what, where, `header version 0x${hex(headerVersion)} is not 1.x`, 'VHD_UNSUPPORTED');
  }
  const blockSize = b.readUInt32BE(32);
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new VhdCorruptError(what, where, `block size ${blockSize} is not a power of two from 512 bytes to 256 MiB`);
  }
  const maxTableEntries = b.readUInt32BE(28);
  if (maxTableEntries > MAX_TABLE_ENTRIES) {
    throw new TidemarkError(
      'LIMIT_EXCEEDED',
      `${what} at offset ${where}: ${maxTableEntries} BAT entries; more than ${MAX_TABLE_ENTRIES} are refused`,
    );
  }
  const tableOffset = b.readBigUInt64BE(16);
  if (tableOffset > BigInt(Number.MAX_SAFE_INTEGER) || tableOffset % BigInt(SECTOR) !== 0n) {
    throw new VhdCorruptError(what, where, `table offset ${tableOffset} is not a sector-aligned file offset`);
  }
  const locators: LocatorEntry[] = [];
  for (let i = 0; i < LOCATOR_ENTRIES; i++) {
    const o = 576 + i * LOCATOR_ENTRY_SIZE;
    const offset = b.readBigUInt64BE(o + 16);
    locators.push({
      code: b.readUInt32BE(o),
      dataSpace: b.readUInt32BE(o + 4),
      dataLength: b.readUInt32BE(o + 8),
      reserved: b.readUInt32BE(o + 12),
      // An offset no file can reach is kept as such; the open reports the entry as out of bounds.
      dataOffset: offset > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(offset),
    });
  }
  return {
    dataOffset: b.readBigUInt64BE(8),
    tableOffset: Number(tableOffset),
    headerVersion,
    maxTableEntries,
    blockSize,
    checksum: stored,
    parentUniqueId: Buffer.from(b.subarray(40, 56)),
    parentTimeStamp: b.readUInt32BE(56),
    parentName: decodeUtf16BE(b.subarray(64, 64 + PARENT_NAME_BYTES)),
    locators,
  };
}

export function encodeDynamicHeader(h: Omit<DynamicHeader, 'checksum' | 'dataOffset' | 'headerVersion'>): Buffer {
  const b = Buffer.alloc(DYNAMIC_HEADER_SIZE);
  b.write(COOKIE_DYNAMIC, 0, 'latin1');
  b.writeBigUInt64BE(NO_OFFSET, 8);
  b.writeBigUInt64BE(BigInt(h.tableOffset), 16);
  b.writeUInt32BE(FORMAT_VERSION, 24);
  b.writeUInt32BE(h.maxTableEntries >>> 0, 28);
  b.writeUInt32BE(h.blockSize >>> 0, 32);
  h.parentUniqueId.copy(b, 40, 0, 16);
  b.writeUInt32BE(h.parentTimeStamp >>> 0, 56);
  encodeUtf16BE(h.parentName, PARENT_NAME_BYTES).copy(b, 64);
  if (h.locators.length > LOCATOR_ENTRIES) throw new TidemarkError('INVALID_ARGUMENT', 'at most 8 parent locators');
  h.locators.forEach((l, i) => {
    const o = 576 + i * LOCATOR_ENTRY_SIZE;
    b.writeUInt32BE(l.code >>> 0, o);
    b.writeUInt32BE(l.dataSpace >>> 0, o + 4);
    b.writeUInt32BE(l.dataLength >>> 0, o + 8);
    b.writeUInt32BE(l.reserved >>> 0, o + 12);
    b.writeBigUInt64BE(BigInt(l.dataOffset), o + 16);
  });
  b.writeUInt32BE(vhdChecksum(b, FIELD_CHECKSUM), FIELD_CHECKSUM);
  return b;
}

/**
 * Bytes a locator's data space stands for. The specification counts 512-byte sectors; Windows and
 * Virtual PC wrote byte counts: values under 512 are sectors, multiples of 512 are bytes (as libvhd
 * reads them), anything else is not usable (undefined).
 */
export function locatorSpaceBytes(dataSpace: number): number | undefined {
  if (dataSpace < SECTOR) return dataSpace * SECTOR;
  if (dataSpace % SECTOR === 0) return dataSpace;
  return undefined;
}

/** UTF-16 big-endian up to the first NUL (unpaired surrogates become U+FFFD). */
export function decodeUtf16BE(b: Uint8Array): string {
  let end = 0;
  while (end + 1 < b.length && (b[end] !== 0 || b[end + 1] !== 0)) end += 2;
  const le = Buffer.alloc(end);
  for (let i = 0; i < end; i += 2) {
    le[i] = b[i + 1];
    le[i + 1] = b[i];
  }
  return le.toString('utf16le');
}

/** `text` as UTF-16 big-endian in a zero-padded field of `bytes` (cut at a whole character). */
export function encodeUtf16BE(text: string, bytes: number): Buffer {
  const le = Buffer.from(text, 'utf16le');
  const out = Buffer.alloc(bytes);
  const n = Math.min(le.length, bytes - 2) & ~1;
  for (let i = 0; i < n; i += 2) {
    out[i] = le[i + 1];
    out[i + 1] = le[i];
  }
  return out;
}
