/**
 * The backup repository: a deduplicating, compressed, (optionally) encrypted chunk store with per-disk indexes and
 * restore-point manifests, over a Backend. docs/formats/repository.md describes every object; this class is the
 * library API the backup application uses:
 *
 *   const repo = await Repository.open(path, { passphrase });
 *   const session = await repo.startBackup();                  // shared lock
 *   const disk = await session.openIndex({ virtualSize, base }); // base: the previous point's index, or none
 *   await disk.put(offset, data);                              // changed slots only (for an incremental)
 *   const index = await session.writeIndex(disk);
 *   await session.commit({ flow, parentId, vms: [...{ disks: [...{ index, stats: disk.stats() }] }], snapshots });
 *
 * It is a facade over the repository's parts, as proxmox-backup splits its datastore, each in its own file:
 *   store.ts        the open repository: objects, keys, the pack-index cache, locks
 *   open.ts         opening and creating one; integrity keys between machines
 *   session.ts      the backup session: chunks, packs, indexes, the manifest committed last
 *   points.ts       listing and reading restore points
 *   restore.ts      restoring a disk of a point
 *   verify.ts       re-reading and re-hashing, damage and the points it affects
 *   maintenance.ts  prune, gc (mark, sweep, repack), rebuilding the pack indexes
 *   info.ts         what the repository holds, and its locks
 */
import type { Backend } from './backend.js';
import type { RepositoryConfig } from './config.js';
import type { DamageError } from './damage.js';
import type { DiskIndex } from './disk-index.js';
import type { ObjectType } from './envelope.js';
import { info, listRepositoryLocks, unlock, type RepositoryInfo } from './info.js';
import type { LockEntry } from './lock.js';
import { gc, prune, repairPackIndexes, type GcReport, type PruneOptions, type PruneReport } from './maintenance.js';
import type { DiskEntry, IndexRef, PointManifest } from './manifest.js';
import { createStore, exportTrust, importTrust, openStore, type InitOptions, type OpenOptions } from './open.js';
import type { ChunkMap, PackContents, PackEntry, PackWriter } from './pack.js';
import {
  findDisk,
  forgetPoint,
  latestPoint,
  latestPoints,
  listPointIds,
  listPoints,
  pointEntries,
  readPoint,
  resolvePoint,
  type DamagedPoint,
  type PointSummary,
} from './points.js';
import { restoreDisk, type RestoreOptions, type RestoreResult, type RestoreSink } from './restore.js';
import { commitManifest, startBackup, type BackupSession } from './session.js';
import type { IntegrityState, ObjectStore } from './store.js';
import type { TrustEntry } from './trust.js';
import { verify, type VerifyOptions, type VerifyReport } from './verify.js';

export class Repository {
  private constructor(private readonly store: ObjectStore) {}

  /** Creates a repository (an empty or missing directory, or an empty backend) and opens it. */
  static async init(location: string | Backend, opts: InitOptions & OpenOptions = {}): Promise<Repository> {
    return new Repository(await createStore(location, opts));
  }

  static async open(location: string | Backend, opts: OpenOptions = {}): Promise<Repository> {
    return new Repository(await openStore(location, opts));
  }

  get backend(): Backend {
    return this.store.backend;
  }

  get config(): RepositoryConfig {
    return this.store.config;
  }

  get integrity(): IntegrityState {
    return this.store.integrity;
  }

  get chunkSize(): number {
    return this.store.chunkSize;
  }

  get location(): string {
    return this.store.location;
  }

  get encrypted(): boolean {
    return this.store.encrypted;
  }

  /**
   * What another machine needs to authenticate this repository's restore points: this machine's entry for it
   * (its integrity key). NOT_FOUND when this machine holds no key (encrypted repositories need none).
   */
  exportTrust(): TrustEntry {
    return exportTrust(this.store);
  }

  /**
   * Keeps an integrity key (from `repo key export` on another machine) for this repository on this machine, once
   * it is shown to be this repository's (its config's MAC matches). The file it was stored in.
   */
  importTrust(entry: TrustEntry): Promise<string> {
    return importTrust(this.store, entry);
  }

  /** Aborts open backup sessions (releasing their locks) and stops the codec workers. */
  close(): Promise<void> {
    return this.store.close();
  }

