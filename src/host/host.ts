/**
 * The host (Hyper-V's VMMS): owns a store directory of VM definitions, their disks and tracking files;
 * opens a running VM's disks and serves them over NBD; cuts live checkpoints on differencing disks;
 * merges them back online; keeps reference points; answers change queries; runs jobs. While it runs it is
 * the only writer of the store's files. Every multi-file operation is journaled in the VM's definition
 * first, so a host killed at any point finishes or rolls it back when it starts again.
 *
 * This class is the composition: each service lives in its own file behind a narrow port (what it needs of
 * the others), as Hyper-V splits the VMMS into WMI services:
 * - vm-store.ts: definitions, paths, the journal, the recovery at start-up, names reserved by imports;
 * - vm-lifecycle.ts: create, modify, start, stop, save, delete, imports, and the run state (open disks, QEMU);
 * - checkpoint-plan.ts (the decision) and checkpoints.ts (its execution): create, delete, apply;
 * - reference-points.ts: convert, create, destroy;
 * - images.ts: change queries, disk files in the store;
 * - snapshot-sets.ts: storage snapshots of VM sets served for backups.
 */
import path from 'node:path';
import { loadClientTls, NbdServer, TlsCredentials } from '../nbd/index.js';
import type { ChangesResult } from '../tracking/tracker.js';
import type { VhdxInfo } from '../formats/vhdx/info.js';
import type { VhdInfo } from '../formats/vhd/info.js';
import type { OpenedDisk } from '../disk/open.js';
import { KeyedMutex } from '../util/mutex.js';
import { HotPlugs } from './hot-plug.js';
import { createProvider, PROVIDER_NAMES } from '../snapshot/index.js';
import { Checkpoints, type CheckpointHook, type CheckpointRequest } from './checkpoints.js';
import type { ConsistencyProvider } from './consistency.js';
import type { ConvertDisksHook, ConvertDisksResult, ConvertTarget } from './convert-disks.js';
import type { Checkpoint, ReferencePoint, ReferencePointOwner, VmDefinition } from './definition.js';
import { guestConsistency } from './guest-consistency.js';
import { Images } from './images.js';
import type { ImportInfo, ImportOwner } from './imports.js';
import { JobManager } from './jobs.js';
import { Leases } from './leases.js';
import { HostLog } from './log.js';
import { ReferencePoints } from './reference-points.js';
import { SnapshotSets } from './snapshot-sets.js';
import { DiskPathPolicy, privateDir, tightenStore } from './store-access.js';
import {
  VmLifecycle,
  type CommitImportRequest,
  type CreateVmRequest,
  type ModifyVmRequest,
  type QemuOptions,
  type VmSummary,
} from './vm-lifecycle.js';
import type { VmRuntime } from './vm-runtime.js';
import { VmStore, type LeaseRef, type VmGuard } from './vm-store.js';

export type { ConsistencyProvider } from './consistency.js';
export type { CheckpointRequest } from './checkpoints.js';
export type {
  CommitImportRequest,
  CreateVmRequest,
  ModifyVmRequest,
  NewDisk,
  TrackingState,
  VmSummary,
} from './vm-lifecycle.js';
export { exportName } from './vm-lifecycle.js';
export type { LeaseRef } from './vm-store.js';

export interface HostOptions {
  store: string;
  /** Where VMs' disks are served (default: a unix socket `nbd.sock` in the store). */
  nbd?: {
    socket?: string;
    port?: number;
    host?: string;
    /**
     * Require TLS with client certificates on the host's NBD: a directory in QEMU's `tls-creds-x509` layout
     * holding both sides (ca-cert.pem, server-cert.pem, server-key.pem for the server; client-cert.pem,
     * client-key.pem for the QEMU processes of the host's VMs).
     */
    tlsDir?: string;
  };
  /** Application consistency for production and recovery checkpoints (the guest integration plugs in here). */
  consistency?: ConsistencyProvider;
  log?: HostLog;
  /** Directories besides the store that VM disks may be attached from (`tidemark host --allow-disk-dir`). */
  allowDiskDirs?: string[];
  /** vm-runtime: how VMs with a boot source run (QEMU binary, accelerator, NBD reconnect delay, stop limits). */
  qemu?: QemuOptions;
  /** Test seams: called between the durable steps of multi-file operations (crash tests stop the host there). */
  hooks?: { convertDisks?: ConvertDisksHook; checkpoints?: CheckpointHook };
}

