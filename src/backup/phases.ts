/**
 * The named phases of a backup-set run (DESIGN.md "A backup-set run"), each a step over the run's state and,
 * within a batch (the VMs of one storage snapshot), the batch's state; flows.ts composes them into the flows.
 *   preflight        every VM: its disks, configuration version, the previous restore point, leftovers cleaned;
 *   checkpoints      a recovery checkpoint per VM of the batch, concurrently within a bound (guest frozen when it can);
 *   oneSnapshot      ONE storage snapshot of the batch's frozen files (noSnapshot: the frozen parents served as they are);
 *   referencePoints  each recovery checkpoint converted to a reference point (merged back online, ids kept);
 *   hostAutoRecovery 2008 R2: every disk of the batch mounted from the snapshot and recovered on this side;
 *   data             each VM's disks read into the session, VMs in parallel within a bound;
 *   commit           the manifest last, naming only the VMs whose data is complete;
 *   release          after the commit, this repository's previous reference points destroyed.
 * A batch's snapshot set is released (and a recovery's overlays closed) when the batch ends, whatever happened.
 * A step of a batch returns false when nothing is left to do in it.
 */
import type { HostClient } from '../api/client.js';
import type { SnapshotSetInfo, VmSummary } from '../api/schemas.js';
import type { VmEntry } from '../repository/index.js';
import { TidemarkError } from '../errors.js';
import { forEachBounded } from '../util/bounded.js';
import { HostMount } from './auto-recovery.js';
import { backupVm } from './read-vm.js';
import type { RunLeases } from './run-leases.js';
import { describeError } from '../util/describe-error.js';
import type {
  BackupSetOptions,
  BatchState,
  NbdDial,
  PhaseTimes,
  RunState,
  VmRunSummary,
  VmState,
} from './run-types.js';

/** A step of the whole run. */
export type RunStep = (run: RunState) => Promise<void>;
/** A step of one batch; `false` ends the batch. */
export type BatchStep = (run: RunState, batch: BatchState) => Promise<boolean | void>;

export const CHECKPOINT_PREFIX = 'tidemark backup';

export const bound = (run: RunState) => run.opts.checkpointConcurrency ?? 4;
export const isOk = (s: VmState) => s.summary.status === 'ok';

export async function timed<T>(
  run: RunState,
  phase: Exclude<keyof PhaseTimes, 'snapshotHoldMs' | 'preflightMs'>,
  fn: () => Promise<T>,
): Promise<T> {
  const t = performance.now();
  try {
    return await fn();
  } finally {
    run.phases[phase] += performance.now() - t;
  }
}

/** A flow's own check of a VM at preflight, before anything is done to it: throws to fail the VM. */
export type PreflightCheck = (vm: VmSummary) => void;

/** 1. Preflight, VMs side by side within the checkpoint phase's bound. */
export const preflight: RunStep = (run) => preflightWith()(run);

/** Preflight with a flow's own checks of each VM, made before the leftovers of ended runs are cleaned. */
export const preflightWith =
  (...checks: PreflightCheck[]): RunStep =>
  async (run) => {
    const { opts, names, leases, states, fail } = run;
    // Nothing could be leased: the whole run is BUSY (exit 6), naming the holders.
    if (names.length > 0 && names.every((n) => leases.refused.has(n))) {
      const busy = names.map((n) => leases.refused.get(n)!);
      if (busy.every((e) => e instanceof TidemarkError && e.code === 'BUSY')) {
        throw new TidemarkError('BUSY', busy.map((e) => e.message).join('; '));
      }
    }
    const started = performance.now();
    for (const name of names) {
      const summary: VmRunSummary = {
        name,
        status: 'ok',
        error: null,
        errorCode: null,
        consistency: null,
        consistencyNote: null,
        freezeWindowMs: null,
        ioPauseMs: null,
        autoRecoveryMs: null,
        autoRecovery: null,
        guidNames: null,
        bytesRead: 0,
        bytesNew: 0,
        bytesStored: 0,
        disks: [],
      };
      states.push({ name, summary, converted: false, referencePointId: null } as VmState);
    }
    // Once for the whole run (a run of 800 VMs must not ask 800 times): the repository's newest point of each VM.
    const previous = await opts.repo.latestPoints(names.filter((n) => !leases.refused.has(n)));
    await forEachBounded(states, bound(run), async (s) => {
      const name = s.name;
      try {
        const refused = leases.refused.get(name);
        if (refused) throw refused;
        const vm = await opts.host.showVm(name);
        if (vm.disks.length === 0) throw new TidemarkError('CONFLICT', `${name} has no disks`);
        if (vm.definition.pending)
          throw new TidemarkError('BUSY', `${name} has an unfinished ${vm.definition.pending.op}`);
        for (const check of checks) check(vm);
        s.definition = vm.definition;
        s.id = vm.id;
        s.configVersion = vm.configVersion;
        s.disks = vm.disks.map((d) => ({
          slot: d.slot,
          virtualDiskId: d.virtualDiskId,
          virtualSize: d.virtualSize,
          format: d.format,
          tracking: d.tracking,
          trackingReason: d.trackingReason ?? null,
        }));
        s.previous = previous.get(name) ?? null;
      } catch (err) {
        fail(s, err);
      }
    });
    await cleanLeftovers(run, states.filter(isOk));
    run.phases.preflightMs = performance.now() - started;
  };

