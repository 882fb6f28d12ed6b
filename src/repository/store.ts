/**
 * The repository's objects: one open repository's backend, config, keys and codec, and everything that reads and
 * writes its objects — sealing, loading and checking chunks, indexes and pack headers, the pack-index cache (where
 * every chunk is), pack writers, and locks. The other parts (session.ts, points.ts, restore.ts, verify.ts,
 * maintenance.ts, info.ts) work through this; open.ts makes one; repository.ts is the facade over them all.
 */
import { createHash, createHmac } from 'node:crypto';
import { TidemarkError, InvalidArgumentError } from '../errors.js';
import type { Backend, ObjectInfo } from './backend.js';
import { forEachBounded } from '../util/bounded.js';
import type { RepositoryConfig } from './config.js';
import {
  damaged,
  isDamage,
  isUnreadableEntry,
  unusableMessage,
  type DamageError,
  type EntryDamage,
  type Damage,
} from './damage.js';
import {
  decodeIndex,
  DiskIndex,
  IndexFormatError,
  indexBodySize,
  MAX_INDEX_SLOTS,
  slotCountFor,
} from './disk-index.js';
import { MAX_MANIFEST_OVERHEAD, MAX_OVERHEAD, type ObjectType } from './envelope.js';
import type { RepositoryKeys } from './keys.js';
import { acquireLock, type RepositoryLock } from './lock.js';
import type { IndexRef } from './manifest.js';
import {
  ChunkMap,
  decodePackHeader,
  decodePackIndex,
  encodePackIndexes,
  MAX_PACK_HEADER_OBJECT,
  MAX_PACK_INDEX_BYTES,
  PACK_TRAILER_SIZE,
  PackFormatError,
  packIndexKey,
  packKey,
  PackWriter,
  type PackContents,
  type PackEntry,
  type PackSink,
} from './pack.js';
import { CodecError, type Codec } from './pool.js';

export const HEX_ID = /^[0-9a-f]{64}$/;

/**
 * Bytes of disk-index slot tables read at once by verify and gc (an index holds up to 512 MiB: a larger one is read
 * alone), so that reading many indexes side by side cannot add up to more than this.
 */
export const INDEX_MEMORY_BUDGET = 256 * 2 ** 20;

/** The name a chunk is sealed under (bound into its encryption): chunks live in packs, not under this key. */
export function chunkKey(id: string): string {
  return `chunks/${id.slice(0, 2)}/${id}`;
}
export function indexKey(id: string): string {
  return `indexes/${id}`;
}

/**
 * How a repository's restore points are authenticated on this machine (docs/formats/repository.md §6a):
 * encrypted (AES-256-GCM and the config's MAC), or unencrypted with the integrity key this machine holds, or not
 * at all — an unencrypted repository whose key this machine does not hold, or one made before integrity keys.
 */
export interface IntegrityState {
  mode: 'aes-256-gcm' | 'hmac-sha256' | 'none';
  /** a forged manifest is refused (false: one cannot be told from a real one) */
  authenticated: boolean;
  /** the repository has an integrity key that this machine does not hold */
  keyMissing: boolean;
  /** where this machine keeps what it knows about the repository */
  trustFile: string;
}

/** What closing the repository ends first: its open backup sessions. */
export interface OpenWriter {
  abort(): Promise<void>;
}

export class ObjectStore {
  private closed = false;
  /** The pack indexes read so far (by object id) and the chunks they list; refreshed by packIndexes(). */
  private packIndexState: { map: ChunkMap; loaded: Set<string> } | null = null;
  /** backup sessions in progress, aborted by close() */
  readonly writers = new Set<OpenWriter>();

  constructor(
    readonly backend: Backend,
    readonly config: RepositoryConfig,
    /** null: not encrypted */
    readonly keys: RepositoryKeys | null,
    private readonly codec: Codec,
    private readonly packSize: number,
    readonly integrity: IntegrityState,
    /** the integrity key this machine holds for the repository (unencrypted repositories), for `repo key export` */
    readonly integrityKey: Buffer | null,
    /** where this machine keeps integrity keys and what it knows of repositories (trust.ts) */
    readonly trustDir: string,
  ) {}

