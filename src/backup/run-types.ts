/**
 * The types of a backup-set run: what a caller gives (options) and gets (the summary), and the small state the
 * named phases (phases.ts) pass between them: the run's, and each batch's.
 */
import type { HostClient } from '../api/client.js';
import type { Checkpoint, SnapshotSetInfo, VmDefinition } from '../api/schemas.js';
import type { NbdTarget } from '../nbd/client.js';
import type { PointManifest, Repository, VmEntry } from '../repository/index.js';
import type { AuditMode, AuditResult } from './audit.js';
import type { RunLeases } from './run-leases.js';

export type Flow = '2016' | 'per-vm' | '2012r2' | '2008r2' | 'no-snapshot';
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
  /** VMs per storage snapshot in the per-vm, 2012r2 and 2008r2 flows (default 1). */
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
  /**
   * 2008r2 flow: the host's auto-recovery of the VM's disks (its batch's, start to served), and what it did;
   * 2012r2 flow: the auto-recovery inside the VM (hot-add, the guest's recovery, hot-remove, per disk).
   */
  autoRecoveryMs: number | null;
  autoRecovery: string | null;
  /**
   * 2012r2 flow: the GUID names the writer's metadata gave the disks' checkpoint files before they existed (`.avhdx`,
   * or `.avhd` for a legacy VHD disk), and the file each became (null until lined up); null in the other flows.
   */
  guidNames: GuidName[] | null;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  disks: DiskRunSummary[];
}

export interface GuidName {
  slot: string;
  /** `{GUID}.avhdx` (`{GUID}.avhd` for a VHD disk), named before the file exists */
  name: string;
  /** the checkpoint's file it became */
  file: string | null;
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
export interface DataPhase {
  audit: AuditMode;
  auditSeed: number;
  warn(line: string): void;
}

export interface VmState {
  name: string;
  summary: VmRunSummary;
  /** The VM's definition as preflight read it (its checkpoints and reference points then: the run holds the lease). */
  definition: VmDefinition;
  id: string;
  /**
   * `format`: VHDX or legacy VHD (its checkpoint children `.avhd`); `trackingReason`: why the disk can have no
   * change tracking at all (a legacy VHD), or null.
   */
  disks: {
    slot: string;
    virtualDiskId: string;
    virtualSize: number;
    format: 'vhdx' | 'vhd';
    tracking: string;
    trackingReason: string | null;
  }[];
  configVersion: string;
  previous: PointManifest | null;
  checkpoint?: Checkpoint;
  converted: boolean;
  referencePointId: string | null;
  entry?: VmEntry;
  /** 2008r2: why a disk's content is the host's recovery of it rather than the checkpoint's (by slot). */
  recovered?: Map<string, string>;
}

/** Where the snapshot's exports are read (with client TLS when the host requires it). */
export type NbdDial = Pick<NbdTarget, 'socket' | 'host' | 'port' | 'tls'>;

export type BackupSession = Awaited<ReturnType<Repository['startBackup']>>;

/** What every phase of a run shares. */
export interface RunState {
  opts: BackupSetOptions;
  flow: Flow;
  started: number;
  leases: RunLeases;
  /** The VMs named, once each, in order. */
  names: string[];
  /** Where the snapshot's exports are read. */
  nbdTarget: NbdDial;
  log: (line: string) => void;
  errors: string[];
  warnings: string[];
  /** Every VM of the run, in order (filled by preflight). */
  states: VmState[];
  fail: (s: VmState, err: unknown) => void;
  data: DataPhase;
  phases: PhaseTimes;
  /** Storage snapshots taken so far. */
  snapshots: number;
  session?: BackupSession;
  /** Set by the commit. */
  pointId: string | null;
}

/** What the phases of one batch (one storage snapshot's VMs) share. */
export interface BatchState {
  /** The batch's VMs; after the checkpoint phase, those whose checkpoint was made. */
  ready: VmState[];
  /** The batch's snapshot set. */
  set?: SnapshotSetInfo;
  /** What the data phase reads: the set's exports and where (a recovery step may put its own in their place). */
  read?: {
    set: SnapshotSetInfo;
    target: NbdDial;
    /** Where a disk is read when not from `target` (2012r2: the overlays the guest's recovery changed). */
    targetOf?: (vm: string, slot: string) => NbdDial;
  };
  /** Run when the batch ends, last registered first (the snapshot set released, overlays closed). */
  cleanups: (() => Promise<void>)[];
}
