/**
 * Providers make the snapshot (VSS provider phases: BeginPrepareSnapshot per volume, EndPrepareSnapshots,
 * PreCommitSnapshots, CommitSnapshots, PostCommitSnapshots, AbortSnapshots). A "volume" here is a set of
 * files. `ManagedProvider` is the runtime wrapper the requester drives: sequence, time limits, throws turned
 * into failures. `snapshotProviderAdapter` puts a storage-snapshot provider (src/snapshot) behind it.
 */
import { TidemarkError } from '../errors.js';
import type { PreparedSnapshot, SnapshotOptions, SnapshotProvider, StorageSnapshot } from '../snapshot/provider.js';
import { badState } from './writer.js';
import { systemClock, type Clock } from '../util/clock.js';
import { errorMessage, ms, settle, type Settled } from './settle.js';
import type { ProviderFailure, ProviderPhase, ProviderReport, SnapshotInfo } from './types.js';

export interface ProviderContext {
  readonly snapshotSetId: string;
  /** Fires when the requester stops waiting (time limit, or the set is being aborted). */
  readonly signal: AbortSignal;
}

export interface VolumeRequest {
  snapshotId: string;
  files: readonly string[];
}

/** What a provider hands back for each volume of the set after commit. */
export interface CommittedSnapshot {
  snapshotId: string;
  files: readonly string[];
  createdAt: Date;
  /** The storage snapshot, when the provider is a storage-snapshot provider (snapshotProviderAdapter). */
  storage?: StorageSnapshot;
  /** Anything else a provider wants the requester to reach (a device path, a clone's handle). */
  handle?: unknown;
}

/**
 * A snapshot provider. Methods may throw (the wrapper turns a throw into a failure); `abort` releases
 * everything the set holds at any point (prepared state, committed snapshots), must be idempotent and must
 * accept a set it never saw; `deleteSnapshots` releases the snapshots after a successful backup.
 */
export interface Provider {
  readonly name: string;
  /** undefined when it can snapshot these files; otherwise why not. */
  isSupported(files: readonly string[]): Promise<string | undefined>;
  beginPrepare(ctx: ProviderContext, volume: VolumeRequest): Promise<void>;
  endPrepare(ctx: ProviderContext): Promise<void>;
  preCommit(ctx: ProviderContext): Promise<void>;
  /** The instant of the snapshot: writes are held meanwhile, so it must be quick (under 1 s). */
  commit(ctx: ProviderContext): Promise<void>;
  /** After Thaw: one record per volume given to beginPrepare. */
  postCommit(ctx: ProviderContext): Promise<CommittedSnapshot[]>;
  abort(ctx: ProviderContext): Promise<void>;
  deleteSnapshots(ctx: ProviderContext): Promise<void>;
}

/** A snapshot of the set as the requester holds it. */
export interface SnapshotRecord {
  info: SnapshotInfo;
  storage?: StorageSnapshot;
  handle?: unknown;
}

export type ProviderState =
  'idle' | 'preparing' | 'prepared' | 'precommitted' | 'committed' | 'postcommitted' | 'failed' | 'aborted' | 'deleted';

export interface ProviderCallOutcome {
  phase: ProviderPhase;
  ok: boolean;
  cancelled: boolean;
  failure?: ProviderFailure;
  durationMs: number;
}

export interface ProviderEvent {
  source: 'provider';
  name: string;
  phase: ProviderPhase;
  outcome: 'ok' | 'failed' | 'cancelled';
  durationMs: number;
  failure?: ProviderFailure;
}

const ORDER: ProviderPhase[] = ['beginPrepare', 'endPrepare', 'preCommit', 'commit', 'postCommit', 'deleteSnapshots'];
const AFTER: Partial<Record<ProviderPhase, ProviderState>> = {
  beginPrepare: 'preparing',
  endPrepare: 'prepared',
  preCommit: 'precommitted',
  commit: 'committed',
  postCommit: 'postcommitted',
  deleteSnapshots: 'deleted',
};
const BEFORE: Partial<Record<ProviderPhase, ProviderState[]>> = {
  beginPrepare: ['idle', 'preparing'],
  endPrepare: ['preparing'],
  preCommit: ['prepared'],
  commit: ['precommitted'],
  postCommit: ['committed'],
  deleteSnapshots: ['postcommitted'],
};

