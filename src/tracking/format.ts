/**
 * On-disk formats of the change tracker (docs/formats/rct.md): the `.rct` file (two headers, two map
 * slots of per-granule change counters) and the `.mrt` file (two slots of a coarse bitmap written
 * ahead of data). Decode/encode pairs; every decoder checks bounds and CRC-32C before trusting a field.
 */
import { crc32c, crc32cWithZeroedField } from '../util/crc32c.js';
import { guidToString, parseGuid, type Guid } from '../util/guid.js';

export const RCT_SIGNATURE = 'tdmkrct2';
/** Earlier Tidemark formats, recognised as ours (so never taken for another product's) and replaced. */
export const OLD_RCT_SIGNATURES = ['tdmkrct1'];
export const MRT_SIGNATURE = 'tdmkmrt1';
export const RCT_VERSION = 2;
/** Bytes of the fixed fields at the start of a header slot. */
const FIELDS = 4096;
/** Chain records: one per file of the chain (head first), 64 bytes each. */
export const MAX_CHAIN_RECORDS = 64;
const RECORD = 64;
/** Seal nonces kept: ids older than this many seals are refused (too old to prove their lineage). */
export const SEAL_HISTORY = 4096;
/** A header slot: fields, chain records, seal history; one CRC over all of it. */
export const HEADER_SLOT = FIELDS + MAX_CHAIN_RECORDS * RECORD + SEAL_HISTORY * 8;
const NAME_MAX = 255;
const REASON_MAX = 511;

/** Where a tracked virtual disk's data was last known to be, as the tracker last saw it. */
export interface Binding {
  /** File name (no directory) of the chain's head, the file that receives writes. */
  head: string;
  dataWriteGuid: Guid;
}

/**
 * One file instance as the file system names it: device, inode and birth time tell a file from a copy of
 * it; modification time and size tell whether anything wrote it since (compared only when the record was
 * taken at a clean close: while a session writes, they move). The change time is kept for diagnosis.
 */
export interface FileRecord {
  /** First 8 bytes of SHA-256 of the file's name (no directory), hex; '' for the tracking files' own. */
  nameHash: string;
  dev: bigint;
  ino: bigint;
  /** Nanoseconds since 1970; 0 when the file system does not keep a birth time. */
  birthNs: bigint;
  ctimeNs: bigint;
  mtimeNs: bigint;
  size: bigint;
}

export interface RctHeader {
  sequence: bigint;
  inUse: boolean;
  granularity: number;
  epoch: Guid;
  /** The counter writes are stamped with now; ids 1 .. counter-1 have been sealed. */
  counter: number;
  /** The first counter of this epoch that can be queried (ids below were never sealed in this epoch). */
  firstCounter: number;
  mapSlot: 0 | 1;
  mapCrc: number;
  virtualSize: number;
  virtualDiskId: Guid;
  binding: Binding;
  /** A binding the next open accepts as well (the DataWriteGuid a writing session or a merge installs). */
  pending: Binding | null;
  epochStartedAt: number;
  lastSealAt: number;
  /** Why the current epoch began, when it began by a reset rather than by `enable`. */
  resetReason: string;
  /** The chain's files (head first) when this header was written. */
  chain: FileRecord[];
  /** The chain records' times and sizes are final: written at a clean close, nothing of ours writes since. */
  closedClean: boolean;
  /** The `.rct` file itself and its `.mrt`, as instances (a copied tracking file is not this lineage's). */
  rctFile: FileRecord | null;
  mrtFile: FileRecord | null;
  /** Seal nonces by counter modulo SEAL_HISTORY: an id names its counter AND the nonce of that seal. */
  nonces: BigUint64Array;
}

function writeString(b: Buffer, at: number, max: number, text: string): void {
  const bytes = Buffer.from(text, 'utf8').subarray(0, max);
  b.writeUInt16LE(bytes.length, at);
  bytes.copy(b, at + 2);
}

function readString(b: Buffer, at: number, max: number): string | undefined {
  const n = b.readUInt16LE(at);
  if (n > max) return undefined;
  return b.toString('utf8', at + 2, at + 2 + n);
}

