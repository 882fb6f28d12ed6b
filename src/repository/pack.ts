/**
 * Packs and pack indexes (docs/formats/repository.md §4): chunks are stored many to an object, as restic and
 * borg store them, because one object per chunk costs a file creation per MiB on a local disk (on ext4 that was
 * most of a full backup's system time) and a request per MiB on an object store.
 *
 * A pack is `chunk envelope … | header envelope | u32 LE length of the header envelope`. The header (sealed under
 * the pack's key, so it cannot be moved to another pack) lists every chunk of the pack; it lets an index be
 * rebuilt from the packs alone. A pack index lists, for some packs, the chunks they hold and where: a backup
 * session writes one when it commits, gc writes consolidated ones.
 *
 *   header:      0 "TMPH"  4 version u16 = 1  6 reserved u16  8 count u32  12 reserved u32  16 entries
 *   pack index:  0 "TMPI"  4 version u16 = 1  6 reserved u16  8 packs u32  12 reserved u32
 *                16 per pack: pack id (32) | count u32 | reserved u32 | entries
 *   entry:       chunk id (32) | offset u32 | length u32   (the chunk's envelope: bytes [offset, offset + length))
 */
import { randomBytes } from 'node:crypto';
import { TidemarkErrorBase } from '../errors.js';
import { ID_SIZE } from './disk-index.js';
import { HEADER_SIZE, MAX_OVERHEAD } from './envelope.js';

/** A pack is closed once it holds this much (plus at most one chunk and its header), unless told otherwise. */
export const DEFAULT_PACK_SIZE = 16 * 2 ** 20;
export const MIN_PACK_SIZE = 4096;
export const MAX_PACK_SIZE = 256 * 2 ** 20;
/** Chunks per pack, at most: bounds the header (a pack of tiny compressed chunks closes early). */
export const MAX_PACK_ENTRIES = 16384;
/** Plaintext of one pack index object, at most (writers split larger ones). */
export const MAX_PACK_INDEX_BYTES = 64 * 2 ** 20;
/** The trailer after a pack's header envelope: its length. */
export const PACK_TRAILER_SIZE = 4;

const HEADER_MAGIC = Buffer.from('TMPH', 'latin1');
const INDEX_MAGIC = Buffer.from('TMPI', 'latin1');
const VERSION = 1;
const PREFIX_SIZE = 16;
const ENTRY_SIZE = ID_SIZE + 8;
const PACK_REF_SIZE = ID_SIZE + 8;

export interface PackEntry {
  /** the chunk id, 64 hex digits */
  id: string;
  offset: number;
  length: number;
}

export interface PackContents {
  packId: string;
  entries: PackEntry[];
}

export function packKey(id: string): string {
  return `packs/${id.slice(0, 2)}/${id}`;
}
export function packIndexKey(id: string): string {
  return `packindex/${id}`;
}
export function newPackId(): string {
  return randomBytes(32).toString('hex');
}

/** Size of a header envelope's plaintext for `count` chunks. */
export function packHeaderSize(count: number): number {
  return PREFIX_SIZE + count * ENTRY_SIZE;
}
/** The largest header envelope a pack can end with. */
export const MAX_PACK_HEADER_OBJECT = packHeaderSize(MAX_PACK_ENTRIES) + MAX_OVERHEAD;

/** A pack or pack index that does not decode: what verify reports, like IndexFormatError. */
export class PackFormatError extends TidemarkErrorBase<'REPOSITORY_CORRUPT'> {
  constructor(
    readonly problem: 'truncated' | 'corrupt',
    message: string,
  ) {
    super('REPOSITORY_CORRUPT', message);
    this.name = 'PackFormatError';
  }
}

function writePrefix(out: Buffer, magic: Buffer, count: number): void {
  magic.copy(out, 0);
  out.writeUInt16LE(VERSION, 4);
  out.writeUInt16LE(0, 6);
  out.writeUInt32LE(count, 8);
  out.writeUInt32LE(0, 12);
}

