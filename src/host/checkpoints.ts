/**
 * Checkpoints (Hyper-V's Msvm_VirtualSystemSnapshotService): cut a checkpoint of a VM, running or off, as
 * checkpoint-plan.ts decides it; delete one (merging online when the VM runs on it); apply one to a VM that is off.
 * Every multi-file step is journaled in the VM's definition first (vm-store.ts recovers it at start-up).
 */
import { randomUUID } from 'node:crypto';
import { unlink } from 'node:fs/promises';
import { childExtension, openDisk, type OpenedDisk } from '../disk/open.js';
import type { MergeStep } from '../disk/gated-disk.js';
import { TidemarkError } from '../errors.js';
import { planCheckpoint, type CheckpointPlan } from './checkpoint-plan.js';
import type { ConsistencyProvider } from './consistency.js';
import { childExtensionOf, createChildFile, diskFileFormat, mergeChildFile } from './disk-files.js';
import type {
  Checkpoint,
  CheckpointType,
  Consistency,
  DiskAttachment,
  ReferencePoint,
  VmDefinition,
} from './definition.js';
import type { LeaseInfo } from './leases.js';
import type { HostLog } from './log.js';
import { privateFiles } from './store-access.js';
import type { VmRuntime } from './vm-runtime.js';
import { MEMORY_EXT, type LeaseRef, type VmGuard, type VmStore } from './vm-store.js';

export interface CheckpointRequest extends LeaseRef {
  type?: CheckpointType;
  name?: string;
  /** For recovery checkpoints (backup): the consistency wanted, and whether less is a failure. */
  consistency?: Consistency;
  requireConsistency?: boolean;
}

/** What the checkpoint service needs of the host. */
export interface CheckpointHostAccess {
  store: Pick<
    VmStore,
    | 'get'
    | 'save'
    | 'vmDir'
    | 'diskFile'
    | 'abs'
    | 'rel'
    | 'baseOf'
    | 'diskOptions'
    | 'assertNoPending'
    | 'finishRemoval'
    | 'applyRemoval'
    | 'deleteOrphaned'
  >;
  guard: VmGuard;
  leaseHolder(vm: string): Promise<LeaseInfo | undefined>;
  /** The open disks of a running VM, by slot (undefined when it is off). */
  runningDisks(vm: string): Map<string, OpenedDisk> | undefined;
  qemuRunning(vm: string): boolean;
  runtime(vm: string): VmRuntime;
  /** Freezes the guest around the cut (the guest integration; replaceable while the host runs). */
  consistency(): ConsistencyProvider;
  log: HostLog;
  /** Test seam (HostOptions.hooks): called after each durable step of a checkpoint or its removal. */
  hook?: CheckpointHook;
}

/** The durable steps of a running VM's checkpoint and of its removal (an online merge's own steps included). */
export type CheckpointStep =
  'children made' | 'sealed' | 'recorded' | 'switched' | 'outcome' | 'merge journaled' | MergeStep | 'removed';
export type CheckpointHook = (step: CheckpointStep) => void | Promise<void>;

/** How the cut's instant was made consistent, and how long the VM's I/O was held. */
interface CutOutcome {
  result: { ioPauseMs: number | null };
  consistency: Consistency;
  freezeWindowMs: number | null;
  note: string;
}

/** A disk of the VM and the child the checkpoint switches it onto. */
interface NewChild {
  disk: DiskAttachment;
  child: string;
}

export class Checkpoints {
  constructor(private readonly host: CheckpointHostAccess) {}

  list(name: string): (Checkpoint & { current: boolean })[] {
    const def = this.host.store.get(name);
    return def.checkpoints.map((c) => ({ ...structuredClone(c), current: c.id === def.currentCheckpointId }));
  }

  /** A checkpoint by id or name. */
  find(def: VmDefinition, key: string): Checkpoint {
    const cp = def.checkpoints.find((c) => c.id === key || c.name === key);
    if (!cp) throw new TidemarkError('NOT_FOUND', `${def.name} has no checkpoint "${key}"`);
    return cp;
  }

  /**
   * Cuts a checkpoint: (freeze the guest), pause the VM's I/O, flush, seal each tracker's id, create an
   * .avhdx (.avhd under a VHD) child per disk, record it all in one atomic definition write, switch onto the children,
   * resume, (thaw). The parents are from then on the frozen, consistent point.
   */
  async create(name: string, req: CheckpointRequest = {}): Promise<Checkpoint> {
    return this.host.guard.leased(name, req.lease, 'checkpoint create', () => this.cut(name, req));
  }

