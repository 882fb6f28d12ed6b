/**
 * VM lifecycle (Hyper-V's Msvm_VirtualSystemManagementService and the VM worker processes): create, modify,
 * upgrade, start, stop, save, pause and delete VMs, register restored ones (imports), and the run state: a running
 * VM's disks are open and served over NBD, and a VM with a boot source is a QEMU process (vm-runtime.ts) attached
 * to those exports. The other services ask here which disks are open.
 */
import { randomUUID } from 'node:crypto';
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { openDisk, type OpenedDisk } from '../disk/open.js';
import { VhdVirtualDisk } from '../disk/vhd-disk.js';
import { TidemarkError } from '../errors.js';
import { createVhdx } from '../formats/vhdx/create.js';
import type { NbdServer } from '../nbd/index.js';
import { trackingPaths } from '../tracking/tracker.js';
import { Mutex } from '../util/mutex.js';
import { parseSize } from '../util/size.js';
import type { AccelRequest } from './accel.js';
import {
  checkConfigVersion,
  compareConfigVersions,
  CONFIG_VERSIONS,
  DEFAULT_CONFIG_VERSION,
  supportsRct,
} from './config-version.js';
import {
  DEFAULT_MEMORY_MIB,
  DEFINITION_VERSION,
  SLOT,
  VM_NAME,
  type BootDefinition,
  type CheckpointPolicy,
  type DiskAttachment,
  type VmDefinition,
} from './definition.js';
import {
  checkConvertible,
  CONVERT_TARGETS,
  convertVmDisks,
  type ConvertDisksHook,
  type ConvertDisksResult,
  type ConvertTarget,
} from './convert-disks.js';
import { diskFileFormat, probeDiskFile, trackingUnavailable, type HostDiskFormat } from './disk-files.js';
import { checkDiskPaths, enableTracking, settleChain } from './images.js';
import { dropImportMarker, writeImportMarker, type ImportInfo, type ImportOwner } from './imports.js';
import type { LeaseInfo, Leases } from './leases.js';
import type { HostLog } from './log.js';
import { parseSlot, type NbdAddress as QemuNbdAddress } from './qemu-command.js';
import { privateDir, privateFiles, type DiskPathPolicy } from './store-access.js';
import { checkScsiControllers, resolveBoot, type BootRequest } from './vm-boot.js';
import { VmRuntime, type ExitInfo, type StopOptions, type StopOutcome, type VmState } from './vm-runtime.js';
import { exists, type LeaseRef, type VmGuard, type VmStore } from './vm-store.js';

/** How VMs with a boot source run (QEMU binary, accelerator, NBD reconnect delay, stop limits). */
export interface QemuOptions {
  binary?: string;
  accel?: AccelRequest;
  reconnectDelay?: number;
  stop?: StopOptions;
}

export interface NewDisk {
  slot: string;
  /** Attach an existing VHDX (used in place). */
  path?: string;
  /** Or create a new dynamic VHDX of this size. */
  size?: number | string;
  blockSize?: number;
}

/** A new VM; how it boots (memory, CPUs, SCSI controllers, boot source, image, workload) comes from `BootRequest`. */
export interface CreateVmRequest extends BootRequest {
  name: string;
  generation?: 1 | 2;
  configVersion?: string;
  checkpointPolicy?: CheckpointPolicy;
  guest?: string | null;
  disks?: NewDisk[];
  accel?: AccelRequest;
}

export interface ModifyVmRequest {
  checkpointPolicy?: CheckpointPolicy;
  /** Upwards only, with the VM off (as Update-VMVersion). */
  configVersion?: string;
  guest?: string | null;
  attach?: NewDisk[];
  detach?: string[];
  /** Add-VMScsiController / Remove-VMScsiController: 0–4, with the VM off; never below a controller with a disk. */
  scsiControllers?: number;
}

/** Registers a reserved import: the disks written into the import's folder, the definition's settings. */
export type CommitImportRequest = Omit<CreateVmRequest, 'name'>;

/**
 * Per disk: `enabled` (the configuration version has change tracking and the disk's tracking files are there
 * or, running, attached), `none` (a version before 6.2), `missing` (the version wants it but the disk has no
 * tracking files: `vm upgrade` creates them).
 */
export type TrackingState = 'enabled' | 'none' | 'missing';

export interface VmSummary {
  name: string;
  id: string;
  state: VmState;
  generation: 1 | 2;
  configVersion: string;
  checkpointPolicy: CheckpointPolicy;
  guest: string | null;
  disks: {
    slot: string;
    virtualDiskId: string;
    virtualSize: number;
    /** VHDX, or legacy VHD (told by the magic): what the disk's checkpoint children are (`.avhdx`, `.avhd`). */
    format: HostDiskFormat;
    base: string;
    head: string;
    export: string | null;
    /** vm-runtime: the export's NBD URI while the VM runs */
    nbdUri: string | null;
    tracking: TrackingState;
    /** Why the disk can have no change tracking (a legacy VHD), or null. */
    trackingReason: string | null;
  }[];
  // vm-runtime
  memoryMiB: number;
  cpus: number;
  scsiControllers: number;
  boot: BootDefinition | null;
  image: string | null;
  /** the QEMU process, while one runs */
  qemu: { pid: number | null; qmp: string; console: string; accel: string | null; accelReason: string | null } | null;
  lastExit: ExitInfo | null;
  checkpoints: number;
  currentCheckpointId: string | null;
  referencePoints: number;
  /** The run or operation holding the VM's lease, or null. */
  lease: LeaseInfo | null;
}

