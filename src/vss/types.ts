/**
 * The vocabulary of VSS-style coordination (HYPERV-BACKUP-MODEL.md §2): backup types, writer states and
 * failures, writer metadata, and the structured reports the requester gets back. Names follow VSS
 * (VSS_WS_*, VSS_E_WRITERERROR_*) so that people who know Windows backup find their way.
 */
import { TidemarkError } from '../errors.js';

export const BACKUP_TYPES = ['full', 'incremental', 'differential', 'copy', 'log'] as const;
export type BackupType = (typeof BACKUP_TYPES)[number];

/** The writer callbacks, in the order a backup raises them (abort can come at any point after PrepareForBackup). */
export const WRITER_PHASES = [
  'identify',
  'prepareForBackup',
  'prepareForSnapshot',
  'freeze',
  'thaw',
  'postSnapshot',
  'backupComplete',
  'abort',
] as const;
export type WriterPhase = (typeof WRITER_PHASES)[number];

export type WriterState =
  | 'STABLE'
  | 'WAITING_FOR_FREEZE'
  | 'WAITING_FOR_THAW'
  | 'WAITING_FOR_POST_SNAPSHOT'
  | 'WAITING_FOR_BACKUP_COMPLETE'
  | 'FAILED_AT_IDENTIFY'
  | 'FAILED_AT_PREPARE_BACKUP'
  | 'FAILED_AT_PREPARE_SNAPSHOT'
  | 'FAILED_AT_FREEZE'
  | 'FAILED_AT_THAW'
  | 'FAILED_AT_POST_SNAPSHOT'
  | 'FAILED_AT_BACKUP_COMPLETE'
  | 'FAILED_AT_ABORT';

export const FAILED_STATE: Record<WriterPhase, WriterState> = {
  identify: 'FAILED_AT_IDENTIFY',
  prepareForBackup: 'FAILED_AT_PREPARE_BACKUP',
  prepareForSnapshot: 'FAILED_AT_PREPARE_SNAPSHOT',
  freeze: 'FAILED_AT_FREEZE',
  thaw: 'FAILED_AT_THAW',
  postSnapshot: 'FAILED_AT_POST_SNAPSHOT',
  backupComplete: 'FAILED_AT_BACKUP_COMPLETE',
  abort: 'FAILED_AT_ABORT',
};

export function isFailedState(state: WriterState): boolean {
  return state.startsWith('FAILED_AT_');
}

/** VSS_E_WRITERERROR_*: what a writer says went wrong. */
export const WRITER_FAILURE_KINDS = [
  'TIMEOUT',
  'RETRYABLE',
  'NONRETRYABLE',
  'OUTOFRESOURCES',
  'INCONSISTENTSNAPSHOT',
  'PARTIAL_FAILURE',
] as const;
export type WriterFailureKind = (typeof WRITER_FAILURE_KINDS)[number];

export interface ComponentFailure {
  logicalPath: string;
  name: string;
  kind: WriterFailureKind;
  message: string;
}

export interface WriterFailure {
  kind: WriterFailureKind;
  /** The callback in which the writer failed (or in which its time ran out). */
  phase: WriterPhase;
  message: string;
  /** false when the writer set the failure but returned true: the backup goes on without what failed. */
  fatal: boolean;
  /** PARTIAL_FAILURE: which components failed; the others are fine. */
  components?: ComponentFailure[];
}

// ---------------------------------------------------------------------------------------------------
// Writer metadata (what Identify returns)

/** Files a component owns: `filespec` (`*` and `?` wildcards) in `path`, and below it when `recursive`. */
export interface FileSet {
  path: string;
  filespec: string;
  recursive: boolean;
}

export interface ComponentMetadata {
  name: string;
  /** Groups components like a path ('' = top level); (logicalPath, name) is unique per writer. */
  logicalPath?: string;
  /** false: the component is backed up whenever its writer takes part; true: the requester chooses. */
  selectable: boolean;
  caption?: string;
  fileSets: FileSet[];
  /** Opaque to the requester: stored with the backup and handed back to the writer (VSS private metadata). */
  data?: string;
}

export interface WriterMetadata {
  components: ComponentMetadata[];
  /** Files the writer wants left out of the backup even when they match a component's file set. */
  excludeFiles?: FileSet[];
}

/** How a requester names a component. */
export interface ComponentRef {
  writer: string;
  logicalPath?: string;
  name: string;
}

/** A component as a writer sees it in its callbacks. */
export interface SelectedComponent {
  logicalPath: string;
  name: string;
  selectable: boolean;
  /** Included because it is not selectable and its writer takes part, not because the requester added it. */
  implicit: boolean;
  fileSets: readonly FileSet[];
  data?: string;
  /** In BackupComplete: what the requester said about the copy of this component (false when it said nothing). */
  backupSucceeded?: boolean;
  backupMessage?: string;
}

export const LIMITS = {
  maxComponents: 10_000,
  maxFileSets: 10_000,
  maxNameLength: 1024,
  maxDataLength: 1 << 20,
};

