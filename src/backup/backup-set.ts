/**
 * A backup-set run, the Windows Server 2016 way (DESIGN.md "A backup-set run"):
 *   1. preflight every VM (disks, configuration version, the previous restore point's ids);
 *   2. checkpoint phase: a recovery checkpoint per VM, concurrently within a bound (guest frozen when it can);
 *   3. ONE storage snapshot of every VM's frozen files, whatever the number of VMs;
 *   4. each recovery checkpoint converted to a reference point (merged back online, ids kept);
 *   5. data phase: per disk, the changes since the previous point's id (or everything allocated, and why)
 *      read from the snapshot's read-only NBD exports, chunked, hashed, stored; the manifest written last;
 *   6. release the snapshot; only after the commit, destroy this repository's previous reference points.
 * `per-vm` takes one snapshot per batch of N VMs (2012 R2); `2008r2` does too, then mounts every disk of the batch
 * from the snapshot and recovers it on the host before reading it (auto-recovery.ts); `no-snapshot` reads the
 * frozen parents while the checkpoints exist and converts afterwards. The data phase reads VMs in parallel
 * (bounded). The run talks to the host only through its API and reads data
 * only through NBD, so it could run on another machine.
 *
 * A run holds each VM's lease from preflight to its end (run-leases.ts): a second run of the same VM gets
 * BUSY (or waits), and the checkpoints and snapshot sets the run makes carry its lease, so clean-up of what
 * a dead run left never touches a live run's. Reference points belong to the repository that made them
 * (its id): other repositories' and people's are never destroyed.
 */
import { randomInt } from 'node:crypto';
import type { HostClient } from '../api/client.js';
import type { Checkpoint, SnapshotSetInfo } from '../api/schemas.js';
import { NbdClient, type NbdTarget } from '../nbd/client.js';
import { loadClientTls } from '../nbd/tls.js';
import { CONTEXT_BASE_ALLOCATION } from '../nbd/protocol.js';
import type { DiskEntry, PointManifest, Repository, VmEntry } from '../repository/index.js';
import { TidemarkError } from '../errors.js';
import { forEachBounded } from '../util/bounded.js';
import {
  AUDIT_TIME_FLOOR_MS,
  AUDIT_TIME_SHARE,
  DEFAULT_AUDIT,
  auditDisk,
  countDifferences,
  formatRate,
  type AuditMode,
  type AuditResult,
} from './audit.js';
import { HostMount } from './auto-recovery.js';
import { chunksTouched, copyChunks, type Range } from './disk-reader.js';
import { RunLeases } from './run-leases.js';

export type Flow = '2016' | 'per-vm' | '2008r2' | 'no-snapshot';
export type ConsistencyMode = 'app' | 'crash' | 'app-required';

export interface BackupEvents {
  /** A line worth logging (phase boundaries, fallbacks, failures). */
  log?(line: string): void;
  /** Bytes of a disk read so far (for progress bars). */
  progress?(vm: string, slot: string, done: number, total: number): void;
}

export interface BackupSetOptions {
  host: HostClient;
  repo: Repository;
  vms: string[];
  flow?: Flow;
  /** VMs per storage snapshot in the per-vm and 2008r2 flows (default 1). */
  batch?: number;
  consistency?: ConsistencyMode;
  provider?: 'cow' | 'reflink';
  /** Checkpoints created at once (default 4). */
  checkpointConcurrency?: number;
  /** VMs whose data is read at once in the data phase (default 4). */
  vmParallel?: number;
  /** Chunk reads in flight per disk (default 8). */
  readParallel?: number;
  /**
   * The tracking audit of every incremental disk (audit.ts): a sample of the chunks tracking calls unchanged
   * re-read and compared with the previous point. Default: 1% of the disk's chunks, at least 16.
   */
  audit?: AuditMode;
  /**
   * Time budget of a sampled audit, per disk, counted once the disk's changed chunks are read (it runs alongside
   * them): default 10% of the time they took, at least 2 s. A full audit has no time bound.
   */
  auditTimeMs?: number;
  /** Seed of the audit samples (default: random; logged and recorded in the manifest, to replay a run). */
  auditSeed?: number;
  events?: BackupEvents;
  /** Seconds to wait for a VM another run holds (default: BUSY at once; Infinity: until it is free). */
  wait?: number;
  /** Seconds a VM's lease lives without this run's heartbeat (default 60). */
  leaseTtlSeconds?: number;
  /** The holder's description in other runs' BUSY messages (default `tidemark backup VM...`). */
  command?: string;
  /** Client credentials for a host whose NBD requires TLS (ca-cert.pem, client-cert.pem, client-key.pem). */
  nbdTlsDir?: string;
}

