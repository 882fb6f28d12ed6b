/**
 * The requester's side: `BackupComponents` (IVssBackupComponents) drives writers and providers through one
 * backup in the order HYPERV-BACKUP-MODEL.md §2 gives, applies its abort rules and time limits, and reports
 * what happened. One object serves one backup: a second use is a BAD_STATE error.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import {
  ManagedProvider,
  type Provider,
  type ProviderCallOutcome,
  type ProviderEvent,
  type SnapshotRecord,
} from './provider.js';
import { systemClock, type Clock } from '../util/clock.js';
import { errorMessage, ms, settle } from './settle.js';
import {
  BACKUP_TYPES,
  componentPath,
  fileSetMatches,
  type AbortCause,
  type BackupType,
  type ComponentRef,
  type ComponentResult,
  type OverallStatus,
  type ProviderPhase,
  type SelectedComponent,
  type SnapshotInfo,
  type SnapshotSetReport,
  type SnapshotSetTimings,
  type WriterFailure,
  type WriterMetadata,
  type WriterPhase,
  type WriterStatus,
} from './types.js';
import {
  ManagedWriter,
  badState,
  type Writer,
  type WriterCallInput,
  type WriterCallOutcome,
  type WriterEvent,
} from './writer.js';

export interface VssLimits {
  /** Freeze→Thaw: a writer still frozen after this is failed (FAILED_AT_FREEZE, TIMEOUT) and the set aborted. */
  freezeWindowMs: number;
  /** Flush-and-hold: writes held longer than this are released and the set fails. */
  holdWritesMs: number;
  /** A provider commit slower than this is reported as a warning. */
  commitWarnMs: number;
  /** A provider preCommit or commit slower than this fails the set. */
  commitLimitMs: number;
  /** Each writer callback (Identify, PrepareForBackup, ... Abort). */
  writerCallbackMs: number;
  /** Per-phase overrides of writerCallbackMs. */
  writerPhaseMs?: Partial<Record<WriterPhase, number>>;
  /** Each provider call other than preCommit and commit (isSupported, prepare, postCommit, abort, delete). */
  providerCallMs: number;
}

export const DEFAULT_LIMITS: Readonly<VssLimits> = Object.freeze({
  freezeWindowMs: 60_000,
  holdWritesMs: 10_000,
  commitWarnMs: 1_000,
  commitLimitMs: 10_000,
  writerCallbackMs: 60_000,
  providerCallMs: 120_000,
});

/** Flush the files' pending writes and hold new ones until `release` is called (the host's storage stack). */
export type HoldWrites = (files: readonly string[]) => Promise<() => Promise<void> | void>;

export interface RequesterEvent {
  source: 'requester' | 'host';
  name: string;
  phase: string;
  outcome: 'ok' | 'failed' | 'warning';
  durationMs?: number;
  message?: string;
}
export type VssEvent = WriterEvent | ProviderEvent | RequesterEvent;

export interface BackupComponentsOptions {
  writers?: Writer[];
  providers?: Provider[];
  holdWrites?: HoldWrites;
  limits?: Partial<VssLimits>;
  onEvent?: (e: VssEvent) => void;
  /** Time for the limits and the timings (default: the system clock). */
  clock?: Clock;
}

export interface BackupStateOptions {
  type: BackupType;
  /** true: component mode, the requester adds components; false: every component of every writer. */
  selectComponents: boolean;
}

export interface WriterMetadataResult {
  writer: string;
  metadata?: WriterMetadata;
  failure?: WriterFailure;
}

export interface DisposeResult {
  /** The backup had passed PrepareForBackup without BackupComplete or AbortBackup: dispose aborted it. */
  autoAborted: boolean;
  warnings: string[];
}

type Stage =
  | 'created'
  | 'initialized'
  | 'stateSet'
  | 'gathered'
  | 'prepared'
  | 'snapshotting'
  | 'snapshotted'
  | 'snapshotFailed'
  | 'completed'
  | 'aborted'
  | 'disposed';

interface Volume {
  snapshotId: string;
  files: string[];
  provider: string;
}

// One backup at a time per writer, as VSS allows one snapshot set in progress.
const writerOwner = new WeakMap<Writer, string>();

