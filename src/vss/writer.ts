/**
 * Writers: applications that own data, describe it (Identify) and bring it to a consistent state around the
 * snapshot (Freeze/Thaw). `Writer` is what an application implements; `ManagedWriter` is the runtime wrapper
 * the requester drives (the kysely pattern): it enforces the sequence, records states and failures, turns a
 * throw into a NONRETRYABLE failure and a hang into a TIMEOUT, so a bad writer never crashes the requester.
 */
import { TidemarkError } from '../errors.js';
import { systemClock, type Clock } from '../util/clock.js';
import { errorMessage, ms, settle, type Settled } from './settle.js';
import {
  FAILED_STATE,
  WRITER_FAILURE_KINDS,
  componentPath,
  isFailedState,
  validateWriterMetadata,
  type AbortCause,
  type BackupType,
  type ComponentFailure,
  type PhaseRecord,
  type SelectedComponent,
  type SnapshotInfo,
  type WriterFailure,
  type WriterFailureKind,
  type WriterMetadata,
  type WriterPhase,
  type WriterState,
  type WriterStatus,
} from './types.js';

/** What a writer may report from any callback. */
export interface FailureSink {
  /**
   * Records why this callback failed. Return false afterwards for a fatal failure (the writer drops out of
   * the backup; in Freeze and Thaw the backup is aborted), true for a non-fatal one (the backup goes on and
   * the failure is reported).
   */
  setFailure(kind: WriterFailureKind, message: string): void;
  /** One component failed (PARTIAL_FAILURE); the others are fine. Only components of `ctx.components`. */
  setComponentFailure(
    component: { logicalPath?: string; name: string },
    kind: WriterFailureKind,
    message: string,
  ): void;
}

export interface IdentifyContext extends Pick<FailureSink, 'setFailure'> {
  /** Fires when the requester stops waiting (time limit). */
  readonly signal: AbortSignal;
}

export interface WriterContext extends FailureSink {
  readonly phase: WriterPhase;
  readonly backupType: BackupType;
  /** undefined before the requester started a snapshot set. */
  readonly snapshotSetId: string | undefined;
  /** This writer's components in the backup; empty when it takes part with nothing selected. */
  readonly components: readonly SelectedComponent[];
  /** Every file in the snapshot set (from PrepareForSnapshot on): a writer whose files are missing may fail INCONSISTENTSNAPSHOT. */
  readonly snapshotSetFiles: readonly string[];
  /** The snapshots made (from PostSnapshot on). */
  readonly snapshots: readonly SnapshotInfo[];
  /** In Abort: why the backup is aborted. */
  readonly abortCause?: AbortCause;
  /** Fires when the requester stops waiting for this callback (time limit, or the backup is being aborted). */
  readonly signal: AbortSignal;
}

/**
 * An application taking part in backups. Contract: a callback never throws; it returns true on success or
 * after a non-fatal failure, false after a fatal one (setting the failure first). It may receive Abort at any
 * point after PrepareForBackup, more than once, and even while one of its callbacks is still running.
 */
export interface Writer {
  readonly name: string;
  /** This writer's Freeze→Thaw window (VSS: the timeout given at Subscribe); default: the requester's limit. */
  readonly freezeWindowMs?: number;
  /** Describes the writer's data. Returns false on a fatal failure (after ctx.setFailure). */
  identify(ctx: IdentifyContext): Promise<WriterMetadata | false>;
  prepareForBackup(ctx: WriterContext): Promise<boolean>;
  prepareForSnapshot(ctx: WriterContext): Promise<boolean>;
  freeze(ctx: WriterContext): Promise<boolean>;
  thaw(ctx: WriterContext): Promise<boolean>;
  postSnapshot(ctx: WriterContext): Promise<boolean>;
  backupComplete(ctx: WriterContext): Promise<boolean>;
  abort(ctx: WriterContext): Promise<boolean>;
}

/** What the requester passes for one callback; the wrapper adds signal and the failure sink. */
export type WriterCallInput = Omit<WriterContext, 'phase' | 'signal' | keyof FailureSink>;