export interface DiskRunSummary {
  slot: string;
  diskId: string;
  read: 'incremental' | 'full';
  fullReason: string | null;
  rctId: string | null;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  /** the tracking audit of an incremental (null: audit off, or a full read for another reason) */
  audit: AuditResult | null;
}

export interface VmRunSummary {
  name: string;
  status: 'ok' | 'failed';
  error: string | null;
  /** The error's code (`BUSY`: another run holds the VM), or null. */
  errorCode: string | null;
  consistency: 'application' | 'crash' | null;
  consistencyNote: string | null;
  freezeWindowMs: number | null;
  ioPauseMs: number | null;
  /** 2008r2 flow: the host's auto-recovery of the VM's disks (its batch's, start to served), and what it did. */
  autoRecoveryMs: number | null;
  autoRecovery: string | null;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  disks: DiskRunSummary[];
}

export interface BackupSetSummary {
  ok: boolean;
  pointId: string | null;
  flow: Flow;
  /** Storage snapshots taken by this run. */
  snapshots: number;
  durationMs: number;
  /** Time in each phase, summed over the batches (the data phase is wall time, VMs read in parallel). */
  phases: PhaseTimes;
  /** the seed of this run's audit samples (null: audit off) */
  auditSeed: number | null;
  vms: VmRunSummary[];
  errors: string[];
  /** what the run got right but someone must look at (change tracking that missed a change) */
  warnings: string[];
}

export interface PhaseTimes {
  preflightMs: number;
  checkpointMs: number;
  snapshotMs: number;
  /** The longest write hold of a storage snapshot's commit (every disk of its set paused), or null. */
  snapshotHoldMs: number | null;
  referencePointMs: number;
  autoRecoveryMs: number;
  dataMs: number;
}

/** What the data phase of every disk shares. */
interface DataPhase {
  audit: AuditMode;
  auditSeed: number;
  warn(line: string): void;
}

interface VmState {
  name: string;
  summary: VmRunSummary;
  definition: unknown;
  id: string;
  disks: { slot: string; virtualDiskId: string; virtualSize: number; tracking: string }[];
  configVersion: string;
  previous: PointManifest | null;
  checkpoint?: Checkpoint;
  converted: boolean;
  referencePointId: string | null;
  entry?: VmEntry;
  /** 2008r2: why a disk's content is the host's recovery of it rather than the checkpoint's (by slot). */
  recovered?: Map<string, string>;
}