/** One provider in one snapshot set. */
export class ManagedProvider {
  readonly name: string;
  private _state: ProviderState = 'idle';
  private _failure: ProviderFailure | undefined;
  private readonly volumes: VolumeRequest[] = [];
  private readonly timings: Partial<Record<ProviderPhase, number>> = {};
  private readonly inFlight = new Set<AbortController>();
  private _snapshots: SnapshotRecord[] = [];
  private touched = false;

  constructor(
    readonly provider: Provider,
    readonly snapshotSetId: string,
    private readonly timeoutFor: (phase: ProviderPhase) => number,
    private readonly onEvent?: (e: ProviderEvent) => void,
    private readonly clock: Clock = systemClock,
  ) {
    this.name = provider.name;
  }

  get state(): ProviderState {
    return this._state;
  }
  get failure(): ProviderFailure | undefined {
    return this._failure;
  }
  get snapshots(): readonly SnapshotRecord[] {
    return this._snapshots;
  }
  /** It holds something that Abort or DeleteSnapshots must release. */
  get holdsResources(): boolean {
    return this.touched && this._state !== 'aborted' && this._state !== 'deleted';
  }

  report(): ProviderReport {
    const r: ProviderReport = {
      provider: this.name,
      snapshotIds: this.volumes.map((v) => v.snapshotId),
      state: this._state,
      timings: { ...this.timings },
    };
    if (this._failure) r.failure = this._failure;
    return r;
  }

  beginPrepare(volume: VolumeRequest, cancel?: AbortSignal): Promise<ProviderCallOutcome> {
    return this.run('beginPrepare', cancel, async (ctx) => {
      this.volumes.push({ snapshotId: volume.snapshotId, files: [...volume.files] });
      await this.provider.beginPrepare(ctx, volume);
    });
  }
  endPrepare(cancel?: AbortSignal): Promise<ProviderCallOutcome> {
    return this.run('endPrepare', cancel, (ctx) => this.provider.endPrepare(ctx));
  }
  preCommit(cancel?: AbortSignal): Promise<ProviderCallOutcome> {
    return this.run('preCommit', cancel, (ctx) => this.provider.preCommit(ctx));
  }
  commit(cancel?: AbortSignal): Promise<ProviderCallOutcome> {
    return this.run('commit', cancel, (ctx) => this.provider.commit(ctx));
  }
  postCommit(cancel?: AbortSignal): Promise<ProviderCallOutcome> {
    return this.run('postCommit', cancel, async (ctx) => {
      const got = await this.provider.postCommit(ctx);
      this._snapshots = this.checkSnapshots(got);
    });
  }
  deleteSnapshots(): Promise<ProviderCallOutcome> {
    return this.run('deleteSnapshots', undefined, (ctx) => this.provider.deleteSnapshots(ctx));
  }

  /** Releases everything; idempotent; allowed in any state (a no-op when nothing is held). */
  async abort(): Promise<ProviderCallOutcome> {
    for (const ac of this.inFlight) ac.abort();
    if (!this.holdsResources) return { phase: 'abort', ok: true, cancelled: false, durationMs: 0 };
    const out = await this.run('abort', undefined, (ctx) => this.provider.abort(ctx));
    // Even a failed abort leaves nothing for us to retry here: the provider's recover() cleans up after it.
    this._state = 'aborted';
    this._snapshots = [];
    return out;
  }

  private checkSnapshots(got: unknown): SnapshotRecord[] {
    if (!Array.isArray(got)) throw new Error('postCommit did not return an array of snapshots');
    return this.volumes.map((v) => {
      const c = (got as CommittedSnapshot[]).find((s) => s && s.snapshotId === v.snapshotId);
      if (!c) throw new Error(`postCommit returned no snapshot for volume ${v.snapshotId}`);
      const createdAt = c.createdAt instanceof Date ? c.createdAt : new Date();
      const rec: SnapshotRecord = {
        info: {
          snapshotId: v.snapshotId,
          snapshotSetId: this.snapshotSetId,
          provider: this.name,
          files: [...v.files],
          createdAt: createdAt.toISOString(),
        },
      };
      if (c.storage) rec.storage = c.storage;
      if (c.handle !== undefined) rec.handle = c.handle;
      return rec;
    });
  }