/**
 * The batch phases over the VMs preflight left, in batches of `size` VMs (all of them in one: `null`), one batch
 * after another; the repository's session opens first.
 */
export function inBatches(size: (run: RunState) => number | null, ...steps: BatchStep[]): RunStep {
  return async (run) => {
    const live = run.states.filter(isOk);
    const n = size(run) ?? live.length;
    const batches: VmState[][] = [];
    for (let i = 0; i < live.length; i += n) batches.push(live.slice(i, i + n));
    if (live.length > 0) run.session = await run.opts.repo.startBackup({ operation: 'backup' });
    for (const ready of batches) {
      const batch: BatchState = { ready, cleanups: [] };
      try {
        for (const step of steps) if ((await step(run, batch)) === false) break;
      } finally {
        for (const cleanup of batch.cleanups.reverse()) await cleanup();
      }
    }
  };
}

/** 2. A recovery checkpoint per VM of the batch, concurrently within a bound. */
export const checkpoints: BatchStep = async (run, batch) => {
  const { opts, leases, log, fail } = run;
  const started = performance.now();
  await forEachBounded(batch.ready, bound(run), async (s) => {
    try {
      const cp = await opts.host.createCheckpoint(s.name, {
        type: 'recovery',
        name: `${CHECKPOINT_PREFIX} ${new Date().toISOString()}`,
        consistency: opts.consistency === 'crash' ? 'crash' : 'application',
        requireConsistency: opts.consistency === 'app-required',
        lease: leases.lease(s.name),
      });
      s.checkpoint = cp;
      Object.assign(s.summary, {
        consistency: cp.consistency,
        consistencyNote: cp.consistencyNote,
        freezeWindowMs: cp.freezeWindowMs,
        ioPauseMs: cp.ioPauseMs,
      });
      log(`${s.name}: recovery checkpoint, ${cp.consistency}-consistent (${cp.consistencyNote ?? ''})`);
    } catch (err) {
      fail(s, err);
    }
  });
  run.phases.checkpointMs += performance.now() - started;
  batch.ready = batch.ready.filter((s) => s.checkpoint && isOk(s));
  return batch.ready.length > 0;
};

/**
 * 3. The batch's snapshot set: ONE storage snapshot of every frozen file of the batch (`none`: no snapshot, the
 * frozen parents served as they are), released when the batch ends. When it cannot be made, the batch's VMs fail
 * and their checkpoints are deleted.
 */
function snapshotSet(provider: (run: RunState) => 'cow' | 'reflink' | 'none'): BatchStep {
  return async (run, batch) => {
    const { opts, leases, log, fail, errors } = run;
    const ready = batch.ready;
    let set: SnapshotSetInfo;
    try {
      set = await timed(run, 'snapshotMs', () =>
        opts.host.createSnapshotSet({
          vms: ready.map((s) => ({ name: s.name, checkpoint: s.checkpoint!.id, lease: leases.lease(s.name) })),
          provider: provider(run),
        }),
      );
      run.snapshots += set.storageSnapshots;
      if (set.timings.holdMs !== null)
        run.phases.snapshotHoldMs = Math.max(run.phases.snapshotHoldMs ?? 0, set.timings.holdMs);
      log(`snapshot set ${set.id.slice(0, 8)}: ${set.storageSnapshots} storage snapshot(s) for ${ready.length} VM(s)`);
    } catch (err) {
      for (const s of ready) {
        fail(s, err);
        await opts.host
          .deleteCheckpoint(s.name, s.checkpoint!.id, { lease: leases.lease(s.name) })
          .catch((e) => log(`${s.name}: cleanup: ${describeError(e)}`));
      }
      return false;
    }
    batch.set = set;
    batch.read = { set, target: run.nbdTarget };
    batch.cleanups.push(() =>
      opts.host
        .releaseSnapshotSet(
          set.id,
          ready.every(isOk),
          ready.map((s) => leases.lease(s.name)).find((l) => l !== undefined),
        )
        .then(
          () => undefined,
          (e) => {
            errors.push(`release snapshot set: ${describeError(e)}`);
          },
        ),
    );
  };
}

export const oneSnapshot = snapshotSet((run) => run.opts.provider ?? 'cow');
export const noSnapshot = snapshotSet(() => 'none');