export interface WriterCallOutcome {
  phase: WriterPhase;
  /** The callback succeeded, or failed non-fatally: the writer goes on. */
  ok: boolean;
  /** The requester stopped waiting (cancel signal) before the callback finished. */
  cancelled: boolean;
  failure?: WriterFailure;
  durationMs: number;
}

export interface WriterEvent {
  source: 'writer';
  name: string;
  phase: WriterPhase;
  outcome: 'ok' | 'failed' | 'cancelled';
  durationMs: number;
  failure?: WriterFailure;
}

const NEXT_STATE: Partial<Record<WriterPhase, WriterState>> = {
  prepareForBackup: 'STABLE',
  prepareForSnapshot: 'WAITING_FOR_FREEZE',
  freeze: 'WAITING_FOR_THAW',
  thaw: 'WAITING_FOR_POST_SNAPSHOT',
  postSnapshot: 'WAITING_FOR_BACKUP_COMPLETE',
  backupComplete: 'STABLE',
};

const REQUIRED_STATE: Partial<Record<WriterPhase, WriterState>> = {
  prepareForSnapshot: 'STABLE',
  freeze: 'WAITING_FOR_FREEZE',
  thaw: 'WAITING_FOR_THAW',
  postSnapshot: 'WAITING_FOR_POST_SNAPSHOT',
  backupComplete: 'WAITING_FOR_BACKUP_COMPLETE',
};

/**
 * One writer in one backup. The requester creates one per backup (states are per backup); the `Writer` itself
 * is long-lived and serves backup after backup.
 */
export class ManagedWriter {
  readonly name: string;
  private _state: WriterState = 'STABLE';
  private _failure: WriterFailure | undefined;
  private readonly later: WriterFailure[] = [];
  private readonly history: PhaseRecord[] = [];
  private _metadata: WriterMetadata | undefined;
  private _abortCount = 0;
  private started = new Set<WriterPhase>();
  private inFlight: WriterPhase | undefined;
  private inFlightAbort: AbortController | undefined;
  participating = false;

  constructor(
    readonly writer: Writer,
    private readonly timeoutFor: (phase: WriterPhase) => number,
    private readonly onEvent?: (e: WriterEvent) => void,
    private readonly clock: Clock = systemClock,
  ) {
    this.name = writer.name;
  }

  get state(): WriterState {
    return this._state;
  }
  get failure(): WriterFailure | undefined {
    return this._failure;
  }
  get metadata(): WriterMetadata | undefined {
    return this._metadata;
  }
  get failed(): boolean {
    return isFailedState(this._state);
  }
  get abortCount(): number {
    return this._abortCount;
  }
  /** The backup reached this writer's PrepareForBackup: from now on it must end in BackupComplete or Abort. */
  get prepared(): boolean {
    return this.started.has('prepareForBackup');
  }
  get completed(): boolean {
    return this.started.has('backupComplete') && this._state === 'STABLE';
  }

  status(): WriterStatus {
    const s: WriterStatus = {
      writer: this.name,
      state: this._state,
      laterFailures: [...this.later],
      abortCount: this._abortCount,
      participating: this.participating,
      phases: [...this.history],
    };
    if (this._failure) s.failure = this._failure;
    return s;
  }

  /** The requester fails the writer from outside (its Freeze→Thaw window elapsed while it was frozen). */
  markFailed(phase: WriterPhase, kind: WriterFailureKind, message: string): void {
    this.recordFailure({ kind, phase, message, fatal: true });
    this._state = FAILED_STATE[phase];
  }