  private async cut(name: string, req: CheckpointRequest): Promise<Checkpoint> {
    const { store } = this.host;
    const def = store.get(name);
    const running = this.host.runningDisks(name);

    // Validate and plan: whatever is refused is refused before a file is made.
    const plan = planCheckpoint(def.checkpointPolicy, req, {
      vm: name,
      disks: def.disks.length,
      pending: def.pending?.op ?? null,
      running: running !== undefined,
      qemuRunning: this.host.qemuRunning(name),
    });
    const holder = req.lease !== undefined ? await this.host.leaseHolder(name) : undefined;
    const id = randomUUID();
    const cpName = req.name ?? `${name} - (${new Date().toISOString().replace('T', ' ').slice(0, 19)})`;
    // Each child in its head's format: .avhdx under a VHDX, .avhd (a VHD differencing disk) under a VHD.
    const children: NewChild[] = [];
    for (const d of def.disks) {
      const open = running?.get(d.slot);
      const ext = open ? childExtension(open) : childExtensionOf(await diskFileFormat(store.abs(def, d.head)));
      children.push({ disk: d, child: store.diskFile(name, `${d.slot}_${id.slice(0, 8)}${ext}`) });
    }
    const memoryFile = plan.how === 'memory' ? store.diskFile(name, `memory_${id.slice(0, 8)}${MEMORY_EXT}`) : null;
    const created = [...children.map((c) => c.child), ...(memoryFile ? [memoryFile] : [])];

    // The files about to be made, in memory (no other operation on the VM starts meanwhile). Not written: they
    // lie in the VM's own folder, where a host killed before the record removes every child and memory file its
    // definition does not name when it starts again (VmStore's recovery); the record is the first write.
    def.pending = { op: 'checkpoint', checkpointId: id, created: created.map((f) => store.rel(def, f)) };

    try {
      // Record: the checkpoint enters the definition in the cut's own write (crash-consistent until the outcome
      // says more), and that write clears the journal.
      const draft: CheckpointDraft = {
        id,
        name: cpName,
        type: plan.type,
        run: holder ? { lease: holder.id, runId: holder.owner.runId, command: holder.owner.command } : null,
        memoryState: memoryFile ? store.rel(def, memoryFile) : null,
      };
      const record = (sealed: Map<string, string | undefined>) =>
        recordCheckpoint(def, draft, children, sealed, (f) => store.rel(def, f));
      const cut = () => this.cutDisks(def, running, children, record);

      // Freeze (or save the memory), cut, thaw: the plan says which wraps the cut.
      const outcome = await this.around(def, plan, memoryFile, cut);

      // Record how the instant was made: a production checkpoint whose guest did not freeze is a standard one.
      const type = plan.how === 'freeze' && outcome.consistency === 'crash' ? plan.typeIfNotFrozen : plan.type;
      const cp = def.checkpoints.find((c) => c.id === id)!;
      cp.type = type;
      cp.consistency = outcome.consistency;
      cp.consistencyNote = outcome.note;
      cp.freezeWindowMs = outcome.freezeWindowMs;
      cp.ioPauseMs = outcome.result.ioPauseMs;
      await store.save(def);
      await this.host.hook?.('outcome');
      this.host.log.info(
        `checkpoint ${cp.name} of ${name}: ${type}, ${cp.consistency}-consistent, I/O pause ${fmtMs(cp.ioPauseMs)}, freeze ${fmtMs(cp.freezeWindowMs)}`,
      );
      return structuredClone(cp);
    } catch (err) {
      // Not committed: roll back the files it made (committed, the journal is already clear and they stay).
      if (def.pending?.op === 'checkpoint') {
        for (const f of created) await unlink(f).catch(() => undefined);
        def.pending = null;
      }
      throw err;
    }
  }

  /** Runs the cut as the plan says: as it is, inside the guest's freeze, or with the guest paused and saved. */
  private async around(
    def: VmDefinition,
    plan: CheckpointPlan,
    memoryFile: string | null,
    cut: () => Promise<{ ioPauseMs: number | null }>,
  ): Promise<CutOutcome> {
    switch (plan.how) {
      case 'off':
        // Nothing writes to a VM that is off: the point is consistent as it is.
        return { result: await cut(), consistency: 'application', freezeWindowMs: null, note: plan.note };
      case 'crash':
        return { result: await cut(), consistency: 'crash', freezeWindowMs: null, note: plan.note };
      case 'memory': {
        // The guest pauses, its memory goes to the file, the disks are cut, and it continues.
        const captured = await this.host.runtime(def.name).captureState(memoryFile!, cut);
        return {
          result: captured.result,
          consistency: 'crash',
          freezeWindowMs: null,
          note: `standard checkpoint with the guest's memory (${(captured.bytes / 2 ** 20).toFixed(1)} MiB saved in ${fmtMs(captured.ms)}; the guest was paused meanwhile)`,
        };
      }
      case 'freeze':
        // The guest agent freezes, the cut runs, it thaws; if the guest cannot, the fallback decides.
        return this.host.consistency().around(def, cut, { fallback: plan.fallback });
    }
  }

