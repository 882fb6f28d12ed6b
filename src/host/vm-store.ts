/**
 * The VM store (the definitions half of Hyper-V's VMMS): the store directory's VM folders and their definitions,
 * the paths inside them, the journal each multi-file operation writes into its VM's definition first (`pending`),
 * the names reserved by imports (a restore registering a VM), and the recovery at start-up that finishes or rolls
 * back what a killed host left half done. It knows no running VM: the other services read and save definitions here.
 */
import { access, readdir, rm, unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import { trackingPaths } from '../tracking/tracker.js';
import { KeyedMutex } from '../util/mutex.js';
import { supportsRct } from './config-version.js';
import { mergeChildFile } from './disk-files.js';
import {
  readDefinition,
  writeDefinition,
  type Checkpoint,
  type ReferencePoint,
  type VmDefinition,
} from './definition.js';
import { dropImportMarker, importOwnerAlive, readImportMarker, type ImportInfo } from './imports.js';
import type { HostLog } from './log.js';

/** A checkpoint's differencing disk beside its parent. */
export const CHILD_EXT = '.avhdx';
/** A VHD head's checkpoint child: a VHD differencing disk. */
export const VHD_CHILD_EXT = '.avhd';
/** A standard checkpoint's memory and device state (Hyper-V's runtime-state file has this extension). */
export const MEMORY_EXT = '.vmrs';

/** A VM operation of a backup run: the id of the VM's lease the run holds. */
export interface LeaseRef {
  lease?: string;
}

/**
 * One operation per VM at a time: `locked` holds the VM's lock; `leased` also checks that the caller holds the VM's
 * lease when a backup run has it (Leases.during), naming the operation in the refusal.
 */
export interface VmGuard {
  locked<T>(vm: string, fn: () => Promise<T>): Promise<T>;
  leased<T>(vm: string, lease: string | undefined, op: string, fn: () => Promise<T>): Promise<T>;
}

export class VmStore {
  private vms = new Map<string, VmDefinition>();
  /** One definition write per VM at a time (the last one wins, never a torn file). */
  private defWrites = new KeyedMutex();
  /** Names reserved by imports (a restore registering a VM) until they are committed or cancelled. */
  private imports = new Map<string, ImportInfo>();
  private closed = false;

  constructor(
    /** The store directory (absolute). */
    readonly root: string,
    private readonly log: HostLog,
  ) {}

  // ---------------------------------------------------------------- start-up

  /**
   * Reads every VM folder: registers each definition after finishing or rolling back its journal, and keeps or
   * removes the imports a previous host left (kept while their restore still runs).
   */
  async load(): Promise<void> {
    for (const name of (await readdir(path.join(this.root, 'vms'))).sort()) {
      const file = this.defPath(name);
      const marker = await readImportMarker(this.vmDir(name));
      if (!(await exists(file))) {
        if (marker) await this.recoverImport(name, marker);
        continue;
      }
      // Registered, but the host stopped before the marker went: the import is complete.
      if (marker) await dropImportMarker(this.vmDir(name));
      const def = await readDefinition(file);
      this.vms.set(def.name, def);
      await this.recover(def);
    }
  }

  /** From now on every lookup fails with CLOSED (the host is shutting down). */
  close(): void {
    this.closed = true;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  mustBeOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', 'the host is shutting down');
  }

  // ---------------------------------------------------------------- definitions

  /** The VM's live definition (the services change it, then `save` it). */
  get(name: string): VmDefinition {
    this.mustBeOpen();
    const def = this.vms.get(name);
    if (!def) throw new TidemarkError('NOT_FOUND', `no VM named ${name}`);
    return def;
  }

  /** The definition, or undefined (no CLOSED check: for callbacks that run while the host closes). */
  find(name: string): VmDefinition | undefined {
    return this.vms.get(name);
  }

  has(name: string): boolean {
    return this.vms.has(name);
  }

  /** Every definition, in the order they were registered. */
  all(): VmDefinition[] {
    return [...this.vms.values()];
  }

  /** Every definition, by name. */
  list(): VmDefinition[] {
    return [...this.vms.values()].sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Registers a definition in memory (`save` writes it). */
  add(def: VmDefinition): void {
    this.vms.set(def.name, def);
  }

  remove(name: string): void {
    this.vms.delete(name);
  }

  /** Writes the definition atomically: the journal's commit point. */
  async save(def: VmDefinition): Promise<void> {
    await this.defWrites.run(def.name, () => writeDefinition(this.defPath(def.name), def));
  }

  assertNoPending(def: VmDefinition): void {
    if (def.pending)
      throw new TidemarkError(
        'BUSY',
        `${def.name} has an unfinished ${def.pending.op}; restart the host to recover it`,
      );
  }

  // ---------------------------------------------------------------- paths

  vmDir(name: string): string {
    return path.join(this.root, 'vms', name);
  }

  defPath(name: string): string {
    return path.join(this.vmDir(name), 'vm.json');
  }

  /** A file of a VM's disk in its own folder (checkpoint children, memory states). */
  diskFile(name: string, file: string): string {
    return path.join(this.vmDir(name), 'disks', file);
  }

  abs(def: VmDefinition, p: string): string {
    return path.resolve(this.vmDir(def.name), p);
  }

  /** Paths inside the VM's folder are stored relative to it (the store can move); others absolutely. */
  rel(def: VmDefinition, p: string): string {
    const rel = path.relative(this.vmDir(def.name), path.resolve(this.vmDir(def.name), p));
    return rel.startsWith('..') || path.isAbsolute(rel) ? path.resolve(p) : rel;
  }

  baseOf(def: VmDefinition, head: string): string | undefined {
    return def.disks.find((d) => d.head === head)?.base;
  }

  /** A path the API names, confined to the store. */
  inStore(p: string): string {
    const abs = path.resolve(this.root, p);
    if (abs !== this.root && !abs.startsWith(this.root + path.sep)) {
      throw new TidemarkError('PATH_NOT_ALLOWED', `${p} is outside the host's store ${this.root}`);
    }
    return abs;
  }

  /** How a VM's disks open: confined to the store and the folders of its bases, tracked from version 6.2. */
  diskOptions(def: VmDefinition): { allowedRoots: string[]; tracking: boolean } {
    const roots = new Set([this.root, ...def.disks.map((d) => path.dirname(this.abs(def, d.base)))]);
    return { allowedRoots: [...roots], tracking: supportsRct(def.configVersion) };
  }

  // ---------------------------------------------------------------- names reserved by imports

  /** ALREADY_EXISTS when a VM, an import in progress or a folder holds the name. */
  async assertNameFree(name: string): Promise<void> {
    if (this.vms.has(name)) throw new TidemarkError('ALREADY_EXISTS', `a VM named ${name} exists`);
    const reserved = this.imports.get(name);
    if (reserved) {
      if (importOwnerAlive(reserved.owner)) {
        throw new TidemarkError(
          'ALREADY_EXISTS',
          `${name} is being restored by pid ${reserved.owner.pid} on ${reserved.owner.hostname} ("${reserved.owner.command}") since ${reserved.createdAt}`,
        );
      }
      await this.recoverImport(name, reserved);
    }
    const dir = this.vmDir(name);
    if (await exists(dir)) throw new TidemarkError('ALREADY_EXISTS', `${dir} exists; remove it or choose another name`);
  }

  reserveName(info: ImportInfo): void {
    this.imports.set(info.name, info);
  }

  reservation(name: string): ImportInfo | undefined {
    return this.imports.get(name);
  }

  releaseName(name: string): void {
    this.imports.delete(name);
  }

  reservations(): ImportInfo[] {
    return [...this.imports.values()];
  }

  /** An import a stopped host or an ended restore left: kept while its process lives, removed otherwise. */
  private async recoverImport(name: string, info: ImportInfo): Promise<void> {
    if (importOwnerAlive(info.owner)) {
      this.imports.set(name, info);
      return;
    }
    this.imports.delete(name);
    await rm(info.dir, { recursive: true, force: true });
    this.log.warn(`removed the unfinished import of ${name} (its restore, pid ${info.owner.pid}, has ended)`);
  }

  // ---------------------------------------------------------------- the journal

  /**
   * The last step of removing a checkpoint (after its merge, if any): the VM's current checkpoint moves to the
   * parent, files nothing needs any more are deleted (journaled too), and a conversion records its reference point.
   * Idempotent: recovery runs it again after a crash.
   */
  async finishRemoval(
    def: VmDefinition,
    cpId: string,
    then: 'delete' | 'refpoint',
    rp: ReferencePoint | null,
  ): Promise<void> {
    const orphaned = this.applyRemoval(def, cpId, then, rp);
    await this.save(def);
    await this.deleteOrphaned(def, orphaned);
  }

  /**
   * `finishRemoval`'s change of the definition, in memory, for a caller that writes it with its own last change
   * (an online merge's switch onto the parent): returns the files left to delete, which the journal then names.
   */
  applyRemoval(def: VmDefinition, cpId: string, then: 'delete' | 'refpoint', rp: ReferencePoint | null): string[] {
    const cp = def.checkpoints.find((c) => c.id === cpId);
    const orphaned: string[] = [];
    if (cp) {
      if (def.currentCheckpointId === cp.id) {
        def.currentCheckpointId = cp.parentId;
      } else {
        orphaned.push(...filesOnlyItNeeds(def, cp));
      }
      // Its memory state belongs to it alone.
      if (cp.memoryState) orphaned.push(cp.memoryState);
      def.checkpoints = def.checkpoints.filter((c) => c.id !== cpId);
    }
    if (then === 'refpoint' && rp && !def.referencePoints.some((r) => r.id === rp.id)) def.referencePoints.push(rp);
    def.pending = orphaned.length > 0 ? { op: 'delete-files', files: orphaned } : null;
    return orphaned;
  }

  /** Deletes the files `applyRemoval` left (its write journaled them), then clears the journal. */
  async deleteOrphaned(def: VmDefinition, orphaned: string[]): Promise<void> {
    if (orphaned.length === 0) return;
    for (const f of orphaned) await unlink(this.abs(def, f)).catch(() => undefined);
    def.pending = null;
    await this.save(def);
  }

  /** Finishes or rolls back what a killed host left half done, then removes stray children. */
  private async recover(def: VmDefinition): Promise<void> {
    const p = def.pending;
    if (p) {
      this.log.warn(`${def.name}: recovering an interrupted ${p.op}`);
      if (p.op === 'checkpoint') {
        // Not committed (the commit clears the journal): the files it made go.
        for (const f of p.created) await unlink(this.abs(def, f)).catch(() => undefined);
        def.pending = null;
        await this.save(def);
      } else if (p.op === 'merge') {
        // A merge is finished, never undone: offline now, for each disk not yet switched.
        for (const m of p.disks) {
          if (await exists(this.abs(def, m.child))) {
            await mergeChildFile(this.abs(def, m.child), { allowedRoots: this.diskOptions(def).allowedRoots });
          }
          def.disks.find((a) => a.slot === m.slot)!.head = m.parent;
          await this.save(def);
        }
        await this.finishRemoval(def, p.checkpointId, p.then, p.referencePoint);
      } else if (p.op === 'apply') {
        // Committed when every head is a created child: then the old present goes, else the new children.
        const committed = p.created.every((f) => def.disks.some((d) => d.head === f));
        const victims = committed ? p.discard : p.created;
        for (const f of victims) await unlink(this.abs(def, f)).catch(() => undefined);
        def.pending = null;
        await this.save(def);
      } else if (p.op === 'convert-disks') {
        // Not committed (the commit replaces this journal by the old VHDs' deletion): the VHDX files made go.
        for (const d of p.disks) {
          const to = this.abs(def, d.to);
          const t = trackingPaths(to);
          for (const f of [this.abs(def, d.temp), to, t.rct, t.mrt]) await unlink(f).catch(() => undefined);
        }
        def.pending = null;
        await this.save(def);
      } else {
        for (const f of p.files) await unlink(this.abs(def, f)).catch(() => undefined);
        def.pending = null;
        await this.save(def);
      }
    }
    // A child no definition refers to is a leftover: remove it (only .avhdx and .avhd files in the VM's own folder).
    const referenced = new Set([
      ...def.disks.map((d) => this.abs(def, d.head)),
      ...def.checkpoints.flatMap((c) => c.disks.map((d) => this.abs(def, d.file))),
      ...def.checkpoints.flatMap((c) => (c.memoryState ? [this.abs(def, c.memoryState)] : [])),
    ]);
    const dir = path.join(this.vmDir(def.name), 'disks');
    for (const f of await readdir(dir).catch(() => [] as string[])) {
      const full = path.join(dir, f);
      if ((f.endsWith(CHILD_EXT) || f.endsWith(VHD_CHILD_EXT) || f.endsWith(MEMORY_EXT)) && !referenced.has(full)) {
        this.log.warn(`${def.name}: removing stray ${f}`);
        await unlink(full).catch(() => undefined);
      }
    }
  }
}

/** A checkpoint off the VM's path: its files no other checkpoint, head or base uses. */
function filesOnlyItNeeds(def: VmDefinition, cp: Checkpoint): string[] {
  const inUse = new Set([
    ...def.disks.map((d) => d.head),
    ...def.checkpoints.filter((c) => c.id !== cp.id).flatMap((c) => c.disks.map((d) => d.file)),
  ]);
  return cp.disks
    .filter((d) => !inUse.has(d.file) && d.file !== def.disks.find((a) => a.slot === d.slot)?.base)
    .map((d) => d.file);
}

export async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}