  private async run(
    phase: ProviderPhase,
    cancel: AbortSignal | undefined,
    fn: (ctx: ProviderContext) => Promise<void>,
  ): Promise<ProviderCallOutcome> {
    if (phase !== 'abort') {
      const allowed = BEFORE[phase] ?? [];
      if (!allowed.includes(this._state))
        throw badState(`provider ${this.name}: ${phase} in state ${this._state} (expected ${allowed.join(' or ')})`);
      if (this.inFlight.size > 0) throw badState(`provider ${this.name}: ${phase} while another call is running`);
    }
    this.touched = true;
    const ac = new AbortController();
    this.inFlight.add(ac);
    const forward = () => ac.abort();
    if (cancel?.aborted) ac.abort();
    cancel?.addEventListener('abort', forward, { once: true });
    const ctx: ProviderContext = { snapshotSetId: this.snapshotSetId, signal: ac.signal };
    const timeoutMs = this.timeoutFor(phase);
    const t0 = this.clock.now();
    // Waiting stops on the caller's cancel and on abort() (which aborts every call in flight).
    const r: Settled<void> = await settle(() => fn(ctx), timeoutMs, ac.signal, this.clock);
    cancel?.removeEventListener('abort', forward);
    this.inFlight.delete(ac);
    if (r.kind !== 'value') ac.abort();
    const durationMs = ms(t0, this.clock.now());
    this.timings[phase] = (this.timings[phase] ?? 0) + durationMs;
    let failure: ProviderFailure | undefined;
    if (r.kind === 'timeout')
      failure = { kind: 'TIMEOUT', phase, message: `provider ${this.name}: ${phase} took more than ${timeoutMs} ms` };
    else if (r.kind === 'error') {
      const e = r.error;
      failure =
        e instanceof TidemarkError
          ? { kind: 'PROVIDER_VETO', phase, message: `provider ${this.name}: ${phase}: ${e.message}`, code: e.code }
          : {
              kind: 'UNEXPECTED_PROVIDER_ERROR',
              phase,
              message: `provider ${this.name}: ${phase}: ${errorMessage(e)}`,
            };
    }
    if (failure) {
      this._failure ??= failure;
      if (phase !== 'abort') this._state = 'failed';
    } else if (r.kind === 'value' && phase !== 'abort') {
      this._state = AFTER[phase] ?? this._state;
    }
    const cancelled = r.kind === 'cancelled';
    this.onEvent?.({
      source: 'provider',
      name: this.name,
      phase,
      outcome: cancelled ? 'cancelled' : failure ? 'failed' : 'ok',
      durationMs,
      ...(failure ? { failure } : {}),
    });
    const out: ProviderCallOutcome = { phase, ok: r.kind === 'value', cancelled, durationMs };
    if (failure) out.failure = failure;
    return out;
  }
}

/** Provider phases in order, for reports and tests. */
export const PROVIDER_PHASES: readonly ProviderPhase[] = ORDER;

// ---------------------------------------------------------------------------------------------------
// Storage-snapshot providers behind the VSS provider phases

export interface SnapshotAdapterOptions extends SnapshotOptions {
  /** The provider's name in the framework (default: the storage provider's name). */
  name?: string;
}

interface AdapterVolume {
  files: string[];
  prepared?: PreparedSnapshot;
  storage?: StorageSnapshot;
  /** A prepare or commit is running on it: abort leaves it to that call, which undoes its work when it ends. */
  busy: boolean;
}

interface AdapterSet {
  volumes: Map<string, AdapterVolume>;
  /** Set by abort: work still running when it came (a slow prepare or commit) is undone when it finishes. */
  released: boolean;
}

/**
 * The VSS phases over a storage-snapshot provider: beginPrepare prepares one storage snapshot per volume
 * (the slow part), commit commits them all at once (the instant), postCommit hands back each StorageSnapshot,
 * abort and deleteSnapshots abort what is prepared and release what is committed.
 */
