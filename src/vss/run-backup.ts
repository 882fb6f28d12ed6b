/**
 * The whole requester sequence in one call, with retries of retryable failures: each attempt uses a new
 * BackupComponents (one object per backup) and ends in BackupComplete or AbortBackup, then dispose.
 */
import { TidemarkError } from '../errors.js';
import { systemClock, type Clock } from '../util/clock.js';
import type { SnapshotRecord } from './provider.js';
import type { BackupComponents } from './requester.js';
import { errorMessage } from './settle.js';
import {
  componentPath,
  type BackupType,
  type ComponentRef,
  type ComponentResult,
  type OverallStatus,
  type SnapshotSetReport,
  type WriterFailure,
  type WriterStatus,
} from './types.js';

export interface CopySession {
  report: SnapshotSetReport;
  snapshots: readonly SnapshotRecord[];
  snapshotOf(file: string): SnapshotRecord | undefined;
  /** The components the snapshot holds consistently (status ok): the ones to copy. */
  components: ComponentResult[];
  /** The verdict on one component's copy; components left unmarked count as copied when their status is ok. */
  markComponent(ref: ComponentRef, succeeded: boolean, message?: string): void;
}

export interface RunBackupOptions {
  /** Makes the BackupComponents of one attempt (a retry needs a new one). */
  create: () => BackupComponents;
  type: BackupType;
  /** Component mode with these components; omitted: every component of every writer. */
  components?: ComponentRef[];
  /** The snapshot set: each entry is one "volume" (a set of files), with a provider name or the first that fits. */
  volumes: { files: string[]; provider?: string }[];
  /** The data phase, between DoSnapshotSet and BackupComplete. A throw aborts the backup (no retry). */
  copy?: (session: CopySession) => Promise<void>;
  /** Retries after a retryable failure (default 3, as Microsoft recommends for VSS writer errors). */
  retries?: number;
  /** Pause before a retry (default 10 minutes, Microsoft's recommendation; tests use 0). */
  retryDelayMs?: number;
  /** Failure kinds worth a retry: writer failures and the abort cause's kind (default ['RETRYABLE']). */
  retryOn?: readonly string[];
  /** Stops the waiting between attempts. */
  signal?: AbortSignal;
  /** Times the pause between attempts (default: the system clock). */
  clock?: Clock;
  onAttempt?: (a: AttemptResult) => void;
}

export interface AttemptResult {
  attempt: number;
  status: OverallStatus;
  /** Where the attempt stopped. */
  stoppedAt: 'gatherWriterMetadata' | 'prepareForBackup' | 'doSnapshotSet' | 'copy' | 'backupComplete';
  /** This attempt is followed by another. */
  retried: boolean;
  /** The failures that made it retryable, or why it failed. */
  reasons: string[];
  report?: SnapshotSetReport;
  /** dispose() had to abort: a bug in this helper if it ever shows. */
  autoAborted: boolean;
}

export interface RunBackupResult {
  status: OverallStatus;
  attempts: AttemptResult[];
  /** The last attempt's report, after BackupComplete when it got there. */
  report?: SnapshotSetReport;
  writerStatus: WriterStatus[];
  /** Requested components and what became of them (including those of writers that failed Identify). */
  components: ComponentResult[];
  copyError?: string;
}

const DEFAULT_RETRY_ON = ['RETRYABLE'];

export async function runBackup(opts: RunBackupOptions): Promise<RunBackupResult> {
  const retries = opts.retries ?? 3;
  const delay = opts.retryDelayMs ?? 600_000;
  const retryOn = new Set(opts.retryOn ?? DEFAULT_RETRY_ON);
  if (!Number.isInteger(retries) || retries < 0)
    throw new TidemarkError('INVALID_ARGUMENT', 'retries must be a non-negative integer');
  const attempts: AttemptResult[] = [];
  for (let attempt = 1; ; attempt++) {
    const last = attempt > retries;
    const out = await oneAttempt(opts, attempt, last, retryOn);
    attempts.push(out.attempt);
    opts.onAttempt?.(out.attempt);
    if (!out.attempt.retried) {
      const result: RunBackupResult = {
        status: out.attempt.status,
        attempts,
        writerStatus: out.writerStatus,
        components: out.components,
      };
      if (out.attempt.report) result.report = out.attempt.report;
      if (out.copyError !== undefined) result.copyError = out.copyError;
      return result;
    }
    if (delay > 0) await (opts.clock ?? systemClock).sleep(delay, opts.signal);
  }
}

interface AttemptOutcome {
  attempt: AttemptResult;
  writerStatus: WriterStatus[];
  components: ComponentResult[];
  copyError?: string;
}