  get chunkSize(): number {
    return this.config.chunkSize;
  }

  get location(): string {
    return this.backend.location;
  }

  get encrypted(): boolean {
    return this.keys !== null;
  }

  /** Aborts open backup sessions (releasing their locks) and stops the codec workers. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.writers]) await s.abort().catch(() => undefined);
    await this.codec.close();
    await this.backend.close();
  }

  checkOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', `repository ${this.location} is closed`);
  }

  async lock(kind: 'shared' | 'exclusive', operation: string): Promise<RepositoryLock> {
    this.checkOpen();
    return acquireLock(this.backend, kind, operation);
  }

  /** The id of a chunk (or index body): SHA-256, or HMAC-SHA-256 under the repository's id key when encrypted. */
  hashId(data: Uint8Array): string {
    return this.keys
      ? createHmac('sha256', this.keys.idKey).update(data).digest('hex')
      : createHash('sha256').update(data).digest('hex');
  }

  // ---------------------------------------------------------------------------------------------------------
  // Objects

  /** Gives a sealed buffer back for reuse once nothing uses it any more. @internal */
  recycle(sealed: Buffer): void {
    this.codec.recycle(sealed);
  }

  /** @internal */
  async seal(type: ObjectType, key: string, plain: Uint8Array): Promise<Buffer> {
    this.checkOpen();
    // Objects not named by their hash get a checksum when not encrypted: manifests, pack headers.
    return this.codec.seal(plain, { type, name: key, checksum: type === 'manifest' || type === 'pack-header' });
  }

  /** Opens a chunk's envelope (read by the caller) without checking its id. */
  async openChunk(stored: Uint8Array, id: string): Promise<Buffer> {
    return this.codec.open(stored, 'chunk', chunkKey(id), this.chunkSize);
  }

  /** Reads and opens one object (or `at`, a range of one), turning every way it can fail into NOT_FOUND or a typed damage. */
  async load(
    type: ObjectType,
    key: string,
    maxPlain: number,
    what: string,
    missing: 'damage' | 'not-found',
    at?: { offset: number; length: number; name: string; expectId?: string; into?: Buffer },
  ): Promise<{ plain: Buffer; storedBytes: number }> {
    this.checkOpen();
    const object = type === 'pack-header' ? 'pack' : type;
    let stored: Buffer;
    try {
      stored = await this.backend.get(key, {
        maxBytes: maxPlain + (type === 'manifest' ? MAX_MANIFEST_OVERHEAD : MAX_OVERHEAD),
        ...(at ? { range: { offset: at.offset, length: at.length }, into: at.into } : {}),
      });
    } catch (err) {
      const code = (err as TidemarkError).code;
      if (code === 'NOT_FOUND') {
        // Something there that is not an object (a directory, a dangling link) is not "missing": it is damage.
        const entry = at ? null : await this.unusableEntry(key);
        if (entry) throw damaged(object, key, 'unreadable', unusableMessage(what, entry), err);
        if (missing === 'not-found') throw err;
        throw damaged(object, key, 'missing', `${what} is missing (${key})`, err);
      }
      if (code === 'LIMIT_EXCEEDED')
        throw damaged(object, key, 'corrupt', `${what} is damaged: ${(err as Error).message}`, err);
      if (isUnreadableEntry(err)) {
        throw damaged(object, key, 'unreadable', `${what} cannot be read (${key}): ${(err as Error).message}`, err);
      }
      throw err;
    }
    if (at && stored.length < at.length) {
      throw damaged(
        object,
        key,
        'truncated',
        `${what} is damaged: ${key} ends inside it (at byte ${at.offset + stored.length})`,
      );
    }
    try {
      const plain = await this.codec.open(stored, type, at?.name ?? key, maxPlain, at?.expectId);
      return { plain, storedBytes: stored.length };
    } catch (err) {
      if (err instanceof CodecError) {
        if (err.code === 'NOT_SUPPORTED') throw new TidemarkError('NOT_SUPPORTED', `${what}: ${err.message}`);
        throw damaged(
          object,
          key,
          err.problem,
          `${what} is damaged (${key}${at ? ` at ${at.offset}` : ''}): ${err.message}`,
          err,
        );
      }
      throw err;
    }
  }