  async identify(cancel?: AbortSignal): Promise<WriterCallOutcome> {
    if (this.prepared) throw badState(`cannot identify writer ${this.name} once its backup has started`);
    this.beginCall('identify');
    const ac = new AbortController();
    const forward = () => ac.abort();
    if (cancel?.aborted) ac.abort();
    cancel?.addEventListener('abort', forward, { once: true });
    let failure: { kind: WriterFailureKind; message: string } | undefined;
    let sealed = false;
    const ctx: IdentifyContext = {
      signal: ac.signal,
      setFailure: (kind, message) => {
        if (sealed) return;
        failure = { kind: checkKind(kind), message: String(message) };
      },
    };
    const t0 = this.clock.now();
    const timeoutMs = this.timeoutFor('identify');
    const r = await settle(() => this.writer.identify(ctx), timeoutMs, ac.signal, this.clock);
    sealed = true;
    cancel?.removeEventListener('abort', forward);
    if (r.kind !== 'value') ac.abort();
    this.inFlight = undefined;
    let outcome: WriterFailure | undefined;
    if (r.kind === 'value' && r.value !== false) {
      try {
        this._metadata = validateWriterMetadata(this.name, r.value);
        if (failure) outcome = { ...failure, phase: 'identify', fatal: false };
      } catch (err) {
        outcome = { kind: 'NONRETRYABLE', phase: 'identify', message: errorMessage(err), fatal: true };
      }
    } else {
      outcome = this.interpret('identify', r, failure, timeoutMs);
    }
    if (outcome?.fatal) this._metadata = undefined;
    return this.finish('identify', t0, r.kind === 'cancelled', outcome);
  }

  /** Raises one callback after PrepareForBackup began: the requester's sequence is checked first. */
  async call(phase: Exclude<WriterPhase, 'identify'>, input: WriterCallInput, cancel?: AbortSignal) {
    this.checkSequence(phase);
    if (phase === 'abort') {
      this._abortCount++;
      this.inFlightAbort?.abort(); // the callback still running learns that the backup is being aborted
    }
    this.beginCall(phase);
    const ac = new AbortController();
    if (phase !== 'abort') this.inFlightAbort = ac;
    const forward = () => ac.abort();
    if (cancel?.aborted) ac.abort();
    cancel?.addEventListener('abort', forward, { once: true });
    let failure: { kind: WriterFailureKind; message: string } | undefined;
    const componentFailures: ComponentFailure[] = [];
    let sealed = false;
    const known = new Set(input.components.map((c) => componentPath(c.logicalPath, c.name)));
    const ctx: WriterContext = {
      ...input,
      phase,
      signal: ac.signal,
      setFailure: (kind, message) => {
        if (sealed) return;
        failure = { kind: checkKind(kind), message: String(message) };
      },
      setComponentFailure: (component, kind, message) => {
        if (sealed) return;
        const logicalPath = component.logicalPath ?? '';
        const key = componentPath(logicalPath, component.name);
        if (!known.has(key))
          throw new TidemarkError(
            'INVALID_ARGUMENT',
            `writer ${this.name} reported a failure of component ${key}, which is not in this backup`,
          );
        componentFailures.push({ logicalPath, name: component.name, kind: checkKind(kind), message: String(message) });
      },
    };
    const t0 = this.clock.now();
    const timeoutMs = this.timeoutFor(phase);
    // Waiting stops on the caller's cancel and when Abort is raised meanwhile.
    const r = await settle(() => this.writer[phase](ctx), timeoutMs, ac.signal, this.clock);
    sealed = true;
    cancel?.removeEventListener('abort', forward);
    if (r.kind !== 'value') ac.abort();
    if (this.inFlightAbort === ac) this.inFlightAbort = undefined;
    if (this.inFlight === phase) this.inFlight = undefined;
    if (componentFailures.length > 0) {
      failure = {
        kind: failure?.kind ?? 'PARTIAL_FAILURE',
        message: failure?.message ?? `${componentFailures.length} component(s) failed`,
      };
    }
    const outcome = this.interpret(phase, r, failure, timeoutMs);
    if (outcome && componentFailures.length > 0) outcome.components = componentFailures;
    return this.finish(phase, t0, r.kind === 'cancelled', outcome);
  }

