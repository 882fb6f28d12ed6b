/**
 * The hard disk footer (512 bytes, big-endian; Virtual PC before 2004 wrote 511): at the end of every
 * VHD, and copied at offset 0 of dynamic and differencing disks. A decode/encode pair; the decoder
 * checks the length, cookie and checksum before it reads a field, and returns the problem as a string
 * when the copy is not valid (the other copy may be).
 */
import { vhdChecksum } from './checksum.js';
import { COOKIE_FOOTER, FOOTER_SIZE, OLD_FOOTER_SIZE } from './constants.js';
import type { Chs } from './geometry.js';

export interface VhdFooter {
  features: number;
  /** Format version: major in the high 16 bits (1), minor in the low. */
  version: number;
  /** Offset of the dynamic header; all ones for fixed disks. */
  dataOffset: bigint;
  /** Seconds since 2000-01-01 00:00 UTC. */
  timeStamp: number;
  /** Four characters, e.g. "vpc ", "win ", "qemu", "tdmk". */
  creatorApp: string;
  creatorVersion: number;
  /** "Wi2k" (Windows) or "Mac ". */
  creatorHostOs: string;
  originalSize: bigint;
  currentSize: bigint;
  geometry: Chs;
  diskType: number;
  checksum: number;
  /** 16 bytes, a UUID in network byte order. */
  uniqueId: Buffer;
  savedState: number;
  /** 512, or 511 for a footer written by Virtual PC before 2004. */
  length: 512 | 511;
}

const FIELD_CHECKSUM = 64;

/** Decodes one footer copy (`buf` of 512 or 511 bytes); a string says why it is not valid. */
export function decodeFooter(buf: Uint8Array): VhdFooter | string {
  if (buf.length !== FOOTER_SIZE && buf.length !== OLD_FOOTER_SIZE) return `length ${buf.length} is not 512`;
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.length);
  if (b.toString('latin1', 0, 8) !== COOKIE_FOOTER) return 'cookie is not "conectix"';
  const stored = b.readUInt32BE(FIELD_CHECKSUM);
  const actual = vhdChecksum(b, FIELD_CHECKSUM);
  if (stored !== actual) return `checksum mismatch (stored 0x${hex(stored)}, computed 0x${hex(actual)})`;
  return {
    features: b.readUInt32BE(8),
    version: b.readUInt32BE(12),
    dataOffset: b.readBigUInt64BE(16),
    timeStamp: b.readUInt32BE(24),
    creatorApp: b.toString('latin1', 28, 32),
    creatorVersion: b.readUInt32BE(32),
    creatorHostOs: b.toString('latin1', 36, 40),
    originalSize: b.readBigUInt64BE(40),
    currentSize: b.readBigUInt64BE(48),
    geometry: { cylinders: b.readUInt16BE(56), heads: b[58], sectorsPerTrack: b[59] },
    diskType: b.readUInt32BE(60),
    checksum: stored,
    uniqueId: Buffer.from(b.subarray(68, 84)),
    savedState: b[84],
    length: buf.length as 512 | 511,
  };
}

/** Encodes a footer of 512 bytes (whatever `f.length` says: Tidemark writes the current form only). */
export function encodeFooter(f: Omit<VhdFooter, 'checksum' | 'length'>): Buffer {
  const b = Buffer.alloc(FOOTER_SIZE);
  b.write(COOKIE_FOOTER, 0, 'latin1');
  b.writeUInt32BE(f.features >>> 0, 8);
  b.writeUInt32BE(f.version >>> 0, 12);
  b.writeBigUInt64BE(BigInt.asUintN(64, f.dataOffset), 16);
  b.writeUInt32BE(f.timeStamp >>> 0, 24);
  b.write(f.creatorApp.padEnd(4, ' ').slice(0, 4), 28, 'latin1');
  b.writeUInt32BE(f.creatorVersion >>> 0, 32);
  b.write(f.creatorHostOs.padEnd(4, ' ').slice(0, 4), 36, 'latin1');
  b.writeBigUInt64BE(BigInt.asUintN(64, f.originalSize), 40);
  b.writeBigUInt64BE(BigInt.asUintN(64, f.currentSize), 48);
  b.writeUInt16BE(f.geometry.cylinders & 0xffff, 56);
  b[58] = f.geometry.heads & 0xff;
  b[59] = f.geometry.sectorsPerTrack & 0xff;
  b.writeUInt32BE(f.diskType >>> 0, 60);
  f.uniqueId.copy(b, 68, 0, 16);
  b[84] = f.savedState & 0xff;
  b.writeUInt32BE(vhdChecksum(b, FIELD_CHECKSUM), FIELD_CHECKSUM);
  return b;
}

/** A UUID stored in network byte order, as text (lowercase 8-4-4-4-12), as vhdiinfo prints it. */
export function uuidToString(id: Uint8Array): string {
  const h = Buffer.from(id.subarray(0, 16)).toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** VHD time stamp (seconds since 2000) as an ISO date. */
export function vhdTimeToIso(t: number): string {
  return new Date((t + 946684800) * 1000).toISOString();
}

/** The current time as a VHD time stamp. */
export function vhdNow(): number {
  return Math.max(0, Math.min(0xffffffff, Math.floor(Date.now() / 1000) - 946684800));
}

export function hex(n: number): string {
  return n.toString(16).padStart(8, '0');
}