// Fixed offsets inside the header slot's fields.
const H = {
  sig: 0,
  crc: 8,
  version: 12,
  sequence: 16,
  flags: 24,
  granularity: 28,
  epoch: 32,
  counter: 48,
  firstCounter: 52,
  mapSlot: 56,
  mapCrc: 60,
  virtualSize: 64,
  virtualDiskId: 72,
  bindingGuid: 88,
  pendingGuid: 104,
  hasPending: 120,
  epochStartedAt: 128,
  lastSealAt: 136,
  bindingHead: 144,
  pendingHead: 144 + 2 + NAME_MAX,
  resetReason: 144 + 2 * (2 + NAME_MAX),
  // 144 + 2 * 257 + 513 = 1171: the lineage fields start on the next 8-byte boundary.
  chainCount: 1176,
  rctFile: 1184,
  mrtFile: 1184 + RECORD,
  records: FIELDS,
  nonces: FIELDS + MAX_CHAIN_RECORDS * RECORD,
} as const;

const FLAG_IN_USE = 1;
const FLAG_CLOSED_CLEAN = 2;
const FLAG_RCT_FILE = 4;
const FLAG_MRT_FILE = 8;

function encodeRecord(b: Buffer, at: number, r: FileRecord): void {
  Buffer.from(r.nameHash.padEnd(16, '0').slice(0, 16), 'hex').copy(b, at);
  b.writeBigUInt64LE(r.dev, at + 8);
  b.writeBigUInt64LE(r.ino, at + 16);
  b.writeBigInt64LE(r.birthNs, at + 24);
  b.writeBigInt64LE(r.ctimeNs, at + 32);
  b.writeBigInt64LE(r.mtimeNs, at + 40);
  b.writeBigUInt64LE(r.size, at + 48);
}

function decodeRecord(b: Buffer, at: number): FileRecord {
  return {
    nameHash: b.toString('hex', at, at + 8),
    dev: b.readBigUInt64LE(at + 8),
    ino: b.readBigUInt64LE(at + 16),
    birthNs: b.readBigInt64LE(at + 24),
    ctimeNs: b.readBigInt64LE(at + 32),
    mtimeNs: b.readBigInt64LE(at + 40),
    size: b.readBigUInt64LE(at + 48),
  };
}

export function encodeRctHeader(h: RctHeader): Buffer {
  if (h.chain.length > MAX_CHAIN_RECORDS) throw new RangeError(`a chain of ${h.chain.length} files is too long`);
  const b = Buffer.alloc(HEADER_SLOT);
  b.write(RCT_SIGNATURE, H.sig, 'latin1');
  b.writeUInt32LE(RCT_VERSION, H.version);
  b.writeBigUInt64LE(h.sequence, H.sequence);
  b.writeUInt32LE(
    (h.inUse ? FLAG_IN_USE : 0) |
      (h.closedClean ? FLAG_CLOSED_CLEAN : 0) |
      (h.rctFile ? FLAG_RCT_FILE : 0) |
      (h.mrtFile ? FLAG_MRT_FILE : 0),
    H.flags,
  );
  b.writeUInt32LE(h.granularity, H.granularity);
  h.epoch.copy(b, H.epoch);
  b.writeUInt32LE(h.counter, H.counter);
  b.writeUInt32LE(h.firstCounter, H.firstCounter);
  b.writeUInt32LE(h.mapSlot, H.mapSlot);
  b.writeUInt32LE(h.mapCrc, H.mapCrc);
  b.writeBigUInt64LE(BigInt(h.virtualSize), H.virtualSize);
  h.virtualDiskId.copy(b, H.virtualDiskId);
  h.binding.dataWriteGuid.copy(b, H.bindingGuid);
  if (h.pending) {
    h.pending.dataWriteGuid.copy(b, H.pendingGuid);
    b.writeUInt32LE(1, H.hasPending);
    writeString(b, H.pendingHead, NAME_MAX, h.pending.head);
  }
  b.writeDoubleLE(h.epochStartedAt, H.epochStartedAt);
  b.writeDoubleLE(h.lastSealAt, H.lastSealAt);
  writeString(b, H.bindingHead, NAME_MAX, h.binding.head);
  writeString(b, H.resetReason, REASON_MAX, h.resetReason);
  b.writeUInt32LE(h.chain.length, H.chainCount);
  if (h.rctFile) encodeRecord(b, H.rctFile, h.rctFile);
  if (h.mrtFile) encodeRecord(b, H.mrtFile, h.mrtFile);
  h.chain.forEach((r, i) => encodeRecord(b, H.records + i * RECORD, r));
  Buffer.from(h.nonces.buffer, h.nonces.byteOffset, h.nonces.byteLength).copy(b, H.nonces);
  b.writeUInt32LE(crc32cWithZeroedField(b, H.crc), H.crc);
  return b;
}