/** The requester's object for one backup. */
export class BackupComponents {
  private stage: Stage = 'created';
  private readonly limits: VssLimits;
  private readonly writerList: Writer[];
  private readonly providerMap = new Map<string, Provider>();
  private readonly holdWrites: HoldWrites | undefined;
  private readonly onEvent: ((e: VssEvent) => void) | undefined;
  private readonly clock: Clock;
  private type: BackupType = 'full';
  private selectComponents = false;
  private managed: ManagedWriter[] = [];
  private readonly added = new Map<string, Set<string>>();
  private readonly selection = new Map<string, SelectedComponent[]>();
  private readonly marks = new Map<string, { succeeded: boolean; message?: string }>();
  private setId: string | undefined;
  private readonly volumes: Volume[] = [];
  private readonly managedProviders = new Map<string, ManagedProvider>();
  private snapshotRecords: SnapshotRecord[] = [];
  /** What the set made; outlives dispose (which drops the records' handles). */
  private snapshotInfos: SnapshotInfo[] = [];
  private abortCause: AbortCause | undefined;
  private timings: SnapshotSetTimings | undefined;
  private readonly warnings: string[] = [];
  private busy: { what: string; done: Promise<unknown> } | undefined;
  private raiseSetAbort: ((cause: AbortCause) => void) | undefined;
  private locked: Writer[] = [];
  private disposing: Promise<DisposeResult> | undefined;
  private requesterAborted = false;
  private aborting: Promise<WriterStatus[]> | undefined;

  constructor(opts: BackupComponentsOptions = {}) {
    this.limits = { ...DEFAULT_LIMITS, ...opts.limits };
    for (const [k, v] of Object.entries(this.limits)) {
      if (k !== 'writerPhaseMs' && !(typeof v === 'number' && v > 0))
        throw new TidemarkError('INVALID_ARGUMENT', `limit ${k} must be a positive number of milliseconds`);
    }
    this.writerList = [...(opts.writers ?? [])];
    const names = new Set<string>();
    for (const w of this.writerList) {
      if (typeof w?.name !== 'string' || w.name === '')
        throw new TidemarkError('INVALID_ARGUMENT', 'every writer needs a non-empty name');
      if (names.has(w.name)) throw new TidemarkError('INVALID_ARGUMENT', `two writers are named ${w.name}`);
      names.add(w.name);
    }
    for (const p of opts.providers ?? []) {
      if (typeof p?.name !== 'string' || p.name === '')
        throw new TidemarkError('INVALID_ARGUMENT', 'every provider needs a non-empty name');
      if (this.providerMap.has(p.name))
        throw new TidemarkError('INVALID_ARGUMENT', `two providers are named ${p.name}`);
      this.providerMap.set(p.name, p);
    }
    this.holdWrites = opts.holdWrites;
    this.onEvent = opts.onEvent;
    this.clock = opts.clock ?? systemClock;
  }

  get snapshotSetId(): string | undefined {
    return this.setId;
  }

  // -------------------------------------------------------------------------------------------------
  // The sequence

  initializeForBackup(): void {
    this.expect('initializeForBackup', ['created']);
    this.stage = 'initialized';
  }

