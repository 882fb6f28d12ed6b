/**
 * The backup session: writing one restore point. Chunks go into packs (deduplicated against what the repository
 * held when the session began, under its shared lock), each disk's index is stored, and commit() makes the packs,
 * their pack indexes and the indexes durable before it writes the manifest, last, atomically.
 */
import { TidemarkError, InvalidArgumentError } from '../errors.js';
import { isAllZero } from '../util/zero.js';
import { checkIndexGeometry, encodeIndex, IndexBuilder } from './disk-index.js';
import type { RepositoryLock } from './lock.js';
import {
  checkManifest,
  encodeManifest,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  newPointId,
  pointKey,
  type DiskStats,
  type IndexRef,
  type PointInput,
  type PointManifest,
} from './manifest.js';
import type { ChunkMap, PackWriter } from './pack.js';
import { chunkKey, indexKey, type ObjectStore } from './store.js';

/** What a backup session needs of the repository. */
type SessionStore = Pick<
  ObjectStore,
  | 'backend'
  | 'chunkSize'
  | 'hashId'
  | 'integrity'
  | 'location'
  | 'lock'
  | 'packIndexes'
  | 'packWriter'
  | 'readIndex'
  | 'recycle'
  | 'seal'
  | 'writePackIndexes'
  | 'writers'
>;

export interface PutResult {
  /** the chunk's id, or null for an all-zero chunk (never stored) */
  id: string | null;
  /** stored by this call (false: the repository had it, or it is zero) */
  isNew: boolean;
  /** bytes this call added to the repository */
  storedBytes: number;
}

export interface DiskWriteStats extends DiskStats {
  chunksNew: number;
  chunksReused: number;
  zeroChunks: number;
}

/** A backup session under a shared lock: chunks and indexes, then commit() writes the manifest, or abort(). */
export async function startBackup(store: SessionStore, opts: { operation?: string } = {}): Promise<BackupSession> {
  if (store.integrity.keyMissing) {
    // Its manifest could not carry the MAC: every machine that holds the key would refuse it as forged.
    throw new InvalidArgumentError(
      `repository ${store.location} authenticates its restore points with an integrity key this machine does not hold: copy it from a machine that does (\`tidemark repo key export FILE\`, then here \`tidemark repo key import FILE\`)`,
    );
  }
  const lock = await store.lock('shared', opts.operation ?? 'backup');
  let known: ChunkMap;
  try {
    // Read under the lock: what a chunk is deduplicated against can no longer be removed by gc (§9).
    known = (await store.packIndexes()).map;
  } catch (err) {
    await lock.release();
    throw err;
  }
  const session = new BackupSession(store, lock, known, () => store.writers.delete(session));
  store.writers.add(session);
  return session;
}

/** Writes a restore point's manifest, once everything it names is durable. */
export async function commitManifest(store: SessionStore, m: PointManifest): Promise<void> {
  const key = pointKey(m.id);
  // Everything the manifest points at must be durable before the manifest exists.
  await store.backend.sync();
  const sealed = await store.seal('manifest', key, encodeManifest(m));
  await store.backend.put(key, sealed, { sync: true });
}

type SessionState = 'open' | 'committed' | 'aborted';

/**
 * One backup in progress. Chunks and indexes go in first (each object durable before the manifest), commit()
 * writes the manifest last and releases the shared lock. A session that never commits (abort, crash) leaves
 * every earlier point as it was; what it wrote is garbage for gc.
 */
export class BackupSession {
  readonly pointId: string;
  readonly startedAt: Date;
  private state: SessionState = 'open';
  /** chunks this session stored */
  private readonly present = new Set<string>();
  private readonly inflight = new Map<string, Promise<PutResult>>();
  private readonly indexes = new Set<string>();
  private readonly packs: PackWriter;

  /** @internal */
  constructor(
    private readonly store: SessionStore,
    private readonly lock: RepositoryLock,
    /** the chunks the repository held when the session began (under its lock) */
    private readonly known: ChunkMap,
    private readonly onEnd: () => void,
  ) {
    this.packs = store.packWriter();
    this.startedAt = new Date();
    this.pointId = newPointId(this.startedAt);
  }

  get isOpen(): boolean {
    return this.state === 'open';
  }

  private checkOpen(): void {
    if (this.state !== 'open') {
      throw new TidemarkError('CLOSED', `backup session ${this.pointId} is ${this.state}`);
    }
  }