  private checkSequence(phase: Exclude<WriterPhase, 'identify'>): void {
    if (this.inFlight && phase !== 'abort')
      throw badState(`writer ${this.name}: ${phase} raised while ${this.inFlight} is still running`);
    if (phase === 'abort') {
      if (!this.prepared) throw badState(`writer ${this.name}: Abort before PrepareForBackup`);
      if (this.completed) throw badState(`writer ${this.name}: Abort after BackupComplete`);
      return;
    }
    if (this.failed) throw badState(`writer ${this.name} is ${this._state}: only Abort may follow`);
    if (this._abortCount > 0) throw badState(`writer ${this.name} was aborted: only Abort may follow`);
    if (phase === 'prepareForBackup') {
      if (!this._metadata) throw badState(`writer ${this.name}: PrepareForBackup before a successful Identify`);
      if (this.prepared) throw badState(`writer ${this.name}: PrepareForBackup raised twice in one backup`);
      return;
    }
    if (!this.prepared) throw badState(`writer ${this.name}: ${phase} before PrepareForBackup`);
    const required = REQUIRED_STATE[phase];
    if (this.started.has(phase) || (required && this._state !== required))
      throw badState(`writer ${this.name}: ${phase} raised in state ${this._state}`);
  }

  private beginCall(phase: WriterPhase): void {
    this.started.add(phase);
    if (phase !== 'abort') this.inFlight = phase;
  }

  private interpret(
    phase: WriterPhase,
    r: Settled<unknown>,
    failure: { kind: WriterFailureKind; message: string } | undefined,
    timeoutMs: number,
  ): WriterFailure | undefined {
    switch (r.kind) {
      case 'timeout':
        return { kind: 'TIMEOUT', phase, message: `${phase} did not return within ${timeoutMs} ms`, fatal: true };
      case 'cancelled':
        return undefined;
      case 'error':
        return { kind: 'NONRETRYABLE', phase, message: `${phase} threw: ${errorMessage(r.error)}`, fatal: true };
      case 'value':
        if (r.value === true) return failure && { ...failure, phase, fatal: false };
        if (r.value === false)
          return failure
            ? { ...failure, phase, fatal: true }
            : {
                kind: 'NONRETRYABLE',
                phase,
                message: `${phase} returned false without setting a failure`,
                fatal: true,
              };
        return {
          kind: 'NONRETRYABLE',
          phase,
          message: `${phase} returned ${typeof r.value} instead of true or false`,
          fatal: true,
        };
    }
  }

  private finish(phase: WriterPhase, t0: number, cancelled: boolean, failure?: WriterFailure): WriterCallOutcome {
    const durationMs = ms(t0, this.clock.now());
    if (failure) this.recordFailure(failure);
    if (failure?.fatal) {
      if (phase !== 'abort' || !this.failed) this._state = FAILED_STATE[phase];
    } else if (!cancelled && !this.failed) {
      if (phase === 'abort') this._state = 'STABLE';
      else if (this._abortCount === 0) this._state = NEXT_STATE[phase] ?? this._state;
    }
    const ok = !cancelled && !failure?.fatal;
    const record: PhaseRecord = { phase, ok, durationMs };
    if (failure) record.failure = failure;
    this.history.push(record);
    this.onEvent?.({
      source: 'writer',
      name: this.name,
      phase,
      outcome: cancelled ? 'cancelled' : ok ? 'ok' : 'failed',
      durationMs,
      ...(failure ? { failure } : {}),
    });
    const out: WriterCallOutcome = { phase, ok, cancelled, durationMs };
    if (failure) out.failure = failure;
    return out;
  }

  private recordFailure(f: WriterFailure): void {
    if (!this._failure) this._failure = f;
    else this.later.push(f);
  }
}

function checkKind(kind: WriterFailureKind): WriterFailureKind {
  if (!(WRITER_FAILURE_KINDS as readonly string[]).includes(kind))
    throw new TidemarkError('INVALID_ARGUMENT', `unknown writer failure kind ${JSON.stringify(kind)}`);
  return kind;
}

export function badState(message: string): TidemarkError {
  return new TidemarkError('BAD_STATE', message);
}