/** What VM lifecycle needs of the host. */
export interface LifecycleHostAccess {
  store: Pick<
    VmStore,
    | 'root'
    | 'isClosed'
    | 'mustBeOpen'
    | 'get'
    | 'find'
    | 'has'
    | 'all'
    | 'list'
    | 'add'
    | 'remove'
    | 'save'
    | 'assertNoPending'
    | 'vmDir'
    | 'defPath'
    | 'abs'
    | 'rel'
    | 'diskOptions'
    | 'assertNameFree'
    | 'reserveName'
    | 'reservation'
    | 'releaseName'
    | 'reservations'
  >;
  guard: VmGuard;
  leases: Pick<Leases, 'holder'>;
  /** Where disks may be attached from. */
  diskPaths: Pick<DiskPathPolicy, 'check'>;
  nbd: NbdServer;
  log: HostLog;
  qemu: QemuOptions | undefined;
  /** The host NBD's TLS directory, which the QEMU processes dial with. */
  nbdTlsDir: string | undefined;
  /** Test seam: called between the durable steps of `vm convert-disks` (crash tests stop the host there). */
  convertDisksHook?: ConvertDisksHook;
}

export class VmLifecycle {
  /** The open disks of each running VM, by slot, each served as the NBD export `vm/slot`. */
  private running = new Map<string, Map<string, OpenedDisk>>();
  /** vm-runtime: the QEMU of each VM with a boot source */
  private runtimes = new Map<string, VmRuntime>();
  /** One creation (or import) at a time: the name check and the folder are one step. */
  private createLock = new Mutex();

  constructor(private readonly host: LifecycleHostAccess) {}

  // ---------------------------------------------------------------- start-up and shutdown

  /** After the store is loaded and the NBD server listens: VMs recorded Running get their disks served again. */
  async resumeAll(): Promise<void> {
    const { store, log } = this.host;
    for (const def of store.all()) {
      if (def.state === 'Running') {
        try {
          await this.openDisks(def);
        } catch (err) {
          log.warn(`could not restart ${def.name}: ${(err as Error).message}`);
          def.state = 'Off';
          await store.save(def);
        }
      }
      if (def.boot) await this.adoptRuntime(def); // vm-runtime
    }
  }

  /** vm-runtime: QEMU keeps running (its NBD client reconnects to the next host); only QMP is let go. */
  async detachRuntimes(): Promise<void> {
    for (const rt of this.runtimes.values()) await rt.detach().catch((e) => this.host.log.warn(String(e)));
  }

  /** Flushes and closes every open disk (the VMs keep state Running for the next start). */
  async closeAllDisks(): Promise<void> {
    for (const name of [...this.running.keys()]) {
      for (const disk of this.running.get(name)!.values())
        await disk.close().catch((e) => this.host.log.warn(String(e)));
    }
    this.running.clear();
  }

  // ---------------------------------------------------------------- VMs

  async listVms(): Promise<VmSummary[]> {
    const out: VmSummary[] = [];
    for (const d of this.host.store.list()) out.push(await this.summary(d));
    return out;
  }

  /** Configuration versions this host supports (oldest first) and the one new VMs get. */
  configVersions(): { supported: string[]; default: string } {
    return { supported: [...CONFIG_VERSIONS], default: DEFAULT_CONFIG_VERSION };
  }

  getVm(name: string): VmDefinition {
    const def = this.host.store.find(name);
    if (!def) throw new TidemarkError('NOT_FOUND', `no VM named ${name}`);
    return structuredClone(def);
  }

  async showVm(name: string): Promise<VmSummary & { definition: VmDefinition }> {
    const def = this.getVm(name);
    return { ...(await this.summary(def)), definition: def };
  }

  async createVm(req: CreateVmRequest): Promise<VmSummary> {
    const { store } = this.host;
    checkVmName(req.name);
    req = await resolveBoot(req); // vm-runtime: --image DIR → its kernel, initrd and command line
    const configVersion = checkConfigVersion(req.configVersion ?? DEFAULT_CONFIG_VERSION);
    // What the disk paths name is checked before the lock: no VM creation waits behind a hostile path.
    await checkDiskPaths(store.root, req.disks);
    return this.createLock.run(async () => {
      await store.assertNameFree(req.name);
      const dir = store.vmDir(req.name);
      await privateDir(dir);
      await privateDir(path.join(dir, 'disks'));
      const def = await this.register(newDefinition(req.name, { ...req, configVersion }), req.disks ?? [], dir);
      this.host.log.info(`created VM ${def.name} with ${def.disks.length} disk(s)`);
      return this.summary(def);
    });
  }

