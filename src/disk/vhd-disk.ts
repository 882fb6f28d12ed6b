/**
 * The host storage stack's virtual disk for legacy VHD chains (issue 17): what `VirtualDisk` is for VHDX,
 * with the same surface, so that the host and the NBD server choose a device by format and use it alike.
 * The head (fixed, dynamic or differencing) is writable, its parents read-only.
 *
 * Checkpoints follow the pre-2016 differencing-disk path: the checkpoint's child is a differencing VHD
 * (the caller names it `.avhd`, as Hyper-V does) created over the head and opened over the live head
 * instance; at the switch the old head is retired into the read-only frozen point. A VHD child links to
 * its parent by the parent's unique id and footer time stamp, and the engine gives a disk a new time stamp
 * at the first change of a writable session: so before a child is made the head takes its session's time
 * stamp at once (`markChanged`), and the writes until the cut keep it.
 *
 * VHD has no resilient change tracking: `dirtyContexts()` is empty, `changes` refuses with
 * MISSING_CHANGE_TRACKING_INFORMATION, `seal` answers undefined (as `VirtualDisk` does for an untracked
 * disk) and `trackingUnavailable` says why, for the backup to report. A backup reads such a disk in full,
 * or (the pre-2016 way) reads the frozen differencing children of its checkpoints.
 */
import { unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, fromSystemError } from '../errors.js';
import { SECTOR } from '../formats/vhd/constants.js';
import { createVhd } from '../formats/vhd/create.js';
import { VhdFile, type VhdOpenOptions } from '../formats/vhd/vhd.js';
import type { ChangesResult } from '../tracking/tracker.js';
import { syncDirectory } from '../util/atomic.js';
import type { AllocationExtent, BlockDevice, DirtyExtent, WriteOptions, ZeroOptions } from './device.js';
import { IoGate } from './io-gate.js';
import type { OnlineMergeOptions, OnlineMergeResult } from './virtual-disk.js';

export interface VhdVirtualDiskOptions {
  readOnly?: boolean;
  /** Directories the chain's files may be opened from (default: the head's directory). */
  allowedRoots?: string[];
  pathMap?: Record<string, string>;
  /** Where the chain's files are read from (a storage snapshot's view); default the live files. */
  openFile?: VhdOpenOptions['openFile'];
}

/** Why a VHD disk has no change tracking (what the backup reports for it). */
export const VHD_TRACKING_UNAVAILABLE = 'VHD disk: legacy VHD has no resilient change tracking';

/** Blocks at most this many (or fewer) left dirty end the live passes of an online merge. */
const FINAL_PASS_BLOCKS = 16;
const COPY_PIECE = 8 * 1024 * 1024;

export class VhdVirtualDisk implements BlockDevice {
  readonly format = 'vhd' as const;
  /** Why this disk's changes cannot be queried (always: VHD has no RCT). */
  readonly trackingUnavailable = VHD_TRACKING_UNAVAILABLE;
  /** Never a tracker: the host's "tracking enabled?" reads this as VirtualDisk's. */
  readonly changeTracker: undefined = undefined;

  private gate = new IoGate();
  private closed = false;
  /** Blocks of the head written while an online merge copies it (they are copied again). */
  private mergeDirty: Set<number> | undefined;
  /** The next checkpoint's child, opened over the live head; `prepared` once the cut made the head durable. */
  private staged: { path: string; file: VhdFile; prepared: boolean } | undefined;

  private constructor(
    private head: VhdFile,
    private readonly opts: VhdVirtualDiskOptions,
  ) {}

  static async open(filePath: string, opts: VhdVirtualDiskOptions = {}): Promise<VhdVirtualDisk> {
    return new VhdVirtualDisk(await openHead(filePath, opts), opts);
  }

  // ---------------------------------------------------------------- what it is

  get path(): string {
    return this.head.path;
  }

  /** The open head file (and through `.chain()` its parents). */
  get file(): VhdFile {
    return this.head;
  }

  /** The base disk's unique id (a VHD has no virtual disk id shared by its chain; the base's stays). */
  get virtualDiskId(): string {
    return this.head.chain().at(-1)!.uniqueId;
  }

  get size(): number {
    return this.head.virtualSize;
  }

  get readOnly(): boolean {
    return !!this.opts.readOnly;
  }

  get minimumBlockSize(): number {
    return SECTOR;
  }