export class Host {
  readonly jobs = new JobManager();
  readonly nbd: NbdServer;
  readonly log: HostLog;
  /** Storage snapshots of VM sets, served as read-only exports for backups. */
  readonly snapshots: SnapshotSets;
  private readonly vms: VmStore;
  private readonly lifecycle: VmLifecycle;
  private readonly checkpoints: Checkpoints;
  private readonly referencePoints: ReferencePoints;
  private readonly images: Images;
  private consistency: ConsistencyProvider;

  /** Disks hot-added to a VM's SCSI controller (the 2012 R2 flow's auto-recovery inside the VM). */
  readonly hotPlugs: HotPlugs;

  private constructor(
    readonly store: string,
    private readonly opts: HostOptions,
    /** One backup run or checkpoint operation per VM at a time. */
    readonly leases: Leases,
    /** Where disks may be attached from. */
    readonly diskPaths: DiskPathPolicy,
    nbdTls: TlsCredentials | undefined,
  ) {
    this.nbd = new NbdServer({ tls: nbdTls });
    this.consistency = opts.consistency ?? guestConsistency();
    this.log = opts.log ?? new HostLog();
    const log = this.log;
    const vms = (this.vms = new VmStore(store, log));
    // One operation per VM at a time, across every service; a leased VM only for its run.
    const locks = new KeyedMutex();
    const guard: VmGuard = {
      locked: (vm, fn) => locks.run(vm, fn),
      leased: (vm, lease, op, fn) => locks.run(vm, () => leases.during(vm, lease, op, fn)),
    };
    const lifecycle = (this.lifecycle = new VmLifecycle({
      store: vms,
      guard,
      leases,
      diskPaths,
      nbd: this.nbd,
      log,
      qemu: opts.qemu,
      nbdTlsDir: opts.nbd?.tlsDir,
      convertDisksHook: opts.hooks?.convertDisks,
    }));
    const running = (name: string) => lifecycle.runningDisks(name);
    this.checkpoints = new Checkpoints({
      store: vms,
      guard,
      leaseHolder: (vm) => leases.holder(vm),
      runningDisks: running,
      qemuRunning: (vm) => lifecycle.qemuRunning(vm),
      runtime: (vm) => lifecycle.runtime(vm),
      consistency: () => this.consistency,
      log,
      hook: opts.hooks?.checkpoints,
    });
    this.referencePoints = new ReferencePoints({
      store: vms,
      guard,
      runningDisks: running,
      checkpoints: this.checkpoints,
      log,
    });
    this.images = new Images({
      store: vms,
      runningDisk: (vm, slot) => lifecycle.runningDisks(vm)?.get(slot),
      assertNotOpen: (file) => lifecycle.assertNotOpen(file),
    });
    this.hotPlugs = new HotPlugs({
      definition: (name) => vms.get(name),
      qemu: (name) => (lifecycle.qemuRunning(name) ? lifecycle.runtime(name) : undefined),
      checkLease: (vm, lease) => leases.check(vm, lease),
    });
    this.snapshots = new SnapshotSets({
      store,
      nbd: this.nbd,
      diffAreaRoot: path.join(store, 'snapshots'),
      definition: (name) => vms.get(name),
      vmDir: (name) => vms.vmDir(name),
      abs: (def, p) => vms.abs(def, p),
      allowedRoots: (def) => vms.diskOptions(def).allowedRoots,
      runningDisks: running,
      checkLease: (vm, lease) => leases.check(vm, lease),
      leaseLive: (id) => leases.isLive(id),
      leaseHolder: (vm) => leases.holder(vm),
    });
  }

