/** Tidemark's backup repository: the public API (see repository.ts for how a backup uses it). */
export type { Backend, GetOptions, ObjectInfo, PutOptions } from './backend.js';
export { isValidKey } from './backend.js';
export { LocalBackend } from './local-backend.js';
export { DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, checkChunkSize, type RepositoryConfig } from './config.js';
export { DiskIndex, IndexBuilder, MAX_INDEX_SLOTS } from './disk-index.js';
export { DEFAULT_SCRYPT_LOG_N, MIN_SCRYPT_LOG_N, newKeyFileContents } from './keys.js';
export type { LockEntry, LockKind } from './lock.js';
export { defaultTrustDir, parseTrustEntry, readSmallFile, type TrustEntry } from './trust.js';
export {
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  POINT_ID,
  type DiskAudit,
  type DiskEntry,
  type DiskStats,
  type IndexRef,
  type PointInput,
  type PointManifest,
  type PointStatistics,
  type VmEntry,
} from './manifest.js';
export { defaultWorkers } from './pool.js';
export {
  applyRetention,
  isoWeek,
  type RetentionCandidate,
  type RetentionDecision,
  type RetentionPolicy,
} from './retention.js';
export {
  BackupSession,
  DiskWriter,
  Repository,
  chunkKey,
  indexKey,
  type Affected,
  type Damage,
  type DamagedPoint,
  type DiskWriteStats,
  type EntryDamage,
  type GcReport,
  type InitOptions,
  type IntegrityState,
  type OpenOptions,
  type PointSummary,
  type PruneEntry,
  type PruneOptions,
  type PruneReport,
  type PutResult,
  type RepositoryInfo,
  type RestoreOptions,
  type RestoreResult,
  type RestoreSink,
  type VerifyReport,
} from './repository.js';
