/**
 * Storage snapshots of a set of VMs, as the backup application asks for them: ONE snapshot of every file
 * the set needs (each VM's frozen chain and definition), cut through the VSS sequence (VM writer +
 * storage provider, writes held while the provider commits), then served as read-only NBD exports of the
 * frozen disks as they were at the instant (pull mode: the reader may sit on another machine). Releasing
 * the set closes the exports and frees the diff area.
 *
 * A set records the run (the VMs' leases) that made it: while one of those leases lives, only that run may
 * release it, so a second run never tears down a first run's snapshot.
 */
import { randomUUID } from 'node:crypto';
import path from 'node:path';
import { openDisk, type OpenedDisk } from '../disk/open.js';
import { TidemarkError } from '../errors.js';
import { chainFiles } from './disk-files.js';
import type { NbdServer } from '../nbd/index.js';
import type { RandomAccessFile } from '../util/file.js';
import { createProvider } from '../snapshot/index.js';
import { mapBounded } from '../util/bounded.js';
import { BackupComponents, snapshotProviderAdapter, type SnapshotSetReport } from '../vss/index.js';
import type { VmDefinition } from './definition.js';
import type { LeaseInfo } from './leases.js';
import { VM_WRITER_NAME, VmWriter, type VmInSet, type VmOutcome } from './vm-writer.js';

export interface SnapshotSetRequest {
  /** `lease`: the VM's lease the calling run holds (needed while the VM is leased). */
  vms: { name: string; checkpoint?: string; lease?: string }[];
  /** 'none': no storage snapshot, the frozen files are exported as they are (the no-snapshot flow). */
  provider?: 'cow' | 'reflink' | 'none';
}

export interface SnapshotExport {
  vm: string;
  slot: string;
  virtualDiskId: string;
  virtualSize: number;
  /** The NBD export serving the disk as it was at the snapshot (read-only). */
  export: string;
  /** The frozen file the export reads (the checkpoint's parent, or the head for a direct snapshot). */
  file: string;
}

export interface SnapshotSetInfo {
  id: string;
  provider: string;
  createdAt: string;
  /** Storage snapshots this set took (1: one for the whole set, whatever the number of VMs). */
  storageSnapshots: number;
  /** The run that made it (its leases' run id), or null when made outside a run. */
  runId: string | null;
  /** `lease`: the VM's lease the making run held, or null. */
  vms: ({ name: string; checkpoint: string | null; lease: string | null } & VmOutcome)[];
  exports: SnapshotExport[];
  timings: { holdMs: number | null; commitMs: number | null; totalMs: number };
  warnings: string[];
}

/** What the snapshot service needs of the host. */
export interface SnapshotHostAccess {
  store: string;
  nbd: NbdServer;
  definition(name: string): VmDefinition;
  vmDir(name: string): string;
  abs(def: VmDefinition, p: string): string;
  allowedRoots(def: VmDefinition): string[];
  runningDisks(name: string): Map<string, OpenedDisk> | undefined;
  diffAreaRoot: string;
  /** The VM's live lease after checking the caller may work on the VM (Leases.check). */
  checkLease(vm: string, lease: string | undefined): Promise<LeaseInfo | undefined>;
  leaseLive(id: string): Promise<boolean>;
  leaseHolder(vm: string): Promise<LeaseInfo | undefined>;
}

/** VMs of a set checked, and disks opened for its exports, at once. */
const MEMBER_CONCURRENCY = 8;

interface LiveSet {
  info: SnapshotSetInfo;
  /** undefined for a set without a storage snapshot (no-snapshot flow). */
  bc: BackupComponents | undefined;
  disks: OpenedDisk[];
}

export class SnapshotSets {
  private sets = new Map<string, LiveSet>();
  /** Storage snapshots taken since the host started (the 2016 flow's "one per backup-set run"). */
  taken = 0;

  constructor(private readonly host: SnapshotHostAccess) {}

  list(): SnapshotSetInfo[] {
    return [...this.sets.values()].map((s) => structuredClone(s.info));
  }

