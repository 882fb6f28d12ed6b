/**
 * A disk index: the chunk of every chunk-sized slot of one disk in one restore point (docs/formats/repository.md
 * §5). Slot i covers bytes [i × chunkSize, min((i + 1) × chunkSize, virtualSize)); 32 zero bytes mean "all zero,
 * nothing stored". Indexes are objects named by the hash of their encoding, so an unchanged disk shares its index
 * with the previous restore point.
 *
 *   0 magic "TMIX"  4 version u16 = 1  6 idLength u16 = 32  8 chunkSize u32  12 reserved u32 = 0
 *  16 virtualSize u64  24 slotCount u64  32 nonZeroSlots u64  40 slots (slotCount × 32 bytes)
 */
import { TidemarkError, TidemarkErrorBase } from '../errors.js';

export const INDEX_HEADER_SIZE = 40;
export const ID_SIZE = 32;
/** 16 Mi slots (a 16 TiB disk at 1 MiB chunks, 64 TiB at 4 MiB): the index is held in memory (512 MiB at most). */
export const MAX_INDEX_SLOTS = 2 ** 24;
const MAGIC = Buffer.from('TMIX', 'latin1');
const VERSION = 1;
const ZERO_ID = Buffer.alloc(ID_SIZE);
const HEX_ID = /^[0-9a-f]{64}$/;

export function slotCountFor(virtualSize: number, chunkSize: number): number {
  return Math.ceil(virtualSize / chunkSize);
}

export function indexBodySize(slots: number): number {
  return INDEX_HEADER_SIZE + slots * ID_SIZE;
}

export function checkIndexGeometry(virtualSize: number, chunkSize: number): void {
  if (!Number.isSafeInteger(virtualSize) || virtualSize < 0) {
    throw new TidemarkError('INVALID_ARGUMENT', `virtual size ${virtualSize} is not a byte count`);
  }
  const slots = slotCountFor(virtualSize, chunkSize);
  if (slots > MAX_INDEX_SLOTS) {
    throw new TidemarkError(
      'LIMIT_EXCEEDED',
      `a ${virtualSize}-byte disk needs ${slots} chunks of ${chunkSize} bytes; an index holds at most ${MAX_INDEX_SLOTS} (use a larger chunk size)`,
    );
  }
}

/** The chunks of one disk, read-only. */
export class DiskIndex {
  readonly slotCount: number;

  constructor(
    readonly chunkSize: number,
    readonly virtualSize: number,
    /** slotCount × 32 bytes */
    protected readonly slots: Buffer,
  ) {
    this.slotCount = slotCountFor(virtualSize, chunkSize);
    if (slots.length !== this.slotCount * ID_SIZE) throw new Error('index slot table of the wrong size');
  }

  slotOffset(slot: number): number {
    return slot * this.chunkSize;
  }

  slotLength(slot: number): number {
    return Math.min(this.chunkSize, this.virtualSize - slot * this.chunkSize);
  }

  /** the raw 32-byte id of a slot (all zero: a zero slot); a view, not a copy */
  rawId(slot: number): Buffer {
    return this.slots.subarray(slot * ID_SIZE, (slot + 1) * ID_SIZE);
  }

  /** the chunk id of a slot in hex, or null for an all-zero slot */
  idAt(slot: number): string | null {
    const raw = this.rawId(slot);
    return raw.equals(ZERO_ID) ? null : raw.toString('hex');
  }

  nonZeroSlots(): number {
    let n = 0;
    for (let s = 0; s < this.slotCount; s++) if (!this.rawId(s).equals(ZERO_ID)) n++;
    return n;
  }

  /** the stored (non-zero) slots, in disk order */
  *chunks(): Generator<{ slot: number; offset: number; length: number; id: string }> {
    for (let s = 0; s < this.slotCount; s++) {
      const raw = this.rawId(s);
      if (!raw.equals(ZERO_ID)) {
        yield { slot: s, offset: s * this.chunkSize, length: this.slotLength(s), id: raw.toString('hex') };
      }
    }
  }

  /** the slot table itself (slotCount × 32 bytes), for encoding and copying */
  rawSlots(): Buffer {
    return this.slots;
  }

  /** the distinct chunk ids */
  chunkIds(): Set<string> {
    const out = new Set<string>();
    for (const c of this.chunks()) out.add(c.id);
    return out;
  }
}