  /** The entry under `key` when it stands where an object belongs but is not one, else null. */
  private async unusableEntry(key: string): Promise<ObjectInfo | null> {
    for await (const o of this.backend.list(key, { unusable: true })) if (o.key === key && o.unusable) return o;
    return null;
  }

  /** The largest envelope a chunk can have. */
  get maxChunkObject(): number {
    return this.chunkSize + MAX_OVERHEAD;
  }

  /**
   * Where every chunk is: the pack indexes, read again where they changed since the last call (a backup elsewhere
   * added one; gc replaced them all). Damaged pack indexes are left out and named in `damaged`: their chunks then
   * look missing to readers (and a backup stores them again). `reread`: read every one again (verify and gc check
   * what is stored, not what this process remembers).
   */
  async packIndexes(
    opts: { reread?: boolean } = {},
  ): Promise<{ map: ChunkMap; indexCount: number; damaged: DamageError[] }> {
    this.checkOpen();
    if (opts.reread) this.packIndexState = null;
    const listed: string[] = [];
    const damage: DamageError[] = [];
    for await (const o of this.backend.list('packindex/', { unusable: true })) {
      const id = o.key.slice('packindex/'.length);
      if (!HEX_ID.test(id)) continue;
      if (o.unusable) damage.push(damaged('pack-index', o.key, 'unreadable', unusableMessage(`pack index ${id}`, o)));
      else listed.push(id);
    }
    listed.sort();
    const present = new Set(listed);
    let state = this.packIndexState;
    if (!state || [...state.loaded].some((id) => !present.has(id))) state = { map: new ChunkMap(), loaded: new Set() };
    const fresh = listed.filter((id) => !state.loaded.has(id));
    const read = new Map<string, PackContents[]>();
    await forEachBounded(fresh, 8, async (id) => {
      try {
        read.set(id, await this.readPackIndex(id));
      } catch (err) {
        if (!isDamage(err)) throw err;
        damage.push(err);
      }
    });
    for (const id of fresh) {
      const packs = read.get(id);
      if (!packs) continue;
      for (const p of packs) state.map.add(p);
      state.loaded.add(id);
    }
    this.packIndexState = state;
    damage.sort((a, b) => (a.details.key < b.details.key ? -1 : 1));
    return { map: state.map, indexCount: listed.length, damaged: damage };
  }

  private async readPackIndex(id: string): Promise<PackContents[]> {
    const key = packIndexKey(id);
    const { plain } = await this.load('pack-index', key, MAX_PACK_INDEX_BYTES, `pack index ${id}`, 'damage');
    let packs: PackContents[];
    try {
      packs = decodePackIndex(plain, this.maxChunkObject);
    } catch (err) {
      if (err instanceof PackFormatError) {
        throw damaged('pack-index', key, err.problem, `pack index ${id} is damaged: ${err.message}`, err);
      }
      throw err;
    }
    if (this.hashId(plain) !== id) {
      throw damaged('pack-index', key, 'corrupt', `pack index ${id} is damaged: its content does not hash to its name`);
    }
    return packs;
  }

  /** Records packs a session (or gc) stored and indexed, so this process finds their chunks without a reload. */
  private notePackIndex(indexIds: string[], packs: PackContents[]): void {
    const state = this.packIndexState;
    if (!state) return;
    for (const p of packs) state.map.add(p);
    for (const id of indexIds) state.loaded.add(id);
  }

  /** @internal Stores pack index objects for `packs`; their ids. */
  async writePackIndexes(packs: PackContents[]): Promise<string[]> {
    const ids: string[] = [];
    for (const body of encodePackIndexes(packs)) {
      const id = this.hashId(body);
      const key = packIndexKey(id);
      await this.backend.put(key, await this.seal('pack-index', key, body));
      ids.push(id);
    }
    this.notePackIndex(ids, packs);
    return ids;
  }