  async create(req: SnapshotSetRequest): Promise<SnapshotSetInfo> {
    if (req.vms.length === 0) throw new TidemarkError('INVALID_ARGUMENT', 'a snapshot set needs at least one VM');
    const id = randomUUID();
    const providerName = req.provider ?? 'cow';
    // Each VM checked and its frozen chains listed, side by side (a set of hundreds of VMs).
    const members = await mapBounded(req.vms, MEMBER_CONCURRENCY, async ({ name, checkpoint, lease }) => {
      const def = this.host.definition(name);
      const held = await this.host.checkLease(name, lease);
      const cp = checkpoint ? def.checkpoints.find((c) => c.id === checkpoint || c.name === checkpoint) : undefined;
      if (checkpoint && !cp) throw new TidemarkError('NOT_FOUND', `${name} has no checkpoint "${checkpoint}"`);
      const heads = def.disks.map((d) => ({
        slot: d.slot,
        file: this.host.abs(def, cp ? cp.disks.find((x) => x.slot === d.slot)!.file : d.head),
      }));
      // Every file of every frozen chain, and the definition, are in the set.
      const chains: string[] = [];
      for (const h of heads) chains.push(...(await this.chainOf(def, h)));
      return {
        def,
        vmDir: this.host.vmDir(name),
        running: this.host.runningDisks(name) !== undefined,
        checkpoint: cp
          ? { id: cp.id, consistency: cp.consistency, note: cp.consistencyNote, freezeWindowMs: cp.freezeWindowMs }
          : undefined,
        heads,
        lease: held?.id ?? null,
        runId: held?.owner.runId ?? null,
        files: [...chains, path.join(this.host.vmDir(name), 'vm.json')],
      };
    });
    const files = new Set(members.flatMap((m) => m.files));
    const runId = members.find((m) => m.runId !== null)?.runId ?? null;

    if (providerName === 'none') return this.exportLive(id, members, runId);
    const writer = new VmWriter(members);
    const bc = new BackupComponents({
      writers: [writer],
      providers: [snapshotProviderAdapter(createProvider(providerName), { diffAreaRoot: this.host.diffAreaRoot })],
      holdWrites: async () => {
        // Flush-and-hold: every running disk of the set's VMs is drained and flushed while the provider commits.
        const disks = members.flatMap((m) => [...(this.host.runningDisks(m.def.name)?.values() ?? [])]);
        await Promise.all(disks.map((d) => d.pause()));
        try {
          await Promise.all(disks.map((d) => d.file.flush()));
        } catch (err) {
          for (const d of disks) d.resume();
          throw err;
        }
        return () => {
          for (const d of disks) d.resume();
        };
      },
    });
    const opened: OpenedDisk[] = [];
    let report: SnapshotSetReport;
    try {
      bc.initializeForBackup();
      bc.setBackupState({ type: 'full', selectComponents: true });
      await bc.gatherWriterMetadata();
      for (const m of members)
        bc.addComponent({ writer: VM_WRITER_NAME, logicalPath: 'Virtual Machines', name: m.def.id });
      bc.startSnapshotSet();
      await bc.addToSnapshotSet([...files]);
      await bc.prepareForBackup();
      report = await bc.doSnapshotSet();
      if (report.status === 'failed') {
        throw new TidemarkError(
          'IO_ERROR',
          `storage snapshot failed: ${report.abort?.message ?? report.warnings.join('; ') ?? 'unknown reason'}`,
        );
      }
      const failedVm = report.components.find((c) => c.failure);
      if (failedVm) {
        throw new TidemarkError('NOT_SUPPORTED', failedVm.failure!.message ?? `component ${failedVm.name} failed`);
      }
      const exports = await this.exportDisks(members, `snap-${id.slice(0, 8)}`, `at snapshot ${id}`, opened, (h) => {
        const storage = bc.snapshotOf(h.file)?.storage;
        if (!storage) throw new TidemarkError('IO_ERROR', `the snapshot does not hold ${h.file}`);
        return (p: string) => storage.openFile(p);
      });
      this.taken += report.snapshots.length;
      const info: SnapshotSetInfo = {
        id,
        provider: providerName,
        createdAt: new Date().toISOString(),
        storageSnapshots: report.snapshots.length,
        runId,
        vms: members.map((m) => ({
          name: m.def.name,
          checkpoint: m.checkpoint?.id ?? null,
          lease: m.lease,
          ...(writer.outcomes.get(m.def.name) ?? {
            consistency: 'crash' as const,
            note: 'no writer outcome',
            freezeWindowMs: null,
          }),
        })),
        exports,
        timings: {
          holdMs: report.timings.holdMs ?? null,
          commitMs: report.timings.commitMs ?? null,
          totalMs: report.timings.totalMs,
        },
        warnings: report.warnings,
      };
      this.sets.set(id, { info, bc, disks: opened });
      return structuredClone(info);
    } catch (err) {
      await this.unexport(id, opened);
      await bc.abortBackup().catch(() => undefined);
      await bc.dispose().catch(() => undefined);
      throw err;
    }
  }

  /**
   * The files of the chain whose head is `h.file`: for a running VM whose open chain holds that file (a checkpoint's
   * frozen parent under the running child, or the head itself), read off the open chain; else opened to walk it.
   */
  private async chainOf(def: VmDefinition, h: { slot: string; file: string }): Promise<string[]> {
    const chain = this.host.runningDisks(def.name)?.get(h.slot)?.file.chain() ?? [];
    const at = chain.findIndex((f) => path.resolve(f.path) === h.file);
    if (at >= 0) return chain.slice(at).map((f) => path.resolve(f.path));
    return chainFiles(h.file, { allowedRoots: this.host.allowedRoots(def) });
  }

