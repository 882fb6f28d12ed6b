/**
 * A backup-set run, the Windows Server 2016 way (DESIGN.md "A backup-set run"):
 *   1. preflight every VM (disks, configuration version, the previous restore point's ids);
 *   2. checkpoint phase: a recovery checkpoint per VM, concurrently within a bound (guest frozen when it can);
 *   3. ONE storage snapshot of every VM's frozen files, whatever the number of VMs;
 *   4. each recovery checkpoint converted to a reference point (merged back online, ids kept);
 *   5. data phase: per disk, the changes since the previous point's id (or everything allocated, and why)
 *      read from the snapshot's read-only NBD exports, chunked, hashed, stored; the manifest written last;
 *   6. release the snapshot; only after the commit, destroy this repository's previous reference points.
 * Each is a named step (phases.ts) and each flow a composition of them (flows.ts): `per-vm` takes one snapshot
 * per batch of N VMs (2012 R2); `2008r2` does too, then mounts every disk of the batch from the snapshot and
 * recovers it on the host before reading it (auto-recovery.ts); `no-snapshot` reads the frozen parents while the
 * checkpoints exist and converts afterwards. The data phase reads VMs in parallel (bounded). The run talks to the
 * host only through its API and reads data only through NBD, so it could run on another machine.
 *
 * A run holds each VM's lease from preflight to its end (run-leases.ts): a second run of the same VM gets
 * BUSY (or waits), and the checkpoints and snapshot sets the run makes carry its lease, so clean-up of what
 * a dead run left never touches a live run's. Reference points belong to the repository that made them
 * (its id): other repositories' and people's are never destroyed.
 */
import { randomInt } from 'node:crypto';
import type { HostClient } from '../api/client.js';
import { loadClientTls } from '../nbd/tls.js';
import { TidemarkError } from '../errors.js';
import { DEFAULT_AUDIT, formatRate, type AuditMode } from './audit.js';
import { FLOWS, runFlow } from './flows.js';
import { RunLeases } from './run-leases.js';
import { describeError } from '../util/describe-error.js';
import type { BackupSetOptions, BackupSetSummary, DataPhase, NbdDial, RunState, VmState } from './run-types.js';

export type {
  BackupEvents,
  BackupSetOptions,
  BackupSetSummary,
  ConsistencyMode,
  DiskRunSummary,
  Flow,
  PhaseTimes,
  VmRunSummary,
} from './run-types.js';
export { describeAudit } from './read-vm.js';

export async function runBackupSet(opts: BackupSetOptions): Promise<BackupSetSummary> {
  const started = performance.now();
  const flow = opts.flow ?? '2016';
  const steps = FLOWS[flow];
  if (!steps) throw new TidemarkError('INVALID_ARGUMENT', `unknown flow ${String(flow)}`);
  const log = (line: string) => opts.events?.log?.(line);
  const errors: string[] = [];
  const warnings: string[] = [];
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
    const msg = describeError(err);
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
  const run: RunState = {
    opts,
    flow,
    started,
    leases,
    names,
    nbdTarget,
    log,
    errors,
    warnings,
    states: [],
    fail,
    data,
    phases: {
      preflightMs: 0,
      checkpointMs: 0,
      snapshotMs: 0,
      snapshotHoldMs: null,
      referencePointMs: 0,
      autoRecoveryMs: 0,
      dataMs: 0,
    },
    snapshots: 0,
    pointId: null,
  };
  try {
    return await runFlow(steps, run);
  } finally {
    await leases.release();
  }
}

/** The host keeps a lease holder's command to 500 characters: a set of hundreds of VMs is named by its count. */
function clipCommand(command: string, vms: number): string {
  if (command.length <= 400) return command;
  const cut = command.slice(0, 400);
  return `${cut.slice(0, cut.lastIndexOf(' '))} … (${vms} VMs)`;
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