  /** @internal A pack writer storing into this repository. */
  packWriter(): PackWriter {
    const sink: PackSink = {
      sealHeader: (key, plain) => this.seal('pack-header', key, plain),
      recycle: (sealed) => this.recycle(sealed),
      put: (key, data) => this.backend.put(key, data, { deferred: true }),
      allocate: (size) => this.backend.allocate?.(size) ?? Promise.resolve(Buffer.allocUnsafeSlow(size)),
      maxChunkObject: this.maxChunkObject,
      packSize: this.packSize,
    };
    return new PackWriter(sink);
  }

  /**
   * One chunk's plaintext, checked: it must open, hash to its id and, when given, have the slot's length.
   * REPOSITORY_CORRUPT (details.problem: missing, truncated, corrupt) otherwise.
   */
  async readChunk(id: string, expectLength?: number): Promise<Buffer> {
    if (!HEX_ID.test(id)) throw new InvalidArgumentError(`"${id}" is not a chunk id`);
    const map = this.packIndexState?.map.has(id) ? this.packIndexState.map : (await this.packIndexes()).map;
    return (await this.readChunkIn(map, id, expectLength)).plain;
  }

  /** Where a chunk's envelope is stored: its pack's key and the byte range in it (null: no pack index lists it). */
  async locateChunk(id: string): Promise<{ key: string; offset: number; length: number } | null> {
    const loc = (await this.packIndexes()).map.get(id);
    return loc ? { key: packKey(loc.pack), offset: loc.offset, length: loc.length } : null;
  }

  /**
   * A chunk's plaintext, checked (see readChunk). Large reads may go through a buffer of `scratch` (reused, one
   * per read at a time); the caller may recycle() the plaintext once done with it.
   */
  async readChunkIn(
    map: ChunkMap,
    id: string,
    expectLength?: number,
    scratch?: Buffer[],
  ): Promise<{ plain: Buffer; storedBytes: number }> {
    const loc = map.get(id);
    if (!loc) {
      throw damaged('chunk', chunkKey(id), 'missing', `chunk ${id} is missing: no pack index lists it`);
    }
    const key = packKey(loc.pack);
    // The codec checks the content against the id where it opens it (a worker).
    const into = scratch ? (scratch.pop() ?? Buffer.allocUnsafeSlow(this.maxChunkObject)) : undefined;
    let r;
    try {
      r = await this.load('chunk', key, this.chunkSize, `chunk ${id}`, 'damage', {
        ...loc,
        name: chunkKey(id),
        expectId: id,
        into,
      });
    } finally {
      if (into) scratch!.push(into); // the codec has its own copy once open() settles
    }
    if (expectLength !== undefined && r.plain.length !== expectLength) {
      throw damaged(
        'chunk',
        key,
        'corrupt',
        `chunk ${id} holds ${r.plain.length} bytes where its slot has ${expectLength}`,
      );
    }
    return r;
  }

  /** A disk index by reference (or id); checked against its name and, from a ref, the geometry it promises. */
  async readIndex(ref: IndexRef | string): Promise<DiskIndex> {
    const id = typeof ref === 'string' ? ref : ref.id;
    if (!HEX_ID.test(id)) throw new InvalidArgumentError(`"${id}" is not an index id`);
    const key = indexKey(id);
    const maxPlain =
      typeof ref === 'string'
        ? indexBodySize(MAX_INDEX_SLOTS)
        : indexBodySize(Math.min(slotCountFor(ref.virtualSize, this.chunkSize), MAX_INDEX_SLOTS));
    const { plain } = await this.load('index', key, maxPlain, `index ${id}`, 'damage');
    let index: DiskIndex;
    try {
      index = decodeIndex(plain, this.chunkSize, typeof ref === 'string' ? undefined : ref.virtualSize);
    } catch (err) {
      if (err instanceof IndexFormatError) {
        throw damaged('index', key, err.problem, `index ${id} is damaged: ${err.message}`, err);
      }
      throw err;
    }
    if (this.hashId(plain) !== id) {
      throw damaged('index', key, 'corrupt', `index ${id} is damaged: its content does not hash to its name`);
    }
    return index;
  }