/**
 * 4. Each recovery checkpoint converted to a reference point (side by side within the checkpoint bound). After
 * the data phase (no-snapshot), the entries already read get the reference point's id.
 */
export const referencePoints: BatchStep = async (run, batch) => {
  const owner = { kind: 'repository' as const, id: run.opts.repo.config.id };
  await timed(run, 'referencePointMs', () =>
    convertAll(run.opts.host, batch.ready, owner, run.leases, run.fail, run.log, bound(run)),
  );
  for (const s of batch.ready)
    if (s.entry) (s.entry as { referencePointId?: string | null }).referencePointId = s.referencePointId;
};

/**
 * 2008r2: the host mounts every disk of the batch from the snapshot and recovers it (auto-recovery.ts); the data
 * phase reads the recovered overlays.
 */
export const hostAutoRecovery: BatchStep = async (run, batch) => {
  const mount = await timed(run, 'autoRecoveryMs', () =>
    autoRecover(run.opts, batch.ready, batch.set!, run.nbdTarget, run.fail, run.log),
  );
  if (!mount) return;
  batch.read = { set: mount.set, target: mount.target };
  batch.cleanups.push(() =>
    mount.mount.close().catch((e) => {
      run.errors.push(`auto-recovery clean-up: ${describeError(e)}`);
    }),
  );
};

/** 5. The data phase of a batch: each VM's disks read into the session, at most `vmParallel` VMs at once. */
export const data: BatchStep = async (run, batch) => {
  const { set, target, targetOf } = batch.read!;
  await timed(run, 'dataMs', () =>
    forEachBounded(batch.ready, run.opts.vmParallel ?? 4, async (s) => {
      if (!isOk(s)) return;
      try {
        s.entry = await backupVm(
          run.opts,
          run.data,
          s,
          set,
          (slot) => targetOf?.(s.name, slot) ?? target,
          run.session!,
        );
      } catch (err) {
        run.fail(s, err);
      }
    }),
  );
};

/** Commit: the manifest last, naming only the VMs whose data is complete (none: the session aborted). */
export const commit: RunStep = async (run) => {
  const done = run.states.filter((s) => isOk(s) && s.entry);
  if (run.session && done.length > 0) {
    const parent = done.map((s) => s.previous?.id).find((x) => x) ?? null;
    const m = await run.session.commit({
      flow: run.flow,
      parentId: parent,
      vms: done.map((s) => s.entry!) as VmEntry[],
      snapshots: run.snapshots,
    });
    run.pointId = m.id;
    run.log(`restore point ${run.pointId} committed (${done.length} VM(s))`);
  } else {
    await run.session?.abort();
    run.session = undefined;
  }
};

/**
 * 6. Only after the commit, per VM whose data it holds: destroy this repository's previous reference points (never
 * another repository's, a person's, or an unowned one).
 */
export const release: RunStep = async (run) => {
  if (!run.pointId) return;
  const done = run.states.filter((s) => isOk(s) && s.entry);
  await forEachBounded(done, bound(run), async (s) => {
    if (!s.referencePointId) return;
    await destroyPreviousReferencePoints(run.opts.host, s, run.opts.repo.config.id, s.referencePointId, run.log).catch(
      (e) => run.errors.push(`${s.name}: destroying previous reference points: ${describeError(e)}`),
    );
  });
};

/**
 * The 2008r2 flow's auto-recovery: the batch's disks mounted from the snapshot and recovered on this side
 * (auto-recovery.ts); returns the set as the data phase reads it (the recovered overlays) and where. A failure
 * fails the batch's VMs (their snapshot cannot be read as the guest left it).
 */
async function autoRecover(
  opts: BackupSetOptions,
  ready: VmState[],
  set: SnapshotSetInfo,
  nbdTarget: NbdDial,
  fail: (s: VmState, err: unknown) => void,
  log: (line: string) => void,
): Promise<{ mount: HostMount; set: SnapshotSetInfo; target: NbdDial } | null> {
  const live = ready.filter((s) => s.summary.status === 'ok');
  if (live.length === 0) return null;
  const names = new Set(live.map((s) => s.name));
  try {
    const mount = await HostMount.mount(
      set.exports.filter((e) => names.has(e.vm)),
      { nbd: nbdTarget, tlsDir: opts.nbdTlsDir, parallel: opts.checkpointConcurrency ?? 4, log },
    );
    for (const s of live) {
      const r = mount.recovered.get(s.name);
      // A disk the recovery changed holds what no tracking id sealed: read in full, and recorded without an id,
      // so no incremental (this run's or the next's) mixes it with the checkpoint's content.
      for (const d of s.disks) {
        const bytes = mount.changedBytes(s.name, d.slot);
        if (bytes > 0) {
          s.recovered ??= new Map();
          s.recovered.set(
            d.slot,
            `auto-recovery on the host changed ${bytes} bytes of the disk: its content is the recovered file system, which no change-tracking id describes`,
          );
        }
      }
      s.summary.autoRecoveryMs = r?.ms ?? null;
      s.summary.autoRecovery = r?.note ?? null;
      log(`${s.name}: auto-recovery on the host in ${(r?.ms ?? 0).toFixed(0)} ms: ${r?.note ?? ''}`);
    }
    const exports = set.exports.map((e) => ({ ...e, export: mount.exportOf(e.vm, e.slot) ?? e.export }));
    return { mount, set: { ...set, exports }, target: mount.target };
  } catch (err) {
    for (const s of live) fail(s, err);
    return null;
  }
}