  /**
   * Opens the store (creating it, private, if needed; tightening an older one), reloads the leases, recovers
   * interrupted operations and imports, and restarts running VMs.
   */
  static async open(opts: HostOptions): Promise<Host> {
    const store = path.resolve(opts.store);
    const log = opts.log ?? new HostLog();
    await privateDir(store);
    await privateDir(path.join(store, 'vms'));
    const tightened = await tightenStore(store);
    if (tightened > 0) log.info(`made ${tightened} file(s) and folder(s) of the store private (0600/0700)`);
    const diskPaths = await DiskPathPolicy.create(store, opts.allowDiskDirs ?? []);
    const leases = await Leases.load(path.join(store, 'leases.json'), log);
    const nbdTls = await loadHostNbdTls(opts.nbd?.tlsDir);
    const host = new Host(store, { ...opts, log }, leases, diskPaths, nbdTls);
    // Diff areas of snapshots a killed host left behind: the live files were never touched; free the space.
    for (const provider of PROVIDER_NAMES) {
      const removed = await createProvider(provider).recover({ diffAreaRoot: path.join(store, 'snapshots') });
      if (removed > 0) host.log.warn(`removed ${removed} stale ${provider} snapshot area(s)`);
    }
    await host.vms.load();
    const nbd = opts.nbd ?? {};
    await host.nbd.listen(
      nbd.port !== undefined ? { port: nbd.port, host: nbd.host } : { socket: nbd.socket ?? host.nbdSocket },
    );
    await host.lifecycle.resumeAll();
    return host;
  }

  get nbdSocket(): string {
    return this.opts.nbd?.socket ?? path.join(this.store, 'nbd.sock');
  }

  setConsistencyProvider(p: ConsistencyProvider): void {
    this.consistency = p;
  }

  // ---------------------------------------------------------------- VMs (vm-lifecycle.ts)

  listVms(): Promise<VmSummary[]> {
    return this.lifecycle.listVms();
  }

  /** Configuration versions this host supports (oldest first) and the one new VMs get. */
  configVersions(): { supported: string[]; default: string } {
    return this.lifecycle.configVersions();
  }

  getVm(name: string): VmDefinition {
    return this.lifecycle.getVm(name);
  }

  showVm(name: string): Promise<VmSummary & { definition: VmDefinition }> {
    return this.lifecycle.showVm(name);
  }

  createVm(req: CreateVmRequest): Promise<VmSummary> {
    return this.lifecycle.createVm(req);
  }

  modifyVm(name: string, req: ModifyVmRequest & LeaseRef): Promise<VmSummary> {
    return this.lifecycle.modifyVm(name, req);
  }

  /** Update-VMVersion: the VM (off) moves to `version` (default: the host's default), never down. */
  upgradeVm(name: string, opts: { version?: string } & LeaseRef = {}): Promise<VmSummary> {
    return this.lifecycle.upgradeVm(name, opts);
  }

  /** Convert-VHD + Set-VMHardDiskDrive: the VM's VHD disks become VHDX beside them (the VM off). */
  convertDisks(name: string, opts: { to: ConvertTarget } & LeaseRef): Promise<ConvertDisksResult & { vm: VmSummary }> {
    return this.lifecycle.convertDisks(name, opts);
  }

  startVm(name: string): Promise<VmSummary> {
    return this.lifecycle.startVm(name);
  }

  stopVm(name: string, opts: { turnOff?: boolean; force?: boolean } = {}): Promise<VmSummary> {
    return this.lifecycle.stopVm(name, opts);
  }

  deleteVm(name: string, opts: { removeFiles?: boolean } = {}): Promise<void> {
    return this.lifecycle.deleteVm(name, opts);
  }

  /** Saves a running VM's memory and device state and ends its QEMU (Saved); `vm start` restores it. */
  saveVm(name: string): Promise<VmSummary> {
    return this.lifecycle.saveVm(name);
  }

  /** Pauses or resumes a VM's QEMU. */
  pauseVm(name: string, pause: boolean): Promise<VmSummary> {
    return this.lifecycle.pauseVm(name, pause);
  }

  /** The serial console log from `offset` (at most `max` bytes): `{ data, offset: next, size }`. */
  readConsole(name: string, offset = 0, max = 65536): Promise<{ data: string; offset: number; size: number }> {
    return this.lifecycle.readConsole(name, offset, max);
  }

  /** The VM's runtime (made once), wired so that QEMU ending by itself (guest power-off, crash) closes the disks. */
  runtime(name: string): VmRuntime {
    return this.lifecycle.runtime(name);
  }

  /** The open virtual disk of a running VM's slot (for in-process workloads and backup exports). */
  runningDisk(name: string, slot: string): OpenedDisk {
    return this.lifecycle.runningDisk(name, slot);
  }

  // ---------------------------------------------------------------- imports (restore --register)

  /** Reserves a name for a restored VM and makes its (private) folder, before anything is restored. */
  reserveImport(name: string, owner: ImportOwner): Promise<ImportInfo> {
    return this.lifecycle.reserveImport(name, owner);
  }

