/**
 * The backup repository: a deduplicating, compressed, (optionally) encrypted chunk store with per-disk indexes and
 * restore-point manifests, over a Backend. docs/formats/repository.md describes every object; this file is the
 * library API the backup application uses:
 *
 *   const repo = await Repository.open(path, { passphrase });
 *   const session = await repo.startBackup();                  // shared lock
 *   const disk = await session.openIndex({ virtualSize, base }); // base: the previous point's index, or none
 *   await disk.put(offset, data);                              // changed slots only (for an incremental)
 *   const index = await session.writeIndex(disk);
 *   await session.commit({ flow, parentId, vms: [...{ disks: [...{ index, stats: disk.stats() }] }], snapshots });
 */
import { createHash, createHmac, randomUUID } from 'node:crypto';
import { readdir, stat } from 'node:fs/promises';
import { TidemarkError, InvalidArgumentError } from '../errors.js';
import { isAllZero, ZEROES } from '../util/zero.js';
import type { Backend, ObjectInfo } from './backend.js';
import { forEachBounded, MemoryBudget } from '../util/bounded.js';
import {
  checkChunkSize,
  checkConfigMac,
  configMac,
  CONFIG_KEY,
  decodeConfig,
  DEFAULT_CHUNK_SIZE,
  encodeConfig,
  FORMAT_NAME,
  FORMAT_VERSION,
  integrityConfigMac,
  integrityMacMatches,
  type RepositoryConfig,
} from './config.js';
import {
  defaultTrustDir,
  integrityKeyFor,
  integrityKeyOf,
  newIntegrityKey,
  trustEntry,
  trustFile,
  writeTrust,
  type TrustEntry,
} from './trust.js';
import {
  checkIndexGeometry,
  decodeIndex,
  DiskIndex,
  encodeIndex,
  IndexBuilder,
  IndexFormatError,
  indexBodySize,
  MAX_INDEX_SLOTS,
  slotCountFor,
} from './disk-index.js';
import { MAX_MANIFEST_OVERHEAD, MAX_OVERHEAD, type ObjectType } from './envelope.js';
import {
  deriveIntegrityKeys,
  deriveKeys,
  makeSlot,
  newMasterKey,
  readKeyFile,
  unwrapMaster,
  type KeySlot,
  type RepositoryKeys,
  type Secret,
} from './keys.js';
import { LocalBackend } from './local-backend.js';
import { acquireLock, breakStaleLocks, listLocks, type LockEntry, type RepositoryLock } from './lock.js';
import {
  checkManifest,
  decodeManifest,
  encodeManifest,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  MAX_MANIFEST_BYTES,
  newPointId,
  pointKey,
  POINT_ID,
  type DiskEntry,
  type DiskStats,
  type IndexRef,
  type PointInput,
  type PointManifest,
  type PointStatistics,
} from './manifest.js';
import {
  ChunkMap,
  decodePackHeader,
  decodePackIndex,
  DEFAULT_PACK_SIZE,
  encodePackIndexes,
  MAX_PACK_SIZE,
  MIN_PACK_SIZE,
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
import { CodecError, createCodec, type Codec } from './pool.js';
import { applyRetention, checkPolicy, type RetentionDecision, type RetentionPolicy } from './retention.js';

const HEX_ID = /^[0-9a-f]{64}$/;
/**
 * Bytes of disk-index slot tables read at once by verify and gc (an index holds up to 512 MiB: a larger one is read
 * alone), so that reading many indexes side by side cannot add up to more than this.
 */
const INDEX_MEMORY_BUDGET = 256 * 2 ** 20;
/** how long a temporary file of an interrupted put must lie untouched before gc removes it */
const TEMPORARY_GRACE_MS = 60 * 60 * 1000;

/** The name a chunk is sealed under (bound into its encryption): chunks live in packs, not under this key. */
export function chunkKey(id: string): string {
  return `chunks/${id.slice(0, 2)}/${id}`;
}
export function indexKey(id: string): string {
  return `indexes/${id}`;
}

export interface InitOptions {
  /** power of two, 64 KiB–8 MiB; default 1 MiB */
  chunkSize?: number;
  /** encrypt, with this passphrase opening the repository */
  passphrase?: string;
  /** encrypt, with this key file opening the repository (both may be given: two key slots) */
  keyFile?: string;
  /** scrypt cost as log2(N), 15–20; default 17 */
  scryptLogN?: number;
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

export interface OpenOptions {
  passphrase?: string;
  keyFile?: string;
  /** codec worker threads (0: compress and encrypt on the calling thread); default one per core, up to 4 */
  workers?: number;
  /** zstd level for what this process writes; default 3 */
  compressionLevel?: number;
  /** close the packs this process writes at this many bytes (4 KiB–256 MiB); default 16 MiB */
  packSize?: number;
  /** where this machine keeps integrity keys and what it knows of repositories (trust.ts); default defaultTrustDir() */
  trustDir?: string;
}

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

export interface RestoreSink {
  write(offset: number, data: Buffer): Promise<void>;
  /** zero a range (punch a hole, write zeros); when absent, zero ranges are written as zero bytes */
  zero?(offset: number, length: number): Promise<void>;
}

export interface RestoreOptions {
  /** chunks fetched and opened at once; default 8 */
  parallel?: number;
  /** the target already reads as zeros (a new sparse file): zero slots are skipped */
  assumeZeroed?: boolean;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface RestoreResult {
  pointId: string;
  diskId: string;
  virtualSize: number;
  bytesWritten: number;
  zeroBytes: number;
  chunksRead: number;
  durationMs: number;
}

export interface PointSummary {
  id: string;
  time: string;
  flow: string;
  parentId: string | null;
  snapshots: number;
  statistics: PointStatistics;
  vms: {
    name: string;
    id: string;
    consistency: 'application' | 'crash';
    freezeWindowMs: number | null;
    disks: Pick<DiskEntry, 'diskId' | 'name' | 'virtualSize' | 'read' | 'fullReason' | 'rctId' | 'stats'>[];
  }[];
}

export interface DamagedPoint {
  id: string;
  code: string;
  message: string;
}

export interface Affected {
  pointId: string;
  vm?: string;
  diskId?: string;
  disk?: string;
  /** stored slots of that disk the damage covers */
  slots?: number;
  /** the first few byte offsets of those slots */
  offsets?: number[];
}

export interface Damage {
  object: 'chunk' | 'index' | 'manifest' | 'pack-index' | 'pack';
  /** the object holding the damage: for a chunk, its pack (or, when no pack index lists it, its name) */
  key: string;
  /** where in its pack a damaged chunk lies */
  range?: { offset: number; length: number };
  id: string;
  /** unreadable: the entry is not an object (a symlink, FIFO, directory, …) or the backend cannot read it */
  problem: 'missing' | 'truncated' | 'corrupt' | 'unreadable';
  message: string;
  affects: Affected[];
}

/** A repository entry that cannot be read, as `repo info` reports it. */
export interface EntryDamage {
  object: Damage['object'];
  key: string;
  problem: Damage['problem'];
  message: string;
}

export interface VerifyOptions {
  /** chunks read and checked at once; default 8 */
  parallel?: number;
  /**
   * After each chunk: the stored bytes read so far of those the pack indexes list for the chunks to check (a
   * throughput, for a progress bar), and the chunks done of all.
   */
  onProgress?: (p: { doneBytes: number; totalBytes: number; doneChunks: number; totalChunks: number }) => void;
}

export interface VerifyReport {
  ok: boolean;
  /** restore points are authenticated on this machine (false: a forged one would pass as real; see repo info) */
  authenticated: boolean;
  /** 'all', or the point verified */
  scope: string;
  checked: { points: number; indexes: number; chunks: number; packs: number; storedBytes: number };
  damage: Damage[];
  /** every restore point some damage affects, oldest first */
  affectedPoints: string[];
}

export interface PruneOptions extends RetentionPolicy {
  dryRun?: boolean;
}

export interface PruneEntry extends RetentionDecision {
  vms: string[];
}

export interface PruneReport {
  dryRun: boolean;
  kept: PruneEntry[];
  removed: PruneEntry[];
  /** points whose manifest cannot be read: never removed by prune */
  damaged: DamagedPoint[];
}

export interface GcReport {
  dryRun: boolean;
  points: number;
  indexesKept: number;
  indexesRemoved: number;
  chunksKept: number;
  /** chunks no restore point references, dropped from the packs (also those of packs no index lists) */
  chunksRemoved: number;
  packsKept: number;
  /** packs deleted: wholly unreferenced, repacked, or listed by no pack index (left by an interrupted backup) */
  packsRemoved: number;
  /** packs rewritten holding only their referenced chunks (the new packs are counted in packsWritten) */
  packsRepacked: number;
  packsWritten: number;
  /** bytes of packs and indexes deleted, less the bytes of the packs written */
  bytesRemoved: number;
  temporaryRemoved: number;
  /** indexes the manifests name that do not exist (their points are damaged; verify names them) */
  missingIndexes: string[];
}

export interface RepositoryInfo {
  location: string;
  id: string;
  formatVersion: number;
  createdAt: string;
  chunkSize: number;
  chunkId: 'sha256' | 'hmac-sha256';
  compression: 'zstd';
  encryption: null | { cipher: 'aes-256-gcm'; keySlots: KeySlot['kind'][] };
  /** how restore points are authenticated on this machine */
  integrity: { mode: IntegrityState['mode']; authenticated: boolean; keyMissing: boolean };
  points: number;
  indexes: { count: number; bytes: number };
  /** chunks the pack indexes list, and the bytes of their envelopes */
  chunks: { count: number; bytes: number };
  packs: { count: number; bytes: number };
  packIndexes: { count: number; bytes: number };
  locks: LockEntry[];
  /** entries under points/, indexes/, packs/ and packindex/ that are not objects, and pack indexes that do not read */
  damage: EntryDamage[];
}

/** A stored object that cannot be used: REPOSITORY_CORRUPT with what verify needs in `details`. */
function damaged(
  object: Damage['object'],
  key: string,
  problem: Damage['problem'],
  message: string,
  cause?: unknown,
): DamageError {
  return new TidemarkError('REPOSITORY_CORRUPT', message, { object, key, problem }, { cause }) as DamageError;
}

type DamageError = TidemarkError & { details: { object: string; key: string; problem: string } };

/** Failures of the machine rather than of the object: they stop a command instead of being reported as damage. */
const TRANSIENT_ERRNO = new Set(['EMFILE', 'ENFILE', 'ENOMEM', 'EAGAIN', 'EINTR', 'ENOSPC']);

/**
 * Whether a backend's failure to read one object is damage to that object (an unreadable file, an entry the
 * safe opener refuses: a symlink, a FIFO, a directory) rather than a reason to stop (a closed repository, a bug).
 */
function isUnreadableEntry(err: unknown): boolean {
  if (!(err instanceof TidemarkError)) return false;
  if (err.code === 'CLOSED' || err.code === 'INVALID_ARGUMENT' || err.code === 'BUSY') return false;
  return !TRANSIENT_ERRNO.has(String(err.details.errno ?? ''));
}

/** The message for an entry that stands where an object belongs but is not one. */
function unusableMessage(what: string, o: ObjectInfo): string {
  return `${what} (${o.key}) cannot be read: it is ${o.unusable}, not an object`;
}

function isDamage(err: unknown): err is DamageError {
  return err instanceof TidemarkError && err.code === 'REPOSITORY_CORRUPT' && typeof err.details.problem === 'string';
}

export class Repository {
  private readonly sessions = new Set<BackupSession>();
  private closed = false;
  /** The pack indexes read so far (by object id) and the chunks they list; refreshed by packIndexes(). */
  private packIndexState: { map: ChunkMap; loaded: Set<string> } | null = null;

  private constructor(
    readonly backend: Backend,
    readonly config: RepositoryConfig,
    private readonly keys: RepositoryKeys | null,
    private readonly codec: Codec,
    private readonly packSize: number,
    readonly integrity: IntegrityState,
    /** the integrity key this machine holds for the repository (unencrypted repositories), for `repo key export` */
    private readonly integrityKey: Buffer | null,
    private readonly trustDir: string,
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

  /** Creates a repository (an empty or missing directory, or an empty backend) and opens it. */
  static async init(location: string | Backend, opts: InitOptions & OpenOptions = {}): Promise<Repository> {
    const packSize = checkPackSize(opts.packSize);
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
    const sizeProblem = checkChunkSize(chunkSize);
    if (sizeProblem) throw new InvalidArgumentError(sizeProblem);
    if (opts.passphrase !== undefined && opts.passphrase.length === 0) {
      throw new InvalidArgumentError('the passphrase is empty');
    }
    if (typeof location === 'string') await checkEmptyDirectory(location);
    const backend = typeof location === 'string' ? new LocalBackend(location) : location;
    if (await backend.exists(CONFIG_KEY)) {
      throw new TidemarkError('ALREADY_EXISTS', `${backend.location} is already a repository`);
    }
    const id = randomUUID();
    const secrets: Secret[] = [];
    if (opts.passphrase !== undefined) secrets.push({ passphrase: opts.passphrase });
    if (opts.keyFile !== undefined) secrets.push({ keyFile: await readKeyFile(opts.keyFile) });
    const config: RepositoryConfig = {
      format: FORMAT_NAME,
      version: FORMAT_VERSION,
      id,
      createdAt: new Date().toISOString(),
      chunkSize,
      chunkId: secrets.length > 0 ? 'hmac-sha256' : 'sha256',
      compression: 'zstd',
      encryption: null,
    };
    let keys: RepositoryKeys | null = null;
    let integrityKey: Buffer | null = null;
    const trustDir = opts.trustDir ?? defaultTrustDir();
    if (secrets.length > 0) {
      const master = newMasterKey();
      const slots: KeySlot[] = [];
      for (const s of secrets) slots.push(await makeSlot(master, id, s, opts.scryptLogN));
      keys = deriveKeys(master, id);
      config.encryption = { cipher: 'aes-256-gcm', keys: slots, mac: '' };
      config.encryption.mac = configMac(config, keys.configKey);
      // Remembered so that a config rewritten to say "not encrypted" is refused here; not needed to open it.
      await writeTrust(
        trustDir,
        trustEntry({ repositoryId: id, location: backend.location, integrityKey: null }),
      ).catch(() => undefined);
    } else {
      // Kept by this machine before the config names it: a repository whose key was lost is never made.
      integrityKey = newIntegrityKey();
      await writeTrust(trustDir, trustEntry({ repositoryId: id, location: backend.location, integrityKey }));
      const { configKey } = deriveIntegrityKeys(integrityKey, id);
      config.integrity = { algorithm: 'hmac-sha256', mac: integrityConfigMac(config, configKey) };
    }
    await backend.put(CONFIG_KEY, encodeConfig(config), { sync: true });
    // Opened with the keys in hand: no second key derivation.
    return Repository.withCodec(backend, config, keys, integrityKey, trustDir, opts, packSize);
  }

  private static async withCodec(
    backend: Backend,
    config: RepositoryConfig,
    keys: RepositoryKeys | null,
    integrityKey: Buffer | null,
    trustDir: string,
    opts: OpenOptions,
    packSize: number,
  ): Promise<Repository> {
    const macKey = integrityKey ? deriveIntegrityKeys(integrityKey, config.id).manifestKey : null;
    const codec = await createCodec({
      key: keys?.encKey ?? null,
      idKey: keys?.idKey ?? null,
      macKey,
      level: opts.compressionLevel,
      workers: opts.workers,
    });
    const integrity: IntegrityState = {
      mode: keys ? 'aes-256-gcm' : config.integrity ? 'hmac-sha256' : 'none',
      authenticated: keys !== null || integrityKey !== null,
      keyMissing: !keys && !!config.integrity && integrityKey === null,
      trustFile: trustFile(trustDir, config.id),
    };
    return new Repository(backend, config, keys, codec, packSize, integrity, integrityKey, trustDir);
  }

  static async open(location: string | Backend, opts: OpenOptions = {}): Promise<Repository> {
    const packSize = checkPackSize(opts.packSize);
    const backend = typeof location === 'string' ? new LocalBackend(location) : location;
    let raw: Buffer;
    try {
      raw = await backend.get(CONFIG_KEY, { maxBytes: 64 * 1024 });
    } catch (err) {
      if ((err as TidemarkError).code === 'NOT_FOUND') {
        // Something there that is not an object (a directory, a dangling link) is a damaged repository, not none.
        for await (const o of backend.list('config', { unusable: true })) {
          if (o.key === CONFIG_KEY && o.unusable) {
            throw new TidemarkError(
              'REPOSITORY_CORRUPT',
              `config of repository ${backend.location} cannot be read: it is ${o.unusable}, not an object`,
            );
          }
        }
        throw new TidemarkError(
          'NOT_FOUND',
          `no repository at ${backend.location} (create one with: tidemark repo init ${backend.location})`,
        );
      }
      if ((err as TidemarkError).code === 'LIMIT_EXCEEDED') {
        throw new TidemarkError('REPOSITORY_CORRUPT', `config of repository ${backend.location} is too large`);
      }
      if (isUnreadableEntry(err)) {
        throw new TidemarkError(
          'REPOSITORY_CORRUPT',
          `config of repository ${backend.location} cannot be read: ${(err as Error).message}`,
          {},
          { cause: err },
        );
      }
      throw err;
    }
    const config = decodeConfig(raw, backend.location);
    let keys: RepositoryKeys | null = null;
    if (config.encryption) {
      let secret: Secret;
      if (opts.keyFile !== undefined) secret = { keyFile: await readKeyFile(opts.keyFile) };
      else if (opts.passphrase !== undefined) secret = { passphrase: opts.passphrase };
      else {
        throw new InvalidArgumentError(
          `repository ${backend.location} is encrypted: give its passphrase (TIDEMARK_PASSPHRASE or --passphrase-file) or --key-file`,
        );
      }
      const master = await unwrapMaster(config.encryption.keys, config.id, secret, backend.location);
      keys = deriveKeys(master, config.id);
      checkConfigMac(config, keys.configKey, backend.location);
    }
    const trustDir = opts.trustDir ?? defaultTrustDir();
    const integrityKey = keys ? null : await integrityKeyFor(config, trustDir, backend.location);
    return Repository.withCodec(backend, config, keys, integrityKey, trustDir, opts, packSize);
  }

  /**
   * What another machine needs to authenticate this repository's restore points: this machine's entry for it
   * (its integrity key). NOT_FOUND when this machine holds no key (encrypted repositories need none).
   */
  exportTrust(): TrustEntry {
    if (this.integrityKey === null) {
      throw new TidemarkError(
        'NOT_FOUND',
        this.keys
          ? `repository ${this.location} is encrypted: its passphrase or key file is all another machine needs`
          : `this machine holds no integrity key for repository ${this.location}`,
      );
    }
    return trustEntry({ repositoryId: this.config.id, location: this.location, integrityKey: this.integrityKey });
  }

  /**
   * Keeps an integrity key (from `repo key export` on another machine) for this repository on this machine, once
   * it is shown to be this repository's (its config's MAC matches). The file it was stored in.
   */
  async importTrust(entry: TrustEntry): Promise<string> {
    if (entry.repository !== this.config.id) {
      throw new InvalidArgumentError(
        `that key is for repository ${entry.repository}; ${this.location} is repository ${this.config.id}`,
      );
    }
    const key = integrityKeyOf(entry);
    if (this.keys || key === null) {
      throw new InvalidArgumentError(`repository ${this.location} is encrypted: it has no integrity key to import`);
    }
    if (!this.config.integrity) {
      throw new InvalidArgumentError(`repository ${this.location} was made without an integrity key`);
    }
    if (!integrityMacMatches(this.config, deriveIntegrityKeys(key, this.config.id).configKey)) {
      throw new TidemarkError(
        'WRONG_KEY',
        `that key is not repository ${this.location}'s integrity key (the config's MAC does not match)`,
      );
    }
    return writeTrust(
      this.trustDir,
      trustEntry({ repositoryId: entry.repository, location: this.location, integrityKey: key }),
    );
  }

  /** Aborts open backup sessions (releasing their locks) and stops the codec workers. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const s of [...this.sessions]) await s.abort().catch(() => undefined);
    await this.codec.close();
    await this.backend.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', `repository ${this.location} is closed`);
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

  /** Reads and opens one object (or `at`, a range of one), turning every way it can fail into NOT_FOUND or a typed damage. */
  private async load(
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
  private get maxChunkObject(): number {
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
  private async readChunkIn(
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

  // ---------------------------------------------------------------------------------------------------------
  // Restore points

  /** The id of every entry under points/ (oldest first), also those that are not objects (see pointEntries). */
  async listPointIds(): Promise<string[]> {
    return (await this.pointEntries()).ids;
  }

  /**
   * Every entry under points/ named like a restore point, and of those, the ones that are not objects (a
   * symlink, a FIFO, a directory, …) with the message that reports them: damage, never skipped.
   */
  async pointEntries(): Promise<{ ids: string[]; unusable: Map<string, string> }> {
    const ids: string[] = [];
    const unusable = new Map<string, string>();
    for await (const o of this.backend.list('points/', { unusable: true })) {
      const id = o.key.slice('points/'.length);
      if (!POINT_ID.test(id)) continue;
      ids.push(id);
      if (o.unusable) unusable.set(id, unusableMessage(`restore point ${id}`, o));
    }
    return { ids: ids.sort(), unusable };
  }

  /**
   * Entries under `prefix` named like the objects `shape` matches (its first group: the id) that are not objects,
   * each as damage to `object`.
   */
  private async unusableEntries(
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

  /** A full point id from an id or a unique prefix of one. */
  async resolvePoint(idOrPrefix: string): Promise<string> {
    if (POINT_ID.test(idOrPrefix)) return idOrPrefix;
    if (!/^[0-9a-f-]+$/.test(idOrPrefix)) throw new InvalidArgumentError(`"${idOrPrefix}" is not a restore point id`);
    const matches = (await this.listPointIds()).filter((id) => id.startsWith(idOrPrefix));
    if (matches.length === 1) return matches[0];
    if (matches.length === 0) {
      throw new TidemarkError('NOT_FOUND', `no restore point ${idOrPrefix} in ${this.location}`);
    }
    throw new InvalidArgumentError(`"${idOrPrefix}" names ${matches.length} restore points: give more of the id`);
  }

  async readPoint(idOrPrefix: string): Promise<PointManifest> {
    const id = await this.resolvePoint(idOrPrefix);
    const key = pointKey(id);
    let plain: Buffer;
    try {
      ({ plain } = await this.load(
        'manifest',
        key,
        MAX_MANIFEST_BYTES,
        `manifest of restore point ${id}`,
        'not-found',
      ));
    } catch (err) {
      if ((err as TidemarkError).code === 'NOT_FOUND') {
        throw new TidemarkError('NOT_FOUND', `no restore point ${id} in ${this.location}`);
      }
      throw err;
    }
    try {
      const m = decodeManifest(plain, id);
      for (const [i, vm] of m.vms.entries()) {
        for (const [j, d] of vm.disks.entries()) {
          if (d.index.chunkSize !== this.chunkSize) {
            throw new TidemarkError(
              'REPOSITORY_CORRUPT',
              `manifest of restore point ${id} is damaged: vms.${i}.disks.${j}.index.chunkSize: ${d.index.chunkSize}, the repository's is ${this.chunkSize}`,
            );
          }
        }
      }
      return m;
    } catch (err) {
      if (err instanceof TidemarkError && err.code === 'REPOSITORY_CORRUPT') {
        throw damaged('manifest', key, 'corrupt', err.message, err);
      }
      throw err;
    }
  }

  /** Every restore point (oldest first), optionally only those holding a VM (by name or id). */
  async listPoints(opts: { vm?: string } = {}): Promise<{ points: PointSummary[]; damaged: DamagedPoint[] }> {
    const { ids, unusable } = await this.pointEntries();
    // Summaries only are kept (a manifest's definitions may make it 16 MiB).
    const found = new Map<string, PointSummary | DamagedPoint>();
    await forEachBounded(ids, 8, async (id) => {
      const why = unusable.get(id);
      if (why !== undefined) {
        found.set(id, { id, code: 'REPOSITORY_CORRUPT', message: why });
        return;
      }
      try {
        found.set(id, summarize(await this.readPoint(id)));
      } catch (err) {
        if (!(err instanceof TidemarkError) || err.code === 'NOT_FOUND') {
          if (err instanceof TidemarkError) return;
          throw err;
        }
        found.set(id, { id, code: err.code, message: err.message });
      }
    });
    const points: PointSummary[] = [];
    const bad: DamagedPoint[] = [];
    for (const id of ids) {
      const m = found.get(id);
      if (!m) continue;
      if (!('vms' in m)) {
        bad.push(m);
        continue;
      }
      if (opts.vm !== undefined && !m.vms.some((v) => v.name === opts.vm || v.id === opts.vm)) continue;
      points.push(m);
    }
    points.sort((a, b) => (a.time < b.time ? -1 : a.time > b.time ? 1 : a.id < b.id ? -1 : 1));
    return { points, damaged: bad };
  }

  /** The newest restore point holding a VM (by name or id), or null: the base of the next incremental. */
  async latestPoint(vm: string): Promise<PointManifest | null> {
    const { points } = await this.listPoints({ vm });
    const last = points.at(-1);
    return last ? this.readPoint(last.id) : null;
  }

  /** Removes one restore point's manifest (exclusive lock): the way out for a point verify found damaged. */
  async forgetPoint(idOrPrefix: string): Promise<string> {
    const lock = await this.lock('exclusive', 'forget');
    try {
      const id = await this.resolvePoint(idOrPrefix);
      if (!(await this.backend.exists(pointKey(id)))) {
        throw new TidemarkError('NOT_FOUND', `no restore point ${id} in ${this.location}`);
      }
      await this.backend.delete(pointKey(id));
      await this.backend.sync();
      return id;
    } finally {
      await lock.release();
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Backup

  private async lock(kind: 'shared' | 'exclusive', operation: string): Promise<RepositoryLock> {
    this.checkOpen();
    return acquireLock(this.backend, kind, operation);
  }

  /** A backup session under a shared lock: chunks and indexes, then commit() writes the manifest, or abort(). */
  async startBackup(opts: { operation?: string } = {}): Promise<BackupSession> {
    if (this.integrity.keyMissing) {
      // Its manifest could not carry the MAC: every machine that holds the key would refuse it as forged.
      throw new InvalidArgumentError(
        `repository ${this.location} authenticates its restore points with an integrity key this machine does not hold: copy it from a machine that does (\`tidemark repo key export FILE\`, then here \`tidemark repo key import FILE\`)`,
      );
    }
    const lock = await this.lock('shared', opts.operation ?? 'backup');
    let known: ChunkMap;
    try {
      // Read under the lock: what a chunk is deduplicated against can no longer be removed by gc (§9).
      known = (await this.packIndexes()).map;
    } catch (err) {
      await lock.release();
      throw err;
    }
    const session = new BackupSession(this, lock, known, () => this.sessions.delete(session));
    this.sessions.add(session);
    return session;
  }

  /** @internal */
  async commitManifest(m: PointManifest): Promise<void> {
    const key = pointKey(m.id);
    // Everything the manifest points at must be durable before the manifest exists.
    await this.backend.sync();
    const sealed = await this.seal('manifest', key, encodeManifest(m));
    await this.backend.put(key, sealed, { sync: true });
  }

  // ---------------------------------------------------------------------------------------------------------
  // Restore

  /** Finds a disk of a point by its virtual disk id (or, failing that, its name). */
  findDisk(m: PointManifest, disk: string): { vm: PointManifest['vms'][number]; disk: DiskEntry } {
    for (const vm of m.vms) for (const d of vm.disks) if (d.diskId === disk) return { vm, disk: d };
    const byName = m.vms.flatMap((vm) => vm.disks.filter((d) => d.name === disk).map((d) => ({ vm, disk: d })));
    if (byName.length === 1) return byName[0];
    const all = m.vms.flatMap((vm) => vm.disks.map((d) => `${d.diskId} (${vm.name}/${d.name})`));
    throw new TidemarkError('NOT_FOUND', `restore point ${m.id} has no disk ${disk}; it has: ${all.join(', ')}`);
  }

  /**
   * Writes a disk of a restore point to `sink`, fetching, opening and checking up to `parallel` chunks at once.
   * Writes may arrive in any order; every byte of the disk is written once (zero slots through sink.zero, as zero
   * bytes, or not at all with assumeZeroed). Holds a shared lock: gc, which moves chunks between packs, waits.
   */
  async restoreDisk(
    pointId: string,
    diskId: string,
    sink: RestoreSink,
    opts: RestoreOptions = {},
  ): Promise<RestoreResult> {
    const lock = await this.lock('shared', 'restore');
    try {
      return await this.restoreDiskLocked(pointId, diskId, sink, opts);
    } finally {
      await lock.release();
    }
  }

  private async restoreDiskLocked(
    pointId: string,
    diskId: string,
    sink: RestoreSink,
    opts: RestoreOptions,
  ): Promise<RestoreResult> {
    const started = Date.now();
    const m = await this.readPoint(pointId);
    const { map } = await this.packIndexes();
    const { disk } = this.findDisk(m, diskId);
    const index = await this.readIndex(disk.index);
    const scratch: Buffer[] = [];
    const parallel = Math.min(64, Math.max(1, opts.parallel ?? 8));
    let done = 0;
    let bytesWritten = 0;
    let zeroBytes = 0;
    let chunksRead = 0;
    const slots = (function* () {
      for (let s = 0; s < index.slotCount; s++) yield s;
    })();
    await forEachBounded(slots, parallel, async (slot) => {
      const offset = index.slotOffset(slot);
      const length = index.slotLength(slot);
      const id = index.idAt(slot);
      if (id === null) {
        zeroBytes += length;
        if (sink.zero) await sink.zero(offset, length);
        else if (!opts.assumeZeroed) {
          for (let at = 0; at < length; at += ZEROES.length) {
            const n = Math.min(ZEROES.length, length - at);
            await sink.write(offset + at, ZEROES.subarray(0, n));
          }
        }
      } else {
        const { plain: data } = await this.readChunkIn(map, id, length, scratch);
        chunksRead++;
        await sink.write(offset, data);
        this.recycle(data);
        bytesWritten += length;
      }
      done += length;
      opts.onProgress?.(done, index.virtualSize);
    });
    return {
      pointId: m.id,
      diskId: disk.diskId,
      virtualSize: index.virtualSize,
      bytesWritten,
      zeroBytes,
      chunksRead,
      durationMs: Date.now() - started,
    };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Verify

  /**
   * Re-reads and re-hashes every chunk of one point (or of all), and reports each damaged or missing chunk, index
   * and manifest with every restore point it affects — those outside the scope too.
   */
  async verify(pointId?: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
    // Shared, like a backup's: gc (which moves chunks between packs) must not run meanwhile.
    const lock = await this.lock('shared', 'verify');
    try {
      return await this.verifyLocked(pointId, opts);
    } finally {
      await lock.release();
    }
  }

  private async verifyLocked(pointId: string | undefined, opts: VerifyOptions): Promise<VerifyReport> {
    const { ids: allIds, unusable: unusablePoints } = await this.pointEntries();
    const scopeIds = pointId === undefined ? allIds : [await this.resolvePoint(pointId)];
    if (pointId !== undefined && !allIds.includes(scopeIds[0])) {
      throw new TidemarkError('NOT_FOUND', `no restore point ${scopeIds[0]} in ${this.location}`);
    }
    const all = pointId === undefined;
    const inScope = new Set(scopeIds);
    const damage: Damage[] = [];
    // Who uses each index: every point, so that damage names all the points it affects. Only this is kept of a
    // manifest (not its definitions: a manifest may be 16 MiB).
    interface Use {
      pointId: string;
      vm: string;
      diskId: string;
      disk: string;
      index: IndexRef;
    }
    const users = new Map<string, Use[]>();
    const manifestDamage = (id: string, problem: Damage['problem'], message: string) =>
      damage.push({ object: 'manifest', key: pointKey(id), id, problem, message, affects: [{ pointId: id }] });
    await forEachBounded(allIds, 8, async (id) => {
      const why = unusablePoints.get(id);
      if (why !== undefined) {
        if (inScope.has(id)) manifestDamage(id, 'unreadable', why);
        return;
      }
      try {
        const m = await this.readPoint(id);
        for (const vm of m.vms) {
          for (const d of vm.disks) {
            const u = users.get(d.index.id) ?? [];
            u.push({ pointId: id, vm: vm.name, diskId: d.diskId, disk: d.name, index: d.index });
            users.set(d.index.id, u);
          }
        }
      } catch (err) {
        if (!(err instanceof TidemarkError) || err.code === 'CLOSED') throw err;
        if (!inScope.has(id)) return;
        // A manifest this Tidemark cannot read (a newer version, say) is reported too: verify never stops at one.
        const problem = isDamage(err) ? (err.details.problem as Damage['problem']) : 'unreadable';
        manifestDamage(id, err.code === 'NOT_FOUND' ? 'missing' : problem, err.message);
      }
    });
    // Entries that stand where an index or a pack belongs but are not objects: reported, never opened.
    const unusableIndexes = await this.unusableEntries('indexes/', /^indexes\/([0-9a-f]{64})$/, 'index', 'index');
    const unusablePacks = await this.unusableEntries('packs/', /^packs\/[0-9a-f]{2}\/([0-9a-f]{64})$/, 'pack', 'pack');

    const scopeIndexes = new Set<string>();
    for (const [indexId, us] of users) if (us.some((u) => inScope.has(u.pointId))) scopeIndexes.add(indexId);

    const badIndexes = new Set<string>();
    const indexDamage = (indexId: string, problem: Damage['problem'], message: string) =>
      damage.push({
        object: 'index',
        key: indexKey(indexId),
        id: indexId,
        problem,
        message,
        affects: (users.get(indexId) ?? []).map((u) => ({
          pointId: u.pointId,
          vm: u.vm,
          diskId: u.diskId,
          disk: u.disk,
        })),
      });
    // Indexes are read, used and dropped, a few at a time within a memory budget: never all held at once.
    const budget = new MemoryBudget(INDEX_MEMORY_BUDGET);
    const withIndex = async (indexId: string, report: boolean, use: (index: DiskIndex) => void) => {
      const ref = users.get(indexId)![0].index;
      const unusable = unusableIndexes.get(indexId);
      if (unusable) {
        badIndexes.add(indexId);
        if (report) indexDamage(indexId, 'unreadable', unusable.message);
        return;
      }
      await budget.run(indexBodySize(slotCountFor(ref.virtualSize, this.chunkSize)), async () => {
        let index: DiskIndex;
        try {
          index = await this.readIndex(ref);
        } catch (err) {
          if (!isDamage(err)) throw err;
          badIndexes.add(indexId);
          if (report) indexDamage(indexId, err.details.problem as Damage['problem'], err.message);
          return;
        }
        use(index);
      });
    };
    const chunkIds = new Set<string>();
    await forEachBounded(scopeIndexes, 4, (id) =>
      withIndex(id, true, (index) => {
        for (const c of index.chunks()) chunkIds.add(c.id);
      }),
    );
    // An unusable entry no point names is damage too (when verifying everything).
    if (all) for (const [id, e] of unusableIndexes) if (!users.has(id)) indexDamage(id, e.problem, e.message);

    const { map, damaged: badPackIndexes } = await this.packIndexes({ reread: true });
    for (const err of badPackIndexes) {
      // Its chunks are reported below as missing (no other index lists them), with the points they affect.
      damage.push({
        object: 'pack-index',
        key: err.details.key,
        id: err.details.key.slice('packindex/'.length),
        problem: err.details.problem as Damage['problem'],
        message: `${err.message} (rebuild the pack indexes with \`tidemark repo repair-index\`)`,
        affects: [],
      });
    }
    // In pack order, so that each pack is read from start to end.
    const ordered = [...chunkIds].sort((a, b) => {
      const la = map.get(a);
      const lb = map.get(b);
      if (!la || !lb) return la ? 1 : lb ? -1 : 0;
      return la.pack < lb.pack ? -1 : la.pack > lb.pack ? 1 : la.offset - lb.offset;
    });
    const packs = new Set<string>();
    for (const id of ordered) {
      const loc = map.get(id);
      if (loc) packs.add(loc.pack);
    }
    const badChunks = new Map<string, { key: string; problem: Damage['problem']; message: string }>();
    let totalBytes = 0;
    for (const id of ordered) totalBytes += map.get(id)?.length ?? 0;
    let storedBytes = 0;
    let doneBytes = 0;
    let doneChunks = 0;
    await forEachBounded(ordered, Math.max(1, opts.parallel ?? 8), async (id) => {
      const loc = map.get(id);
      const unusable = loc ? unusablePacks.get(loc.pack) : undefined;
      try {
        if (unusable) throw damaged('chunk', unusable.key, 'unreadable', `chunk ${id}: ${unusable.message}`);
        // Added after the await: `storedBytes += await …` would read storedBytes before it and lose the other
        // workers' additions.
        const { storedBytes: n } = await this.readChunkIn(map, id);
        storedBytes += n;
      } catch (err) {
        if (!isDamage(err)) throw err;
        badChunks.set(id, {
          key: err.details.key,
          problem: err.details.problem as Damage['problem'],
          message: err.message,
        });
      }
      doneBytes += loc?.length ?? 0;
      opts.onProgress?.({ doneBytes, totalBytes, doneChunks: ++doneChunks, totalChunks: chunkIds.size });
    });

    if (badChunks.size > 0) {
      // Every index that reads (those outside the scope too) is read again to say where the damaged chunks are used.
      const affects = new Map<string, Affected[]>();
      const readable = [...users.keys()].filter((id) => !badIndexes.has(id));
      await forEachBounded(readable, 4, (indexId) =>
        withIndex(indexId, false, (index) => {
          const hits = new Map<string, number[]>();
          for (const c of index.chunks()) {
            if (!badChunks.has(c.id)) continue;
            const h = hits.get(c.id) ?? [];
            h.push(c.offset);
            hits.set(c.id, h);
          }
          for (const [chunkId, offsets] of hits) {
            const list = affects.get(chunkId) ?? [];
            for (const u of users.get(indexId)!) {
              list.push({
                pointId: u.pointId,
                vm: u.vm,
                diskId: u.diskId,
                disk: u.disk,
                slots: offsets.length,
                offsets: offsets.slice(0, 8),
              });
            }
            affects.set(chunkId, list);
          }
        }),
      );
      for (const [id, bad] of badChunks) {
        const list = (affects.get(id) ?? []).sort((a, b) => (a.pointId < b.pointId ? -1 : 1));
        const loc = map.get(id);
        damage.push({
          object: 'chunk',
          key: bad.key,
          ...(loc ? { range: { offset: loc.offset, length: loc.length } } : {}),
          id,
          problem: bad.problem,
          message: bad.message,
          affects: list,
        });
      }
    }

    if (all) {
      // Unusable packs none of the chunks above lie in.
      for (const [id, e] of unusablePacks) {
        if (!packs.has(id)) damage.push({ ...e, affects: [] });
      }
    }

    const affected = new Set<string>();
    for (const d of damage) for (const a of d.affects) affected.add(a.pointId);
    const order = { manifest: 0, index: 1, 'pack-index': 2, pack: 3, chunk: 4 };
    damage.sort((a, b) => order[a.object] - order[b.object] || (a.id < b.id ? -1 : 1));
    return {
      ok: damage.length === 0,
      authenticated: this.integrity.authenticated,
      scope: pointId === undefined ? 'all' : scopeIds[0],
      checked: {
        points: scopeIds.length,
        indexes: scopeIndexes.size,
        chunks: chunkIds.size,
        packs: packs.size,
        storedBytes,
      },
      damage,
      affectedPoints: [...affected].sort(),
    };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Retention and garbage collection

  /**
   * Applies a retention policy (per group of points with the same VMs) and removes the manifests it does not keep,
   * under an exclusive lock (none with dryRun). The chunks stay until gc().
   */
  async prune(opts: PruneOptions): Promise<PruneReport> {
    const problem = checkPolicy(opts);
    if (problem) throw new InvalidArgumentError(problem);
    const dryRun = opts.dryRun === true;
    const lock = dryRun ? null : await this.lock('exclusive', 'prune');
    try {
      const { ids, unusable } = await this.pointEntries();
      // What retention needs of each manifest, no more (a manifest may be 16 MiB).
      const manifests: { id: string; time: string; vms: { name: string; id: string }[] }[] = [];
      const bad: DamagedPoint[] = [];
      await forEachBounded(ids, 8, async (id) => {
        const why = unusable.get(id);
        if (why !== undefined) {
          bad.push({ id, code: 'REPOSITORY_CORRUPT', message: why });
          return;
        }
        try {
          const m = await this.readPoint(id);
          manifests.push({ id: m.id, time: m.time, vms: m.vms.map((v) => ({ name: v.name, id: v.id })) });
        } catch (err) {
          if (!(err instanceof TidemarkError)) throw err;
          bad.push({ id, code: err.code, message: err.message });
        }
      });
      const vmsOf = new Map(manifests.map((m) => [m.id, m.vms.map((v) => v.name)]));
      const decisions = applyRetention(
        manifests.map((m) => ({
          id: m.id,
          time: new Date(m.time),
          group: m.vms
            .map((v) => v.id)
            .sort()
            .join(','),
        })),
        opts,
      );
      const entries = decisions.map((d) => ({ ...d, vms: vmsOf.get(d.id) ?? [] }));
      const removed = entries.filter((d) => !d.keep);
      if (!dryRun) {
        for (const d of removed) await this.backend.delete(pointKey(d.id));
        await this.backend.sync();
      }
      return {
        dryRun,
        kept: entries.filter((d) => d.keep),
        removed,
        damaged: bad.sort((a, b) => (a.id < b.id ? -1 : 1)),
      };
    } finally {
      await lock?.release();
    }
  }

  /**
   * Mark and sweep, under an exclusive lock: mark every index the manifests name and every chunk those indexes
   * name, then delete the indexes and chunks nobody marked. A backup holds a shared lock from before its first
   * chunk until after its manifest, so no backup runs while gc does, and nothing a future manifest will name can
   * be swept (docs/formats/repository.md §9). A manifest or index that cannot be read stops gc: it cannot know what
   * that point references.
   */
  async gc(opts: { dryRun?: boolean } = {}): Promise<GcReport> {
    const dryRun = opts.dryRun === true;
    const lock = await this.lock('exclusive', 'gc');
    try {
      // Listed before anything is read: an entry that is not an object stops gc here, never opened (a FIFO would
      // block the read).
      const listedIndexes: ObjectInfo[] = [];
      for await (const o of this.backend.list('indexes/', { unusable: true })) {
        const id = o.key.slice('indexes/'.length);
        if (!HEX_ID.test(id)) continue;
        if (o.unusable) throw this.gcStopsAt(unusableMessage(`index ${id}`, o), o.key);
        listedIndexes.push(o);
      }
      const { packs: stored, unusable: unusablePacks } = await this.storedPacks();
      const firstUnusable = unusablePacks.values().next().value;
      if (firstUnusable) throw this.gcStopsAt(firstUnusable.message, firstUnusable.key);
      const { ids, unusable: unusablePoints } = await this.pointEntries();
      const markedIndexes = new Map<string, IndexRef>();
      await forEachBounded(ids, 8, async (id) => {
        let m: PointManifest;
        try {
          const why = unusablePoints.get(id);
          if (why !== undefined) throw new TidemarkError('REPOSITORY_CORRUPT', why);
          m = await this.readPoint(id);
        } catch (err) {
          if (err instanceof TidemarkError && err.code === 'NOT_FOUND') return;
          throw new TidemarkError(
            'REPOSITORY_CORRUPT',
            `gc stopped: restore point ${id} cannot be read (${(err as Error).message}); gc cannot know what it references — check with \`tidemark verify\`, then remove the point with \`tidemark points forget ${id}\``,
            { pointId: id },
          );
        }
        for (const vm of m.vms) for (const d of vm.disks) markedIndexes.set(d.index.id, d.index);
      });
      const markedChunks = new Set<string>();
      const missingIndexes: string[] = [];
      const budget = new MemoryBudget(INDEX_MEMORY_BUDGET);
      await forEachBounded(markedIndexes.values(), 4, async (ref) => {
        try {
          // Its chunks marked within the memory budget; the index itself is not kept.
          await budget.run(indexBodySize(slotCountFor(ref.virtualSize, this.chunkSize)), async () => {
            for (const c of (await this.readIndex(ref)).chunks()) markedChunks.add(c.id);
          });
        } catch (err) {
          if (isDamage(err) && err.details.problem === 'missing') {
            missingIndexes.push(ref.id);
            return;
          }
          throw new TidemarkError(
            'REPOSITORY_CORRUPT',
            `gc stopped: index ${ref.id} cannot be read (${(err as Error).message}); check with \`tidemark verify\` and forget the points it names`,
            { indexId: ref.id },
          );
        }
      });

      const { map, indexCount, damaged: badPackIndexes } = await this.packIndexes({ reread: true });
      if (badPackIndexes.length > 0) {
        // Its packs would look unindexed, and unindexed packs are deleted: stop instead.
        throw new TidemarkError(
          'REPOSITORY_CORRUPT',
          `gc stopped: ${badPackIndexes[0].message}; gc cannot know which packs it lists — rebuild the pack indexes from the packs with \`tidemark repo repair-index\``,
          { key: badPackIndexes[0].details.key },
        );
      }

      const report: GcReport = {
        dryRun,
        points: ids.length,
        indexesKept: 0,
        indexesRemoved: 0,
        chunksKept: 0,
        chunksRemoved: 0,
        packsKept: 0,
        packsRemoved: 0,
        packsRepacked: 0,
        packsWritten: 0,
        bytesRemoved: 0,
        temporaryRemoved: 0,
        missingIndexes: missingIndexes.sort(),
      };
      const sweep: { key: string; size: number }[] = [];
      for (const o of listedIndexes) {
        const id = o.key.slice('indexes/'.length);
        if (markedIndexes.has(id)) report.indexesKept++;
        else {
          report.indexesRemoved++;
          sweep.push(o);
        }
      }

      // Each pack: kept whole (every chunk in it is referenced and found there), removed (none is), or repacked.
      const keep: PackContents[] = [];
      const repack: { packId: string; live: PackEntry[] }[] = [];
      for (const packId of map.packIds()) {
        const entries = map.entriesOf(packId);
        const live = entries.filter((e) => markedChunks.has(e.id) && map.get(e.id)!.pack === packId);
        const info = stored.get(packId);
        stored.delete(packId);
        report.chunksKept += live.length;
        if (!info) {
          // Damage (verify names it): keep the index's word for where the chunks were.
          if (live.length > 0) keep.push({ packId, entries: [...live] });
          continue;
        }
        report.chunksRemoved += entries.length - live.length;
        if (live.length === entries.length) {
          report.packsKept++;
          keep.push({ packId, entries: [...entries] });
        } else {
          sweep.push(info);
          report.packsRemoved++;
          if (live.length > 0) {
            report.packsRepacked++;
            repack.push({ packId, live });
          }
        }
      }
      // What no pack index lists: packs of interrupted backups (no backup runs now: we hold the exclusive lock).
      for (const [packId, info] of stored) {
        sweep.push(info);
        report.packsRemoved++;
        report.chunksRemoved += await this.readPackHeader(packId, info.size).then(
          (e) => e.length,
          () => 0,
        );
      }
      for (const o of sweep) report.bytesRemoved += o.size;

      const changed = repack.length > 0 || report.packsRemoved > 0 || indexCount > 1;
      if (!dryRun && changed) {
        // 1. The referenced chunks of the packs to repack, checked, into new packs.
        const writer = this.packWriter();
        for (const { packId, live } of repack) await this.copyChunks(packId, live, writer);
        const written = await writer.finish();
        await this.backend.sync(); // in place before an index names them
        report.packsWritten = written.length;
        for (const p of written) report.bytesRemoved -= p.entries.reduce((n, e) => n + e.length, 0);
        // 2. One set of pack indexes for everything kept instead of the old ones; 3. (below) the old packs: a crash
        // in between leaves packs no index lists.
        await this.replacePackIndexes([...keep, ...written]);
      }
      if (!dryRun) {
        await forEachBounded(sweep, 16, (o) => this.backend.delete(o.key));
        report.temporaryRemoved = (await this.backend.sweepTemporary?.(TEMPORARY_GRACE_MS)) ?? 0;
        await this.backend.sync();
      }
      return report;
    } finally {
      await lock.release();
    }
  }

  /** gc's refusal to go on past an entry it cannot read (before it deletes anything). */
  private gcStopsAt(why: string, key: string): TidemarkError {
    return new TidemarkError(
      'REPOSITORY_CORRUPT',
      `gc stopped before deleting anything: ${why}; check with \`tidemark verify\`, then move it out of the repository`,
      { key },
    );
  }

  /** Copies the referenced chunks of a pack into `writer`, each opened and checked on the way (damage stops gc). */
  private async copyChunks(packId: string, live: readonly PackEntry[], writer: PackWriter): Promise<void> {
    const key = packKey(packId);
    const first = live[0].offset;
    const last = live[live.length - 1];
    const span = await this.backend.get(key, { range: { offset: first, length: last.offset + last.length - first } });
    for (const e of live) {
      const raw = span.subarray(e.offset - first, e.offset - first + e.length);
      try {
        if (raw.length < e.length) throw damaged('chunk', key, 'truncated', `chunk ${e.id} is cut off in ${key}`);
        const plain = await this.codec.open(raw, 'chunk', chunkKey(e.id), this.chunkSize);
        if (this.hashId(plain) !== e.id)
          throw damaged('chunk', key, 'corrupt', `chunk ${e.id} does not hash to its name`);
      } catch (err) {
        throw new TidemarkError(
          'REPOSITORY_CORRUPT',
          `gc stopped before deleting anything: chunk ${e.id} in ${key} is damaged (${(err as Error).message}); run \`tidemark verify\` and forget the points it names`,
          { key, chunk: e.id },
          { cause: err },
        );
      }
      await writer.add(e.id, raw);
    }
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
  private async storedPacks(): Promise<{
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
  private async replacePackIndexes(packs: PackContents[]): Promise<void> {
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

  /**
   * Rebuilds the pack indexes from the packs' own headers (exclusive lock): the way out when a pack index is
   * damaged or lost. Every readable pack is listed again; a pack whose header cannot be read is reported and left.
   */
  async repairPackIndexes(): Promise<{
    packs: number;
    chunks: number;
    unreadable: { key: string; message: string }[];
  }> {
    const lock = await this.lock('exclusive', 'repair-index');
    try {
      // What the current pack indexes say still serves for a pack whose own header cannot be read.
      const { map: before } = await this.packIndexes({ reread: true });
      const packs: PackContents[] = [];
      const stored = await this.storedPacks();
      // An entry that is not a pack cannot be read; the current pack indexes' word for it, if any, is kept.
      const unreadable: { key: string; message: string }[] = [...stored.unusable.values()];
      for (const packId of stored.unusable.keys()) {
        if (before.hasPack(packId)) packs.push({ packId, entries: [...before.entriesOf(packId)] });
      }
      await forEachBounded(stored.packs, 8, async ([packId, o]) => {
        try {
          packs.push({ packId, entries: await this.readPackHeader(packId, o.size) });
        } catch (err) {
          if (!isDamage(err)) throw err;
          unreadable.push({ key: o.key, message: err.message });
          if (before.hasPack(packId)) packs.push({ packId, entries: [...before.entriesOf(packId)] });
        }
      });
      packs.sort((a, b) => (a.packId < b.packId ? -1 : 1));
      await this.replacePackIndexes(packs.filter((p) => p.entries.length > 0));
      return {
        packs: packs.length,
        chunks: packs.reduce((n, p) => n + p.entries.length, 0),
        unreadable: unreadable.sort((a, b) => (a.key < b.key ? -1 : 1)),
      };
    } finally {
      await lock.release();
    }
  }

  // ---------------------------------------------------------------------------------------------------------
  // Info and locks

  /**
   * What the repository is and holds. Reads the config, lists every prefix and reads the pack indexes (for the
   * chunk counts): entries among them that cannot be read are reported in `damage`, not left out silently.
   */
  async info(): Promise<RepositoryInfo> {
    this.checkOpen();
    const damage: EntryDamage[] = [];
    const count = async (prefix: string, shape: RegExp, object: Damage['object'], what: string) => {
      let n = 0;
      let bytes = 0;
      for await (const o of this.backend.list(prefix, { unusable: true })) {
        const m = shape.exec(o.key);
        if (o.unusable) {
          if (m)
            damage.push({ object, key: o.key, problem: 'unreadable', message: unusableMessage(`${what} ${m[1]}`, o) });
          continue;
        }
        n++;
        bytes += o.size;
      }
      return { count: n, bytes };
    };
    const c = this.config;
    const points = await count('points/', /^points\/(\d{8}-\d{6}-[0-9a-f]{8})$/, 'manifest', 'restore point');
    const indexes = await count('indexes/', /^indexes\/([0-9a-f]{64})$/, 'index', 'index');
    const packs = await count('packs/', /^packs\/[0-9a-f]{2}\/([0-9a-f]{64})$/, 'pack', 'pack');
    const packIndexes = await count('packindex/', /^packindex\/([0-9a-f]{64})$/, 'pack-index', 'pack index');
    const { map, damaged: badPackIndexes } = await this.packIndexes();
    for (const err of badPackIndexes) {
      // Entries that are not objects were counted above already.
      if (err.details.problem === 'unreadable' && damage.some((d) => d.key === err.details.key)) continue;
      damage.push({
        object: 'pack-index',
        key: err.details.key,
        problem: err.details.problem as Damage['problem'],
        message: `${err.message} (rebuild the pack indexes with \`tidemark repo repair-index\`)`,
      });
    }
    damage.sort((a, b) => (a.key < b.key ? -1 : 1));
    return {
      location: this.location,
      id: c.id,
      formatVersion: c.version,
      createdAt: c.createdAt,
      chunkSize: c.chunkSize,
      chunkId: c.chunkId,
      compression: c.compression,
      encryption: c.encryption ? { cipher: c.encryption.cipher, keySlots: c.encryption.keys.map((k) => k.kind) } : null,
      integrity: {
        mode: this.integrity.mode,
        authenticated: this.integrity.authenticated,
        keyMissing: this.integrity.keyMissing,
      },
      points: points.count,
      indexes,
      chunks: { count: map.chunkCount, bytes: map.storedBytes() },
      packs,
      packIndexes,
      locks: await listLocks(this.backend),
      damage,
    };
  }

  async locks(): Promise<LockEntry[]> {
    return listLocks(this.backend);
  }

  /** Removes the locks of dead local processes; with force, every lock (only when no holder is alive!). */
  async unlock(opts: { force?: boolean } = {}): Promise<LockEntry[]> {
    if (!opts.force) return breakStaleLocks(this.backend);
    const all = await listLocks(this.backend);
    for (const l of all) await this.backend.delete(l.key);
    return all;
  }
}

function summarize(m: PointManifest): PointSummary {
  return {
    id: m.id,
    time: m.time,
    flow: m.flow,
    parentId: m.parentId,
    snapshots: m.snapshots,
    statistics: m.statistics,
    vms: m.vms.map((vm) => ({
      name: vm.name,
      id: vm.id,
      consistency: vm.consistency,
      freezeWindowMs: vm.freezeWindowMs,
      disks: vm.disks.map((d) => ({
        diskId: d.diskId,
        name: d.name,
        virtualSize: d.virtualSize,
        read: d.read,
        fullReason: d.fullReason,
        rctId: d.rctId,
        stats: d.stats,
      })),
    })),
  };
}

function checkPackSize(size: number | undefined): number {
  if (size === undefined) return DEFAULT_PACK_SIZE;
  if (!Number.isSafeInteger(size) || size < MIN_PACK_SIZE || size > MAX_PACK_SIZE) {
    throw new InvalidArgumentError(`pack size ${size} is not a byte count from ${MIN_PACK_SIZE} to ${MAX_PACK_SIZE}`);
  }
  return size;
}

async function checkEmptyDirectory(dir: string): Promise<void> {
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) throw new TidemarkError('ALREADY_EXISTS', `${dir} exists and is not a directory`);
    const entries = await readdir(dir);
    if (entries.includes(CONFIG_KEY)) throw new TidemarkError('ALREADY_EXISTS', `${dir} is already a repository`);
    if (entries.length > 0) {
      throw new TidemarkError('ALREADY_EXISTS', `${dir} is not empty: a repository needs a new or empty directory`);
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
}

// -------------------------------------------------------------------------------------------------------------
// Backup sessions

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
    readonly repository: Repository,
    private readonly lock: RepositoryLock,
    /** the chunks the repository held when the session began (under its lock) */
    private readonly known: ChunkMap,
    private readonly onEnd: () => void,
  ) {
    this.packs = repository.packWriter();
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
    const repo = this.repository;
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
    const repo = this.repository;
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
    const repo = this.repository;
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
    const repo = this.repository;
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
      await repo.commitManifest(manifest);
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
    await this.repository.backend.sync().catch(() => undefined);
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
