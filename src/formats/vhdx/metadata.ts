/**
 * The metadata region (MS-VHDX 2.6): table, known items and the parent locator, as decode/encode pairs.
 */
import { VhdxCorruptError } from '../../errors.js';
import { guidEquals, guidToString, parseGuid, type Guid } from '../../util/guid.js';
import {
  ITEM_FILE_PARAMETERS,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_VIRTUAL_DISK_SIZE,
  KiB,
  MAX_BLOCK_SIZE,
  MAX_VIRTUAL_SIZE,
  METADATA_TABLE_SIZE,
  MIN_BLOCK_SIZE,
  MiB,
  PARENT_LOCATOR_TYPE_VHDX,
  SIG_METADATA,
} from './constants.js';

export interface MetadataEntry {
  itemId: Guid;
  offset: number;
  length: number;
  isUser: boolean;
  isVirtualDisk: boolean;
  isRequired: boolean;
}

export const MAX_METADATA_ENTRIES = 2047;
export const MAX_METADATA_ITEM = MiB;

export function decodeMetadataTable(buf: Uint8Array, regionOffset: number, regionLength: number): MetadataEntry[] {
  const where = regionOffset;
  if (buf.length < METADATA_TABLE_SIZE) throw new VhdxCorruptError('metadata table', where, 'short read');
  const b = Buffer.from(buf.buffer, buf.byteOffset, METADATA_TABLE_SIZE);
  if (b.toString('latin1', 0, 8) !== SIG_METADATA) {
    throw new VhdxCorruptError('metadata table', where, 'signature is not "metadata"');
  }
  const count = b.readUInt16LE(10);
  if (count > MAX_METADATA_ENTRIES) {
    throw new VhdxCorruptError('metadata table', where, `entry count ${count} exceeds ${MAX_METADATA_ENTRIES}`);
  }
  const entries: MetadataEntry[] = [];
  let userCount = 0;
  for (let i = 0; i < count; i++) {
    const o = 32 + i * 32;
    const flags = b.readUInt32LE(o + 24);
    const e: MetadataEntry = {
      itemId: Buffer.from(b.subarray(o, o + 16)),
      offset: b.readUInt32LE(o + 16),
      length: b.readUInt32LE(o + 20),
      isUser: (flags & 1) !== 0,
      isVirtualDisk: (flags & 2) !== 0,
      isRequired: (flags & 4) !== 0,
    };
    const at = `entry ${i} (${guidToString(e.itemId)})`;
    if (e.length > MAX_METADATA_ITEM) {
      throw new VhdxCorruptError('metadata table', where, `${at} length ${e.length} exceeds 1 MiB`);
    }
    if (e.length === 0 && e.offset !== 0) {
      throw new VhdxCorruptError('metadata table', where, `${at} has zero length but offset ${e.offset}`);
    }
    if (e.length > 0 && (e.offset < METADATA_TABLE_SIZE || e.offset + e.length > regionLength)) {
      throw new VhdxCorruptError(
        'metadata table',
        where,
        `${at} [${e.offset}, +${e.length}) lies outside the metadata region`,
      );
    }
    if (e.isUser) userCount++;
    for (const prev of entries) {
      if (guidEquals(prev.itemId, e.itemId) && prev.isUser === e.isUser) {
        throw new VhdxCorruptError('metadata table', where, `${at} repeats an item`);
      }
      if (
        e.length > 0 &&
        prev.length > 0 &&
        e.offset < prev.offset + prev.length &&
        prev.offset < e.offset + e.length
      ) {
        throw new VhdxCorruptError('metadata table', where, `${at} overlaps item ${guidToString(prev.itemId)}`);
      }
    }
    entries.push(e);
  }
  if (userCount > 1024) throw new VhdxCorruptError('metadata table', where, `${userCount} user items exceed 1024`);
  return entries;
}

export function encodeMetadataTable(entries: MetadataEntry[]): Buffer {
  const b = Buffer.alloc(METADATA_TABLE_SIZE);
  b.write(SIG_METADATA, 0, 'latin1');
  b.writeUInt16LE(entries.length, 10);
  entries.forEach((e, i) => {
    const o = 32 + i * 32;
    e.itemId.copy(b, o);
    b.writeUInt32LE(e.offset, o + 16);
    b.writeUInt32LE(e.length, o + 20);
    b.writeUInt32LE((e.isUser ? 1 : 0) | (e.isVirtualDisk ? 2 : 0) | (e.isRequired ? 4 : 0), o + 24);
  });
  return b;
}

export const KNOWN_ITEMS: Guid[] = [
  ITEM_FILE_PARAMETERS,
  ITEM_VIRTUAL_DISK_SIZE,
  ITEM_VIRTUAL_DISK_ID,
  ITEM_LOGICAL_SECTOR_SIZE,
  ITEM_PHYSICAL_SECTOR_SIZE,
  ITEM_PARENT_LOCATOR,
];

export function isKnownItem(e: MetadataEntry): boolean {
  return !e.isUser && KNOWN_ITEMS.some((g) => guidEquals(g, e.itemId));
}

export interface FileParameters {
  blockSize: number;
  leaveBlockAllocated: boolean;
  hasParent: boolean;
}