export async function runBackupSet(opts: BackupSetOptions): Promise<BackupSetSummary> {
  const started = performance.now();
  const flow = opts.flow ?? '2016';
  const log = (line: string) => opts.events?.log?.(line);
  const errors: string[] = [];
  const warnings: string[] = [];
  const states: VmState[] = [];
  const audit = checkAuditOptions(opts);
  const data: DataPhase = {
    audit,
    auditSeed: opts.auditSeed ?? randomInt(2 ** 32),
    warn: (line) => {
      warnings.push(line);
      log(`WARNING: ${line}`);
    },
  };
  if (audit.kind !== 'off') {
    const what = audit.kind === 'full' ? 'every chunk' : `${formatRate(audit.rate)} of the chunks (at least 16)`;
    log(`tracking audit: ${what} tracking calls unchanged, seed ${data.auditSeed}`);
  }
  const fail = (s: VmState, err: unknown) => {
    const msg = err instanceof Error ? err.message : String(err);
    s.summary.status = 'failed';
    s.summary.errorCode ??= err instanceof TidemarkError ? err.code : null;
    s.summary.error ??= msg;
    errors.push(`${s.name}: ${msg}`);
    log(`${s.name}: failed: ${msg}`);
  };
  const names = [...new Set(opts.vms)];
  // Before anything changes: a host whose NBD needs TLS the run cannot speak is refused up front.
  const nbdTarget = await nbdAddress(opts.host, opts.nbdTlsDir);
  const leases = await RunLeases.acquire(opts.host, names, {
    command: clipCommand(opts.command ?? `tidemark backup ${names.join(' ')}`, names.length),
    ttlSeconds: opts.leaseTtlSeconds,
    waitSeconds: opts.wait,
    log,
  });
  try {
    return await runLeased(opts, names, leases, {
      started,
      flow,
      log,
      errors,
      warnings,
      states,
      fail,
      data,
      nbdTarget,
    });
  } finally {
    await leases.release();
  }
}

interface RunContext {
  started: number;
  /** Where the snapshot's exports are read (with client TLS when the host requires it). */
  nbdTarget: NbdDial;
  flow: Flow;
  log: (line: string) => void;
  errors: string[];
  warnings: string[];
  states: VmState[];
  fail: (s: VmState, err: unknown) => void;
  data: DataPhase;
}