/** `logicalPath\name`, the VSS way of writing a component's full path; unique per writer. */
export function componentPath(logicalPath: string | undefined, name: string): string {
  return logicalPath ? `${logicalPath}\\${name}` : name;
}

function bad(writer: string, problem: string): TidemarkError {
  return new TidemarkError('INVALID_ARGUMENT', `writer ${writer} returned invalid metadata: ${problem}`, { writer });
}

function checkName(writer: string, what: string, v: unknown, allowEmpty: boolean): string {
  if (typeof v !== 'string') throw bad(writer, `${what} is not a string`);
  if (!allowEmpty && v.length === 0) throw bad(writer, `${what} is empty`);
  if (v.length > LIMITS.maxNameLength) throw bad(writer, `${what} is longer than ${LIMITS.maxNameLength} characters`);
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f]/.test(v)) throw bad(writer, `${what} ${JSON.stringify(v)} contains control characters`);
  return v;
}

function checkFileSet(writer: string, where: string, f: unknown): FileSet {
  if (typeof f !== 'object' || f === null) throw bad(writer, `${where} is not an object`);
  const o = f as Record<string, unknown>;
  const path = checkName(writer, `${where}.path`, o.path, false);
  const filespec = checkName(writer, `${where}.filespec`, o.filespec, false);
  if (typeof o.recursive !== 'boolean') throw bad(writer, `${where}.recursive is not a boolean`);
  return { path, filespec, recursive: o.recursive };
}

/**
 * Checks what a writer's Identify returned (it is input: a writer may be buggy) and returns a clean copy:
 * names non-empty and bounded, (logicalPath, name) unique, file sets well formed.
 */
export function validateWriterMetadata(writer: string, m: unknown): WriterMetadata {
  if (typeof m !== 'object' || m === null) throw bad(writer, 'not an object');
  const o = m as Record<string, unknown>;
  if (!Array.isArray(o.components)) throw bad(writer, 'components is not an array');
  if (o.components.length > LIMITS.maxComponents) throw bad(writer, `more than ${LIMITS.maxComponents} components`);
  const seen = new Set<string>();
  let fileSets = 0;
  const components = o.components.map((c: unknown, i: number): ComponentMetadata => {
    if (typeof c !== 'object' || c === null) throw bad(writer, `components[${i}] is not an object`);
    const co = c as Record<string, unknown>;
    const name = checkName(writer, `components[${i}].name`, co.name, false);
    const logicalPath =
      co.logicalPath === undefined ? '' : checkName(writer, `components[${i}].logicalPath`, co.logicalPath, true);
    const key = componentPath(logicalPath, name);
    if (seen.has(key)) throw bad(writer, `component ${key} is listed twice`);
    seen.add(key);
    if (typeof co.selectable !== 'boolean') throw bad(writer, `component ${key}: selectable is not a boolean`);
    if (co.caption !== undefined && typeof co.caption !== 'string')
      throw bad(writer, `component ${key}: caption is not a string`);
    if (co.data !== undefined) {
      if (typeof co.data !== 'string') throw bad(writer, `component ${key}: data is not a string`);
      if (co.data.length > LIMITS.maxDataLength)
        throw bad(writer, `component ${key}: data is longer than ${LIMITS.maxDataLength} characters`);
    }
    if (!Array.isArray(co.fileSets)) throw bad(writer, `component ${key}: fileSets is not an array`);
    fileSets += co.fileSets.length;
    if (fileSets > LIMITS.maxFileSets) throw bad(writer, `more than ${LIMITS.maxFileSets} file sets`);
    const out: ComponentMetadata = {
      name,
      logicalPath,
      selectable: co.selectable,
      fileSets: co.fileSets.map((f: unknown, j: number) => checkFileSet(writer, `component ${key}: fileSets[${j}]`, f)),
    };
    if (co.caption !== undefined) out.caption = co.caption as string;
    if (co.data !== undefined) out.data = co.data as string;
    return out;
  });
  const result: WriterMetadata = { components };
  if (o.excludeFiles !== undefined) {
    if (!Array.isArray(o.excludeFiles)) throw bad(writer, 'excludeFiles is not an array');
    if (o.excludeFiles.length > LIMITS.maxFileSets) throw bad(writer, `more than ${LIMITS.maxFileSets} exclusions`);
    result.excludeFiles = o.excludeFiles.map((f: unknown, j: number) => checkFileSet(writer, `excludeFiles[${j}]`, f));
  }
  return result;
}

/**
 * Whether `file` (absolute) belongs to a file set. A VSS file spec knows only `*` (any run of characters) and
 * `?` (one character) and matches the file name, not the directory; `recursive` extends it to sub-directories.
 */
export function fileSetMatches(set: FileSet, file: string, sep = '/'): boolean {
  const dir = set.path.endsWith(sep) && set.path.length > 1 ? set.path.slice(0, -1) : set.path;
  const cut = file.lastIndexOf(sep);
  const fileDir = cut <= 0 ? sep : file.slice(0, cut);
  const base = file.slice(cut + 1);
  const inDir = fileDir === dir || (set.recursive && fileDir.startsWith(dir === sep ? sep : dir + sep));
  return inDir && wildcardMatch(set.filespec, base);
}