  /**
   * Stores one chunk's plaintext (at most the chunk size) unless the repository has it; an all-zero chunk is
   * never stored (id null). Safe to call many times at once (that is how the codec workers are kept busy);
   * `plaintext` must stay unchanged until the promise settles.
   */
  async putChunk(plaintext: Uint8Array): Promise<PutResult> {
    this.checkOpen();
    const repo = this.store;
    if (plaintext.length === 0 || plaintext.length > repo.chunkSize) {
      throw new InvalidArgumentError(`a chunk holds 1 to ${repo.chunkSize} bytes, not ${plaintext.length}`);
    }
    if (isAllZero(plaintext)) return { id: null, isNew: false, storedBytes: 0 };
    const id = repo.hashId(plaintext);
    if (this.present.has(id) || this.known.has(id)) return { id, isNew: false, storedBytes: 0 };
    const running = this.inflight.get(id);
    if (running) {
      await running;
      return { id, isNew: false, storedBytes: 0 };
    }
    const work = (async (): Promise<PutResult> => {
      const sealed = await repo.seal('chunk', chunkKey(id), plaintext);
      await this.packs.add(id, sealed);
      const storedBytes = sealed.length;
      repo.recycle(sealed); // copied into the pack
      return { id, isNew: true, storedBytes };
    })();
    this.inflight.set(id, work);
    try {
      const r = await work;
      this.present.add(id);
      return r;
    } finally {
      this.inflight.delete(id);
    }
  }

  /**
   * The index of one disk of this point: a copy of `base` (the previous point's index of that disk, for an
   * incremental) or all zero. Put the slots that changed; the others keep the base's chunks.
   */
  async openIndex(opts: { virtualSize: number; base?: IndexRef | string | null }): Promise<DiskWriter> {
    this.checkOpen();
    const repo = this.store;
    checkIndexGeometry(opts.virtualSize, repo.chunkSize);
    let builder: IndexBuilder;
    if (opts.base) {
      const base = await repo.readIndex(opts.base);
      if (base.virtualSize !== opts.virtualSize) {
        throw new InvalidArgumentError(
          `the base index covers ${base.virtualSize} bytes but the disk has ${opts.virtualSize}: read the disk in full`,
        );
      }
      builder = IndexBuilder.from(base);
    } else {
      builder = IndexBuilder.empty(repo.chunkSize, opts.virtualSize);
    }
    return new DiskWriter(this, builder);
  }

  /** Stores a disk's index (unless an identical one exists) and returns the reference the manifest holds. */
  async writeIndex(disk: DiskWriter): Promise<IndexRef> {
    this.checkOpen();
    const repo = this.store;
    const body = encodeIndex(disk.index);
    const id = repo.hashId(body);
    const key = indexKey(id);
    if (!(await repo.backend.exists(key))) await repo.backend.put(key, await repo.seal('index', key, body));
    this.indexes.add(id);
    return {
      id,
      virtualSize: disk.index.virtualSize,
      chunkSize: disk.index.chunkSize,
      storedSlots: disk.index.nonZeroSlots(),
    };
  }