async function runLeased(
  opts: BackupSetOptions,
  names: string[],
  leases: RunLeases,
  { started, flow, log, errors, warnings, states, fail, data, nbdTarget }: RunContext,
): Promise<BackupSetSummary> {
  // Nothing could be leased: the whole run is BUSY (exit 6), naming the holders.
  if (names.length > 0 && names.every((n) => leases.refused.has(n))) {
    const busy = names.map((n) => leases.refused.get(n)!);
    if (busy.every((e) => e instanceof TidemarkError && e.code === 'BUSY')) {
      throw new TidemarkError('BUSY', busy.map((e) => e.message).join('; '));
    }
  }

  // 1. Preflight, VMs side by side within the checkpoint phase's bound.
  const preflightStarted = performance.now();
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
      bytesRead: 0,
      bytesNew: 0,
      bytesStored: 0,
      disks: [],
    };
    states.push({ name, summary, converted: false, referencePointId: null } as VmState);
  }
  await forEachBounded(states, opts.checkpointConcurrency ?? 4, async (s) => {
    const name = s.name;
    try {
      const refused = leases.refused.get(name);
      if (refused) throw refused;
      const vm = await opts.host.showVm(name);
      if (vm.disks.length === 0) throw new TidemarkError('CONFLICT', `${name} has no disks`);
      if (vm.definition.pending)
        throw new TidemarkError('BUSY', `${name} has an unfinished ${vm.definition.pending.op}`);
      s.definition = vm.definition;
      s.id = vm.id;
      s.configVersion = vm.configVersion;
      s.disks = vm.disks.map((d) => ({
        slot: d.slot,
        virtualDiskId: d.virtualDiskId,
        virtualSize: d.virtualSize,
        tracking: d.tracking,
      }));
      s.previous = await opts.repo.latestPoint(name);
      await cleanLeftovers(opts.host, name, leases.lease(name), log);
    } catch (err) {
      fail(s, err);
    }
  });

  const batches: VmState[][] = [];
  const live = states.filter((s) => s.summary.status === 'ok');
  if (flow === 'per-vm' || flow === '2008r2') {
    const n = Math.max(1, opts.batch ?? 1);
    for (let i = 0; i < live.length; i += n) batches.push(live.slice(i, i + n));
  } else if (live.length > 0) batches.push(live);

  let snapshots = 0;
  const phases: PhaseTimes = {
    preflightMs: performance.now() - preflightStarted,
    checkpointMs: 0,
    snapshotMs: 0,
    snapshotHoldMs: null,
    referencePointMs: 0,
    autoRecoveryMs: 0,
    dataMs: 0,
  };
  const timed = async <T>(phase: Exclude<keyof PhaseTimes, 'snapshotHoldMs' | 'preflightMs'>, fn: () => Promise<T>) => {
    const t = performance.now();
    try {
      return await fn();
    } finally {
      phases[phase] += performance.now() - t;
    }
  };
  let session: Awaited<ReturnType<Repository['startBackup']>> | undefined;
  try {
    if (live.length > 0) session = await opts.repo.startBackup({ operation: 'backup' });
    for (const batch of batches) {
      // 2. Checkpoint phase, concurrently within a bound.
      const checkpointsStarted = performance.now();
      await forEachBounded(batch, opts.checkpointConcurrency ?? 4, async (s) => {
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
      phases.checkpointMs += performance.now() - checkpointsStarted;
      const ready = batch.filter((s) => s.checkpoint && s.summary.status === 'ok');
      if (ready.length === 0) continue;

      // 3. One storage snapshot for the batch (none in the no-snapshot flow).
      let set: SnapshotSetInfo | undefined;
      try {
        set = await timed('snapshotMs', () =>
          opts.host.createSnapshotSet({
            vms: ready.map((s) => ({ name: s.name, checkpoint: s.checkpoint!.id, lease: leases.lease(s.name) })),
            provider: flow === 'no-snapshot' ? 'none' : (opts.provider ?? 'cow'),
          }),
        );
        snapshots += set.storageSnapshots;
        if (set.timings.holdMs !== null)
          phases.snapshotHoldMs = Math.max(phases.snapshotHoldMs ?? 0, set.timings.holdMs);
        log(
          `snapshot set ${set.id.slice(0, 8)}: ${set.storageSnapshots} storage snapshot(s) for ${ready.length} VM(s)`,
        );
      } catch (err) {
        for (const s of ready) {
          fail(s, err);
          await opts.host
            .deleteCheckpoint(s.name, s.checkpoint!.id, { lease: leases.lease(s.name) })
            .catch((e) => log(`${s.name}: cleanup: ${e.message}`));
        }
        continue;
      }
      try {
        // 4. Reference points (after the data phase in the no-snapshot flow: the frozen files are read live).
        const owner = { kind: 'repository' as const, id: opts.repo.config.id };
        if (flow !== 'no-snapshot')
          await timed('referencePointMs', () =>
            convertAll(opts.host, ready, owner, leases, fail, log, opts.checkpointConcurrency ?? 4),
          );
        // 2008r2: the host mounts every disk of the batch from the snapshot and recovers it; the data phase reads that.
        const mount =
          flow === '2008r2'
            ? await timed('autoRecoveryMs', () => autoRecover(opts, ready, set!, nbdTarget, fail, log))
            : null;
        // 5. Data phase, VMs in parallel within a bound.
        try {
          await timed('dataMs', () =>
            readVms(opts, data, ready, mount?.set ?? set!, mount?.target ?? nbdTarget, session!, fail),
          );
        } finally {
          await mount?.mount.close().catch((e) => errors.push(`auto-recovery clean-up: ${e.message}`));
        }
        if (flow === 'no-snapshot') {
          await timed('referencePointMs', () =>
            convertAll(opts.host, ready, owner, leases, fail, log, opts.checkpointConcurrency ?? 4),
          );
          for (const s of ready)
            if (s.entry) (s.entry as { referencePointId?: string | null }).referencePointId = s.referencePointId;
        }
      } finally {
        await opts.host
          .releaseSnapshotSet(
            set.id,
            ready.every((s) => s.summary.status === 'ok'),
            ready.map((s) => leases.lease(s.name)).find((l) => l !== undefined),
          )
          .catch((e) => errors.push(`release snapshot set: ${e.message}`));
      }
    }

    // Commit: the manifest last, naming only the VMs whose data is complete.
    const done = states.filter((s) => s.summary.status === 'ok' && s.entry);
    let pointId: string | null = null;
    if (session && done.length > 0) {
      const parent = done.map((s) => s.previous?.id).find((x) => x) ?? null;
      const m = await session.commit({ flow, parentId: parent, vms: done.map((s) => s.entry!), snapshots });
      pointId = m.id;
      log(`restore point ${pointId} committed (${done.length} VM(s))`);
    } else {
      await session?.abort();
      session = undefined;
    }

    // 6. Only after the commit, per VM whose data it holds: destroy this repository's previous reference
    // points (never another repository's, a person's, or an unowned one).
    if (pointId) {
      await forEachBounded(done, opts.checkpointConcurrency ?? 4, async (s) => {
        if (!s.referencePointId) return;
        await destroyPreviousReferencePoints(opts.host, s.name, opts.repo.config.id, s.referencePointId, log).catch(
          (e) => errors.push(`${s.name}: destroying previous reference points: ${e.message}`),
        );
      });
    }
    return {
      ok: errors.length === 0 && pointId !== null,
      pointId,
      flow,
      snapshots,
      durationMs: performance.now() - started,
      phases,
      auditSeed: data.audit.kind === 'off' ? null : data.auditSeed,
      vms: states.map((s) => s.summary),
      errors,
      warnings,
    };
  } catch (err) {
    await session?.abort().catch(() => undefined);
    throw err;
  }
}

const CHECKPOINT_PREFIX = 'tidemark backup';

/** The host keeps a lease holder's command to 500 characters: a set of hundreds of VMs is named by its count. */
function clipCommand(command: string, vms: number): string {
  if (command.length <= 400) return command;
  const cut = command.slice(0, 400);
  return `${cut.slice(0, cut.lastIndexOf(' '))} … (${vms} VMs)`;
}

/** The data phase of a batch: each VM's disks read into the session, at most `vmParallel` VMs at once. */
async function readVms(
  opts: BackupSetOptions,
  data: DataPhase,
  ready: VmState[],
  set: SnapshotSetInfo,
  nbdTarget: NbdDial,
  session: Awaited<ReturnType<Repository['startBackup']>>,
  fail: (s: VmState, err: unknown) => void,
): Promise<void> {
  await forEachBounded(ready, opts.vmParallel ?? 4, async (s) => {
    if (s.summary.status !== 'ok') return;
    try {
      s.entry = await backupVm(opts, data, s, set, nbdTarget, session);
    } catch (err) {
      fail(s, err);
    }
  });
}

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
 * the host for this VM: their snapshot sets (released) and their recovery checkpoints (merged back, newest
 * first); recovery checkpoints named by a run of a host older than leases count too. A live run's are never
 * touched, nor sets made outside a run, nor a person's own checkpoints.
 */
async function cleanLeftovers(
  host: HostClient,
  vm: string,
  lease: string | undefined,
  log: (line: string) => void,
): Promise<void> {
  const live = new Set((await host.listLeases()).map((l) => l.id));
  for (const set of await host.listSnapshotSets()) {
    if (!set.vms.some((v) => v.name === vm)) continue;
    const made = set.vms.map((v) => v.lease).filter((l): l is string => l !== null);
    if (made.length === 0 || made.some((l) => live.has(l))) continue;
    log(`${vm}: releasing snapshot set ${set.id.slice(0, 8)} left by run ${set.runId ?? '?'}, which has ended`);
    await host.releaseSnapshotSet(set.id, false).catch((e) => log(`${vm}: ${e.message}`));
  }
  const stale = (await host.listCheckpoints(vm)).filter(
    (c) => c.type === 'recovery' && (c.run ? !live.has(c.run.lease) : (c.name ?? '').startsWith(CHECKPOINT_PREFIX)),
  );
  for (const cp of stale.reverse()) {
    log(`${vm}: removing recovery checkpoint ${cp.id.slice(0, 8)} left by run ${cp.run?.runId ?? '(before leases)'}`);
    await host.deleteCheckpoint(vm, cp.id, { lease }).catch((e) => log(`${vm}: ${e.message}`));
  }
}

/** Destroys the reference points of `vm` this repository made before `keep`; no one else's. */
async function destroyPreviousReferencePoints(
  host: HostClient,
  vm: string,
  repositoryId: string,
  keep: string,
  log: (line: string) => void,
): Promise<void> {
  for (const rp of await host.listReferencePoints(vm)) {
    if (rp.id === keep || rp.owner?.kind !== 'repository' || rp.owner.id !== repositoryId) continue;
    await host.destroyReferencePoint(vm, rp.id);
    log(`${vm}: destroyed this repository's previous reference point ${rp.id.slice(0, 8)}`);
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
async function nbdAddress(host: HostClient, tlsDir: string | undefined): Promise<NbdDial> {
  const info = await host.hostInfo();
  const a = info.nbd as { type: 'unix'; path: string } | { type: 'tcp'; host: string; port: number };
  const dial: NbdDial = a.type === 'unix' ? { socket: a.path } : { host: a.host, port: a.port };
  if (!info.nbdTls) return dial;
  if (tlsDir === undefined) {
    throw new TidemarkError(
      'UNAUTHORIZED',
      "the host's NBD requires TLS: give --nbd-tls-dir DIR (ca-cert.pem, client-cert.pem, client-key.pem) or TIDEMARK_NBD_TLS_DIR",
    );
  }
  return { ...dial, tls: await loadClientTls(tlsDir) };
}

type NbdDial = Pick<NbdTarget, 'socket' | 'host' | 'port' | 'tls'>;

/** Reads every disk of one VM into the session; returns its manifest entry. */
async function backupVm(
  opts: BackupSetOptions,
  data: DataPhase,
  s: VmState,
  set: SnapshotSetInfo,
  nbdTarget: NbdDial,
  session: Awaited<ReturnType<Repository['startBackup']>>,
): Promise<VmEntry> {
  const disks: DiskEntry[] = [];
  for (const d of s.disks) {
    const exp = set.exports.find((e) => e.vm === s.name && e.slot === d.slot);
    if (!exp) throw new TidemarkError('NOT_FOUND', `the snapshot set has no export for ${s.name} ${d.slot}`);
    const cpDisk = s.checkpoint!.disks.find((x) => x.slot === d.slot)!;
    const prevDisk = s.previous?.vms.find((v) => v.name === s.name)?.disks.find((x) => x.diskId === d.virtualDiskId);
    // What to read: the changes since the previous point's id, or, when that cannot be proven, everything.
    let ranges: Range[];
    let fullReason: string | null = null;
    let base: DiskEntry['index'] | null = null;
    // The disk's own lack of tracking comes first: it is the reason every backup of it is full.
    if (!cpDisk.rctId)
      fullReason =
        d.tracking === 'none'
          ? `the disk has no change tracking (configuration version ${s.configVersion}; tracking needs 6.2 or later)`
          : `the disk has no change tracking (its tracking files are missing; configuration version ${s.configVersion})`;
    else if (s.recovered?.has(d.slot)) fullReason = s.recovered.get(d.slot)!;
    else if (!prevDisk) fullReason = s.previous ? 'the disk is new since the previous restore point' : 'first backup';
    else if (!prevDisk.rctId) fullReason = 'the previous restore point has no change-tracking id for this disk';
    else if (prevDisk.virtualSize !== d.virtualSize) fullReason = 'the disk was resized';
    if (!fullReason) {
      try {
        ranges = (
          await opts.host.allChanges({ vm: s.name, slot: d.slot, limitId: prevDisk!.rctId!, length: d.virtualSize })
        ).ranges;
        base = prevDisk!.index;
      } catch (err) {
        if (!(err instanceof TidemarkError) || err.code !== 'MISSING_CHANGE_TRACKING_INFORMATION') throw err;
        fullReason = `change tracking refused the previous id: ${err.message}`;
      }
    }
    if (fullReason) {
      opts.events?.log?.(`${s.name} ${d.slot}: full read (${fullReason})`);
      // Everything, as the snapshot holds it: its own block status (below) skips what it does not hold. The live
      // disk's allocation is not the snapshot's: a block the guest trimmed after the checkpoint still holds the
      // checkpoint's data there, and must be read.
      ranges = [{ offset: 0, length: d.virtualSize }];
    }
    let writer = await session.openIndex({ virtualSize: d.virtualSize, base });
    const chunks = chunksTouched(ranges!, writer.chunkSize, d.virtualSize);
    // base:allocation: chunks the snapshot holds no data in are not read (pull mode, as libvirt's tools do).
    const nbd = await NbdClient.connect({ ...nbdTarget, exportName: exp.export, contexts: [CONTEXT_BASE_ALLOCATION] });
    const sizeOf = (list: number[]) =>
      list.reduce((n, c) => n + Math.min(writer.chunkSize, d.virtualSize - c * writer.chunkSize), 0);
    const copy = async (list: number[]) => {
      let done = 0;
      const total = sizeOf(list);
      await copyChunks(nbd, writer, list, {
        size: d.virtualSize,
        parallel: opts.readParallel,
        onProgress: (n) => opts.events?.progress?.(s.name, d.slot, (done += n), total),
      });
    };
    let audit: AuditResult | null = null;
    const passes = { bytesRead: 0, bytesNew: 0, bytesStored: 0 };
    try {
      // The audit runs alongside the reading of the changed chunks (it reads other slots of the same export);
      // once those are read, a sampled audit gets at most its time budget more.
      const copyStarted = performance.now();
      let copyEnded: number | null = null;
      let budget = 0;
      let abandon = false;
      const deadline = () => (abandon ? 0 : copyEnded === null ? Infinity : copyEnded + budget);
      const auditing =
        fullReason || data.audit.kind === 'off'
          ? null
          : auditDisk(nbd, writer.index, {
              mode: data.audit,
              seed: data.auditSeed,
              diskId: d.virtualDiskId,
              size: d.virtualSize,
              changed: chunks,
              hashId: (b) => opts.repo.hashId(b),
              parallel: opts.readParallel,
              deadline,
            }).then(
              (result) => ({ result }),
              (error: unknown) => ({ error }),
            );
      try {
        await copy(chunks);
      } catch (err) {
        abandon = true;
        await auditing;
        throw err;
      }
      copyEnded = performance.now();
      budget = opts.auditTimeMs ?? Math.max(AUDIT_TIME_FLOOR_MS, AUDIT_TIME_SHARE * (copyEnded - copyStarted));
      const settled = await auditing;
      if (settled && 'error' in settled) throw settled.error;
      if (settled) {
        audit = settled.result;
        if (audit.mode === 'sample') audit.timeBudgetMs = budget;
        opts.events?.log?.(`${s.name} ${d.slot}: ${describeAudit(audit)}`);
        if (audit.mismatches > 0) {
          // Tracking is distrusted for this disk in this run: every chunk read again from the same snapshot
          // into a fresh index (chunks stored by the first pass are not stored twice).
          fullReason = `tracking audit found a change at offset ${audit.firstMismatchOffset} that tracking missed`;
          opts.events?.log?.(`${s.name} ${d.slot}: TRACKING DISTRUSTED: ${fullReason}; reading the disk in full`);
          const first = writer.stats();
          passes.bytesRead += first.bytesRead;
          passes.bytesNew += first.bytesNew;
          passes.bytesStored += first.bytesStored;
          const previous = writer.index;
          writer = await session.openIndex({ virtualSize: d.virtualSize, base: null });
          await copy(Array.from({ length: writer.index.slotCount }, (_, i) => i));
          audit.missedChunks = countDifferences(writer.index, previous, chunks);
          data.warn(
            `${s.name} ${d.slot}: change tracking missed a change at offset ${audit.firstMismatchOffset}: ` +
              `${audit.missedChunks} of the ${audit.unchanged} chunks it called unchanged differ from restore point ${s.previous!.id}. ` +
              'This restore point read the disk in full and is exact; find what wrote the disk past the host ' +
              '(another program, a file put back or copied, a storage fault) before trusting its incrementals',
          );
        }
      }
    } finally {
      await nbd.close();
    }
    const index = await session.writeIndex(writer);
    const last = writer.stats();
    const stats = {
      bytesRead: passes.bytesRead + last.bytesRead,
      bytesNew: passes.bytesNew + last.bytesNew,
      bytesStored: passes.bytesStored + last.bytesStored,
    };
    // A disk the host's auto-recovery changed is recorded without an id (no later incremental builds on it).
    const rctId = s.recovered?.has(d.slot) ? null : cpDisk.rctId;
    const m = /^(ide|scsi)(\d)-(\d+)$/.exec(d.slot)!;
    disks.push({
      diskId: d.virtualDiskId,
      name: d.slot,
      controller: { bus: m[1] as 'ide' | 'scsi', controller: Number(m[2]), location: Number(m[3]) },
      virtualSize: d.virtualSize,
      logicalSectorSize: 512,
      blockSize: writer.chunkSize,
      format: 'vhdx',
      rctId,
      read: fullReason ? 'full' : 'incremental',
      fullReason,
      index,
      stats,
      audit,
    });
    s.summary.disks.push({
      slot: d.slot,
      diskId: d.virtualDiskId,
      read: fullReason ? 'full' : 'incremental',
      fullReason,
      rctId,
      bytesRead: stats.bytesRead,
      bytesNew: stats.bytesNew,
      bytesStored: stats.bytesStored,
      audit,
    });
    s.summary.bytesRead += stats.bytesRead;
    s.summary.bytesNew += stats.bytesNew;
    s.summary.bytesStored += stats.bytesStored;
  }
  return {
    name: s.name,
    id: s.id,
    definition: s.definition as VmEntry['definition'],
    consistency: s.checkpoint!.consistency,
    freezeWindowMs: s.checkpoint!.freezeWindowMs,
    ioPauseMs: s.checkpoint!.ioPauseMs,
    disks,
    referencePointId: s.referencePointId,
    consistencyNote: s.checkpoint!.consistencyNote,
  } as VmEntry;
}

/** One line about a disk's audit, for the run's log. */
export function describeAudit(a: AuditResult): string {
  const what = a.mode === 'full' ? 'every chunk' : `a sample of ${a.sampled}`;
  const outcome =
    a.mismatches > 0
      ? `MISMATCH at offset ${a.firstMismatchOffset}`
      : a.stoppedEarly
        ? `no mismatch; stopped at the time bound (${((a.timeBudgetMs ?? 0) / 1000).toFixed(1)} s) after ${a.checked} of ${a.sampled}`
        : 'no mismatch';
  return `tracking audit of ${what} of ${a.unchanged} unchanged chunks (seed ${a.seed}): ${a.checked} checked, ${outcome}, ${a.bytesRead} bytes read in ${a.timeMs.toFixed(0)} ms`;
}

/** The audit options of a run, checked (library callers get the CLI's errors). */
function checkAuditOptions(opts: BackupSetOptions): AuditMode {
  const audit = opts.audit ?? DEFAULT_AUDIT;
  if (audit.kind === 'sample' && !(audit.rate > 0 && audit.rate <= 1))
    throw new TidemarkError('INVALID_ARGUMENT', `the audit rate must be in (0, 1], not ${audit.rate}`);
  if (opts.auditTimeMs !== undefined && !(opts.auditTimeMs > 0))
    throw new TidemarkError('INVALID_ARGUMENT', `the audit time budget must be positive, not ${opts.auditTimeMs} ms`);
  if (opts.auditTimeMs !== undefined && audit.kind === 'full')
    throw new TidemarkError('INVALID_ARGUMENT', 'a full audit has no time bound: give --audit-time with a rate only');
  const seed = opts.auditSeed;
  if (seed !== undefined && !(Number.isInteger(seed) && seed >= 0 && seed <= 0xffffffff))
    throw new TidemarkError('INVALID_ARGUMENT', `the audit seed must be an integer from 0 to 4294967295, not ${seed}`);
  return audit;
}
