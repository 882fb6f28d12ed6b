/**
 * The host storage stack's virtual disk (vhdmp's role in Hyper-V): one VHDX chain, its change tracker,
 * and every guest I/O through it. It adds what the file engine alone does not have: an I/O gate the host
 * pauses to cut checkpoints, a head that can be switched onto a new child or back onto its parent while
 * clients stay connected, and an online merge of the head into its parent while the guest keeps writing.
 */
import { unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import { BlockState } from '../formats/vhdx/constants.js';
import { createVhdx, DEFAULT_CHILD_BLOCK_SIZE } from '../formats/vhdx/create.js';
import { formatLinkage, locatorSet } from '../formats/vhdx/metadata.js';
import { VhdxFile, type OpenOptions } from '../formats/vhdx/vhdx.js';
import { ChangeTracker, updateIdleHeader, type ChangesResult } from '../tracking/tracker.js';
import { guidToString, newGuid } from '../util/guid.js';
import type { AllocationExtent, BlockDevice, DirtyExtent, WriteOptions, ZeroOptions } from './device.js';
import { IoGate } from './io-gate.js';

export interface VirtualDiskOptions {
  readOnly?: boolean;
  /** Directories the chain's files may be opened from (default: the head's directory). */
  allowedRoots?: string[];
  pathMap?: Record<string, string>;
  /** Attach the change tracker when the base disk has tracking files (default true). */
  tracking?: boolean;
  /** Where the chain's files are read from (a storage snapshot's view); default the live files. */
  openFile?: OpenOptions['openFile'];
}

export interface MergeProgress {
  pass: number;
  blocksCopied: number;
  bytesCopied: number;
}

export interface OnlineMergeOptions {
  /**
   * Runs while I/O is paused, after the merged child was deleted and before the parent becomes the head:
   * the host records the new head in the VM's definition here, so a crash never finds both.
   */
  beforeSwitch?: (parentPath: string) => Promise<void>;
  onProgress?: (p: MergeProgress) => void;
  /** Copy passes while the guest writes, before the last pass runs with I/O paused (default 4). */
  maxLivePasses?: number;
}

export interface OnlineMergeResult {
  parentPath: string;
  passes: number;
  bytesCopied: number;
  /** How long guest I/O was held for the last pass and the switch. */
  pauseMs: number;
}

/** Blocks at most this many (or fewer) left dirty end the live passes. */
const FINAL_PASS_BLOCKS = 16;
const COPY_PIECE = 8 * 1024 * 1024;

export class VirtualDisk implements BlockDevice {
  private gate = new IoGate();
  private closed = false;
  /** Blocks of the head written while an online merge copies it (they are copied again). */
  private mergeDirty: Set<number> | undefined;
  /**
   * The next checkpoint's child, opened over the live head (its parent is this very head instance) so the
   * switch re-opens nothing; `prepared` once its tracker seal recorded it.
   */
  private staged: { path: string; file: VhdxFile; prepared: boolean } | undefined;

  private constructor(
    private head: VhdxFile,
    private tracker: ChangeTracker | undefined,
    private readonly opts: VirtualDiskOptions,
  ) {}

  static async open(filePath: string, opts: VirtualDiskOptions = {}): Promise<VirtualDisk> {
    const { head, tracker } = await openHead(filePath, opts);
    return new VirtualDisk(head, tracker, opts);
  }

  // ---------------------------------------------------------------- what it is

  get path(): string {
    return this.head.path;
  }

  /** The open head file (and through `.chain()` its parents). */
  get file(): VhdxFile {
    return this.head;
  }

  get changeTracker(): ChangeTracker | undefined {
    return this.tracker;
  }

  get virtualDiskId(): string {
    return guidToString(this.head.virtualDiskId);
  }

  get size(): number {
    return this.head.virtualSize;
  }

  get readOnly(): boolean {
    return !!this.opts.readOnly;
  }

  get minimumBlockSize(): number {
    return this.head.logicalSectorSize;
  }

  get preferredBlockSize(): number {
    return Math.min(this.head.blockSize, 32 * 1024 * 1024);
  }

  get isPaused(): boolean {
    return this.gate.isPaused;
  }

  // ---------------------------------------------------------------- I/O

  read(offset: number, length: number): Promise<Buffer> {
    return this.io(async () => {
      this.checkRange(offset, length);
      const buf = Buffer.allocUnsafe(length);
      await this.head.read(buf, offset);
      return buf;
    });
  }

  /** Reads into a caller's buffer (the NBD server and backup readers reuse theirs). */
  readInto(dst: Uint8Array, offset: number): Promise<void> {
    return this.io(async () => {
      this.checkRange(offset, dst.length);
      await this.head.read(dst, offset);
    });
  }

  write(offset: number, data: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    return this.io(async () => {
      this.checkWritable();
      this.checkRange(offset, data.length);
      this.noteMergeDirty(offset, data.length);
      await this.head.write(data, offset);
      // Again once it landed: a copy pass may have taken the first mark while the write was still queued.
      this.noteMergeDirty(offset, data.length);
      if (opts.fua) await this.head.flush();
    });
  }

  flush(): Promise<void> {
    return this.io(() => this.head.flush());
  }

  trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    return this.io(async () => {
      this.checkWritable();
      this.checkRange(offset, length);
      this.noteMergeDirty(offset, length);
      await this.head.trim(offset, length);
      // Again once it landed: a copy pass may have taken the first mark while the write was still queued.
      this.noteMergeDirty(offset, length);
      if (opts.fua) await this.head.flush();
    });
  }

  /** Zeroing is a metadata change for whole blocks and a small write at the edges: always "fast". */
  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.io(async () => {
      this.checkWritable();
      this.checkRange(offset, length);
      this.noteMergeDirty(offset, length);
      await this.head.writeZeroes(offset, length, { noHole: opts.noHole });
      // Again once it landed: a copy pass may have taken the first mark while the write was still queued.
      this.noteMergeDirty(offset, length);
      if (opts.fua) await this.head.flush();
    });
  }

  blockStatus(offset: number, length: number): Promise<AllocationExtent[]> {
    return this.io(async () => {
      this.checkRange(offset, length);
      const out: AllocationExtent[] = [];
      let at = offset;
      for (const e of await this.head.contentExtents(offset, length)) {
        if (e.offset > at) out.push({ offset: at, length: e.offset - at, hole: true, zero: true });
        out.push({ offset: e.offset, length: e.length, hole: false, zero: e.zero });
        at = e.offset + e.length;
      }
      if (at < offset + length) out.push({ offset: at, length: offset + length - at, hole: true, zero: true });
      return out;
    });
  }

  async dirtyContexts(): Promise<string[]> {
    return this.tracker?.sealedIds() ?? [];
  }

  async dirtyStatus(name: string, offset: number, length: number): Promise<DirtyExtent[]> {
    const res = await this.changes(name, offset, length);
    const out: DirtyExtent[] = [];
    let at = offset;
    for (const r of res.ranges) {
      if (r.offset > at) out.push({ offset: at, length: r.offset - at, dirty: false });
      out.push({ offset: r.offset, length: r.length, dirty: true });
      at = r.offset + r.length;
    }
    const end = offset + res.processedLength;
    if (at < end) out.push({ offset: at, length: end - at, dirty: false });
    return out;
  }

  /** QueryChangesVirtualDisk on this disk's tracker (refused when the disk has none). */
  async changes(sinceId: string, offset = 0, length?: number, maxRanges?: number): Promise<ChangesResult> {
    this.assertOpen();
    if (!this.tracker) {
      const found = await ChangeTracker.inspect(this.head.chain().at(-1)!.path);
      throw new TidemarkError(
        'MISSING_CHANGE_TRACKING_INFORMATION',
        found.state === 'foreign'
          ? `${path.basename(this.head.path)} is tracked by another product (${found.detail}): read it in full`
          : `${path.basename(this.head.path)} has no change tracking: read it in full`,
        { id: sinceId },
      );
    }
    return this.tracker.changes(sinceId, offset, length, maxRanges);
  }

  /** Seals the tracker's id for the disk's current state (undefined without tracking). */
  async seal(): Promise<string | undefined> {
    this.assertOpen();
    if (!this.tracker || this.readOnly) return undefined;
    return this.tracker.seal();
  }

  // ---------------------------------------------------------------- pause, switch, checkpoint, merge

  /** Holds new I/O and waits for what is in flight (the checkpoint's instant). */
  async pause(): Promise<void> {
    this.assertOpen();
    await this.gate.pause();
  }

  /**
   * Before a checkpoint links a child to the head: headers a writer that ignores image locks installed are
   * taken as the head's own (the tracker starts a new epoch first), so the child names the DataWriteGuid
   * the file has. Returns why, or undefined when the headers are the head's own.
   */
  private adoptForeignHeaders(): Promise<string | undefined> {
    return this.head.adoptHeadersOnDisk(async (why) => {
      await this.tracker?.distrust(why);
    });
  }

  /** Ends a pause. A child prepared but not switched to is given up (the checkpoint was abandoned). */
  resume(): void {
    if (this.staged?.prepared) void this.dropStaged();
    this.gate.resume();
  }

  /**
   * With I/O paused: makes the current head durable, seals its id, creates `childPath` over it and
   * continues on the child. The old head is from now on the frozen point of the checkpoint.
   */
  async cutCheckpoint(
    childPath: string,
    opts: { blockSize?: number } = {},
  ): Promise<{ id?: string; parentPath: string }> {
    const prepared = await this.prepareChild(childPath, opts);
    await this.switchHead(childPath);
    return prepared;
  }

  /**
   * Creates `childPath` over the current head while I/O still runs (the slow part of a checkpoint) and
   * opens it over this very head instance. The head's DataWriteGuid is installed first, so the child's
   * parent_linkage stays right whatever is written until the cut. `prepareChild` then only flushes and
   * seals inside the pause, and `switchHead` re-opens nothing.
   */
  async precreateChild(childPath: string, opts: { blockSize?: number } = {}): Promise<void> {
    this.assertOpen();
    this.checkWritable();
    await this.dropStaged();
    await this.adoptForeignHeaders();
    await this.head.markDataChanged();
    await this.createChild(childPath, opts);
    await this.stageChild(childPath);
    // What the guest wrote so far is committed now, while it still writes: the pause has less to flush.
    await this.head.flush();
  }

  /**
   * With I/O paused: (unless `precreateChild` made it) creates `childPath` over the head; then flushes the
   * head, leaves its log clean and seals its id, recording the child's first DataWriteGuid in the same
   * tracker persist. The head stays the head until `switchHead` (the host records the checkpoint first).
   */
  async prepareChild(
    childPath: string,
    opts: { blockSize?: number; precreated?: boolean } = {},
  ): Promise<{ id?: string; parentPath: string }> {
    this.assertPaused();
    this.checkWritable();
    const parentPath = this.head.path;
    // A child made before another program rewrote the head's headers links to ones the file no longer
    // has: it is made again over the headers adopted.
    let precreated = opts.precreated ?? false;
    if ((await this.adoptForeignHeaders()) && (this.staged || precreated)) {
      await this.dropStaged();
      await unlink(childPath).catch(() => undefined);
      precreated = false;
    }
    if (this.staged?.path !== path.resolve(childPath)) {
      if (!precreated) {
        // As in precreateChild: the DataWriteGuid the child links to is the head's last one.
        await this.head.markDataChanged();
        await this.createChild(childPath, opts);
      }
      await this.stageChild(childPath);
    }
    const staged = this.staged!;
    let id: string | undefined;
    if (this.tracker) id = await this.tracker.sealForChild(staged.file);
    else await this.head.flush({ cleanLog: true });
    staged.prepared = true;
    return { id, parentPath };
  }

  /**
   * With I/O paused: continues on `filePath`, a child of the head or its parent. The child that
   * `precreateChild`/`prepareChild` opened is switched to in place: the head is retired into its read-only
   * parent and the tracker moves onto it, no file re-opened. Any other path: the head is closed cleanly
   * and `filePath` opened with its chain.
   */
  async switchHead(filePath: string): Promise<void> {
    this.assertPaused();
    const staged = this.staged;
    if (staged && staged.path === path.resolve(filePath)) {
      this.staged = undefined;
      try {
        await this.head.retire();
        await this.tracker?.moveTo(staged.file);
      } catch (err) {
        // Neither head can be trusted to be consistent in memory: give up as a crash would; a re-open recovers.
        this.closed = true;
        staged.file.parent = undefined;
        await staged.file.abandon().catch(() => undefined);
        await this.tracker?.abandon().catch(() => undefined);
        await this.head.abandon().catch(() => undefined);
        throw err;
      }
      this.head = staged.file;
      return;
    }
    await this.dropStaged();
    await this.head.close();
    try {
      const next = await openHead(filePath, this.opts);
      this.head = next.head;
      this.tracker = next.tracker;
    } catch (err) {
      this.closed = true;
      throw err;
    }
  }

  /**
   * Merges the head (a differencing disk) into its parent while the guest keeps writing, then continues
   * on the parent and deletes the child. Follows the parent_linkage2 protocol: the child accepts the
   * parent's next DataWriteGuid before the parent changes, so a crash at any point leaves a chain that
   * opens, reads the same, and that an offline merge finishes. The merge adds no tracked changes.
   */
  async mergeHeadOnline(opts: OnlineMergeOptions = {}): Promise<OnlineMergeResult> {
    this.assertOpen();
    this.checkWritable();
    await this.dropStaged();
    const child = this.head;
    if (!child.parent || !child.parentLink) {
      throw new TidemarkError('INVALID_ARGUMENT', `${child.path} is not a differencing disk: nothing to merge`);
    }
    if (this.mergeDirty) throw new TidemarkError('BUSY', `${child.path} is already being merged`);
    const parentPath = child.parentLink.path;
    const basePath = child.chain().at(-1)!.path;
    const parent = await VhdxFile.open(parentPath, {
      writable: true,
      allowedRoots: this.opts.allowedRoots,
      pathMap: this.opts.pathMap,
    });
    const dirty = new Set<number>();
    let pauseStarted = 0;
    let paused = false;
    const result: OnlineMergeResult = { parentPath, passes: 0, bytesCopied: 0, pauseMs: 0 };
    try {
      // 1. The child accepts the parent's next DataWriteGuid, durably, before the parent changes.
      const next = newGuid();
      await this.gate.pause();
      try {
        await child.setParentLocator(
          locatorSet(
            locatorSet(child.parentLocator!, 'parent_linkage', formatLinkage(parent.header.dataWriteGuid)),
            'parent_linkage2',
            formatLinkage(next),
          ),
        );
        await child.flush();
        this.mergeDirty = dirty;
      } finally {
        this.gate.resume();
      }
      parent.setNextDataWriteGuid(next);
      await parent.markDataChanged();

      // 2. Copy passes while the guest writes; blocks it writes meanwhile are copied again.
      const all: number[] = [];
      for await (const { block, entry } of child.ownBlocks())
        if (entry.state !== BlockState.NotPresent) all.push(block);
      let todo = all;
      const maxLive = opts.maxLivePasses ?? 4;
      while (true) {
        result.passes++;
        for (const block of todo) result.bytesCopied += await this.copyBlock(child, parent, block, dirty);
        opts.onProgress?.({ pass: result.passes, blocksCopied: todo.length, bytesCopied: result.bytesCopied });
        if (dirty.size <= FINAL_PASS_BLOCKS || result.passes >= maxLive) break;
        todo = [...dirty].sort((a, b) => a - b);
        dirty.clear();
      }

      // 3. The last pass with I/O held, then the switch.
      await this.gate.pause();
      paused = true;
      pauseStarted = performance.now();
      todo = [...dirty].sort((a, b) => a - b);
      dirty.clear();
      result.passes++;
      for (const block of todo) result.bytesCopied += await this.copyBlock(child, parent, block, dirty);
      await parent.flush();
      await parent.close();
      this.mergeDirty = undefined;
      await child.close();
      if (this.tracker) {
        // The merged parent becomes the head: the tracker accepts its binding (no foreign writer).
        await updateIdleHeader(basePath, (h) => {
          h.pending = { head: path.basename(parentPath), dataWriteGuid: next };
        });
      }
      await unlink(child.path);
      await opts.beforeSwitch?.(parentPath);
      try {
        const reopened = await openHead(parentPath, this.opts);
        this.head = reopened.head;
        this.tracker = reopened.tracker;
      } catch (err) {
        this.closed = true;
        throw err;
      }
      return result;
    } catch (err) {
      this.mergeDirty = undefined;
      await parent.close().catch(() => undefined);
      throw err;
    } finally {
      if (paused) {
        result.pauseMs = performance.now() - pauseStarted;
        this.gate.resume();
      }
    }
  }

  /** Copies what the child holds of one block into the parent; returns the bytes copied. */
  private async copyBlock(child: VhdxFile, parent: VhdxFile, block: number, dirty: Set<number>): Promise<number> {
    const bs = child.blockSize;
    const base = block * bs;
    const extent = Math.min(bs, child.virtualSize - base);
    const entry = await child.payloadEntry(block);
    if (
      entry.state === BlockState.Zero ||
      entry.state === BlockState.Unmapped ||
      entry.state === BlockState.Undefined
    ) {
      await parent.writeZeroes(base, extent);
      return 0;
    }
    const runs =
      entry.state === BlockState.FullyPresent
        ? [{ offset: 0, length: extent }]
        : entry.state === BlockState.PartiallyPresent
          ? await child.presentRuns(block)
          : [];
    let copied = 0;
    for (const run of runs) {
      for (let at = run.offset; at < run.offset + run.length; at += COPY_PIECE) {
        const n = Math.min(COPY_PIECE, run.offset + run.length - at);
        const buf = Buffer.allocUnsafe(n);
        try {
          await child.readOwn(block, at, buf);
        } catch (err) {
          // The guest changed this block under the copy: it is dirty and will be copied again.
          if (err instanceof TidemarkError && err.code === 'INVALID_ARGUMENT') {
            dirty.add(block);
            return copied;
          }
          throw err;
        }
        await parent.write(buf, base + at);
        copied += n;
      }
    }
    return copied;
  }

  // ---------------------------------------------------------------- close

  /** Waits for in-flight I/O, flushes and closes the chain (the tracker records a clean close). */
  async close(): Promise<void> {
    if (this.closed) return;
    await this.gate.pause();
    this.closed = true;
    await this.dropStaged();
    await this.head.close();
  }

  /** Gives up without a clean close (as a crash would): for tests and after fatal I/O errors. */
  async abandon(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.dropStaged({ abandon: true });
    await this.tracker?.abandon();
    await this.head.abandon();
  }

  // ---------------------------------------------------------------- the staged child

  private createChild(childPath: string, opts: { blockSize?: number }): Promise<void> {
    return createVhdx(childPath, {
      parent: this.head.path,
      blockSize: opts.blockSize ?? DEFAULT_CHILD_BLOCK_SIZE,
      parentOpenOptions: { allowedRoots: this.opts.allowedRoots, pathMap: this.opts.pathMap },
    });
  }

  /** Opens `childPath` over the live head instance (it must link to the head's current DataWriteGuid). */
  private async stageChild(childPath: string): Promise<void> {
    await this.dropStaged();
    const file = await VhdxFile.open(childPath, {
      writable: true,
      parent: this.head,
      allowedRoots: this.opts.allowedRoots,
      pathMap: this.opts.pathMap,
      openFile: this.opts.openFile,
    });
    this.staged = { path: path.resolve(childPath), file, prepared: false };
  }

  /** Closes a staged child that will not be switched to; the head (its parent) stays open and ours. */
  private async dropStaged(opts: { abandon?: boolean } = {}): Promise<void> {
    const staged = this.staged;
    if (!staged) return;
    this.staged = undefined;
    this.tracker?.cancelChild(staged.file);
    staged.file.parent = undefined;
    if (opts.abandon) await staged.file.abandon().catch(() => undefined);
    else await staged.file.close().catch(() => undefined);
  }

  // ---------------------------------------------------------------- helpers

  private async io<T>(fn: () => Promise<T>): Promise<T> {
    this.assertOpen();
    return this.gate.run(() => {
      this.assertOpen();
      return fn();
    });
  }

  private noteMergeDirty(offset: number, length: number): void {
    const dirty = this.mergeDirty;
    if (!dirty || length === 0) return;
    const bs = this.head.blockSize;
    for (let b = Math.floor(offset / bs); b <= Math.floor((offset + length - 1) / bs); b++) dirty.add(b);
  }

  private assertOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', `virtual disk ${this.head.path} is closed`);
  }

  private assertPaused(): void {
    this.assertOpen();
    if (!this.gate.isPaused) throw new TidemarkError('INVALID_ARGUMENT', 'pause the disk before switching its head');
  }

  private checkWritable(): void {
    if (this.readOnly) throw new TidemarkError('READ_ONLY', `${path.basename(this.head.path)} is exported read-only`);
  }

  private checkRange(offset: number, length: number): void {
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length < 0 ||
      offset + length > this.size
    ) {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `range [${offset}, +${length}) is outside the ${this.size}-byte disk`,
      );
    }
  }
}

async function openHead(
  filePath: string,
  opts: VirtualDiskOptions,
): Promise<{ head: VhdxFile; tracker: ChangeTracker | undefined }> {
  const head = await VhdxFile.open(filePath, {
    writable: !opts.readOnly,
    allowedRoots: opts.allowedRoots,
    pathMap: opts.pathMap,
    openFile: opts.openFile,
  });
  try {
    const tracker =
      opts.tracking === false ? undefined : await ChangeTracker.attach(head, { writable: !opts.readOnly });
    return { head, tracker };
  } catch (err) {
    await head.close().catch(() => undefined);
    throw err;
  }
}

export function openVirtualDisk(filePath: string, opts: VirtualDiskOptions = {}): Promise<VirtualDisk> {
  return VirtualDisk.open(filePath, opts);
}
