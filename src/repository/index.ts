/** Tidemark's backup repository: the public API (see repository.ts for how a backup uses it, and for its parts). */
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
export type { Affected, Damage, EntryDamage } from './damage.js';
export type { RepositoryInfo } from './info.js';
export type { GcReport, PruneEntry, PruneOptions, PruneReport } from './maintenance.js';
export type { InitOptions, OpenOptions } from './open.js';
export type { DamagedPoint, PointSummary } from './points.js';
export { Repository } from './repository.js';
export type { RestoreOptions, RestoreResult, RestoreSink } from './restore.js';
export { BackupSession, DiskWriter, type DiskWriteStats, type PutResult } from './session.js';
export { chunkKey, indexKey, type IntegrityState } from './store.js';
export type { VerifyReport } from './verify.js';