  /** Prepares the disks, then writes the definition; on any failure the VM's folder is removed. */
  private async register(def: VmDefinition, disks: NewDisk[], dir: string): Promise<VmDefinition> {
    const { store } = this.host;
    try {
      for (const d of disks) def.disks.push(await this.prepareDisk(def, d));
      store.add(def);
      await store.save(def);
      return def;
    } catch (err) {
      store.remove(def.name);
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  async modifyVm(name: string, req: ModifyVmRequest & LeaseRef): Promise<VmSummary> {
    await checkDiskPaths(this.host.store.root, req.attach);
    return this.host.guard.leased(name, req.lease, 'vm set', async () => {
      const def = this.host.store.get(name);
      // Everything is checked before anything changes; naming the version it has is no change.
      const version = req.configVersion !== undefined ? checkConfigVersion(req.configVersion) : undefined;
      const newVersion = version !== undefined && version !== def.configVersion ? version : undefined;
      if (newVersion !== undefined) this.checkVersionChange(def, newVersion);
      if (req.scsiControllers !== undefined) this.checkScsiChange(def, req);
      if ((req.attach?.length || req.detach?.length) && def.checkpoints.length > 0) {
        throw new TidemarkError('CONFLICT', `${name} has checkpoints: delete them before attaching or detaching disks`);
      }
      const qemuRuns = this.qemuRunning(name);
      for (const slot of [...(req.detach ?? []), ...(req.attach ?? []).map((d) => d.slot)]) {
        if (!qemuRuns || !SLOT.test(slot)) continue;
        const a = parseSlot(slot);
        if (a.kind === 'ide') {
          throw new TidemarkError(
            'CONFLICT',
            `${name} is running: IDE disks (${slot}) change only with the VM off, as in Hyper-V`,
          );
        }
        if (a.controller >= def.scsiControllers) {
          throw new TidemarkError(
            'CONFLICT',
            `${name} has ${def.scsiControllers} SCSI controller(s): ${slot} needs controller ${a.controller}`,
          );
        }
      }
      if (newVersion !== undefined) await this.changeVersion(def, newVersion);
      return this.applyModification(def, req);
    });
  }

  /**
   * Update-VMVersion: the VM (off) moves to `version` (default: the host's default), never down. From 6.2 on,
   * every disk's tracking files are created at once (and re-created where a disk lost them), so the next
   * checkpoint seals an id.
   */
  async upgradeVm(name: string, opts: { version?: string } & LeaseRef = {}): Promise<VmSummary> {
    return this.host.guard.leased(name, opts.lease, 'vm upgrade', async () => {
      const def = this.host.store.get(name);
      const target = opts.version ?? DEFAULT_CONFIG_VERSION;
      this.checkVersionChange(def, target);
      await this.changeVersion(def, target);
      return this.summary(def);
    });
  }

  /**
   * Convert-VHD of each VHD disk of the VM (off, without checkpoints or reference points), then Set-VMHardDiskDrive
   * onto the new VHDX (convert-disks.ts); disks already VHDX are skipped. With a configuration version from 6.2
   * the new disks are tracked at once, so the next checkpoint seals an id.
   */
  async convertDisks(
    name: string,
    opts: { to: ConvertTarget } & LeaseRef,
  ): Promise<ConvertDisksResult & { vm: VmSummary }> {
    if (!(CONVERT_TARGETS as readonly string[]).includes(opts.to)) {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `disks convert to ${CONVERT_TARGETS.join(', ')} only, not "${opts.to}"`,
      );
    }
    return this.host.guard.leased(name, opts.lease, 'vm convert-disks', async () => {
      const { store, log } = this.host;
      const def = store.get(name);
      const state = this.vmState(def);
      if (state !== 'Off') {
        throw new TidemarkError(
          'CONFLICT',
          `${name} is ${state}: stop it to convert its disks (tidemark vm stop ${name}${state === 'Saved' ? ' discards its saved state' : ''})`,
        );
      }
      store.assertNoPending(def);
      checkConvertible(def);
      const r = await convertVmDisks(def, store, log, this.host.convertDisksHook);
      return { ...r, vm: await this.summary(def) };
    });
  }

  private checkVersionChange(def: VmDefinition, target: string): void {
    checkConfigVersion(target);
    if (compareConfigVersions(target, def.configVersion) < 0) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `${def.name} has configuration version ${def.configVersion}; a configuration version cannot be lowered (to ${target})`,
      );
    }
    if (this.running.has(def.name)) {
      throw new TidemarkError('CONFLICT', `${def.name} is running: stop it to change its configuration version`);
    }
    this.host.store.assertNoPending(def);
  }

  /**
   * Add-VMScsiController / Remove-VMScsiController: 0–4 controllers, changed only with the VM off (QEMU's
   * controllers are fixed at launch; a saved state holds them too), never below a controller that holds a disk
   * once the request's own detaches and attaches are done. Naming the number it has is no change.
   */
  private checkScsiChange(def: VmDefinition, req: ModifyVmRequest): void {
    const n = checkScsiControllers(req.scsiControllers!);
    if (n === def.scsiControllers) return;
    const state = this.vmState(def);
    if (state !== 'Off') {
      throw new TidemarkError(
        'CONFLICT',
        `${def.name} is ${state}: SCSI controllers are added and removed only with the VM off (tidemark vm stop ${def.name})`,
      );
    }
    const detached = new Set(req.detach ?? []);
    const slots = [
      ...def.disks.map((d) => d.slot).filter((s) => !detached.has(s)),
      ...(req.attach ?? []).map((d) => d.slot),
    ];
    for (const slot of slots) {
      if (!SLOT.test(slot)) continue;
      const a = parseSlot(slot);
      if (a.kind === 'scsi' && a.controller >= n) {
        throw new TidemarkError(
          'CONFLICT',
          `${def.name} has a disk at ${slot} on SCSI controller ${a.controller}: detach it before lowering its SCSI controllers to ${n}`,
        );
      }
    }
  }

  private async changeVersion(def: VmDefinition, target: string): Promise<void> {
    const { store, log } = this.host;
    if (supportsRct(target)) {
      // Tracking files first: a crash before the definition names the new version leaves files the tracker
      // checks (and resets) when it first attaches, never a version that claims tracking without them.
      for (const att of def.disks) {
        if ((await enableTracking(store.abs(def, att.head), store.diskOptions(def).allowedRoots)) === 'none') {
          log.info(`${def.name} ${att.slot}: change tracking enabled`);
        }
      }
    }
    if (target === def.configVersion) return;
    const from = def.configVersion;
    def.configVersion = target;
    await store.save(def);
    log.info(`${def.name}: configuration version ${from} -> ${target}`);
  }

  private async applyModification(def: VmDefinition, req: ModifyVmRequest): Promise<VmSummary> {
    const name = def.name;
    if (req.checkpointPolicy !== undefined) def.checkpointPolicy = req.checkpointPolicy;
    if (req.scsiControllers !== undefined && req.scsiControllers !== def.scsiControllers) {
      this.host.log.info(`${name}: SCSI controllers ${def.scsiControllers} -> ${req.scsiControllers}`);
      def.scsiControllers = req.scsiControllers;
    }
    if (req.guest !== undefined) {
      def.guest = req.guest;
      if (!this.qemuRunning(name)) this.runtimes.delete(name); // vm-runtime: the next QEMU uses the new channel
    }
    for (const slot of req.detach ?? []) {
      const i = def.disks.findIndex((d) => d.slot === slot);
      if (i < 0) throw new TidemarkError('NOT_FOUND', `${name} has no disk at ${slot}`);
      const open = this.running.get(name)?.get(slot);
      if (this.qemuRunning(name)) await this.runtimes.get(name)!.detachDisk(slot); // vm-runtime: hot-unplug first
      if (open) {
        await this.host.nbd.removeExport(exportName(name, slot));
        await open.close();
        this.running.get(name)!.delete(slot);
      }
      def.disks.splice(i, 1);
    }
    for (const d of req.attach ?? []) {
      const att = await this.prepareDisk(def, d);
      def.disks.push(att);
      if (this.running.has(name)) await this.openDisk(def, att);
      if (this.qemuRunning(name)) await this.runtimes.get(name)!.attachDisk(att.slot, exportName(name, att.slot)); // vm-runtime
    }
    await this.host.store.save(def);
    return this.summary(def);
  }

  async startVm(name: string): Promise<VmSummary> {
    return this.host.guard.locked(name, async () => {
      const def = this.host.store.get(name);
      if (!this.running.has(name)) await this.openDisks(def);
      if (def.boot) await this.launchRuntime(def); // vm-runtime: QEMU on the exports just opened
      def.state = 'Running';
      await this.host.store.save(def);
      this.host.log.info(`started ${name}: ${def.disks.map((d) => exportName(name, d.slot)).join(', ')}`);
      return this.summary(def);
    });
  }

  async stopVm(name: string, opts: { turnOff?: boolean; force?: boolean } = {}): Promise<VmSummary> {
    return this.host.guard.locked(name, async () => {
      const def = this.host.store.get(name);
      const rt = this.runtimes.get(name);
      if (!opts.force) this.refuseForeignClients(def);
      if (rt?.state === 'Saved') await rt.dropSavedState(); // stopping a saved VM discards its saved state
      if (rt && rt.state !== 'Off' && rt.state !== 'Saved') {
        // vm-runtime: the guest shuts down (agent, ACPI, quit), or is turned off, before its disks close
        if (opts.turnOff) await rt.turnOff();
        else {
          const how: StopOutcome = await rt.stop(this.host.qemu?.stop);
          this.host.log.info(`${name}: stopped by ${how.by} in ${(how.ms / 1000).toFixed(1)} s`);
        }
      }
      await this.closeDisks(name);
      def.state = 'Off';
      await this.host.store.save(def);
      this.host.log.info(`stopped ${name}`);
      return this.summary(def);
    });
  }

  /**
   * A VM run by QEMU has one NBD connection per disk, its own; any other client of its exports (a qemu-io, an
   * nbdcopy, a mounted `qemu-nbd -c`...) would lose its disk under it, so stopping waits for `force`. A VM
   * without QEMU has no "own" client: whoever is attached is its guest.
   */
  private refuseForeignClients(def: VmDefinition): void {
    if (!this.qemuRunning(def.name)) return;
    const exports = new Set(def.disks.map((d) => exportName(def.name, d.slot)));
    const perExport = new Map<string, number>();
    for (const c of this.host.nbd.connections()) {
      if (c.export !== undefined && exports.has(c.export)) perExport.set(c.export, (perExport.get(c.export) ?? 0) + 1);
    }
    const foreign = [...perExport].filter(([, n]) => n > 1).map(([e, n]) => `${e}: ${n - 1}`);
    if (foreign.length === 0) return;
    throw new TidemarkError(
      'CONFLICT',
      `${def.name}: NBD clients besides its QEMU have its disks open (${foreign.join(', ')}): close them, or stop with --force`,
    );
  }

  async deleteVm(name: string, opts: { removeFiles?: boolean } = {}): Promise<void> {
    const { store } = this.host;
    return this.host.guard.leased(name, undefined, 'vm delete', async () => {
      const def = store.get(name);
      if (this.running.has(name)) throw new TidemarkError('CONFLICT', `${name} is running: stop it first`);
      store.remove(name);
      this.runtimes.delete(name);
      if (opts.removeFiles) {
        await rm(store.vmDir(name), { recursive: true, force: true });
      } else {
        // Keep the disks (and the definition, renamed) where they are, as Hyper-V keeps VHDX files.
        await rm(store.defPath(name), { force: true });
      }
      this.host.log.info(`deleted VM ${def.name}${opts.removeFiles ? ' and its files' : ''}`);
    });
  }

  // ---------------------------------------------------------------- imports (restore --register)

  /**
   * Reserves a name for a restored VM and makes its (private) folder, before anything is restored: the
   * restore writes the disks into `disksDir`, then commits or cancels.
   */
  async reserveImport(name: string, owner: ImportOwner): Promise<ImportInfo> {
    const { store } = this.host;
    checkVmName(name);
    return this.createLock.run(async () => {
      store.mustBeOpen();
      await store.assertNameFree(name);
      const dir = store.vmDir(name);
      const info: ImportInfo = {
        name,
        dir,
        disksDir: path.join(dir, 'disks'),
        owner,
        createdAt: new Date().toISOString(),
      };
      try {
        await privateDir(dir);
        await privateDir(info.disksDir);
        await writeImportMarker(info);
      } catch (err) {
        await rm(dir, { recursive: true, force: true });
        throw err;
      }
      store.reserveName(info);
      this.host.log.info(`reserved ${name} for a restore (pid ${owner.pid} on ${owner.hostname})`);
      return structuredClone(info);
    });
  }

  listImports(): ImportInfo[] {
    return this.host.store.reservations().map((i) => structuredClone(i));
  }

  /**
   * Registers the restored disks (each inside the import's folder) as the new VM. On any failure the folder
   * and everything in it is removed: the import ends either way.
   */
  async commitImport(name: string, req: CommitImportRequest): Promise<VmSummary> {
    const { store } = this.host;
    return this.createLock.run(async () => {
      store.mustBeOpen();
      const info = store.reservation(name);
      if (!info) throw new TidemarkError('NOT_FOUND', `no import reserves ${name}`);
      try {
        const configVersion = checkConfigVersion(req.configVersion ?? DEFAULT_CONFIG_VERSION);
        for (const d of req.disks ?? []) {
          const p = d.path === undefined ? undefined : path.resolve(info.disksDir, d.path);
          if (p === undefined || path.dirname(p) !== info.disksDir) {
            throw new TidemarkError(
              'PATH_NOT_ALLOWED',
              `disk ${d.slot} of import ${name} must be a file in ${info.disksDir}, not ${d.path ?? '(none)'}`,
            );
          }
        }
        const def = await this.register(newDefinition(name, { ...req, configVersion }), req.disks ?? [], info.dir);
        await dropImportMarker(info.dir);
        this.host.log.info(`registered restored VM ${name} with ${def.disks.length} disk(s)`);
        return await this.summary(def);
      } catch (err) {
        await rm(info.dir, { recursive: true, force: true });
        throw err;
      } finally {
        store.releaseName(name);
      }
    });
  }

  /** Ends an import without registering it: its folder and everything written into it are removed. */
  async cancelImport(name: string): Promise<void> {
    const { store } = this.host;
    return this.createLock.run(async () => {
      const info = store.reservation(name);
      if (!info) throw new TidemarkError('NOT_FOUND', `no import reserves ${name}`);
      store.releaseName(name);
      await rm(info.dir, { recursive: true, force: true });
      this.host.log.info(`cancelled the import of ${name}: its folder was removed`);
    });
  }

  // ---------------------------------------------------------------- run state

  /** The open virtual disk of a running VM's slot (for in-process workloads and backup exports). */
  runningDisk(name: string, slot: string): OpenedDisk {
    const disk = this.running.get(name)?.get(slot);
    if (!disk) throw new TidemarkError('NOT_FOUND', `${name} is not running or has no disk at ${slot}`);
    return disk;
  }

  /** The open disks of a running VM, by slot (undefined when it is off). */
  runningDisks(name: string): Map<string, OpenedDisk> | undefined {
    return this.running.get(name);
  }

  /** CONFLICT when a running VM's chain holds the file. */
  assertNotOpen(file: string): void {
    for (const [name, disks] of this.running) {
      for (const d of disks.values()) {
        if (d.file.chain().some((f) => f.path === file)) {
          throw new TidemarkError('CONFLICT', `${file} is in use by running VM ${name}`);
        }
      }
    }
  }

  private async summary(def: VmDefinition): Promise<VmSummary> {
    const { nbd } = this.host;
    const running = this.running.get(def.name);
    const disks: VmSummary['disks'] = [];
    for (const d of def.disks) {
      const format = await this.diskFormat(def, d);
      disks.push({
        slot: d.slot,
        virtualDiskId: d.virtualDiskId,
        virtualSize: d.virtualSize,
        format,
        base: this.host.store.abs(def, d.base),
        head: this.host.store.abs(def, d.head),
        export: running ? exportName(def.name, d.slot) : null,
        nbdUri: running && nbd.address() ? nbd.uri(exportName(def.name, d.slot)) : null,
        ...(await this.trackingState(def, d, format)),
      });
    }
    return {
      name: def.name,
      id: def.id,
      state: this.vmState(def),
      generation: def.generation,
      configVersion: def.configVersion,
      checkpointPolicy: def.checkpointPolicy,
      guest: def.guest,
      disks,
      checkpoints: def.checkpoints.length,
      currentCheckpointId: def.currentCheckpointId,
      referencePoints: def.referencePoints.length,
      lease: (await this.host.leases.holder(def.name)) ?? null,
      memoryMiB: def.memoryMiB,
      cpus: def.cpus,
      scsiControllers: def.scsiControllers,
      boot: def.boot,
      image: def.image,
      qemu: this.qemuSummary(def),
      lastExit: this.runtimes.get(def.name)?.lastExit ?? null,
    };
  }

  /**
   * A disk's format: the running device's, or the base's magic (a chain is of one format); an unreadable base
   * counts as VHDX, whose reader reports what is wrong with it.
   */
  private async diskFormat(def: VmDefinition, att: DiskAttachment): Promise<HostDiskFormat> {
    const open = this.running.get(def.name)?.get(att.slot);
    if (open) return open instanceof VhdVirtualDisk ? 'vhd' : 'vhdx';
    return diskFileFormat(this.host.store.abs(def, att.base)).catch(() => 'vhdx' as const);
  }

  /** Whether a disk's changes are really tracked: the running disk's tracker, or the files beside its base. */
  private async trackingState(
    def: VmDefinition,
    att: DiskAttachment,
    format: HostDiskFormat,
  ): Promise<{ tracking: TrackingState; trackingReason: string | null }> {
    const open = this.running.get(def.name)?.get(att.slot);
    // A legacy VHD has no change tracking whatever the configuration version: none, and why.
    const reason = trackingUnavailable(format);
    if (reason) return { tracking: 'none', trackingReason: reason };
    if (!supportsRct(def.configVersion)) return { tracking: 'none', trackingReason: null };
    if (open) return { tracking: open.changeTracker ? 'enabled' : 'missing', trackingReason: null };
    const tracked = await exists(trackingPaths(this.host.store.abs(def, att.base)).rct);
    return { tracking: tracked ? 'enabled' : 'missing', trackingReason: null };
  }

  private async prepareDisk(def: VmDefinition, d: NewDisk): Promise<DiskAttachment> {
    const { store } = this.host;
    if (!SLOT.test(d.slot)) {
      throw new TidemarkError('INVALID_ARGUMENT', `slot "${d.slot}" is not ide0-0..ide1-1 or scsi0-0..scsi3-63`);
    }
    if (def.disks.some((x) => x.slot === d.slot))
      throw new TidemarkError('ALREADY_EXISTS', `${def.name} already has a disk at ${d.slot}`);
    let file: string;
    if (d.path) {
      // Confined before anything is opened or written beside it (tracking files).
      file = await this.host.diskPaths.check(d.path);
      for (const other of store.all()) {
        if (other.disks.some((x) => store.abs(other, x.base) === file)) {
          throw new TidemarkError('CONFLICT', `${file} is already attached to VM ${other.name}`);
        }
      }
    } else if (d.size !== undefined) {
      const size = typeof d.size === 'number' ? d.size : parseSize(d.size);
      file = path.join(store.vmDir(def.name), 'disks', `${d.slot}.vhdx`);
      await createVhdx(file, { size, blockSize: d.blockSize });
      await privateFiles(file);
    } else {
      throw new TidemarkError('INVALID_ARGUMENT', `disk ${d.slot}: give a path or a size`);
    }
    // VHDX or legacy VHD, by its magic (anything else: NOT_SUPPORTED naming the format).
    const probe = await probeDiskFile(file, [path.dirname(file), store.root]);
    if (probe.differencing) {
      throw new TidemarkError('INVALID_ARGUMENT', `${file} is a differencing disk: attach its base or merge it first`);
    }
    const { virtualDiskId, virtualSize } = probe;
    // A VHD has no change tracking to start (enableTracking leaves it alone): its backups read it in full.
    if (supportsRct(def.configVersion)) await enableTracking(file, [path.dirname(file)]);
    const rel = store.rel(def, file);
    return { slot: d.slot, base: rel, head: rel, virtualDiskId, virtualSize };
  }

  private async openDisks(def: VmDefinition): Promise<void> {
    const { store } = this.host;
    for (const att of def.disks) await settleChain(store.abs(def, att.head), store.diskOptions(def).allowedRoots);
    this.running.set(def.name, new Map());
    try {
      for (const att of def.disks) await this.openDisk(def, att);
    } catch (err) {
      await this.closeDisks(def.name);
      throw err;
    }
  }

  private async openDisk(def: VmDefinition, att: DiskAttachment): Promise<void> {
    const { store } = this.host;
    if (supportsRct(def.configVersion)) {
      // Tracking files lost while the VM was off (deleted, or never copied along): tracking starts again.
      const found = await enableTracking(
        store.abs(def, att.head),
        store.diskOptions(def).allowedRoots,
        'the tracking files were missing when the VM started',
      );
      if (found === 'none')
        this.host.log.warn(`${def.name} ${att.slot}: the tracking files were missing; change tracking restarted`);
    }
    const disk = await openDisk(store.abs(def, att.head), store.diskOptions(def));
    this.running.get(def.name)!.set(att.slot, disk);
    this.host.nbd.addExport(exportName(def.name, att.slot), disk, { description: `${def.name} ${att.slot}` });
  }

  private async closeDisks(name: string): Promise<void> {
    const disks = this.running.get(name);
    if (!disks) return;
    for (const slot of disks.keys()) await this.host.nbd.removeExport(exportName(name, slot));
    for (const disk of disks.values()) await disk.close();
    this.running.delete(name);
  }

  // ---------------------------------------------------------------- vm-runtime (QEMU): thin integration

  /** Hyper-V's state: the QEMU's when the VM has one, else Running while its disks are exported. */
  private vmState(def: VmDefinition): VmState {
    const rt = this.runtimes.get(def.name);
    if (rt && rt.state !== 'Off') return rt.state;
    if (def.state === 'Saved') return 'Saved';
    return this.running.has(def.name) ? 'Running' : 'Off';
  }

  /** A QEMU process runs the VM (neither off nor saved). */
  qemuRunning(name: string): boolean {
    const s = this.runtimes.get(name)?.state;
    return s !== undefined && s !== 'Off' && s !== 'Saved';
  }

  private qemuSummary(def: VmDefinition): VmSummary['qemu'] {
    if (!def.boot && !this.runtimes.has(def.name)) return null;
    const rt = this.runtime(def.name);
    return {
      pid: rt.pid,
      qmp: rt.files.qmp,
      console: rt.files.console,
      accel: rt.accel?.accel ?? null,
      accelReason: rt.accel?.reason ?? null,
    };
  }

  /** The VM's runtime (made once), wired so that QEMU ending by itself (guest power-off, crash) closes the disks. */
  runtime(name: string): VmRuntime {
    const { store, log } = this.host;
    const def = store.get(name);
    let rt = this.runtimes.get(name);
    if (!rt) {
      rt = new VmRuntime({
        dir: store.vmDir(name),
        runDir: path.join(store.root, 'run'),
        name,
        id: def.id,
        log,
        qemuBinary: this.host.qemu?.binary,
        guestSocket: def.guest,
      });
      rt.on('exit', (info: ExitInfo) => {
        if (store.isClosed) return;
        void this.host.guard
          .locked(name, async () => {
            const d = store.find(name);
            if (!d || this.qemuRunning(name)) return;
            await this.closeDisks(name);
            d.state = info.reason === 'saved' ? 'Saved' : 'Off';
            await store.save(d);
            log.info(`${name}: ${d.state} (${info.detail})`);
          })
          .catch((e) => log.warn(`${name}: after QEMU ended: ${(e as Error).message}`));
      });
      this.runtimes.set(name, rt);
    }
    return rt;
  }

  private async launchRuntime(def: VmDefinition): Promise<void> {
    const rt = this.runtime(def.name);
    if (this.qemuRunning(def.name)) return;
    const a = this.host.nbd.address();
    if (!a) throw new TidemarkError('CLOSED', 'the NBD server is not listening');
    const dial: QemuNbdAddress = a.type === 'unix' ? a : { type: 'inet', host: a.host, port: a.port };
    const tlsDir = this.host.nbdTlsDir;
    const nbd: QemuNbdAddress = tlsDir !== undefined ? { ...dial, tlsDir: path.resolve(tlsDir) } : dial;
    try {
      await rt.start({
        generation: def.generation,
        memoryMiB: def.memoryMiB,
        cpus: def.cpus,
        scsiControllers: def.scsiControllers,
        boot: def.boot!,
        disks: def.disks.map((d) => ({ slot: d.slot, export: exportName(def.name, d.slot) })),
        nbd,
        reconnectDelay: this.host.qemu?.reconnectDelay,
        accel: def.accel !== 'auto' ? def.accel : (this.host.qemu?.accel ?? 'auto'),
      });
    } catch (err) {
      await this.closeDisks(def.name);
      throw err;
    }
    // The guest-agent channel is wired automatically: checkpoints freeze through it.
    if (!def.guest) def.guest = `unix:${rt.guestSocket}`;
  }

  /** After a host restart: the QEMU a previous host launched is adopted through its QMP socket. */
  private async adoptRuntime(def: VmDefinition): Promise<void> {
    const rt = this.runtime(def.name);
    let state: VmState;
    try {
      state = await rt.adopt();
    } catch (err) {
      this.host.log.warn(`${def.name}: ${(err as Error).message}`);
      state = 'Off';
    }
    const live = state !== 'Off' && state !== 'Saved';
    // A QEMU launched by a host that died before recording Running: its NBD client waits for these exports.
    if (live && !this.running.has(def.name)) await this.openDisks(def);
    if (!live && def.state === 'Running') {
      this.host.log.warn(`${def.name}: its QEMU is gone (${rt.lastExit?.detail ?? 'not found'}); the VM is ${state}`);
      await this.closeDisks(def.name);
    }
    const persisted = live ? 'Running' : state === 'Saved' ? 'Saved' : 'Off';
    if (def.state !== persisted) {
      def.state = persisted;
      await this.host.store.save(def);
    }
  }

  /** Saves a running VM's memory and device state and ends its QEMU (Saved); `vm start` restores it. */
  async saveVm(name: string): Promise<VmSummary> {
    return this.host.guard.locked(name, async () => {
      const def = this.host.store.get(name);
      if (!this.qemuRunning(name)) throw new TidemarkError('CONFLICT', `${name} has no running QEMU to save`);
      const r = await this.runtimes.get(name)!.save();
      await this.closeDisks(name);
      def.state = 'Saved';
      await this.host.store.save(def);
      this.host.log.info(`${name}: saved (${(r.bytes / 2 ** 20).toFixed(1)} MiB in ${(r.ms / 1000).toFixed(1)} s)`);
      return this.summary(def);
    });
  }

  /** Pauses or resumes a VM's QEMU. */
  async pauseVm(name: string, pause: boolean): Promise<VmSummary> {
    return this.host.guard.locked(name, async () => {
      const def = this.host.store.get(name);
      if (!this.qemuRunning(name)) throw new TidemarkError('CONFLICT', `${name} has no running QEMU`);
      const rt = this.runtimes.get(name)!;
      if (pause) await rt.pause();
      else await rt.resume();
      return this.summary(def);
    });
  }

  /** The serial console log from `offset` (at most `max` bytes): `{ data, offset: next, size }`. */
  readConsole(name: string, offset = 0, max = 65536): Promise<{ data: string; offset: number; size: number }> {
    return this.runtime(name).readConsole(offset, max);
  }
}