  /**
   * Cuts the disks: seals each tracker's id into a new child per disk and records the checkpoint in one definition
   * write. A running VM's I/O is paused only to flush, seal, record and switch (its children are made before).
   */
  private async cutDisks(
    def: VmDefinition,
    running: Map<string, OpenedDisk> | undefined,
    children: NewChild[],
    record: (sealed: Map<string, string | undefined>) => void,
  ): Promise<{ ioPauseMs: number | null }> {
    const { store } = this.host;
    const sealed = new Map<string, string | undefined>();
    if (!running) {
      for (const c of children) {
        const disk = await openDisk(store.abs(def, c.disk.head), store.diskOptions(def));
        try {
          await disk.pause();
          sealed.set(c.disk.slot, (await disk.prepareChild(c.child)).id);
          disk.resume();
        } finally {
          await disk.close();
        }
      }
      await privateFiles(...children.map((c) => c.child));
      record(sealed);
      await store.save(def);
      return { ioPauseMs: null };
    }
    const disks = children.map((c) => running.get(c.disk.slot)!);
    // The children are made while the guest still writes; the pause only flushes, seals and switches.
    await Promise.all(children.map((c, i) => disks[i].precreateChild(c.child)));
    await privateFiles(...children.map((c) => c.child));
    await this.host.hook?.('children made');
    const started = performance.now();
    await Promise.all(disks.map((d) => d.pause()));
    try {
      await Promise.all(
        children.map(async (c, i) =>
          sealed.set(c.disk.slot, (await disks[i].prepareChild(c.child, { precreated: true })).id),
        ),
      );
      await this.host.hook?.('sealed');
      // The definition names the children before the VM writes to them: a crash after this keeps the checkpoint.
      record(sealed);
      await store.save(def);
      await this.host.hook?.('recorded');
      await Promise.all(children.map((c, i) => disks[i].switchHead(c.child)));
      await this.host.hook?.('switched');
    } finally {
      for (const d of disks) d.resume();
    }
    return { ioPauseMs: performance.now() - started };
  }

  /** Deletes a checkpoint whose files no newer checkpoint needs, merging online when the VM runs on it. */
  async delete(name: string, checkpoint: string, opts: LeaseRef = {}): Promise<void> {
    return this.host.guard.leased(name, opts.lease, 'checkpoint delete', async () => {
      const def = this.host.store.get(name);
      const cp = this.find(def, checkpoint);
      await this.remove(def, cp, 'delete', null);
    });
  }