  /**
   * Entries under `prefix` named like the objects `shape` matches (its first group: the id) that are not objects,
   * each as damage to `object`.
   */
  async unusableEntries(
    prefix: string,
    shape: RegExp,
    object: Damage['object'],
    what: string,
  ): Promise<Map<string, EntryDamage & { id: string }>> {
    const out = new Map<string, EntryDamage & { id: string }>();
    for await (const o of this.backend.list(prefix, { unusable: true })) {
      const m = shape.exec(o.key);
      if (!m || !o.unusable) continue;
      out.set(m[1], {
        object,
        key: o.key,
        id: m[1],
        problem: 'unreadable',
        message: unusableMessage(`${what} ${m[1]}`, o),
      });
    }
    return out;
  }

  /** The chunks a pack's own header lists (what rebuilds its index entry). */
  async readPackHeader(packId: string, size: number): Promise<PackEntry[]> {
    const key = packKey(packId);
    const corrupt = (why: string) => damaged('pack', key, 'corrupt', `pack ${packId} is damaged: ${why}`);
    if (size < PACK_TRAILER_SIZE) throw corrupt(`${size} bytes`);
    let trailer: Buffer;
    try {
      trailer = await this.backend.get(key, {
        range: { offset: size - PACK_TRAILER_SIZE, length: PACK_TRAILER_SIZE },
      });
    } catch (err) {
      if ((err as TidemarkError).code === 'NOT_FOUND')
        throw damaged('pack', key, 'missing', `pack ${packId} is missing`);
      if (isUnreadableEntry(err)) {
        throw damaged('pack', key, 'unreadable', `pack ${packId} cannot be read: ${(err as Error).message}`, err);
      }
      throw err;
    }
    if (trailer.length < PACK_TRAILER_SIZE) throw corrupt('shorter than listed');
    const headerLength = trailer.readUInt32LE(0);
    if (headerLength > MAX_PACK_HEADER_OBJECT || headerLength + PACK_TRAILER_SIZE > size) {
      throw corrupt(`its header claims ${headerLength} bytes`);
    }
    const dataEnd = size - PACK_TRAILER_SIZE - headerLength;
    const { plain } = await this.load(
      'pack-header',
      key,
      MAX_PACK_HEADER_OBJECT,
      `header of pack ${packId}`,
      'damage',
      {
        offset: dataEnd,
        length: headerLength,
        name: key,
      },
    );
    try {
      return decodePackHeader(plain, this.maxChunkObject, dataEnd);
    } catch (err) {
      if (err instanceof PackFormatError) throw corrupt(err.message);
      throw err;
    }
  }

  /** Every pack stored, by id; and the entries named like packs that are not objects, with their messages. */
  async storedPacks(): Promise<{
    packs: Map<string, ObjectInfo>;
    unusable: Map<string, { key: string; message: string }>;
  }> {
    const packs = new Map<string, ObjectInfo>();
    const unusable = new Map<string, { key: string; message: string }>();
    for await (const o of this.backend.list('packs/', { unusable: true })) {
      const m = /^packs\/([0-9a-f]{2})\/([0-9a-f]{64})$/.exec(o.key);
      if (!m || !m[2].startsWith(m[1])) continue;
      if (o.unusable) unusable.set(m[2], { key: o.key, message: unusableMessage(`pack ${m[2]}`, o) });
      else packs.set(m[2], o);
    }
    return { packs, unusable };
  }

  /**
   * Pack indexes listing `packs` take the place of every pack index there is: the new ones durable before any old
   * one goes (a crash in between leaves both, which list the same chunks in packs that all still exist).
   */
  async replacePackIndexes(packs: PackContents[]): Promise<void> {
    const old: string[] = [];
    // Only objects: an entry that is not one (reported as damage) is left for a person to look at.
    for await (const o of this.backend.list('packindex/')) old.push(o.key);
    const fresh = new Set((await this.writePackIndexes(packs)).map(packIndexKey));
    await this.backend.sync();
    await forEachBounded(
      old.filter((k) => !fresh.has(k)),
      16,
      (k) => this.backend.delete(k),
    );
    await this.backend.sync();
    this.packIndexState = null;
  }
}