  /** The id of a chunk (or index body): SHA-256, or HMAC-SHA-256 under the repository's id key when encrypted. */
  hashId(data: Uint8Array): string {
    return this.store.hashId(data);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Objects (store.ts)

  /** Gives a sealed buffer back for reuse once nothing uses it any more. @internal */
  recycle(sealed: Buffer): void {
    this.store.recycle(sealed);
  }

  /** @internal */
  seal(type: ObjectType, key: string, plain: Uint8Array): Promise<Buffer> {
    return this.store.seal(type, key, plain);
  }

  /** Where every chunk is (see ObjectStore.packIndexes); damaged pack indexes are left out and named. */
  packIndexes(opts: { reread?: boolean } = {}): Promise<{ map: ChunkMap; indexCount: number; damaged: DamageError[] }> {
    return this.store.packIndexes(opts);
  }

  /** @internal Stores pack index objects for `packs`; their ids. */
  writePackIndexes(packs: PackContents[]): Promise<string[]> {
    return this.store.writePackIndexes(packs);
  }

  /** @internal A pack writer storing into this repository. */
  packWriter(): PackWriter {
    return this.store.packWriter();
  }

  /**
   * One chunk's plaintext, checked: it must open, hash to its id and, when given, have the slot's length.
   * REPOSITORY_CORRUPT (details.problem: missing, truncated, corrupt) otherwise.
   */
  readChunk(id: string, expectLength?: number): Promise<Buffer> {
    return this.store.readChunk(id, expectLength);
  }

  /** Where a chunk's envelope is stored: its pack's key and the byte range in it (null: no pack index lists it). */
  locateChunk(id: string): Promise<{ key: string; offset: number; length: number } | null> {
    return this.store.locateChunk(id);
  }

  /** A disk index by reference (or id); checked against its name and, from a ref, the geometry it promises. */
  readIndex(ref: IndexRef | string): Promise<DiskIndex> {
    return this.store.readIndex(ref);
  }

  /** The chunks a pack's own header lists (what rebuilds its index entry). */
  readPackHeader(packId: string, size: number): Promise<PackEntry[]> {
    return this.store.readPackHeader(packId, size);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Restore points (points.ts)

  /** The id of every entry under points/ (oldest first), also those that are not objects (see pointEntries). */
  listPointIds(): Promise<string[]> {
    return listPointIds(this.store);
  }

  /** Every entry under points/ named like a restore point, and those of them that are not objects. */
  pointEntries(): Promise<{ ids: string[]; unusable: Map<string, string> }> {
    return pointEntries(this.store);
  }

  /** A full point id from an id or a unique prefix of one. */
  resolvePoint(idOrPrefix: string): Promise<string> {
    return resolvePoint(this.store, idOrPrefix);
  }

  readPoint(idOrPrefix: string): Promise<PointManifest> {
    return readPoint(this.store, idOrPrefix);
  }

  /** Every restore point (oldest first), optionally only those holding a VM (by name or id). */
  listPoints(opts: { vm?: string } = {}): Promise<{ points: PointSummary[]; damaged: DamagedPoint[] }> {
    return listPoints(this.store, opts);
  }

  /** The newest restore point holding a VM (by name or id), or null: the base of the next incremental. */
  latestPoint(vm: string): Promise<PointManifest | null> {
    return latestPoint(this.store, vm);
  }

  /** The newest restore point of each VM, with one pass over the points (the bases of a run's incrementals). */
  latestPoints(vms: string[]): Promise<Map<string, PointManifest | null>> {
    return latestPoints(this.store, vms);
  }

  /** Removes one restore point's manifest (exclusive lock): the way out for a point verify found damaged. */
  forgetPoint(idOrPrefix: string): Promise<string> {
    return forgetPoint(this.store, idOrPrefix);
  }

  /** Finds a disk of a point by its virtual disk id (or, failing that, its name). */
  findDisk(m: PointManifest, disk: string): { vm: PointManifest['vms'][number]; disk: DiskEntry } {
    return findDisk(m, disk);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Backup (session.ts)

  /** A backup session under a shared lock: chunks and indexes, then commit() writes the manifest, or abort(). */
  startBackup(opts: { operation?: string } = {}): Promise<BackupSession> {
    return startBackup(this.store, opts);
  }

  /** @internal */
  commitManifest(m: PointManifest): Promise<void> {
    return commitManifest(this.store, m);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Restore (restore.ts)

  /**
   * Writes a disk of a restore point to `sink`, fetching, opening and checking up to `parallel` chunks at once,
   * under a shared lock (see restore.ts).
   */
  restoreDisk(pointId: string, diskId: string, sink: RestoreSink, opts: RestoreOptions = {}): Promise<RestoreResult> {
    return restoreDisk(this.store, pointId, diskId, sink, opts);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Verify (verify.ts)

  /**
   * Re-reads and re-hashes every chunk of one point (or of all), and reports each damaged or missing chunk, index
   * and manifest with every restore point it affects — those outside the scope too.
   */
  verify(pointId?: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
    return verify(this.store, pointId, opts);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Maintenance (maintenance.ts)

  /** Applies a retention policy and removes the manifests it does not keep; the chunks stay until gc(). */
  prune(opts: PruneOptions): Promise<PruneReport> {
    return prune(this.store, opts);
  }

  /** Mark and sweep (and repack) under an exclusive lock; see maintenance.ts. */
  gc(opts: { dryRun?: boolean } = {}): Promise<GcReport> {
    return gc(this.store, opts);
  }

  /** Rebuilds the pack indexes from the packs' own headers (exclusive lock). */
  repairPackIndexes(): Promise<{ packs: number; chunks: number; unreadable: { key: string; message: string }[] }> {
    return repairPackIndexes(this.store);
  }

  // ---------------------------------------------------------------------------------------------------------
  // Info and locks (info.ts)

  /** What the repository is and holds; entries that cannot be read are reported in `damage`. */
  info(): Promise<RepositoryInfo> {
    return info(this.store);
  }

  locks(): Promise<LockEntry[]> {
    return listRepositoryLocks(this.store);
  }

  /** Removes the locks of dead local processes; with force, every lock (only when no holder is alive!). */
  unlock(opts: { force?: boolean } = {}): Promise<LockEntry[]> {
    return unlock(this.store, opts);
  }
}