async function oneAttempt(
  opts: RunBackupOptions,
  n: number,
  last: boolean,
  retryOn: Set<string>,
): Promise<AttemptOutcome> {
  const bc = opts.create();
  const attempt: AttemptResult = {
    attempt: n,
    status: 'failed',
    stoppedAt: 'gatherWriterMetadata',
    retried: false,
    reasons: [],
    autoAborted: false,
  };
  const missing: ComponentResult[] = [];
  let copyError: string | undefined;
  try {
    bc.initializeForBackup();
    bc.setBackupState({ type: opts.type, selectComponents: opts.components !== undefined });
    const meta = await bc.gatherWriterMetadata();
    const failedIdentify = new Map(meta.filter((m) => m.failure?.fatal).map((m) => [m.writer, m.failure!]));
    const needed = opts.components ? new Set(opts.components.map((c) => c.writer)) : new Set(meta.map((m) => m.writer));
    const idFailures = [...failedIdentify].filter(([w]) => needed.has(w)).map(([, f]) => f);
    if (!last && retryable(idFailures, retryOn)) {
      attempt.retried = true;
      attempt.reasons = idFailures.map((f) => f.message);
      await bc.abortBackup('retrying after a retryable Identify failure');
      return { attempt, writerStatus: bc.gatherWriterStatus(), components: [] };
    }
    for (const c of opts.components ?? []) {
      const f = failedIdentify.get(c.writer);
      if (f) {
        missing.push({
          writer: c.writer,
          logicalPath: c.logicalPath ?? '',
          name: c.name,
          status: 'failed',
          failure: { kind: f.kind, phase: 'identify', message: f.message },
          implicit: false,
        });
      } else {
        bc.addComponent(c);
      }
    }
    bc.startSnapshotSet();
    for (const v of opts.volumes) await bc.addToSnapshotSet(v.files, v.provider);

    attempt.stoppedAt = 'prepareForBackup';
    const prepared = await bc.prepareForBackup();
    const prepFailures = prepared.filter((w) => w.participating && w.failure).map((w) => w.failure!);
    if (!last && retryable(prepFailures, retryOn)) {
      attempt.retried = true;
      attempt.reasons = prepFailures.map((f) => `${f.phase}: ${f.message}`);
      await bc.abortBackup('retrying after a retryable PrepareForBackup failure');
      return { attempt, writerStatus: bc.gatherWriterStatus(), components: [] };
    }

    attempt.stoppedAt = 'doSnapshotSet';
    const report = await bc.doSnapshotSet();
    attempt.report = report;
    attempt.status = report.status;
    if (report.status !== 'succeeded') {
      const kinds = failuresOf(report);
      if (!last && kinds.some((k) => retryOn.has(k.kind))) {
        attempt.retried = true;
        attempt.reasons = kinds.filter((k) => retryOn.has(k.kind)).map((k) => k.message);
        attempt.report = await abortAndReport(bc, 'retrying after a retryable failure');
        attempt.status = 'failed';
        return { attempt, writerStatus: bc.gatherWriterStatus(), components: [] };
      }
      attempt.reasons = kinds.map((k) => k.message);
    }
    if (report.status === 'failed') {
      attempt.report = await abortAndReport(bc, 'the snapshot set failed');
      return {
        attempt,
        writerStatus: bc.gatherWriterStatus(),
        components: [...(attempt.report?.components ?? []), ...missing],
      };
    }

    attempt.stoppedAt = 'copy';
    const marked = new Set<string>();
    const keyOf = (r: ComponentRef) => `${r.writer}\u0000${componentPath(r.logicalPath ?? '', r.name)}`;
    const session: CopySession = {
      report,
      snapshots: bc.snapshots(),
      snapshotOf: (f) => bc.snapshotOf(f),
      components: report.components.filter((c) => c.status === 'ok'),
      markComponent: (ref, ok, message) => {
        bc.setBackupSucceeded(ref, ok, message);
        marked.add(keyOf(ref));
      },
    };
    try {
      await opts.copy?.(session);
    } catch (err) {
      copyError = errorMessage(err);
      attempt.reasons.push(`copy failed: ${copyError}`);
      attempt.report = await abortAndReport(bc, `copying the data failed: ${copyError}`);
      attempt.status = 'failed';
      return {
        attempt,
        writerStatus: bc.gatherWriterStatus(),
        components: [...(attempt.report?.components ?? []), ...missing],
        copyError,
      };
    }
    for (const c of report.components) {
      if (!marked.has(keyOf(c)))
        bc.setBackupSucceeded(c, c.status === 'ok', c.status === 'ok' ? undefined : c.failure?.message);
    }

    attempt.stoppedAt = 'backupComplete';
    const status = await bc.backupComplete();
    const final = bc.report()!;
    attempt.report = final;
    attempt.status = missing.length > 0 && final.status === 'succeeded' ? 'partial' : final.status;
    return { attempt, writerStatus: status, components: [...final.components, ...missing] };
  } finally {
    const d = await bc.dispose();
    attempt.autoAborted = d.autoAborted;
  }
}

async function abortAndReport(bc: BackupComponents, reason: string): Promise<SnapshotSetReport | undefined> {
  await bc.abortBackup(reason);
  return bc.report();
}

function retryable(failures: WriterFailure[], retryOn: Set<string>): boolean {
  return failures.some((f) => f.fatal && (retryOn.has(f.kind) || f.components?.some((c) => retryOn.has(c.kind))));
}

/** Every failure that made a set less than a success: writers' (and their components') and the abort cause. */
function failuresOf(r: SnapshotSetReport): { kind: string; message: string }[] {
  const out: { kind: string; message: string }[] = [];
  if (r.abort && r.abort.kind !== 'REQUESTER_ABORT') out.push({ kind: r.abort.kind, message: r.abort.message });
  for (const w of r.writers) {
    if (!w.participating) continue;
    for (const f of [w.failure, ...w.laterFailures]) {
      if (!f || f.phase === 'abort') continue;
      out.push({ kind: f.kind, message: `writer ${w.writer} ${f.phase}: ${f.message}` });
      for (const c of f.components ?? [])
        out.push({
          kind: c.kind,
          message: `writer ${w.writer} component ${componentPath(c.logicalPath, c.name)}: ${c.message}`,
        });
    }
  }
  return out;
}