/** Decodes one header slot; a string says why the slot is not valid. */
export function decodeRctHeader(b: Buffer): RctHeader | string {
  if (b.length < HEADER_SLOT) return 'short header';
  const sig = b.toString('latin1', 0, 8);
  if (OLD_RCT_SIGNATURES.includes(sig)) return `an older Tidemark tracking format (${sig})`;
  if (sig !== RCT_SIGNATURE) return 'bad signature';
  if (b.readUInt32LE(H.crc) !== crc32cWithZeroedField(b.subarray(0, HEADER_SLOT), H.crc)) return 'checksum mismatch';
  if (b.readUInt32LE(H.version) !== RCT_VERSION) return `version ${b.readUInt32LE(H.version)} is not ${RCT_VERSION}`;
  const granularity = b.readUInt32LE(H.granularity);
  if (granularity < 4096 || granularity > 2 ** 30 || (granularity & (granularity - 1)) !== 0)
    return `bad granularity ${granularity}`;
  const mapSlot = b.readUInt32LE(H.mapSlot);
  if (mapSlot > 1) return `bad map slot ${mapSlot}`;
  const counter = b.readUInt32LE(H.counter);
  const firstCounter = b.readUInt32LE(H.firstCounter);
  if (counter < 1 || firstCounter < 1 || firstCounter > counter) return `bad counters ${firstCounter}..${counter}`;
  const virtualSize = Number(b.readBigUInt64LE(H.virtualSize));
  if (!Number.isSafeInteger(virtualSize) || virtualSize <= 0) return 'bad virtual size';
  const head = readString(b, H.bindingHead, NAME_MAX);
  const pendingHead = readString(b, H.pendingHead, NAME_MAX);
  const resetReason = readString(b, H.resetReason, REASON_MAX);
  if (head === undefined || pendingHead === undefined || resetReason === undefined) return 'bad string length';
  const chainCount = b.readUInt32LE(H.chainCount);
  if (chainCount > MAX_CHAIN_RECORDS) return `bad chain record count ${chainCount}`;
  const flags = b.readUInt32LE(H.flags);
  const nonces = new BigUint64Array(SEAL_HISTORY);
  Buffer.from(nonces.buffer).set(b.subarray(H.nonces, H.nonces + SEAL_HISTORY * 8));
  return {
    sequence: b.readBigUInt64LE(H.sequence),
    inUse: (flags & FLAG_IN_USE) !== 0,
    granularity,
    epoch: Buffer.from(b.subarray(H.epoch, H.epoch + 16)),
    counter,
    firstCounter,
    mapSlot: mapSlot as 0 | 1,
    mapCrc: b.readUInt32LE(H.mapCrc),
    virtualSize,
    virtualDiskId: Buffer.from(b.subarray(H.virtualDiskId, H.virtualDiskId + 16)),
    binding: { head, dataWriteGuid: Buffer.from(b.subarray(H.bindingGuid, H.bindingGuid + 16)) },
    pending:
      b.readUInt32LE(H.hasPending) === 1
        ? { head: pendingHead, dataWriteGuid: Buffer.from(b.subarray(H.pendingGuid, H.pendingGuid + 16)) }
        : null,
    epochStartedAt: b.readDoubleLE(H.epochStartedAt),
    lastSealAt: b.readDoubleLE(H.lastSealAt),
    resetReason,
    chain: Array.from({ length: chainCount }, (_, i) => decodeRecord(b, H.records + i * RECORD)),
    closedClean: (flags & FLAG_CLOSED_CLEAN) !== 0,
    rctFile: flags & FLAG_RCT_FILE ? decodeRecord(b, H.rctFile) : null,
    mrtFile: flags & FLAG_MRT_FILE ? decodeRecord(b, H.mrtFile) : null,
    nonces,
  };
}