/**
 * What backup runs that ended (their leases expired, released, or reclaimed from an ended process) left on
 * the host for the run's VMs: their snapshot sets (released) and their recovery checkpoints (merged back, newest
 * first); recovery checkpoints named by a run of a host older than leases count too. A live run's are never
 * touched, nor sets made outside a run, nor a person's own checkpoints. The host's leases and snapshot sets are
 * listed once for the whole run; a VM whose clean-up fails fails.
 */
async function cleanLeftovers(run: RunState, ready: VmState[]): Promise<void> {
  const { opts, leases, log } = run;
  const host = opts.host;
  if (ready.length === 0) return;
  const [liveLeases, sets] = await Promise.all([host.listLeases(), host.listSnapshotSets()]);
  const live = new Set(liveLeases.map((l) => l.id));
  const ours = new Set(ready.map((s) => s.name));
  for (const set of sets) {
    const vms = set.vms.filter((v) => ours.has(v.name)).map((v) => v.name);
    if (vms.length === 0) continue;
    const made = set.vms.map((v) => v.lease).filter((l): l is string => l !== null);
    if (made.length === 0 || made.some((l) => live.has(l))) continue;
    log(
      `${vms.join(', ')}: releasing snapshot set ${set.id.slice(0, 8)} left by run ${set.runId ?? '?'}, which has ended`,
    );
    await host.releaseSnapshotSet(set.id, false).catch((e) => log(`${vms.join(', ')}: ${describeError(e)}`));
  }
  await forEachBounded(ready, bound(run), async (s) => {
    const vm = s.name;
    try {
      // The checkpoints preflight read with the definition (the run holds the VM's lease: no other run adds any).
      const stale = s.definition.checkpoints.filter(
        (c) => c.type === 'recovery' && (c.run ? !live.has(c.run.lease) : (c.name ?? '').startsWith(CHECKPOINT_PREFIX)),
      );
      for (const cp of stale.reverse()) {
        log(
          `${vm}: removing recovery checkpoint ${cp.id.slice(0, 8)} left by run ${cp.run?.runId ?? '(before leases)'}`,
        );
        await host
          .deleteCheckpoint(vm, cp.id, { lease: leases.lease(vm) })
          .catch((e) => log(`${vm}: ${describeError(e)}`));
      }
    } catch (err) {
      run.fail(s, err);
    }
  });
}

/**
 * Destroys the reference points of the VM this repository made before `keep`; no one else's. They are the ones
 * preflight read with the definition (the run holds the VM's lease: only this run made one since, `keep`); one
 * destroyed meanwhile by someone else is gone already.
 */
async function destroyPreviousReferencePoints(
  host: HostClient,
  s: VmState,
  repositoryId: string,
  keep: string,
  log: (line: string) => void,
): Promise<void> {
  for (const rp of s.definition.referencePoints) {
    if (rp.id === keep || rp.owner?.kind !== 'repository' || rp.owner.id !== repositoryId) continue;
    try {
      await host.destroyReferencePoint(s.name, rp.id);
    } catch (err) {
      if (err instanceof TidemarkError && err.code === 'NOT_FOUND') continue;
      throw err;
    }
    log(`${s.name}: destroyed this repository's previous reference point ${rp.id.slice(0, 8)}`);
  }
}

async function convertAll(
  host: HostClient,
  ready: VmState[],
  owner: { kind: 'repository'; id: string },
  leases: RunLeases,
  fail: (s: VmState, err: unknown) => void,
  log: (line: string) => void,
  concurrency: number,
): Promise<void> {
  // Each VM's merge is its own: converted side by side within the checkpoint phase's bound.
  await forEachBounded(ready, concurrency, async (s) => {
    if (s.converted || !s.checkpoint) return;
    try {
      const rp = await host.convertToReferencePoint(s.name, s.checkpoint.id, { owner, lease: leases.lease(s.name) });
      s.converted = true;
      s.referencePointId = rp.id;
      log(`${s.name}: reference point ${rp.id.slice(0, 8)}`);
    } catch (err) {
      fail(s, err);
    }
  });
}

/** Where the snapshot's exports are served, with client TLS when the host requires it. */
