/**
 * On-disk formats of the change tracker (docs/formats/rct.md): the `.rct` file (two headers, two map
 * slots of per-granule change counters) and the `.mrt` file (two slots of a coarse bitmap written
 * ahead of data). Decode/encode pairs; every decoder checks bounds and CRC-32C before trusting a field.
 */
import { crc32c, crc32cWithZeroedField } from '../util/crc32c.js';
import { guidToString, parseGuid, type Guid } from '../util/guid.js';

export const RCT_SIGNATURE = 'tdmkrct1';
export const MRT_SIGNATURE = 'tdmkmrt1';
export const RCT_VERSION = 1;
export const HEADER_SLOT = 4096;
const NAME_MAX = 255;
const REASON_MAX = 511;

/** Where a tracked virtual disk's data was last known to be, as the tracker last saw it. */
export interface Binding {
  /** File name (no directory) of the chain's head, the file that receives writes. */
  head: string;
  dataWriteGuid: Guid;
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

// Fixed offsets inside the 4 KiB header.
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
} as const;

export function encodeRctHeader(h: RctHeader): Buffer {
  const b = Buffer.alloc(HEADER_SLOT);
  b.write(RCT_SIGNATURE, H.sig, 'latin1');
  b.writeUInt32LE(RCT_VERSION, H.version);
  b.writeBigUInt64LE(h.sequence, H.sequence);
  b.writeUInt32LE(h.inUse ? 1 : 0, H.flags);
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
  b.writeUInt32LE(crc32cWithZeroedField(b, H.crc), H.crc);
  return b;
}

/** Decodes one header slot; a string says why the slot is not valid. */
export function decodeRctHeader(b: Buffer): RctHeader | string {
  if (b.length < HEADER_SLOT) return 'short header';
  if (b.toString('latin1', 0, 8) !== RCT_SIGNATURE) return 'bad signature';
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
  return {
    sequence: b.readBigUInt64LE(H.sequence),
    inUse: (b.readUInt32LE(H.flags) & 1) === 1,
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
  };
}

/** Bytes of one map slot: a u32 counter per granule, padded to 4 KiB. */
export function mapSlotLength(granules: number): number {
  return Math.ceil((granules * 4) / HEADER_SLOT) * HEADER_SLOT;
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
  return Math.ceil((MRT_FIXED + Math.ceil(regions / 8)) / HEADER_SLOT) * HEADER_SLOT;
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

export const ID_PREFIX = 'rct1';

/** `rct1:5bfde23b:ce75:4303:b54f:6c18394f105c:00000007`: the epoch GUID with colons, then the counter in hex. */
export function formatId(epoch: Guid, counter: number): string {
  return `${ID_PREFIX}:${guidToString(epoch).replace(/-/g, ':')}:${counter.toString(16).padStart(8, '0')}`;
}

export function parseId(id: string): { epoch: Guid; counter: number } | undefined {
  const m = /^rct1:([0-9a-f]{8}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{4}):([0-9a-f]{12}):([0-9a-f]{8})$/i.exec(
    id.trim(),
  );
  if (!m) return undefined;
  const epoch = parseGuid(m.slice(1, 6).join('-'));
  const counter = parseInt(m[6], 16);
  return epoch && counter > 0 ? { epoch, counter } : undefined;
}