function readPrefix(body: Buffer, magic: Buffer, what: string): number {
  if (body.length < PREFIX_SIZE) throw new PackFormatError('truncated', `${what}: ${body.length} bytes`);
  if (!body.subarray(0, 4).equals(magic)) throw new PackFormatError('corrupt', `${what}: bad magic`);
  const version = body.readUInt16LE(4);
  if (version !== VERSION) throw new PackFormatError('corrupt', `${what}: version ${version}`);
  if (body.readUInt16LE(6) !== 0 || body.readUInt32LE(12) !== 0) {
    throw new PackFormatError('corrupt', `${what}: reserved fields are not zero`);
  }
  return body.readUInt32LE(8);
}

function writeEntries(out: Buffer, at: number, entries: readonly PackEntry[]): number {
  for (const e of entries) {
    out.write(e.id, at, ID_SIZE, 'hex');
    out.writeUInt32LE(e.offset, at + ID_SIZE);
    out.writeUInt32LE(e.length, at + ID_SIZE + 4);
    at += ENTRY_SIZE;
  }
  return at;
}

/**
 * Reads `count` entries at `at`, checking each: an envelope's length (a header and at least one byte, at most
 * `maxObject`), in order, not overlapping, ending before `end`.
 */
function readEntries(body: Buffer, at: number, count: number, maxObject: number, end: number, what: string) {
  const entries: PackEntry[] = [];
  let next = 0;
  for (let i = 0; i < count; i++, at += ENTRY_SIZE) {
    const offset = body.readUInt32LE(at + ID_SIZE);
    const length = body.readUInt32LE(at + ID_SIZE + 4);
    if (length <= HEADER_SIZE || length > maxObject) {
      throw new PackFormatError('corrupt', `${what}: entry ${i} is ${length} bytes long (at most ${maxObject})`);
    }
    if (offset < next || offset + length > end) {
      throw new PackFormatError('corrupt', `${what}: entry ${i} at ${offset} overlaps or lies outside the pack`);
    }
    next = offset + length;
    entries.push({ id: body.toString('hex', at, at + ID_SIZE), offset, length });
  }
  return entries;
}

export function encodePackHeader(entries: readonly PackEntry[]): Buffer {
  const out = Buffer.alloc(packHeaderSize(entries.length));
  writePrefix(out, HEADER_MAGIC, entries.length);
  writeEntries(out, PREFIX_SIZE, entries);
  return out;
}

/** A pack's header; `dataEnd`: where the header envelope starts (every chunk lies before it). */
export function decodePackHeader(body: Buffer, maxChunkObject: number, dataEnd: number): PackEntry[] {
  const count = readPrefix(body, HEADER_MAGIC, 'pack header');
  if (count > MAX_PACK_ENTRIES) throw new PackFormatError('corrupt', `pack header: ${count} entries`);
  const size = packHeaderSize(count);
  if (body.length !== size) {
    throw new PackFormatError(body.length < size ? 'truncated' : 'corrupt', `pack header: ${body.length} bytes`);
  }
  return readEntries(body, PREFIX_SIZE, count, maxChunkObject, dataEnd, 'pack header');
}

/** Splits `packs` into pack index bodies of at most MAX_PACK_INDEX_BYTES each. */
export function encodePackIndexes(packs: readonly PackContents[]): Buffer[] {
  const bodies: Buffer[] = [];
  let group: PackContents[] = [];
  let size = PREFIX_SIZE;
  const flush = () => {
    if (group.length === 0) return;
    const out = Buffer.alloc(size);
    writePrefix(out, INDEX_MAGIC, group.length);
    let at = PREFIX_SIZE;
    for (const p of group) {
      out.write(p.packId, at, ID_SIZE, 'hex');
      out.writeUInt32LE(p.entries.length, at + ID_SIZE);
      out.writeUInt32LE(0, at + ID_SIZE + 4);
      at = writeEntries(out, at + PACK_REF_SIZE, p.entries);
    }
    bodies.push(out);
    group = [];
    size = PREFIX_SIZE;
  };
  for (const p of packs) {
    const bytes = PACK_REF_SIZE + p.entries.length * ENTRY_SIZE;
    if (size + bytes > MAX_PACK_INDEX_BYTES) flush();
    group.push(p);
    size += bytes;
  }
  flush();
  return bodies;
}