/** Whether a slot's first bytes are a Tidemark tracking header of any version (damaged or not). */
export function isTidemarkRct(slotStart: Buffer): boolean {
  const sig = slotStart.toString('latin1', 0, 8);
  return sig === RCT_SIGNATURE || OLD_RCT_SIGNATURES.includes(sig);
}

/** Bytes of one map slot: a u32 counter per granule, padded to 4 KiB. */
export function mapSlotLength(granules: number): number {
  return Math.ceil((granules * 4) / 4096) * 4096;
}

export function mapSlotOffset(granules: number, slot: 0 | 1): number {
  return 2 * HEADER_SLOT + slot * mapSlotLength(granules);
}

export function mapCrc(map: Uint32Array): number {
  return crc32c(new Uint8Array(map.buffer, map.byteOffset, map.byteLength));
}

// ---------------------------------------------------------------- .mrt

export interface MrtSlot {
  sequence: bigint;
  epoch: Guid;
  /** The .rct header sequence these marks add to: marks of an older sequence are already in the map. */
  rctSequence: bigint;
  regionSize: number;
  regions: number;
  bitmap: Buffer;
}

const MRT_FIXED = 64;

export function mrtSlotLength(regions: number): number {
  return Math.ceil((MRT_FIXED + Math.ceil(regions / 8)) / 4096) * 4096;
}

export function encodeMrtSlot(s: MrtSlot): Buffer {
  const b = Buffer.alloc(mrtSlotLength(s.regions));
  b.write(MRT_SIGNATURE, 0, 'latin1');
  b.writeBigUInt64LE(s.sequence, 16);
  s.epoch.copy(b, 24);
  b.writeBigUInt64LE(s.rctSequence, 40);
  b.writeUInt32LE(s.regionSize, 48);
  b.writeUInt32LE(s.regions, 52);
  s.bitmap.copy(b, MRT_FIXED, 0, Math.ceil(s.regions / 8));
  b.writeUInt32LE(crc32cWithZeroedField(b, 8), 8);
  return b;
}

export function decodeMrtSlot(b: Buffer, regions: number): MrtSlot | string {
  const len = mrtSlotLength(regions);
  if (b.length < len) return 'short slot';
  if (b.toString('latin1', 0, 8) !== MRT_SIGNATURE) return 'bad signature';
  if (b.readUInt32LE(8) !== crc32cWithZeroedField(b.subarray(0, len), 8)) return 'checksum mismatch';
  if (b.readUInt32LE(52) !== regions) return `region count ${b.readUInt32LE(52)} is not ${regions}`;
  return {
    sequence: b.readBigUInt64LE(16),
    epoch: Buffer.from(b.subarray(24, 40)),
    rctSequence: b.readBigUInt64LE(40),
    regionSize: b.readUInt32LE(48),
    regions,
    bitmap: Buffer.from(b.subarray(MRT_FIXED, MRT_FIXED + Math.ceil(regions / 8))),
  };
}

// ---------------------------------------------------------------- ids

export const ID_PREFIX = 'rct2';

/**
 * `rct2:5bfde23b:ce75:4303:b54f:6c18394f105c:00000007:9f3c5e7a12b04d66`: the epoch GUID with colons, the
 * counter in hex, and the nonce drawn at that seal (the lineage: a copy or an older state of the file seals
 * the same counter with another nonce).
 */
export function formatId(epoch: Guid, counter: number, nonce: bigint): string {
  return `${ID_PREFIX}:${guidToString(epoch).replace(/-/g, ':')}:${counter.toString(16).padStart(8, '0')}:${nonce.toString(16).padStart(16, '0')}`;
}

export type ParsedId =
  { version: 2; epoch: Guid; counter: number; nonce: bigint } | { version: 1; epoch: Guid; counter: number };

export function parseId(id: string): ParsedId | undefined {
  const m =
    /^rct([12]):([0-9a-f]{8}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{12}):([0-9a-f]{8})(?::([0-9a-f]{16}))?$/i.exec(
      id.trim(),
    );
  if (!m || (m[1] === '2') !== (m[8] !== undefined)) return undefined;
  const epoch = parseGuid(m.slice(2, 7).join('-'));
  const counter = parseInt(m[7], 16);
  if (!epoch || counter <= 0) return undefined;
  return m[1] === '2' ? { version: 2, epoch, counter, nonce: BigInt(`0x${m[8]}`) } : { version: 1, epoch, counter };
}