  listImports(): ImportInfo[] {
    return this.lifecycle.listImports();
  }

  /** Registers the restored disks as the new VM; the import ends either way. */
  commitImport(name: string, req: CommitImportRequest): Promise<VmSummary> {
    return this.lifecycle.commitImport(name, req);
  }

  /** Ends an import without registering it: its folder and everything written into it are removed. */
  cancelImport(name: string): Promise<void> {
    return this.lifecycle.cancelImport(name);
  }

  // ---------------------------------------------------------------- checkpoints (checkpoints.ts)

  listCheckpoints(name: string): (Checkpoint & { current: boolean })[] {
    return this.checkpoints.list(name);
  }

  /** Cuts a checkpoint (checkpoint-plan.ts decides what kind; checkpoints.ts cuts it). */
  createCheckpoint(name: string, req: CheckpointRequest = {}): Promise<Checkpoint> {
    return this.checkpoints.create(name, req);
  }

  /** Deletes a checkpoint whose files no newer checkpoint needs, merging online when the VM runs on it. */
  deleteCheckpoint(name: string, checkpoint: string, opts: LeaseRef = {}): Promise<void> {
    return this.checkpoints.delete(name, checkpoint, opts);
  }

  /** Applies a checkpoint to a VM that is off: the VM continues from a new child of the checkpoint's files. */
  applyCheckpoint(name: string, checkpoint: string, opts: LeaseRef = {}): Promise<void> {
    return this.checkpoints.apply(name, checkpoint, opts);
  }

  // ---------------------------------------------------------------- reference points (reference-points.ts)

  listReferencePoints(name: string): ReferencePoint[] {
    return this.referencePoints.list(name);
  }

  /** ConvertToReferencePoint: a recovery checkpoint merged back online, its sealed ids kept. */
  convertToReferencePoint(
    name: string,
    checkpoint: string,
    opts: { owner?: ReferencePointOwner | null } & LeaseRef = {},
  ): Promise<ReferencePoint> {
    return this.referencePoints.convert(name, checkpoint, opts);
  }

  /** CreateReferencePoint without a checkpoint: seals every disk's id now. */
  createReferencePoint(name: string, opts: { owner?: ReferencePointOwner | null } = {}): Promise<ReferencePoint> {
    return this.referencePoints.create(name, opts);
  }

  destroyReferencePoint(name: string, id: string): Promise<void> {
    return this.referencePoints.destroy(name, id);
  }

  // ---------------------------------------------------------------- image management (images.ts)

  /**
   * GetVirtualDiskChanges: ranges changed since `limitId` (a sealed RCT id), paged by offset and length.
   * `target` is a VM disk (`{ vm, slot }`) or a disk file in the store.
   */
  virtualDiskChanges(
    target: { vm: string; slot: string } | { path: string },
    limitId: string,
    offset = 0,
    length?: number,
    maxRanges?: number,
  ): Promise<ChangesResult & { virtualDiskId: string }> {
    return this.images.virtualDiskChanges(target, limitId, offset, length, maxRanges);
  }

  diskInfo(file: string): Promise<VhdxInfo | VhdInfo> {
    return this.images.diskInfo(file);
  }

  createDisk(file: string, opts: { size: number; blockSize?: number; tracking?: boolean }): Promise<string> {
    return this.images.createDisk(file, opts);
  }

  mergeDisk(childPath: string): Promise<{ parentPath: string; bytesCopied: number }> {
    return this.images.mergeDisk(childPath);
  }

  // ---------------------------------------------------------------- shutdown

  /** Stops serving, flushes and closes every open disk cleanly (VMs keep state Running for the next start). */
  async close(): Promise<void> {
    if (this.vms.isClosed) return;
    this.vms.close();
    await this.lifecycle.detachRuntimes();
    await this.jobs.drain();
    await this.snapshots.releaseAll();
    await this.nbd.close();
    await this.lifecycle.closeAllDisks();
  }
}

/**
 * The host NBD's TLS credentials, both sides checked at start: the server's, and the client's its VMs'
 * QEMU processes present (so a VM does not fail at its first start with a missing file).
 */
async function loadHostNbdTls(dir: string | undefined): Promise<TlsCredentials | undefined> {
  if (dir === undefined) return undefined;
  const server = await TlsCredentials.load(dir);
  await loadClientTls(dir);
  return server;
}