  /**
   * Writes the restore point's manifest (last, atomically, durably) and ends the session. A manifest that does
   * not validate throws INVALID_ARGUMENT and leaves the session open; a failed write aborts it.
   */
  async commit(input: PointInput): Promise<PointManifest> {
    this.checkOpen();
    const repo = this.store;
    const sums = { bytesRead: 0, bytesNew: 0, bytesStored: 0 };
    for (const vm of input.vms ?? []) {
      for (const d of vm.disks ?? []) {
        sums.bytesRead += d.stats?.bytesRead ?? 0;
        sums.bytesNew += d.stats?.bytesNew ?? 0;
        sums.bytesStored += d.stats?.bytesStored ?? 0;
      }
    }
    const manifest = checkManifest({
      ...input,
      format: MANIFEST_FORMAT,
      version: MANIFEST_VERSION,
      id: this.pointId,
      time: input.time ?? this.startedAt.toISOString(),
      statistics: input.statistics ?? { ...sums, durationMs: Date.now() - this.startedAt.getTime() },
    });
    for (const vm of manifest.vms) {
      for (const d of vm.disks) {
        const where = `manifest: VM ${vm.name} disk ${d.name}`;
        if (d.index.chunkSize !== repo.chunkSize) {
          throw new InvalidArgumentError(`${where}: index chunk size ${d.index.chunkSize} is not ${repo.chunkSize}`);
        }
        if (d.index.virtualSize !== d.virtualSize) {
          throw new InvalidArgumentError(
            `${where}: index covers ${d.index.virtualSize} bytes, the disk has ${d.virtualSize}`,
          );
        }
        if (!this.indexes.has(d.index.id) && !(await repo.backend.exists(indexKey(d.index.id)))) {
          throw new InvalidArgumentError(`${where}: index ${d.index.id} does not exist`);
        }
      }
    }
    if (manifest.parentId !== null && !(await repo.backend.exists(pointKey(manifest.parentId)))) {
      throw new InvalidArgumentError(`manifest: parent restore point ${manifest.parentId} does not exist`);
    }
    try {
      // The last pack; the packs durable and in place before the index that lists them can be seen (a crash in
      // between leaves packs no index lists, which gc removes); commitManifest makes the index durable.
      const written = await this.packs.finish();
      if (written.length > 0) {
        await repo.backend.sync();
        await repo.writePackIndexes(written);
      }
      await commitManifest(repo, manifest);
    } catch (err) {
      await this.abort().catch(() => undefined);
      throw err;
    }
    this.state = 'committed';
    await this.end();
    return manifest;
  }

  /** Ends the session without a restore point; what it stored stays until gc. */
  async abort(): Promise<void> {
    if (this.state !== 'open') return;
    this.state = 'aborted';
    await this.end();
  }

  private async end(): Promise<void> {
    this.onEnd();
    await this.packs.abandon();
    // Staged packs take their place before the lock goes (an aborted session's are orphans gc may then remove).
    await this.store.backend.sync().catch(() => undefined);
    await this.lock.release();
  }
}

/** One disk's index being written in a session, with the disk's statistics. */
export class DiskWriter {
  private readonly counters: DiskWriteStats = {
    bytesRead: 0,
    bytesNew: 0,
    bytesStored: 0,
    chunksNew: 0,
    chunksReused: 0,
    zeroChunks: 0,
  };

  /** @internal */
  constructor(
    readonly session: BackupSession,
    readonly index: IndexBuilder,
  ) {}

  get chunkSize(): number {
    return this.index.chunkSize;
  }

  private slotOf(offset: number, length: number): number {
    const slot = offset / this.chunkSize;
    if (!Number.isInteger(slot) || slot < 0 || slot >= this.index.slotCount) {
      throw new InvalidArgumentError(
        `offset ${offset} is not a chunk boundary of the disk (chunks of ${this.chunkSize} bytes, disk of ${this.index.virtualSize})`,
      );
    }
    if (length !== this.index.slotLength(slot)) {
      throw new InvalidArgumentError(
        `the chunk at offset ${offset} is ${this.index.slotLength(slot)} bytes, not ${length}: read whole chunks`,
      );
    }
    return slot;
  }

  /** Stores the whole chunk at `offset` (chunk-aligned; the chunk size, or what is left at the end of the disk). */
  async put(offset: number, data: Uint8Array): Promise<PutResult> {
    const slot = this.slotOf(offset, data.length);
    const r = await this.session.putChunk(data);
    this.index.set(slot, r.id);
    this.counters.bytesRead += data.length;
    if (r.id === null) this.counters.zeroChunks++;
    else if (r.isNew) {
      this.counters.chunksNew++;
      this.counters.bytesNew += data.length;
      this.counters.bytesStored += r.storedBytes;
    } else this.counters.chunksReused++;
    return r;
  }

  /** Marks whole chunks as all zero without reading them (unallocated or discarded ranges). */
  zero(offset: number, length: number): void {
    if (length === 0) return;
    const first = offset / this.chunkSize;
    const end = offset + length;
    if (!Number.isInteger(first) || first < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw new InvalidArgumentError(`zero range at ${offset} does not start on a chunk boundary`);
    }
    if (end > this.index.virtualSize || (end !== this.index.virtualSize && end % this.chunkSize !== 0)) {
      throw new InvalidArgumentError(`zero range ending at ${end} does not end on a chunk boundary of the disk`);
    }
    const last = Math.ceil(end / this.chunkSize);
    for (let s = first; s < last; s++) this.index.set(s, null);
  }

  stats(): DiskWriteStats {
    return { ...this.counters };
  }
}