  /** The no-snapshot flow: the checkpoints' frozen files served as they are, read-only, while they exist. */
  private async exportLive(
    id: string,
    members: (VmInSet & { heads: { slot: string; file: string }[]; lease: string | null })[],
    runId: string | null,
  ) {
    const opened: OpenedDisk[] = [];
    let exports: SnapshotExport[];
    try {
      exports = await this.exportDisks(members, `frozen-${id.slice(0, 8)}`, 'frozen', opened, () => undefined);
    } catch (err) {
      await this.unexport(id, opened);
      throw err;
    }
    const info: SnapshotSetInfo = {
      id,
      provider: 'none',
      createdAt: new Date().toISOString(),
      storageSnapshots: 0,
      runId,
      vms: members.map((m) => ({
        name: m.def.name,
        checkpoint: m.checkpoint?.id ?? null,
        lease: m.lease,
        consistency: m.checkpoint?.consistency ?? 'crash',
        note: m.checkpoint?.note ?? 'no checkpoint',
        freezeWindowMs: m.checkpoint?.freezeWindowMs ?? null,
      })),
      exports,
      timings: { holdMs: null, commitMs: null, totalMs: 0 },
      warnings: [],
    };
    this.sets.set(id, { info, bc: undefined, disks: opened });
    return structuredClone(info);
  }

  /**
   * Opens each member's frozen disk read-only (through `viewOf`'s file opener, or the live files) and exports
   * it as PREFIX/VM/SLOT. Disks opened are pushed to `opened` so a caller can close them on failure.
   */
  private async exportDisks(
    members: (VmInSet & { heads: { slot: string; file: string }[] })[],
    prefix: string,
    what: string,
    opened: OpenedDisk[],
    viewOf: (h: { slot: string; file: string }) => ((p: string) => Promise<RandomAccessFile>) | undefined,
  ): Promise<SnapshotExport[]> {
    const each = members.flatMap((m) => m.heads.map((h) => ({ m, h })));
    // Opened side by side; exported in the members' order.
    const disks = await mapBounded(each, MEMBER_CONCURRENCY, async ({ m, h }) => {
      const disk = await openDisk(h.file, {
        readOnly: true,
        tracking: false,
        allowedRoots: this.host.allowedRoots(m.def),
        openFile: viewOf(h),
      });
      opened.push(disk);
      return disk;
    });
    return each.map(({ m, h }, i) => {
      const att = m.def.disks.find((d) => d.slot === h.slot)!;
      const name = `${prefix}/${m.def.name}/${h.slot}`;
      this.host.nbd.addExport(name, disks[i], { readOnly: true, description: `${m.def.name} ${h.slot} ${what}` });
      return {
        vm: m.def.name,
        slot: h.slot,
        virtualDiskId: att.virtualDiskId,
        virtualSize: att.virtualSize,
        export: name,
        file: h.file,
      };
    });
  }

  /** Undoes a partly made set: its exports removed, its disks closed. */
  private async unexport(id: string, opened: OpenedDisk[]): Promise<void> {
    const short = id.slice(0, 8);
    for (const e of this.host.nbd.exports()) {
      if (e.name.startsWith(`snap-${short}/`) || e.name.startsWith(`frozen-${short}/`)) {
        await this.host.nbd.removeExport(e.name).catch(() => undefined);
      }
    }
    for (const d of opened) await d.close().catch(() => undefined);
  }

  /**
   * Closes the exports and releases the storage snapshot (its diff area is freed). While a lease of the run
   * that made the set lives, `lease` must be one of that run's leases (BUSY otherwise).
   */
  async release(id: string, opts: { succeeded?: boolean; lease?: string } = {}): Promise<void> {
    const set = this.sets.get(id);
    if (!set) throw new TidemarkError('NOT_FOUND', `no snapshot set ${id}`);
    const own = set.info.vms.map((v) => v.lease).filter((l): l is string => l !== null);
    if (opts.lease === undefined || !own.includes(opts.lease)) {
      for (const v of set.info.vms) {
        if (v.lease !== null && (await this.host.leaseLive(v.lease))) {
          const holder = await this.host.leaseHolder(v.name);
          throw new TidemarkError(
            'BUSY',
            `snapshot set ${id} belongs to a live run: ${v.name} is leased by run ${holder?.owner.runId ?? '?'} (pid ${holder?.owner.pid ?? '?'} on ${holder?.owner.hostname ?? '?'}) since ${holder?.acquiredAt ?? '?'}`,
          );
        }
      }
    }
    // Released once: a second caller finds it gone.
    if (!this.sets.delete(id)) throw new TidemarkError('NOT_FOUND', `no snapshot set ${id}`);
    for (const e of set.info.exports) await this.host.nbd.removeExport(e.export).catch(() => undefined);
    for (const d of set.disks) await d.close().catch(() => undefined);
    if (!set.bc) return;
    try {
      for (const v of set.info.vms) {
        const def = this.host.definition(v.name);
        set.bc.setBackupSucceeded(
          { writer: VM_WRITER_NAME, logicalPath: 'Virtual Machines', name: def.id },
          opts.succeeded ?? true,
        );
      }
      await set.bc.backupComplete();
    } catch {
      await set.bc.abortBackup().catch(() => undefined);
    } finally {
      await set.bc.dispose();
    }
  }

  /** Host shutdown: every set goes, whoever made it (a restarted host holds no storage snapshot). */
  async releaseAll(): Promise<void> {
    for (const [id, set] of [...this.sets]) {
      const lease = set.info.vms.find((v) => v.lease !== null)?.lease ?? undefined;
      await this.release(id, { succeeded: false, lease }).catch(() => undefined);
    }
  }
}