  setBackupState(opts: BackupStateOptions): void {
    this.expect('setBackupState', ['initialized', 'stateSet']);
    if (!(BACKUP_TYPES as readonly string[]).includes(opts?.type))
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `backup type ${JSON.stringify(opts?.type)} is not one of ${BACKUP_TYPES.join(', ')}`,
      );
    if (typeof opts.selectComponents !== 'boolean')
      throw new TidemarkError('INVALID_ARGUMENT', 'selectComponents must be true or false');
    this.type = opts.type;
    this.selectComponents = opts.selectComponents;
    this.stage = 'stateSet';
  }

  /** Identify on every writer, concurrently. A writer that fails is listed with its failure and takes no part. */
  async gatherWriterMetadata(): Promise<WriterMetadataResult[]> {
    this.expect('gatherWriterMetadata', ['stateSet']);
    return this.exclusive('gatherWriterMetadata', async () => {
      this.managed = this.writerList.map(
        (w) =>
          new ManagedWriter(
            w,
            (phase) => this.limits.writerPhaseMs?.[phase] ?? this.limits.writerCallbackMs,
            (e) => this.emit(e),
            this.clock,
          ),
      );
      await Promise.all(this.managed.map((w) => w.identify()));
      this.stage = 'gathered';
      return this.managed.map((w) => {
        const r: WriterMetadataResult = { writer: w.name };
        if (w.metadata) r.metadata = w.metadata;
        if (w.failure) r.failure = w.failure;
        return r;
      });
    });
  }

  /** Selects a component (component mode), checked against the writer's metadata. */
  addComponent(ref: ComponentRef): void {
    this.expect('addComponent', ['gathered']);
    if (!this.selectComponents)
      throw badState('addComponent needs component mode: setBackupState({ selectComponents: true })');
    const w = this.writer(ref.writer);
    if (!w.metadata)
      throw new TidemarkError(
        'NOT_FOUND',
        `writer ${ref.writer} has no metadata (${w.failure?.message ?? 'Identify failed'}): its components cannot be selected`,
      );
    const key = componentPath(ref.logicalPath ?? '', ref.name);
    if (!w.metadata.components.some((c) => componentPath(c.logicalPath, c.name) === key))
      throw new TidemarkError('NOT_FOUND', `writer ${ref.writer} has no component ${key}`);
    const set = this.added.get(w.name) ?? new Set<string>();
    if (set.has(key)) throw new TidemarkError('ALREADY_EXISTS', `component ${key} of ${w.name} is already selected`);
    set.add(key);
    this.added.set(w.name, set);
  }

  startSnapshotSet(): string {
    this.expect('startSnapshotSet', ['gathered', 'prepared']);
    if (this.setId) throw badState(`snapshot set ${this.setId} is already started: one set per backup`);
    this.setId = randomUUID();
    return this.setId;
  }

  /**
   * Adds a "volume" (a set of files) to the snapshot set, with the named provider or else the first one that
   * supports the files. Returns the snapshot's id.
   */
  async addToSnapshotSet(files: readonly string[], providerName?: string): Promise<string> {
    this.expect('addToSnapshotSet', ['gathered', 'prepared']);
    if (!this.setId) throw badState('addToSnapshotSet before startSnapshotSet');
    if (!Array.isArray(files) || files.length === 0 || files.some((f) => typeof f !== 'string' || f === ''))
      throw new TidemarkError('INVALID_ARGUMENT', 'addToSnapshotSet needs a non-empty list of file paths');
    const abs = files.map((f) => path.resolve(f));
    const inSet = new Set(this.volumes.flatMap((v) => v.files));
    const seen = new Set<string>();
    for (const f of abs) {
      if (inSet.has(f)) throw new TidemarkError('ALREADY_EXISTS', `${f} is already in snapshot set ${this.setId}`);
      if (seen.has(f)) throw new TidemarkError('INVALID_ARGUMENT', `${f} is listed twice`);
      seen.add(f);
    }
    return this.exclusive('addToSnapshotSet', async () => {
      const candidates = providerName !== undefined ? [this.provider(providerName)] : [...this.providerMap.values()];
      if (candidates.length === 0) throw new TidemarkError('NOT_SUPPORTED', 'no snapshot provider is registered');
      const reasons: string[] = [];
      for (const p of candidates) {
        const r = await settle(() => p.isSupported(abs), this.limits.providerCallMs, undefined, this.clock);
        const reason =
          r.kind === 'value'
            ? r.value
            : r.kind === 'error'
              ? `isSupported failed: ${errorMessage(r.error)}`
              : `isSupported took more than ${this.limits.providerCallMs} ms`;
        if (reason === undefined) {
          const snapshotId = randomUUID();
          this.volumes.push({ snapshotId, files: abs, provider: p.name });
          return snapshotId;
        }
        reasons.push(`${p.name}: ${reason}`);
      }
      throw new TidemarkError('NOT_SUPPORTED', `no provider can snapshot these files (${reasons.join('; ')})`, {
        files: abs,
      });
    });
  }

  /** PrepareForBackup on the writers taking part. A writer that fails drops out (its components fail). */
  async prepareForBackup(): Promise<WriterStatus[]> {
    this.expect('prepareForBackup', ['gathered']);
    return this.exclusive('prepareForBackup', async () => {
      this.computeSelection();
      const active = this.managed.filter((w) => w.participating && w.metadata);
      const taken = active.find((w) => writerOwner.has(w.writer));
      if (taken)
        throw new TidemarkError(
          'BUSY',
          `writer ${taken.name} is taking part in another backup (${writerOwner.get(taken.writer)}); try again after it ends`,
        );
      const owner = this.setId ?? randomUUID();
      for (const w of active) writerOwner.set(w.writer, owner);
      this.locked = active.map((w) => w.writer);
      this.stage = 'prepared';
      await Promise.all(active.map((w) => w.call('prepareForBackup', this.input(w))));
      return this.gatherWriterStatus();
    });
  }

  /**
   * PrepareForSnapshot → providers' beginPrepare/endPrepare → Freeze → hold writes → preCommit + commit →
   * release → Thaw → postCommit → PostSnapshot. Never throws for what writers and providers do: the report
   * says what happened (status `failed` with `abort` when the set was aborted).
   */
  async doSnapshotSet(): Promise<SnapshotSetReport> {
    this.expect('doSnapshotSet', ['prepared']);
    if (!this.setId || this.volumes.length === 0)
      throw badState('doSnapshotSet needs a snapshot set with files: startSnapshotSet, then addToSnapshotSet');
    return this.exclusive('doSnapshotSet', async () => {
      this.stage = 'snapshotting';
      try {
        await this.runSnapshotSet();
      } finally {
        this.raiseSetAbort = undefined;
      }
      this.stage = this.abortCause ? 'snapshotFailed' : 'snapshotted';
      return this.report()!;
    });
  }

  /** The requester's verdict on the copy of one component, given to its writer in BackupComplete. */
  setBackupSucceeded(ref: ComponentRef, succeeded: boolean, message?: string): void {
    this.expect('setBackupSucceeded', ['snapshotted']);
    const key = componentPath(ref.logicalPath ?? '', ref.name);
    if (!this.selection.get(ref.writer)?.some((c) => componentPath(c.logicalPath, c.name) === key))
      throw new TidemarkError('NOT_FOUND', `component ${key} of writer ${ref.writer} is not in this backup`);
    this.marks.set(`${ref.writer}\u0000${key}`, { succeeded, ...(message !== undefined ? { message } : {}) });
  }

  /** BackupComplete on the writers that reached it; ends the backup. */
  async backupComplete(): Promise<WriterStatus[]> {
    this.expect('backupComplete', ['snapshotted']);
    return this.exclusive('backupComplete', async () => {
      const ready = this.managed.filter((w) => w.participating && w.state === 'WAITING_FOR_BACKUP_COMPLETE');
      await Promise.all(ready.map((w) => w.call('backupComplete', this.input(w, { complete: true }))));
      this.stage = 'completed';
      this.unlock();
      return this.gatherWriterStatus();
    });
  }

  gatherWriterStatus(): WriterStatus[] {
    if (this.managed.length === 0 && this.writerList.length > 0)
      throw badState('gatherWriterStatus before gatherWriterMetadata');
    return this.managed.map((w) => w.status());
  }

  /**
   * Raises Abort: every writer past PrepareForBackup receives it (again, if the set already aborted), the
   * providers release what they hold. Allowed while doSnapshotSet runs (it stops at the next step).
   */
  async abortBackup(reason = 'the requester aborted the backup'): Promise<WriterStatus[]> {
    if (this.stage === 'disposed') throw new TidemarkError('CLOSED', 'this BackupComponents was disposed');
    if (this.stage === 'completed') throw badState('the backup is complete: there is nothing left to abort');
    this.aborting ??= this.runAbort(reason);
    return this.aborting;
  }

  private async runAbort(reason: string): Promise<WriterStatus[]> {
    const cause: AbortCause = { by: 'requester', phase: 'requester', kind: 'REQUESTER_ABORT', message: reason };
    if (this.busy) {
      this.raiseSetAbort?.(cause);
      await this.busy.done.catch(() => undefined);
      if ((this.stage as Stage) === 'aborted' || (this.stage as Stage) === 'disposed')
        return this.managed.map((w) => w.status());
    }
    this.requesterAborted = true;
    this.abortCause ??= cause;
    await this.deliverAbort(this.abortCause);
    this.stage = 'aborted';
    this.unlock();
    return this.managed.map((w) => w.status());
  }

  /**
   * Ends the object: after PrepareForBackup without BackupComplete or AbortBackup it aborts first and says so;
   * deletes the snapshots. Idempotent.
   */
  dispose(): Promise<DisposeResult> {
    this.disposing ??= this.runDispose();
    return this.disposing;
  }

  private async runDispose(): Promise<DisposeResult> {
    const result: DisposeResult = { autoAborted: false, warnings: [] };
    if (this.busy) {
      this.raiseSetAbort?.({
        by: 'requester',
        phase: 'requester',
        kind: 'REQUESTER_ABORT',
        message: 'disposed during doSnapshotSet',
      });
      await this.busy.done.catch(() => undefined);
    }
    const needsAbort = this.managed.some((w) => w.prepared && !w.completed) && !this.requesterAborted;
    if (needsAbort && this.stage !== 'completed') {
      const message = 'disposed after PrepareForBackup without BackupComplete or AbortBackup: aborted automatically';
      result.autoAborted = true;
      result.warnings.push(message);
      this.warn(message);
      await this.abortBackup(message);
    }
    for (const p of this.managedProviders.values()) {
      const out = p.state === 'postcommitted' ? await p.deleteSnapshots() : await p.abort();
      if (out.failure) {
        const message = `provider ${p.name} could not release snapshot set ${this.setId}: ${out.failure.message}`;
        result.warnings.push(message);
        this.warn(message);
      }
    }
    this.snapshotRecords = [];
    this.unlock();
    this.stage = 'disposed';
    return result;
  }

  // -------------------------------------------------------------------------------------------------
  // Results

  /** The snapshots of the set, with each provider's handle (StorageSnapshot for storage providers). */
  snapshots(): readonly SnapshotRecord[] {
    return this.snapshotRecords;
  }

  /** The snapshot holding `file` (absolute or relative to the working directory). */
  snapshotOf(file: string): SnapshotRecord | undefined {
    const abs = path.resolve(file);
    return this.snapshotRecords.find((s) => s.info.files.includes(abs));
  }

  /** The state of the set so far (undefined before doSnapshotSet). */
  report(): SnapshotSetReport | undefined {
    if (!this.setId || !this.timings) return undefined;
    const writers = this.managed.map((w) => w.status());
    const components = this.componentResults();
    const snapshots = [...this.snapshotInfos];
    let status: OverallStatus;
    if (this.abortCause || snapshots.length === 0) status = 'failed';
    else if (
      writers.some((w) => w.participating && (w.failure || w.laterFailures.length > 0)) ||
      components.some((c) => c.status === 'failed' || c.backupSucceeded === false)
    )
      status = 'partial';
    else status = 'succeeded';
    const r: SnapshotSetReport = {
      snapshotSetId: this.setId,
      backupType: this.type,
      status,
      writers,
      components,
      providers: [...this.managedProviders.values()].map((p) => p.report()),
      snapshots,
      timings: { ...this.timings },
      warnings: [...this.warnings],
    };
    if (this.abortCause) r.abort = this.abortCause;
    return r;
  }

  // -------------------------------------------------------------------------------------------------
  // DoSnapshotSet

  private async runSnapshotSet(): Promise<void> {
    const setId = this.setId!;
    const L = this.limits;
    // A timer on this backup's clock, as a value: cancel() is safe twice and after it fired.
    const timer = (after: number, fn: () => void) => this.clock.setTimeout(fn, after);
    const t0 = this.clock.now();
    const timings: SnapshotSetTimings = { totalMs: 0 };
    this.timings = timings;
    const stop = new AbortController();
    const pending = new Map<symbol, { by: AbortCause['by']; name: string; phase: AbortCause['phase'] }>();
    const raise = (cause: AbortCause) => {
      if (this.abortCause) return;
      this.abortCause = cause;
      stop.abort();
      this.emit({
        source: 'requester',
        name: 'doSnapshotSet',
        phase: cause.phase,
        outcome: 'failed',
        message: cause.message,
      });
    };
    this.raiseSetAbort = raise;
    const track = async <T>(who: { by: AbortCause['by']; name: string; phase: AbortCause['phase'] }, p: Promise<T>) => {
      const k = Symbol();
      pending.set(k, who);
      try {
        return await p;
      } finally {
        pending.delete(k);
      }
    };
    const culprit = () => [...pending.values()][0];
    const describe = (c: { by: string; name: string; phase: string } | undefined) =>
      c ? `${c.by} ${c.name} was in ${c.phase}` : 'nothing was running';
    const writerFailed = (o: WriterCallOutcome, name: string, limit?: AbortCause['limit']) => {
      if (o.ok || o.cancelled || !o.failure) return;
      raise({
        by: 'writer',
        name,
        phase: o.phase,
        kind: o.failure.kind,
        message: `writer ${name} failed ${o.phase}: ${o.failure.message}`,
        ...(o.failure.kind === 'TIMEOUT' ? { limit: limit ?? 'callback' } : {}),
      });
    };
    const providerFailed = (o: ProviderCallOutcome, name: string) => {
      if (!o.failure) return;
      raise({
        by: 'provider',
        name,
        phase: o.failure.phase,
        kind: o.failure.kind,
        message: o.failure.message,
        ...(o.failure.kind === 'TIMEOUT'
          ? { limit: o.phase === 'commit' || o.phase === 'preCommit' ? 'commit' : 'callback' }
          : {}),
      });
    };
    const files = this.volumes.flatMap((v) => v.files);
    const active = () => this.managed.filter((w) => w.participating && !w.failed);
    this.checkCoverage(files);

    // Providers for this set, one per provider used.
    for (const v of this.volumes) {
      if (!this.managedProviders.has(v.provider)) {
        this.managedProviders.set(
          v.provider,
          new ManagedProvider(
            this.providerMap.get(v.provider)!,
            setId,
            (phase: ProviderPhase) =>
              phase === 'commit' || phase === 'preCommit' ? L.commitLimitMs : L.providerCallMs,
            (e) => this.emit(e),
            this.clock,
          ),
        );
      }
    }
    const providers = [...this.managedProviders.values()];

    let windowTimer: { cancel(): void } | undefined;
    let holdTimer: { cancel(): void } | undefined;
    let release: (() => Promise<void> | void) | undefined;
    let holdStart: number | undefined;
    let holdAccepted = false;
    let freezeStart: number | undefined;
    const releaseHold = async () => {
      holdTimer?.cancel();
      holdAccepted = true; // a holdWrites that resolves from now on is released at once (below)
      const rel = release;
      release = undefined;
      if (!rel) return;
      timings.holdMs = ms(holdStart!, this.clock.now());
      const r = await settle(() => rel(), L.providerCallMs, undefined, this.clock);
      if (r.kind !== 'value') {
        this.warn(
          `releasing the held writes failed: ${r.kind === 'error' ? errorMessage(r.error) : `no return in ${L.providerCallMs} ms`}`,
        );
      }
    };

    try {
      // 1. PrepareForSnapshot: a failure takes the writer out, without Abort.
      let s = this.clock.now();
      await Promise.all(
        active().map((w) =>
          track(
            { by: 'writer', name: w.name, phase: 'prepareForSnapshot' },
            w.call('prepareForSnapshot', this.input(w), stop.signal),
          ),
        ),
      );
      timings.prepareForSnapshotMs = ms(s, this.clock.now());
      if (this.abortCause) return;

      // 2. Providers prepare: from here a provider failure aborts the set.
      s = this.clock.now();
      await Promise.all(
        providers.map(async (p) => {
          for (const v of this.volumes.filter((x) => x.provider === p.name)) {
            if (this.abortCause) return;
            const o = await track(
              { by: 'provider', name: p.name, phase: 'beginPrepare' },
              p.beginPrepare({ snapshotId: v.snapshotId, files: v.files }, stop.signal),
            );
            providerFailed(o, p.name);
            if (!o.ok) return;
          }
          if (this.abortCause) return;
          providerFailed(
            await track({ by: 'provider', name: p.name, phase: 'endPrepare' }, p.endPrepare(stop.signal)),
            p.name,
          );
        }),
      );
      timings.providerPrepareMs = ms(s, this.clock.now());
      if (this.abortCause) return;

      // 3. Freeze, and the Freeze→Thaw window of every writer frozen.
      const freezing = active().filter((w) => w.state === 'WAITING_FOR_FREEZE');
      freezeStart = this.clock.now();
      const fs = freezeStart;
      let deadlines = freezing.map((w) => ({ w, at: fs + (w.writer.freezeWindowMs ?? L.freezeWindowMs) }));
      const armWindow = () => {
        if (deadlines.length === 0) return;
        const first = Math.min(...deadlines.map((d) => d.at));
        windowTimer = timer(first - this.clock.now(), () => {
          const t = this.clock.now();
          const due = deadlines.filter((d) => d.at <= t + 1);
          deadlines = deadlines.filter((d) => d.at > t + 1);
          const expired = due.filter((d) => d.w.state === 'WAITING_FOR_THAW' || d.w.state === 'WAITING_FOR_FREEZE');
          if (expired.length === 0) return armWindow();
          for (const d of expired) {
            const window = d.at - fs;
            d.w.markFailed('freeze', 'TIMEOUT', `still frozen when its Freeze→Thaw window of ${window} ms elapsed`);
          }
          const c = culprit();
          const names = expired.map((d) => d.w.name).join(', ');
          raise({
            by: c?.by ?? 'writer',
            name: c?.name ?? expired[0].w.name,
            phase: c?.phase ?? 'freeze',
            kind: 'TIMEOUT',
            limit: 'freeze-window',
            message: `the Freeze→Thaw window of ${Math.round(expired[0].at - fs)} ms elapsed while ${describe(c)}; writer(s) ${names} failed at Freeze`,
          });
        });
      };
      armWindow();
      await Promise.all(
        freezing.map((w) =>
          track({ by: 'writer', name: w.name, phase: 'freeze' }, w.call('freeze', this.input(w), stop.signal)).then(
            (o) => writerFailed(o, w.name),
          ),
        ),
      );
      timings.freezeMs = ms(fs, this.clock.now());
      if (this.abortCause) return;

      // 4. Flush and hold the writes to every file of the set.
      const holdWrites = this.holdWrites;
      if (holdWrites) {
        holdStart = this.clock.now();
        holdTimer = timer(L.holdWritesMs, () => {
          const c = culprit();
          raise({
            by: c?.by ?? 'host',
            name: c?.name ?? 'holdWrites',
            phase: c?.phase ?? 'hold',
            kind: 'TIMEOUT',
            limit: 'flush-and-hold',
            message: `writes were held for more than ${L.holdWritesMs} ms while ${describe(c)}; released, set aborted`,
          });
          void releaseHold();
        });
        const held = Promise.resolve().then(() => holdWrites(files));
        // Whoever comes second releases: releaseHold if the hold is granted in time, this handler if it is
        // granted after we stopped waiting (the hold limit, or an abort, came first).
        held.then(
          (rel) => {
            if (typeof rel !== 'function') return;
            if (holdAccepted)
              void Promise.resolve()
                .then(rel)
                .catch(() => undefined);
            else release = rel;
          },
          () => undefined,
        );
        const r = await track(
          { by: 'host', name: 'holdWrites', phase: 'hold' },
          settle(() => held, Infinity, stop.signal, this.clock),
        );
        if (r.kind === 'value' && typeof r.value !== 'function') {
          raise({
            by: 'host',
            name: 'holdWrites',
            phase: 'hold',
            kind: 'FLUSH_WRITES_FAILED',
            message: 'holdWrites returned no release function',
          });
        } else if (r.kind === 'error') {
          raise({
            by: 'host',
            name: 'holdWrites',
            phase: 'hold',
            kind: 'FLUSH_WRITES_FAILED',
            message: `flushing and holding writes failed: ${errorMessage(r.error)}`,
          });
        }
        if (this.abortCause) return;
      }

      // 5. preCommit and commit: the instant of the snapshot.
      s = this.clock.now();
      await Promise.all(
        providers.map((p) =>
          track({ by: 'provider', name: p.name, phase: 'preCommit' }, p.preCommit(stop.signal)).then((o) =>
            providerFailed(o, p.name),
          ),
        ),
      );
      timings.preCommitMs = ms(s, this.clock.now());
      if (this.abortCause) return;
      s = this.clock.now();
      await Promise.all(
        providers.map((p) =>
          track({ by: 'provider', name: p.name, phase: 'commit' }, p.commit(stop.signal)).then((o) =>
            providerFailed(o, p.name),
          ),
        ),
      );
      timings.commitMs = ms(s, this.clock.now());
      if (timings.commitMs > L.commitWarnMs && !this.abortCause)
        this.warn(`the providers' commit took ${timings.commitMs} ms, over the expected ${L.commitWarnMs} ms`);
      if (this.abortCause) return;

      // 6. Release the writes, 7. Thaw (ends the window).
      await releaseHold();
      if (this.abortCause) return;
      windowTimer?.cancel();
      const thawing = active().filter((w) => w.state === 'WAITING_FOR_THAW');
      s = this.clock.now();
      timings.freezeWindowMs = ms(fs, this.clock.now());
      await Promise.all(
        thawing.map((w) =>
          track({ by: 'writer', name: w.name, phase: 'thaw' }, w.call('thaw', this.input(w), stop.signal)).then((o) =>
            writerFailed(o, w.name),
          ),
        ),
      );
      timings.thawMs = ms(s, this.clock.now());
      if (this.abortCause) return;

      // 8. postCommit: the snapshots.
      s = this.clock.now();
      await Promise.all(
        providers.map((p) =>
          track({ by: 'provider', name: p.name, phase: 'postCommit' }, p.postCommit(stop.signal)).then((o) =>
            providerFailed(o, p.name),
          ),
        ),
      );
      timings.postCommitMs = ms(s, this.clock.now());
      if (this.abortCause) return;
      this.snapshotRecords = providers.flatMap((p) => [...p.snapshots]);
      this.snapshotInfos = this.snapshotRecords.map((r) => r.info);

      // 9. PostSnapshot: a failure takes the writer out, without Abort.
      s = this.clock.now();
      await Promise.all(
        active()
          .filter((w) => w.state === 'WAITING_FOR_POST_SNAPSHOT')
          .map((w) =>
            track(
              { by: 'writer', name: w.name, phase: 'postSnapshot' },
              w.call('postSnapshot', this.input(w), stop.signal),
            ),
          ),
      );
      timings.postSnapshotMs = ms(s, this.clock.now());
    } finally {
      windowTimer?.cancel();
      await releaseHold();
      if (freezeStart !== undefined && timings.freezeWindowMs === undefined)
        timings.freezeWindowMs = ms(freezeStart, this.clock.now());
      if (this.abortCause) {
        await this.deliverAbort(this.abortCause);
      }
      timings.totalMs = ms(t0, this.clock.now());
    }
  }

  /** Abort to every writer past PrepareForBackup (not completed), and to every provider of the set. */
  private async deliverAbort(cause: AbortCause): Promise<void> {
    const writers = this.managed.filter((w) => w.prepared && !w.completed);
    await Promise.all([
      ...writers.map((w) => w.call('abort', this.input(w, { abortCause: cause }))),
      ...[...this.managedProviders.values()].map(async (p) => {
        const out = await p.abort();
        if (out.failure) this.warn(`provider ${p.name} failed to abort: ${out.failure.message}`);
      }),
    ]);
    this.snapshotRecords = [];
    this.snapshotInfos = [];
  }

  // -------------------------------------------------------------------------------------------------
  // Helpers

  private computeSelection(): void {
    for (const w of this.managed) {
      const meta = w.metadata;
      if (!meta) {
        // In non-component mode every writer is involved: one that could not identify leaves its data uncovered.
        w.participating = !this.selectComponents;
        continue;
      }
      const added = this.added.get(w.name);
      if (this.selectComponents && !added) continue;
      w.participating = true;
      const chosen: SelectedComponent[] = [];
      for (const c of meta.components) {
        const key = componentPath(c.logicalPath, c.name);
        const explicit = this.selectComponents && added!.has(key);
        if (!this.selectComponents || explicit || !c.selectable) {
          const sc: SelectedComponent = {
            logicalPath: c.logicalPath ?? '',
            name: c.name,
            selectable: c.selectable,
            implicit: !explicit,
            fileSets: c.fileSets,
          };
          if (c.data !== undefined) sc.data = c.data;
          chosen.push(sc);
        }
      }
      this.selection.set(w.name, chosen);
    }
  }

  private input(w: ManagedWriter, extra: { abortCause?: AbortCause; complete?: boolean } = {}): WriterCallInput {
    const comps = (this.selection.get(w.name) ?? []).map((c) => {
      if (!extra.complete) return c;
      const mark = this.marks.get(`${w.name}\u0000${componentPath(c.logicalPath, c.name)}`);
      const out: SelectedComponent = { ...c, backupSucceeded: mark?.succeeded ?? false };
      if (mark?.message !== undefined) out.backupMessage = mark.message;
      return out;
    });
    const input: WriterCallInput = {
      backupType: this.type,
      snapshotSetId: this.setId,
      components: comps,
      snapshotSetFiles: this.volumes.flatMap((v) => v.files),
      snapshots: this.snapshotRecords.map((s) => s.info),
    };
    if (extra.abortCause) return { ...input, abortCause: extra.abortCause };
    return input;
  }

  private componentResults(): ComponentResult[] {
    const out: ComponentResult[] = [];
    for (const w of this.managed) {
      if (!w.participating) continue;
      const st = w.status();
      const all = [st.failure, ...st.laterFailures].filter((f): f is WriterFailure => !!f && f.phase !== 'abort');
      const fatal = w.failed && st.failure && st.failure.phase !== 'backupComplete' ? st.failure : undefined;
      for (const c of this.selection.get(w.name) ?? []) {
        const r: ComponentResult = {
          writer: w.name,
          logicalPath: c.logicalPath,
          name: c.name,
          status: 'ok',
          implicit: c.implicit,
        };
        const own = all
          .flatMap((f) => (f.components ?? []).map((cf) => ({ cf, phase: f.phase })))
          .find(({ cf }) => cf.logicalPath === c.logicalPath && cf.name === c.name);
        if (fatal) {
          r.status = 'failed';
          r.failure = { kind: fatal.kind, phase: fatal.phase, message: fatal.message };
        } else if (own) {
          r.status = 'failed';
          r.failure = { kind: own.cf.kind, phase: own.phase, message: own.cf.message };
        }
        const mark = this.marks.get(`${w.name}\u0000${componentPath(c.logicalPath, c.name)}`);
        if (mark) r.backupSucceeded = mark.succeeded;
        out.push(r);
      }
    }
    return out;
  }

  /** A selected component whose file sets match no file of the snapshot set is not in the snapshot: say so. */
  private checkCoverage(files: string[]): void {
    for (const [writer, comps] of this.selection) {
      for (const c of comps) {
        if (c.fileSets.length === 0) continue;
        if (!c.fileSets.some((fs) => files.some((f) => fileSetMatches(fs, f))))
          this.warn(
            `component ${componentPath(c.logicalPath, c.name)} of writer ${writer}: none of its files is in the snapshot set`,
          );
      }
    }
  }

  private writer(name: string): ManagedWriter {
    const w = this.managed.find((m) => m.name === name);
    if (!w) throw new TidemarkError('NOT_FOUND', `no writer named ${name}`);
    return w;
  }

  private provider(name: string): Provider {
    const p = this.providerMap.get(name);
    if (!p)
      throw new TidemarkError(
        'NOT_FOUND',
        `no provider named ${name} (registered: ${[...this.providerMap.keys()].join(', ') || 'none'})`,
      );
    return p;
  }

  private expect(method: string, stages: Stage[]): void {
    if (this.stage === 'disposed') throw new TidemarkError('CLOSED', `${method}: this BackupComponents was disposed`);
    if (this.busy) throw new TidemarkError('BUSY', `${method}: ${this.busy.what} is still running`);
    if (stages.includes(this.stage)) return;
    if (this.stage === 'completed' || this.stage === 'aborted')
      throw badState(
        `${method}: a BackupComponents serves one backup and this one has ${this.stage}; create a new one`,
      );
    throw badState(`${method} is not allowed now (the backup is at ${this.stage}; expected ${stages.join(' or ')})`);
  }

  private exclusive<T>(what: string, fn: () => Promise<T>): Promise<T> {
    const done = fn();
    this.busy = { what, done };
    const clear = () => {
      if (this.busy?.done === done) this.busy = undefined;
    };
    done.then(clear, clear);
    return done;
  }

  private unlock(): void {
    for (const w of this.locked) writerOwner.delete(w);
    this.locked = [];
  }

  private warn(message: string): void {
    this.warnings.push(message);
    this.emit({ source: 'requester', name: 'backup', phase: 'warning', outcome: 'warning', message });
  }

  private emit(e: VssEvent): void {
    try {
      this.onEvent?.(e);
    } catch {
      // A logging callback must not break the backup.
    }
  }
}
