/** VSS-style coordination: requester (BackupComponents), writers, providers. See docs/vss.md. */
export * from './types.js';
export {
  ManagedWriter,
  type FailureSink,
  type IdentifyContext,
  type Writer,
  type WriterCallInput,
  type WriterCallOutcome,
  type WriterContext,
  type WriterEvent,
} from './writer.js';
export {
  ManagedProvider,
  PROVIDER_PHASES,
  snapshotProviderAdapter,
  type CommittedSnapshot,
  type Provider,
  type ProviderCallOutcome,
  type ProviderContext,
  type ProviderEvent,
  type ProviderState,
  type SnapshotAdapterOptions,
  type SnapshotRecord,
  type VolumeRequest,
} from './provider.js';
export {
  BackupComponents,
  DEFAULT_LIMITS,
  type BackupComponentsOptions,
  type BackupStateOptions,
  type DisposeResult,
  type HoldWrites,
  type RequesterEvent,
  type VssEvent,
  type VssLimits,
  type WriterMetadataResult,
} from './requester.js';
export {
  runBackup,
  type AttemptResult,
  type CopySession,
  type RunBackupOptions,
  type RunBackupResult,
} from './run-backup.js';
export { systemClock, type Clock, type ClockTimer } from '../util/clock.js';