export function decodePackIndex(body: Buffer, maxChunkObject: number): PackContents[] {
  const count = readPrefix(body, INDEX_MAGIC, 'pack index');
  const packs: PackContents[] = [];
  let at = PREFIX_SIZE;
  for (let i = 0; i < count; i++) {
    if (at + PACK_REF_SIZE > body.length) throw new PackFormatError('truncated', `pack index: pack ${i} cut off`);
    const packId = body.toString('hex', at, at + ID_SIZE);
    const n = body.readUInt32LE(at + ID_SIZE);
    if (n === 0 || n > MAX_PACK_ENTRIES || body.readUInt32LE(at + ID_SIZE + 4) !== 0) {
      throw new PackFormatError('corrupt', `pack index: pack ${packId} has ${n} entries`);
    }
    at += PACK_REF_SIZE;
    if (at + n * ENTRY_SIZE > body.length) throw new PackFormatError('truncated', `pack index: pack ${i} cut off`);
    packs.push({ packId, entries: readEntries(body, at, n, maxChunkObject, 2 ** 32 - 1, 'pack index') });
    at += n * ENTRY_SIZE;
  }
  if (at !== body.length) throw new PackFormatError('corrupt', `pack index: ${body.length - at} bytes after the end`);
  return packs;
}

/** Where a chunk's envelope is. */
export interface ChunkLocation {
  pack: string;
  offset: number;
  length: number;
}

/**
 * Every chunk the pack indexes list, and the packs they list. A chunk stored twice (two backups side by side
 * stored it at once) is found in the first pack listed; gc keeps that copy only.
 */
export class ChunkMap {
  private readonly chunks = new Map<string, ChunkLocation>();
  private readonly packs = new Map<string, PackEntry[]>();

  add(pack: PackContents): void {
    if (this.packs.has(pack.packId)) return;
    this.packs.set(pack.packId, pack.entries);
    for (const e of pack.entries) {
      if (!this.chunks.has(e.id)) this.chunks.set(e.id, { pack: pack.packId, offset: e.offset, length: e.length });
    }
  }

  get(id: string): ChunkLocation | undefined {
    return this.chunks.get(id);
  }

  has(id: string): boolean {
    return this.chunks.has(id);
  }

  get chunkCount(): number {
    return this.chunks.size;
  }

  /** The chunks' envelopes, in bytes (each chunk once). */
  storedBytes(): number {
    let n = 0;
    for (const c of this.chunks.values()) n += c.length;
    return n;
  }

  hasPack(pack: string): boolean {
    return this.packs.has(pack);
  }

  packIds(): IterableIterator<string> {
    return this.packs.keys();
  }

  entriesOf(pack: string): readonly PackEntry[] {
    return this.packs.get(pack) ?? [];
  }
}

/**
 * A pack being filled: chunk envelopes copied into one buffer (reused from pack to pack), then its header and
 * trailer. The buffer is large enough for the target, one more chunk and the largest header.
 */
export class PackBuilder {
  readonly entries: PackEntry[] = [];
  private used = 0;

  constructor(
    private readonly buf: Buffer,
    private readonly target: number,
  ) {}

  static capacity(maxChunkObject: number, target: number): number {
    return target + maxChunkObject + MAX_PACK_HEADER_OBJECT + PACK_TRAILER_SIZE;
  }

  get full(): boolean {
    return this.used >= this.target || this.entries.length >= MAX_PACK_ENTRIES;
  }

  add(id: string, sealed: Uint8Array): PackEntry {
    const entry = { id, offset: this.used, length: sealed.length };
    this.buf.set(sealed, this.used);
    this.used += sealed.length;
    this.entries.push(entry);
    return entry;
  }