  /**
   * Removes a checkpoint: when the VM's current state sits on it, its child (the running head) is merged
   * back into the checkpoint's files online (offline when the VM is off). Journaled: a crash anywhere is
   * finished on restart by an offline merge.
   */
  async remove(
    def: VmDefinition,
    cp: Checkpoint,
    then: 'delete' | 'refpoint',
    rp: ReferencePoint | null,
  ): Promise<void> {
    const { store } = this.host;
    store.assertNoPending(def);
    if (def.checkpoints.some((c) => c.parentId === cp.id)) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `checkpoint ${cp.name} has newer checkpoints; delete those first (merging an inner checkpoint is not supported yet)`,
      );
    }
    const isCurrent = def.currentCheckpointId === cp.id;
    const disks = isCurrent
      ? cp.disks.map((d) => ({ slot: d.slot, child: def.disks.find((a) => a.slot === d.slot)!.head, parent: d.file }))
      : [];
    def.pending = { op: 'merge', checkpointId: cp.id, then, referencePoint: rp, disks };
    await store.save(def);
    await this.host.hook?.('merge journaled');
    const running = this.host.runningDisks(def.name);
    // The last disk's switch writes the removal with it (one definition write, not two): from that write on
    // nothing is left to finish but deleting the files it names.
    let orphaned: string[] | undefined;
    for (const [i, m] of disks.entries()) {
      const switched = () => {
        def.disks.find((a) => a.slot === m.slot)!.head = m.parent;
        if (i === disks.length - 1) orphaned = store.applyRemoval(def, cp.id, then, rp);
        return store.save(def);
      };
      const open = running?.get(m.slot);
      if (open) {
        await open.mergeHeadOnline({ beforeSwitch: switched, onStep: this.host.hook });
      } else {
        await mergeChildFile(store.abs(def, m.child), { allowedRoots: store.diskOptions(def).allowedRoots });
        await switched();
      }
    }
    await this.host.hook?.('removed');
    if (orphaned) await store.deleteOrphaned(def, orphaned);
    else await store.finishRemoval(def, cp.id, then, rp);
    this.host.log.info(`${then === 'refpoint' ? 'converted' : 'deleted'} checkpoint ${cp.name} of ${def.name}`);
  }

  /** Applies a checkpoint to a VM that is off: the VM continues from a new child of the checkpoint's files. */
  async apply(name: string, checkpoint: string, opts: LeaseRef = {}): Promise<void> {
    return this.host.guard.leased(name, opts.lease, 'checkpoint apply', () => this.applyNow(name, checkpoint));
  }

  private async applyNow(name: string, checkpoint: string): Promise<void> {
    const { store } = this.host;
    const def = store.get(name);
    store.assertNoPending(def);
    if (this.host.runningDisks(name))
      throw new TidemarkError('CONFLICT', `${name} is running: stop it to apply a checkpoint`);
    const cp = this.find(def, checkpoint);
    const suffix = randomUUID().slice(0, 8);
    const created: string[] = [];
    for (const d of cp.disks) {
      const ext = childExtensionOf(await diskFileFormat(store.abs(def, d.file)));
      created.push(store.diskFile(name, `${d.slot}_${suffix}${ext}`));
    }
    // The current state is discarded unless a checkpoint holds it.
    const frozen = new Set(def.checkpoints.flatMap((c) => c.disks.map((d) => d.file)));
    const discard = def.disks.map((d) => d.head).filter((h) => !frozen.has(h) && h !== store.baseOf(def, h));
    def.pending = { op: 'apply', checkpointId: cp.id, created: created.map((c) => store.rel(def, c)), discard };
    await store.save(def);
    try {
      for (let i = 0; i < cp.disks.length; i++) {
        await createChildFile(created[i], store.abs(def, cp.disks[i].file), store.diskOptions(def).allowedRoots);
        await privateFiles(created[i]);
      }
    } catch (err) {
      for (const c of created) await unlink(c).catch(() => undefined);
      def.pending = null;
      await store.save(def);
      throw err;
    }
    for (let i = 0; i < cp.disks.length; i++) {
      const att = def.disks.find((d) => d.slot === cp.disks[i].slot);
      if (att) att.head = store.rel(def, created[i]);
    }
    def.currentCheckpointId = cp.id;
    def.pending = { op: 'delete-files', files: discard };
    await store.save(def);
    for (const f of discard) await unlink(store.abs(def, f)).catch(() => undefined);
    def.pending = null;
    await store.save(def);
    if (def.boot) {
      // The VM continues from the checkpoint: with its memory when it has some (Saved, as Hyper-V leaves it),
      // and never with a saved state of the discarded present (that memory does not match these disks).
      const rt = this.host.runtime(name);
      if (cp.memoryState) await rt.installSavedState(store.abs(def, cp.memoryState), `checkpoint ${cp.name} applied`);
      else if (rt.state === 'Saved') await rt.dropSavedState();
    }
    this.host.log.info(`applied checkpoint ${cp.name} to ${name}${cp.memoryState ? ' (Saved: start resumes it)' : ''}`);
  }
}

/** What a new checkpoint is before its cut: the rest comes from the cut (sealed ids) and its outcome. */
type CheckpointDraft = Pick<Checkpoint, 'id' | 'name' | 'type' | 'run' | 'memoryState'>;

/** The checkpoint enters the definition: the disks' heads move to the children, the journal is cleared. */
function recordCheckpoint(
  def: VmDefinition,
  draft: CheckpointDraft,
  children: NewChild[],
  sealed: Map<string, string | undefined>,
  rel: (file: string) => string,
): void {
  // In the order a checkpoint's fields have always been written.
  def.checkpoints.push({
    id: draft.id,
    name: draft.name,
    type: draft.type,
    parentId: def.currentCheckpointId,
    createdAt: new Date().toISOString(),
    consistency: 'crash',
    consistencyNote: null,
    freezeWindowMs: null,
    ioPauseMs: null,
    disks: children.map((c) => ({
      slot: c.disk.slot,
      virtualDiskId: c.disk.virtualDiskId,
      file: c.disk.head,
      rctId: sealed.get(c.disk.slot) ?? null,
    })),
    run: draft.run,
    memoryState: draft.memoryState,
  });
  for (const c of children) c.disk.head = rel(c.child);
  def.currentCheckpointId = draft.id;
  def.pending = null;
}

function fmtMs(ms: number | null): string {
  return ms === null ? 'n/a' : `${ms.toFixed(1)} ms`;
}