export function exportName(vm: string, slot: string): string {
  return `${vm}/${slot}`;
}

function checkVmName(name: string): void {
  if (!VM_NAME.test(name)) {
    throw new TidemarkError('INVALID_ARGUMENT', `VM name "${name}" must be 1–64 letters, digits, '.', '_' or '-'`);
  }
}

function newDefinition(name: string, req: Omit<CreateVmRequest, 'name'> & { configVersion: string }): VmDefinition {
  return {
    schemaVersion: DEFINITION_VERSION,
    id: randomUUID(),
    name,
    generation: req.generation ?? 2,
    configVersion: req.configVersion,
    checkpointPolicy: req.checkpointPolicy ?? 'production-fallback',
    guest: req.guest ?? null,
    state: 'Off',
    createdAt: new Date().toISOString(),
    disks: [],
    checkpoints: [],
    currentCheckpointId: null,
    referencePoints: [],
    pending: null,
    memoryMiB: req.memoryMiB ?? DEFAULT_MEMORY_MIB,
    cpus: req.cpus ?? 1,
    // Enough controllers for the disks it is created with (at least one for generation 2, as Hyper-V).
    scsiControllers:
      req.scsiControllers ??
      Math.max(
        (req.generation ?? 2) === 2 ? 1 : 0,
        ...(req.disks ?? []).map((d) => (/^scsi(\d)-/.exec(d.slot) ? Number(d.slot[4]) + 1 : 0)),
      ),
    boot: req.boot ?? null,
    image: req.image ?? null,
    accel: req.accel ?? 'auto',
  };
}