function wildcardMatch(spec: string, name: string): boolean {
  // Iterative matcher with one backtrack point: linear in practice, no regex built from input.
  let s = 0;
  let n = 0;
  let star = -1;
  let mark = 0;
  while (n < name.length) {
    if (s < spec.length && (spec[s] === '?' || spec[s] === name[n])) {
      s++;
      n++;
    } else if (s < spec.length && spec[s] === '*') {
      star = s++;
      mark = n;
    } else if (star >= 0) {
      s = star + 1;
      n = ++mark;
    } else {
      return false;
    }
  }
  while (s < spec.length && spec[s] === '*') s++;
  return s === spec.length;
}

// ---------------------------------------------------------------------------------------------------
// Providers and snapshots

export type ProviderFailureKind = 'TIMEOUT' | 'PROVIDER_VETO' | 'UNEXPECTED_PROVIDER_ERROR';

export type ProviderPhase =
  'isSupported' | 'beginPrepare' | 'endPrepare' | 'preCommit' | 'commit' | 'postCommit' | 'abort' | 'deleteSnapshots';

export interface ProviderFailure {
  kind: ProviderFailureKind;
  phase: ProviderPhase;
  message: string;
  /** The TidemarkError code the provider threw, when it threw one (e.g. NOT_SUPPORTED, IO_ERROR). */
  code?: string;
}

/** One snapshot of the set: a "volume" (a set of files) as it was at the instant of commit. */
export interface SnapshotInfo {
  snapshotId: string;
  snapshotSetId: string;
  provider: string;
  files: string[];
  createdAt: string;
}

// ---------------------------------------------------------------------------------------------------
// Reports

/** Why a snapshot set or a backup was aborted: who, in which phase, which failure, and which limit if any. */
export interface AbortCause {
  by: 'requester' | 'writer' | 'provider' | 'host';
  /** The writer or provider name; `holdWrites` for the host's flush-and-hold. */
  name?: string;
  phase: WriterPhase | ProviderPhase | 'hold' | 'requester';
  kind: WriterFailureKind | ProviderFailureKind | 'FLUSH_WRITES_FAILED' | 'REQUESTER_ABORT';
  /** The time limit that was exceeded, when one was. */
  limit?: 'freeze-window' | 'flush-and-hold' | 'commit' | 'callback';
  message: string;
}

export interface PhaseRecord {
  phase: WriterPhase;
  ok: boolean;
  durationMs: number;
  failure?: WriterFailure;
}

export interface WriterStatus {
  writer: string;
  state: WriterState;
  /** The first failure (fatal or not) the writer reported or the framework recorded for it. */
  failure?: WriterFailure;
  /** Failures after the first one (e.g. an Abort that failed after a Freeze that failed). */
  laterFailures: WriterFailure[];
  /** How many times the writer received Abort in this backup. */
  abortCount: number;
  /** Whether it takes part in this backup (has selected components, or every writer does in non-component mode). */
  participating: boolean;
  phases: PhaseRecord[];
}

export interface ComponentResult {
  writer: string;
  logicalPath: string;
  name: string;
  /** 'ok': the snapshot holds a consistent copy of it; 'failed': it must not be backed up from this snapshot. */
  status: 'ok' | 'failed';
  failure?: { kind: WriterFailureKind; phase: WriterPhase; message: string };
  implicit: boolean;
  /** What the requester said after copying (setBackupSucceeded); undefined until it said something. */
  backupSucceeded?: boolean;
}

export interface ProviderReport {
  provider: string;
  snapshotIds: string[];
  state: string;
  failure?: ProviderFailure;
  timings: Partial<Record<ProviderPhase, number>>;
}

export interface SnapshotSetTimings {
  totalMs: number;
  prepareForSnapshotMs?: number;
  providerPrepareMs?: number;
  freezeMs?: number;
  /** From the moment Freeze was sent until Thaw was sent (or the set was aborted). */
  freezeWindowMs?: number;
  /** From the call of holdWrites until the release was called. */
  holdMs?: number;
  preCommitMs?: number;
  /** The providers' commit, all providers together (the instant of the snapshot). */
  commitMs?: number;
  thawMs?: number;
  postCommitMs?: number;
  postSnapshotMs?: number;
}

export type OverallStatus = 'succeeded' | 'partial' | 'failed';

export interface SnapshotSetReport {
  snapshotSetId: string;
  backupType: BackupType;
  /** succeeded: snapshot made, no failure; partial: snapshot made, some writer or component failed; failed: none. */
  status: OverallStatus;
  abort?: AbortCause;
  writers: WriterStatus[];
  components: ComponentResult[];
  providers: ProviderReport[];
  snapshots: SnapshotInfo[];
  timings: SnapshotSetTimings;
  warnings: string[];
}