  /** Appends the sealed header and the trailer; the whole pack, a view of the builder's buffer. */
  finish(sealedHeader: Uint8Array): Buffer {
    this.buf.set(sealedHeader, this.used);
    this.buf.writeUInt32LE(sealedHeader.length, this.used + sealedHeader.length);
    return this.buf.subarray(0, this.used + sealedHeader.length + PACK_TRAILER_SIZE);
  }

  get buffer(): Buffer {
    return this.buf;
  }
}

/** What a PackWriter needs of the repository (kept small: pack.ts does not import repository.ts). */
export interface PackSink {
  /** seals a pack header under the pack's key */
  sealHeader(packKey: string, plain: Buffer): Promise<Buffer>;
  /** hands a sealed buffer back for reuse */
  recycle(sealed: Buffer): void;
  /** stores a finished pack (durable at the next sync) */
  put(key: string, data: Uint8Array): Promise<void>;
  /** memory for a pack buffer (the backend's fastest to write from) */
  allocate(size: number): Promise<Buffer>;
  /** the largest chunk envelope there can be */
  readonly maxChunkObject: number;
  /** close a pack once it holds this many bytes */
  readonly packSize: number;
}

/** Packs being stored at once while the next one fills (bounds memory to three pack buffers). */
const PACKS_IN_FLIGHT = 2;

/**
 * Packs chunk envelopes as they come and stores each pack once it is full: a backup session's (or gc's) only way
 * to store chunks. A chunk added is in `written` once its pack is stored; a failed store fails every later call.
 */
export class PackWriter {
  readonly written: PackContents[] = [];
  private current: PackBuilder | null = null;
  private readonly storing = new Set<Promise<void>>();
  private readonly spareBuffers: Buffer[] = [];
  private failure: unknown = null;

  constructor(private readonly sink: PackSink) {}

  /** Copies one chunk's envelope into the pack being filled (waiting while too many packs are being stored). */
  async add(id: string, sealed: Uint8Array): Promise<void> {
    this.checkFailure();
    while (!this.current && this.storing.size >= PACKS_IN_FLIGHT) {
      await Promise.race(this.storing);
      this.checkFailure();
    }
    if (!this.current) {
      const buf =
        this.spareBuffers.pop() ??
        (await this.sink.allocate(PackBuilder.capacity(this.sink.maxChunkObject, this.sink.packSize)));
      // Another add may have begun a pack while this one waited for memory: keep the buffer for later.
      if (this.current) this.spareBuffers.push(buf);
      else this.current = new PackBuilder(buf, this.sink.packSize);
    }
    this.current.add(id, sealed);
    if (this.current.full) this.store();
  }

  /** Stores the last pack and waits for every store: the packs written, or the first failure. */
  async finish(): Promise<PackContents[]> {
    if (this.current && this.current.entries.length > 0) this.store();
    while (this.storing.size > 0) await Promise.allSettled([...this.storing]);
    this.checkFailure();
    this.spareBuffers.length = 0;
    return this.written;
  }

  /** Waits for the stores under way and drops the pack being filled (an aborted session's data is garbage). */
  async abandon(): Promise<void> {
    this.current = null;
    while (this.storing.size > 0) await Promise.allSettled([...this.storing]);
    this.spareBuffers.length = 0;
  }

  private checkFailure(): void {
    if (this.failure !== null) throw this.failure;
  }

  private store(): void {
    const pack = this.current!;
    this.current = null;
    const task = (async () => {
      const packId = newPackId();
      const key = packKey(packId);
      const header = await this.sink.sealHeader(key, encodePackHeader(pack.entries));
      const data = pack.finish(header);
      this.sink.recycle(header);
      await this.sink.put(key, data);
      this.written.push({ packId, entries: pack.entries });
      this.spareBuffers.push(pack.buffer);
    })()
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => this.storing.delete(task));
    this.storing.add(task);
  }
}