  /** The head's block size (a fixed disk: 2 MiB, the default VHD block). */
  get preferredBlockSize(): number {
    return Math.min(this.head.blockSize ?? 2 * 1024 * 1024, 32 * 1024 * 1024);
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

  /**
   * The engine's discard: whole blocks of a dynamic head are deallocated, everything else is zeroed (VHD
   * has no unmapped state; a differencing head takes a new block that is a hole in the file).
   */
  trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    return this.io(async () => {
      this.checkWritable();
      this.checkRange(offset, length);
      this.noteMergeDirty(offset, length);
      await this.head.trim(offset, length);
      this.noteMergeDirty(offset, length);
      if (opts.fua) await this.head.flush();
    });
  }

  /**
   * Zeroing is a metadata change for blocks of a dynamic head (deallocated, unless `noHole`) and for blocks
   * a differencing head does not have yet (a new block that is a hole in the file); anywhere else zeros
   * are written. `fast` is refused (NOT_SUPPORTED) when zeros would have to be written anywhere but in the
   * first and last block of the range, and always on a fixed head.
   */
  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.io(async () => {
      this.checkWritable();
      this.checkRange(offset, length);
      if (opts.fast && length > 0 && !(await this.zeroIsFast(offset, length, !!opts.noHole))) {
        throw new TidemarkError(
          'NOT_SUPPORTED',
          `zeroing [${offset}, +${length}) of the ${this.head.diskType} VHD ${path.basename(this.head.path)} means writing zeros`,
        );
      }
      this.noteMergeDirty(offset, length);
      await this.head.writeZeroes(offset, length, { noHole: opts.noHole });
      this.noteMergeDirty(offset, length);
      if (opts.fua) await this.head.flush();
    });
  }

  private async zeroIsFast(offset: number, length: number, noHole: boolean): Promise<boolean> {
    const head = this.head;
    if (head.diskType === 'fixed') return false;
    const bs = head.blockSize!;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    // The edge blocks are a bounded write at most; every block in between must be metadata only.
    for (let b = first + 1; b < last; b++) {
      const at = await head.blockOffset(b);
      if (at === undefined) continue;
      if (head.diskType === 'dynamic' && !noHole) continue;
      return false;
    }
    return true;
  }

  /** From the BAT and the sector bitmaps of the chain: a hole where no file holds the sectors. */
  blockStatus(offset: number, length: number): Promise<AllocationExtent[]> {
    return this.io(async () => {
      this.checkRange(offset, length);
      const out: AllocationExtent[] = [];
      let at = offset;
      for (const e of await this.head.contentExtents(offset, length)) {
        if (e.offset > at) out.push({ offset: at, length: e.offset - at, hole: true, zero: true });
        out.push({ offset: e.offset, length: e.length, hole: false, zero: false });
        at = e.offset + e.length;
      }
      if (at < offset + length) out.push({ offset: at, length: offset + length - at, hole: true, zero: true });
      return out;
    });
  }

  /** No change tracking: no dirty bitmaps to export. */
  async dirtyContexts(): Promise<string[]> {
    return [];
  }

  async dirtyStatus(name: string, offset: number, length: number): Promise<DirtyExtent[]> {
    await this.changes(name, offset, length);
    return [];
  }

  /** QueryChangesVirtualDisk: always refused (MISSING_CHANGE_TRACKING_INFORMATION), as for an untracked VHDX. */
  async changes(sinceId: string, _offset = 0, _length?: number, _maxRanges?: number): Promise<ChangesResult> {
    this.assertOpen();
    throw new TidemarkError(
      'MISSING_CHANGE_TRACKING_INFORMATION',
      `${path.basename(this.head.path)}: ${VHD_TRACKING_UNAVAILABLE}: read it in full`,
      { id: sinceId },
    );
  }

  /** Nothing to seal without change tracking: undefined, as for an untracked VHDX. */
  async seal(): Promise<string | undefined> {
    this.assertOpen();
    return undefined;
  }

  // ---------------------------------------------------------------- pause, switch, checkpoint, merge

  /** Holds new I/O and waits for what is in flight (the checkpoint's instant). */
  async pause(): Promise<void> {
    this.assertOpen();
    await this.gate.pause();
  }

  /** Ends a pause. A child prepared but not switched to is given up (the checkpoint was abandoned). */
  resume(): void {
    if (this.staged?.prepared) void this.dropStaged();
    this.gate.resume();
  }

  /**
   * With I/O paused: makes the head durable, creates `childPath` (a differencing VHD, by convention
   * `.avhd`) over it and continues on the child. The old head is from now on the checkpoint's frozen point.
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
   * opens it over this very head instance. The head takes its session's time stamp first, so the child's
   * link (unique id and time stamp) stays right whatever is written until the cut.
   */
  async precreateChild(childPath: string, opts: { blockSize?: number } = {}): Promise<void> {
    this.assertOpen();
    this.checkWritable();
    await this.dropStaged();
    await this.createChild(childPath, opts);
    await this.stageChild(childPath);
    // What the guest wrote so far is committed now, while it still writes: the pause has less to flush.
    await this.head.flush();
  }

  /**
   * With I/O paused: (unless `precreateChild` made it) creates `childPath` over the head, then makes the
   * head durable. The head stays the head until `switchHead` (the host records the checkpoint first).
   * `id` is always undefined: there is no change tracking to seal.
   */
  async prepareChild(
    childPath: string,
    opts: { blockSize?: number; precreated?: boolean } = {},
  ): Promise<{ id?: string; parentPath: string }> {
    this.assertPaused();
    this.checkWritable();
    const parentPath = this.head.path;
    // A staged child that no longer matches the head's time stamp (never expected) is made again.
    if (this.staged && this.staged.file.header!.parentTimeStamp !== this.head.footer.timeStamp) {
      const stale = this.staged.path;
      await this.dropStaged();
      await unlink(stale).catch(() => undefined);
    }
    if (this.staged?.path !== path.resolve(childPath)) {
      const exists =
        opts.precreated &&
        (await VhdFile.open(childPath, { noParent: true }).then(
          async (f) => {
            const ok = f.header?.parentTimeStamp === this.head.footer.timeStamp;
            await f.close();
            return ok;
          },
          () => false,
        ));
      if (!exists) {
        if (opts.precreated) await unlink(childPath).catch(() => undefined);
        await this.createChild(childPath, opts);
      }
      await this.stageChild(childPath);
    }
    await this.head.flush();
    this.staged!.prepared = true;
    return { id: undefined, parentPath };
  }

  /**
   * With I/O paused: continues on `filePath`, a child of the head or its parent. The child that
   * `precreateChild`/`prepareChild` opened is switched to in place: the head is retired into its read-only
   * parent, no file re-opened. Any other path: the head is closed cleanly and `filePath` opened with its
   * chain.
   */
  async switchHead(filePath: string): Promise<void> {
    this.assertPaused();
    const staged = this.staged;
    if (staged && staged.path === path.resolve(filePath)) {
      this.staged = undefined;
      try {
        await this.head.retire();
      } catch (err) {
        // The head cannot be trusted to be consistent in memory: give up as a crash would; a re-open recovers.
        this.closed = true;
        staged.file.parent = undefined;
        await staged.file.abandon().catch(() => undefined);
        await this.head.abandon().catch(() => undefined);
        throw err;
      }
      this.head = staged.file;
      return;
    }
    await this.dropStaged();
    await this.head.close();
    try {
      this.head = await openHead(filePath, this.opts);
    } catch (err) {
      this.closed = true;
      throw err;
    }
  }

  /**
   * Merges the head (a differencing VHD) into its parent while the guest keeps writing, then continues on
   * the parent and deletes the child. The parent is re-opened writable under the child (in the chain's
   * place) and keeps its time stamp while it receives only the child's own sectors: the chain reads the
   * same at every instant, and after a crash at any point it opens and an offline merge finishes it. Once
   * the child is deleted the parent takes a new time stamp (other children of it no longer match).
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
    if (child.parent.virtualSize !== child.virtualSize) {
      throw new TidemarkError(
        'VHD_UNSUPPORTED',
        `${child.path} is ${child.virtualSize} bytes but its parent ${child.parent.virtualSize}: resized chains cannot be merged`,
      );
    }
    const parentPath = child.parentLink.path;
    const dirty = new Set<number>();
    const result: OnlineMergeResult = { parentPath, passes: 0, bytesCopied: 0, pauseMs: 0 };
    let parent: VhdFile | undefined;
    let pauseStarted = 0;
    let paused = false;
    let switched = false;
    try {
      // 1. With I/O held: the parent, writable and keeping its time stamp, takes the read-only one's place.
      await this.gate.pause();
      try {
        await child.flush();
        parent = await VhdFile.open(parentPath, {
          writable: true,
          keepTimeStamp: true,
          allowedRoots: this.opts.allowedRoots,
          pathMap: this.opts.pathMap,
          openFile: this.opts.openFile,
        });
        if (
          parent.footer.timeStamp !== child.parent.footer.timeStamp ||
          !parent.footer.uniqueId.equals(child.parent.footer.uniqueId)
        ) {
          throw new TidemarkError('PARENT_MISMATCH', `${parentPath} changed under its child ${child.path}`);
        }
        const old = child.parent;
        child.parent = parent;
        await old.close();
        this.mergeDirty = dirty;
      } finally {
        this.gate.resume();
      }

      // 2. Copy passes while the guest writes; blocks it writes meanwhile are copied again.
      const all: number[] = [];
      for await (const { block } of child.ownBlocks()) all.push(block);
      let todo = all;
      const maxLive = opts.maxLivePasses ?? 4;
      while (true) {
        result.passes++;
        for (const block of todo) result.bytesCopied += await this.copyBlock(child, parent, block);
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
      for (const block of todo) result.bytesCopied += await this.copyBlock(child, parent, block);
      await parent.flush();
      this.mergeDirty = undefined;
      child.parent = undefined;
      await child.close();
      try {
        await unlink(child.path);
        await syncDirectory(path.dirname(child.path));
      } catch (err) {
        throw fromSystemError(err, 'delete', child.path);
      }
      // The child is gone: from now on the parent is changed as itself.
      await parent.markChanged();
      this.head = parent;
      switched = true;
      await opts.beforeSwitch?.(parentPath);
      return result;
    } catch (err) {
      this.mergeDirty = undefined;
      if (!switched && parent) {
        if (child.parent === parent) {
          // The child goes on over the parent, which receives nothing more: a read-only parent again.
          await parent.retire().catch(() => undefined);
        } else {
          await parent.close().catch(() => undefined);
          if (!child.parent) this.closed = true;
        }
      }
      throw err;
    } finally {
      if (paused) {
        result.pauseMs = performance.now() - pauseStarted;
        this.gate.resume();
      }
    }
  }

  /** Copies the sectors the child holds of one block into the parent; returns the bytes copied. */
  private async copyBlock(child: VhdFile, parent: VhdFile, block: number): Promise<number> {
    const base = block * child.blockSize!;
    let copied = 0;
    for (const run of await child.presentRuns(block)) {
      for (let at = run.offset; at < run.offset + run.length; at += COPY_PIECE) {
        const n = Math.min(COPY_PIECE, run.offset + run.length - at);
        const buf = Buffer.allocUnsafe(n);
        // A write racing this read marks the block dirty before and after it lands: it is copied again.
        await child.readOwn(block, at, buf);
        await parent.write(buf, base + at);
        copied += n;
      }
    }
    return copied;
  }

  // ---------------------------------------------------------------- close

  /** Waits for in-flight I/O, flushes and closes the chain. */
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
    // A parent being merged into is writable: it is abandoned too, not flushed by its child's close.
    const parent = this.head.parent;
    if (parent?.writable) {
      this.head.parent = undefined;
      await this.head.abandon();
      await parent.abandon();
    } else {
      await this.head.abandon();
    }
  }

  // ---------------------------------------------------------------- the staged child

  private async createChild(childPath: string, opts: { blockSize?: number }): Promise<void> {
    // The head's time stamp for this session, now: the child records it, and later writes keep it.
    await this.head.markChanged();
    await this.head.flush();
    await createVhd(childPath, {
      parent: this.head.path,
      blockSize: opts.blockSize,
      parentOpenOptions: { allowedRoots: this.opts.allowedRoots, pathMap: this.opts.pathMap },
    });
  }

  /** Opens `childPath` over the live head instance (it must link to the head's unique id and time stamp). */
  private async stageChild(childPath: string): Promise<void> {
    await this.dropStaged();
    const file = await VhdFile.open(childPath, {
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
    const bs = this.head.blockSize!;
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

function openHead(filePath: string, opts: VhdVirtualDiskOptions): Promise<VhdFile> {
  return VhdFile.open(filePath, {
    writable: !opts.readOnly,
    allowedRoots: opts.allowedRoots,
    pathMap: opts.pathMap,
    openFile: opts.openFile,
  });
}