export function snapshotProviderAdapter(provider: SnapshotProvider, opts: SnapshotAdapterOptions): Provider {
  const sets = new Map<string, AdapterSet>();
  const snapshotOptions: SnapshotOptions = { diffAreaRoot: opts.diffAreaRoot };
  const setOf = (id: string): AdapterSet => {
    const s = sets.get(id);
    if (!s || s.released) throw new TidemarkError('BAD_STATE', `snapshot set ${id} is not prepared with ${name}`);
    return s;
  };
  const name = opts.name ?? provider.name;

  async function releaseAll(set: AdapterSet): Promise<void> {
    set.released = true;
    const errors: unknown[] = [];
    for (const v of set.volumes.values()) {
      if (v.busy) continue;
      try {
        if (v.storage) await v.storage.release();
        else if (v.prepared) await v.prepared.abort();
      } catch (err) {
        errors.push(err);
      }
      v.storage = undefined;
      v.prepared = undefined;
    }
    if (errors.length > 0) throw errors[0];
  }

  return {
    name,
    isSupported: (files) => provider.supports([...files], snapshotOptions),
    async beginPrepare(ctx, volume) {
      let set = sets.get(ctx.snapshotSetId);
      if (!set) sets.set(ctx.snapshotSetId, (set = { volumes: new Map(), released: false }));
      if (set.released) throw new TidemarkError('BAD_STATE', `snapshot set ${ctx.snapshotSetId} was aborted`);
      if (set.volumes.has(volume.snapshotId))
        throw new TidemarkError('ALREADY_EXISTS', `volume ${volume.snapshotId} is already prepared`);
      const v: AdapterVolume = { files: [...volume.files], busy: true };
      set.volumes.set(volume.snapshotId, v);
      try {
        v.prepared = await provider.prepare(v.files, snapshotOptions);
      } finally {
        v.busy = false;
      }
      if (set.released) {
        await releaseAll(set);
        throw new TidemarkError('CLOSED', `snapshot set ${ctx.snapshotSetId} was aborted during prepare`);
      }
    },
    async endPrepare(ctx) {
      const set = setOf(ctx.snapshotSetId);
      for (const [id, v] of set.volumes)
        if (!v.prepared)
          throw new TidemarkError('BAD_STATE', `volume ${id} of set ${ctx.snapshotSetId} is not prepared`);
    },
    async preCommit(ctx) {
      setOf(ctx.snapshotSetId);
    },
    async commit(ctx) {
      const set = setOf(ctx.snapshotSetId);
      const vols = [...set.volumes.values()];
      for (const v of vols) v.busy = true;
      // All volumes at once: the writes are held, and the set is one instant.
      const results = await Promise.allSettled(vols.map((v) => v.prepared!.commit()));
      results.forEach((r, i) => {
        vols[i].busy = false;
        if (r.status === 'fulfilled') {
          vols[i].storage = r.value;
          vols[i].prepared = undefined;
        }
      });
      if (set.released) {
        await releaseAll(set);
        throw new TidemarkError('CLOSED', `snapshot set ${ctx.snapshotSetId} was aborted during commit`);
      }
      const failed = results.find((r) => r.status === 'rejected');
      if (failed) throw (failed as PromiseRejectedResult).reason;
    },
    async postCommit(ctx) {
      const set = setOf(ctx.snapshotSetId);
      return [...set.volumes].map(([snapshotId, v]) => {
        if (!v.storage) throw new TidemarkError('BAD_STATE', `volume ${snapshotId} was not committed`);
        return { snapshotId, files: v.files, createdAt: v.storage.createdAt, storage: v.storage };
      });
    },
    async abort(ctx) {
      const set = sets.get(ctx.snapshotSetId);
      if (!set) return;
      sets.delete(ctx.snapshotSetId);
      if (!set.released) await releaseAll(set);
    },
    async deleteSnapshots(ctx) {
      const set = sets.get(ctx.snapshotSetId);
      if (!set) return;
      sets.delete(ctx.snapshotSetId);
      if (!set.released) await releaseAll(set);
    },
  };
}