export function decodeFileParameters(b: Buffer, where: number): FileParameters {
  if (b.length < 8) throw new VhdxCorruptError('file parameters item', where, `length ${b.length} is less than 8`);
  const blockSize = b.readUInt32LE(0);
  const flags = b.readUInt32LE(4);
  if (blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || (blockSize & (blockSize - 1)) !== 0) {
    throw new VhdxCorruptError(
      'file parameters item',
      where,
      `block size ${blockSize} is not a power of two from 1 MiB to 256 MiB`,
    );
  }
  return { blockSize, leaveBlockAllocated: (flags & 1) !== 0, hasParent: (flags & 2) !== 0 };
}

export function encodeFileParameters(p: FileParameters): Buffer {
  const b = Buffer.alloc(8);
  b.writeUInt32LE(p.blockSize, 0);
  b.writeUInt32LE((p.leaveBlockAllocated ? 1 : 0) | (p.hasParent ? 2 : 0), 4);
  return b;
}

export function decodeSectorSize(b: Buffer, what: string, where: number): 512 | 4096 {
  if (b.length < 4) throw new VhdxCorruptError(what, where, `length ${b.length} is less than 4`);
  const v = b.readUInt32LE(0);
  if (v !== 512 && v !== 4096) throw new VhdxCorruptError(what, where, `value ${v} is neither 512 nor 4096`);
  return v;
}

export function encodeU32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v, 0);
  return b;
}

export function decodeVirtualDiskSize(b: Buffer, logicalSectorSize: number, where: number): number {
  if (b.length < 8) throw new VhdxCorruptError('virtual disk size item', where, `length ${b.length} is less than 8`);
  const v = b.readBigUInt64LE(0);
  if (v === 0n || v > BigInt(MAX_VIRTUAL_SIZE)) {
    throw new VhdxCorruptError('virtual disk size item', where, `size ${v} is not between 1 byte and 64 TiB`);
  }
  const n = Number(v);
  if (n % logicalSectorSize !== 0) {
    throw new VhdxCorruptError(
      'virtual disk size item',
      where,
      `size ${n} is not a multiple of the logical sector size ${logicalSectorSize}`,
    );
  }
  return n;
}

export function encodeU64(v: number): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v), 0);
  return b;
}

/** A parent locator: its type and key/value pairs, in file order. */
export interface ParentLocator {
  locatorType: Guid;
  entries: [string, string][];
}

export function decodeParentLocator(b: Buffer, where: number): ParentLocator {
  const what = 'parent locator item';
  if (b.length < 20) throw new VhdxCorruptError(what, where, `length ${b.length} is less than the 20-byte header`);
  const locatorType = Buffer.from(b.subarray(0, 16));
  const count = b.readUInt16LE(18);
  if (20 + count * 12 > b.length) {
    throw new VhdxCorruptError(what, where, `${count} entries do not fit in ${b.length} bytes`);
  }
  const entries: [string, string][] = [];
  const text = (off: number, len: number, name: string, i: number): string => {
    if (off === 0 || len === 0 || off + len > b.length || len % 2 !== 0) {
      throw new VhdxCorruptError(
        what,
        where,
        `entry ${i} ${name} [${off}, +${len}) is empty, odd-sized or outside the item`,
      );
    }
    return b.toString('utf16le', off, off + len);
  };
  for (let i = 0; i < count; i++) {
    const o = 20 + i * 12;
    const key = text(b.readUInt32LE(o), b.readUInt16LE(o + 8), 'key', i);
    const value = text(b.readUInt32LE(o + 4), b.readUInt16LE(o + 10), 'value', i);
    if (entries.some(([k]) => k === key)) throw new VhdxCorruptError(what, where, `key "${key}" appears twice`);
    entries.push([key, value]);
  }
  return { locatorType, entries };
}

export function encodeParentLocator(loc: ParentLocator): Buffer {
  const strings = loc.entries.map(([k, v]) => [Buffer.from(k, 'utf16le'), Buffer.from(v, 'utf16le')] as const);
  const headerLen = 20 + strings.length * 12;
  const total = strings.reduce((n, [k, v]) => n + k.length + v.length, headerLen);
  const b = Buffer.alloc(total);
  loc.locatorType.copy(b, 0);
  b.writeUInt16LE(strings.length, 18);
  let pos = headerLen;
  strings.forEach(([k, v], i) => {
    const o = 20 + i * 12;
    b.writeUInt32LE(pos, o);
    k.copy(b, pos);
    pos += k.length;
    b.writeUInt32LE(pos, o + 4);
    v.copy(b, pos);
    pos += v.length;
    b.writeUInt16LE(k.length, o + 8);
    b.writeUInt16LE(v.length, o + 10);
  });
  return b;
}

export function locatorGet(loc: ParentLocator, key: string): string | undefined {
  return loc.entries.find(([k]) => k === key)?.[1];
}

export function locatorSet(loc: ParentLocator, key: string, value: string | undefined): ParentLocator {
  const entries = loc.entries.filter(([k]) => k !== key);
  const idx = loc.entries.findIndex(([k]) => k === key);
  if (value !== undefined) {
    if (idx >= 0) entries.splice(idx, 0, [key, value]);
    else entries.push([key, value]);
  }
  return { locatorType: loc.locatorType, entries };
}

export function isVhdxLocator(loc: ParentLocator): boolean {
  return guidEquals(loc.locatorType, PARENT_LOCATOR_TYPE_VHDX);
}

/** `{83ed0ec3-...}` as written in parent_linkage; parsing is case-insensitive. */
export function formatLinkage(g: Guid): string {
  return `{${guidToString(g)}}`;
}

export function parseLinkage(text: string | undefined): Guid | undefined {
  return text === undefined ? undefined : parseGuid(text);
}

export const METADATA_ITEM_ALIGN = 4 * KiB;