/** An index being built: a copy of the previous restore point's index (or all zero) whose slots are replaced. */
export class IndexBuilder extends DiskIndex {
  set(slot: number, id: string | null): void {
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.slotCount) {
      throw new TidemarkError('INVALID_ARGUMENT', `slot ${slot} is outside the index (0–${this.slotCount - 1})`);
    }
    if (id === null) {
      this.slots.fill(0, slot * ID_SIZE, (slot + 1) * ID_SIZE);
      return;
    }
    if (!HEX_ID.test(id)) throw new TidemarkError('INVALID_ARGUMENT', `"${id}" is not a chunk id`);
    this.slots.write(id, slot * ID_SIZE, 'hex');
  }

  static empty(chunkSize: number, virtualSize: number): IndexBuilder {
    checkIndexGeometry(virtualSize, chunkSize);
    return new IndexBuilder(chunkSize, virtualSize, Buffer.alloc(slotCountFor(virtualSize, chunkSize) * ID_SIZE));
  }

  static from(base: DiskIndex): IndexBuilder {
    return new IndexBuilder(base.chunkSize, base.virtualSize, Buffer.from(base.rawSlots()));
  }
}

export function encodeIndex(index: DiskIndex): Buffer {
  const slots = index.rawSlots();
  const out = Buffer.allocUnsafe(INDEX_HEADER_SIZE + slots.length);
  MAGIC.copy(out, 0);
  out.writeUInt16LE(VERSION, 4);
  out.writeUInt16LE(ID_SIZE, 6);
  out.writeUInt32LE(index.chunkSize, 8);
  out.writeUInt32LE(0, 12);
  out.writeBigUInt64LE(BigInt(index.virtualSize), 16);
  out.writeBigUInt64LE(BigInt(index.slotCount), 24);
  out.writeBigUInt64LE(BigInt(index.nonZeroSlots()), 32);
  slots.copy(out, INDEX_HEADER_SIZE);
  return out;
}

/** An index body that does not decode: what verify reports (the caller adds the index's key). */
export class IndexFormatError extends TidemarkErrorBase<'REPOSITORY_CORRUPT'> {
  constructor(
    readonly problem: 'truncated' | 'corrupt',
    message: string,
  ) {
    super('REPOSITORY_CORRUPT', message);
    this.name = 'IndexFormatError';
  }
}

/**
 * Decodes an index body (after the envelope is opened), checking every field against the repository's chunk size
 * and, when known, the geometry the manifest promised.
 */
export function decodeIndex(body: Buffer, chunkSize: number, expectVirtualSize?: number): DiskIndex {
  if (body.length < INDEX_HEADER_SIZE)
    throw new IndexFormatError('truncated', `${body.length} bytes, shorter than the header`);
  if (!body.subarray(0, 4).equals(MAGIC)) throw new IndexFormatError('corrupt', 'bad magic');
  const version = body.readUInt16LE(4);
  if (version !== VERSION) throw new IndexFormatError('corrupt', `version ${version}`);
  if (body.readUInt16LE(6) !== ID_SIZE) throw new IndexFormatError('corrupt', `id length ${body.readUInt16LE(6)}`);
  const cs = body.readUInt32LE(8);
  if (cs !== chunkSize) throw new IndexFormatError('corrupt', `chunk size ${cs}, the repository's is ${chunkSize}`);
  const vs = body.readBigUInt64LE(16);
  if (vs > BigInt(Number.MAX_SAFE_INTEGER)) throw new IndexFormatError('corrupt', `virtual size ${vs}`);
  const virtualSize = Number(vs);
  if (expectVirtualSize !== undefined && virtualSize !== expectVirtualSize) {
    throw new IndexFormatError('corrupt', `virtual size ${virtualSize}, the manifest says ${expectVirtualSize}`);
  }
  const slots = body.readBigUInt64LE(24);
  const want = slotCountFor(virtualSize, chunkSize);
  if (slots !== BigInt(want)) throw new IndexFormatError('corrupt', `${slots} slots where the size needs ${want}`);
  if (want > MAX_INDEX_SLOTS) throw new IndexFormatError('corrupt', `${want} slots, more than ${MAX_INDEX_SLOTS}`);
  const size = indexBodySize(want);
  if (body.length < size) throw new IndexFormatError('truncated', `${body.length} bytes where ${size} belong`);
  if (body.length > size) throw new IndexFormatError('corrupt', `${body.length - size} bytes after the slots`);
  const index = new DiskIndex(chunkSize, virtualSize, body.subarray(INDEX_HEADER_SIZE));
  const nonZero = body.readBigUInt64LE(32);
  if (nonZero !== BigInt(index.nonZeroSlots())) {
    throw new IndexFormatError(
      'corrupt',
      `header counts ${nonZero} stored slots, the table has ${index.nonZeroSlots()}`,
    );
  }
  return index;
}
