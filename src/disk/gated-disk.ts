/**
 * A virtual disk's head behind an I/O gate: what `VirtualDisk` (VHDX) and `VhdVirtualDisk` (VHD) share.
 * Every guest I/O goes to the head file through the gate the host pauses to cut checkpoints; the head can
 * be switched onto a staged child or re-opened while clients stay connected; and an online merge copies the
 * head into its parent in passes while writes to it mark blocks to copy again. The formats differ in how a
 * child is linked, tracked and merged: those parts are the subclasses' (the hooks below).
 */
import { checkRange } from '../util/range.js';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import type { AllocationExtent, WriteOptions, ZeroOptions } from './device.js';
import { IoGate } from './io-gate.js';

/** What the disk needs of its head file (a `VhdxFile` or a `VhdFile`). */
export interface DiskHead {
  readonly path: string;
  readonly virtualSize: number;
  /** Undefined for a fixed VHD (never merged into, so never asked for merge marks). */
  readonly blockSize: number | undefined;
  /** The open parent file; cleared to detach a staged child from the head it was opened over. */
  parent: unknown;
  parentLink: { path: string } | undefined;
  read(dst: Uint8Array, offset: number): Promise<void>;
  write(data: Uint8Array, offset: number): Promise<void>;
  flush(): Promise<void>;
  trim(offset: number, length: number): Promise<void>;
  writeZeroes(offset: number, length: number, opts: { noHole?: boolean }): Promise<void>;
  contentExtents(offset: number, length: number): Promise<{ offset: number; length: number; zero?: boolean }[]>;
  retire(): Promise<void>;
  close(): Promise<void>;
  abandon(): Promise<void>;
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
  /** Test seam: called after each durable step of the switch (crash tests stop the process there). */
  onStep?: (step: MergeStep) => void | Promise<void>;
}

/** The durable steps of an online merge's switch, in order. */
export type MergeStep = 'merged' | 'tracking moved' | 'child deleted';

export interface OnlineMergeResult {
  parentPath: string;
  passes: number;
  bytesCopied: number;
  /** How long guest I/O was held for the last pass and the switch. */
  pauseMs: number;
}

/** The format's steps of an online merge; `mergeOnline` runs them in its passes and pauses. */
export interface MergeSteps {
  /** With I/O held: the parent is made ready to receive the child's blocks (writes are marked from then). */
  start(): Promise<void>;
  /** After the start, I/O running again. */
  afterStart?(): Promise<void>;
  /** The blocks the child holds (the first pass copies them all). */
  blocks(): Promise<number[]>;
  /** Copies one block into the parent; returns the bytes copied (a block it could not finish goes in `dirty`). */
  copy(block: number, dirty: Set<number>): Promise<number>;
  /** With I/O held, after the last pass: the parent becomes the head and the child goes. */
  finish(): Promise<void>;
  /** Cleans up after a failure anywhere (the error is thrown on). */
  fail(err: unknown): Promise<void>;
}

/** Blocks at most this many (or fewer) left dirty end the live passes of an online merge. */
const FINAL_PASS_BLOCKS = 16;

export abstract class GatedDisk<H extends DiskHead, O extends { readOnly?: boolean }> {
  protected readonly gate = new IoGate();
  protected closed = false;
  /** Blocks of the head written while an online merge copies it (they are copied again). */
  protected mergeDirty: Set<number> | undefined;
  /** The next checkpoint's child, opened over the live head; `prepared` once the cut made the head durable. */
  protected staged: { path: string; file: H; prepared: boolean } | undefined;

  protected constructor(
    protected head: H,
    protected readonly opts: O,
  ) {}

  // ---------------------------------------------------------------- the format's parts

  /** Creates `childPath` (a differencing disk) over the head. */
  protected abstract createChild(childPath: string, opts: { blockSize?: number }): Promise<void>;
  /** Opens `childPath` writable over the live head instance. */
  protected abstract openChild(childPath: string): Promise<H>;
  /** Opens `filePath` with its chain as the new head (and whatever the format keeps with it). */
  protected abstract openHeadAt(filePath: string): Promise<void>;
  /** Gives up the head (and what hangs on it) without a clean close. */
  protected abstract abandonHead(): Promise<void>;

  /** Before `precreateChild` creates the child: what the head must be for the child to link to it. */
  protected async beforeNewChild(): Promise<void> {}
  /** After the head was retired under the staged child, before the child becomes the head. */
  protected async afterRetire(_next: H): Promise<void> {}
  /** When a switch fails half-way: gives up what the format keeps beside the head (a tracker). */
  protected async abandonBeside(): Promise<void> {}
  /** A staged child is being dropped. */
  protected releaseStaged(_file: H): void {}
  /** Throws NOT_SUPPORTED where `fast` zeroing would have to write zeros (by default it never does). */
  protected async checkFastZero(_offset: number, _length: number, _opts: ZeroOptions): Promise<void> {}

  // ---------------------------------------------------------------- what it is

  get path(): string {
    return this.head.path;
  }

  get size(): number {
    return this.head.virtualSize;
  }

  get readOnly(): boolean {
    return !!this.opts.readOnly;
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
    return this.io(() => this.change(offset, data.length, opts, () => this.head.write(data, offset)));
  }

  flush(): Promise<void> {
    return this.io(() => this.head.flush());
  }

  /** The head's discard (what a discarded range reads as is the format's: zeros or the parent's). */
  trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    return this.io(() => this.change(offset, length, opts, () => this.head.trim(offset, length)));
  }

  /** Zeroing through the head; `fast` is refused where the format would have to write zeros. */
  writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    return this.io(() =>
      this.change(
        offset,
        length,
        opts,
        () => this.head.writeZeroes(offset, length, { noHole: opts.noHole }),
        () => this.checkFastZero(offset, length, opts),
      ),
    );
  }

  /** From the head's content extents: a hole (reading zeros) where no file of the chain holds the bytes. */
  blockStatus(offset: number, length: number): Promise<AllocationExtent[]> {
    return this.io(async () => {
      this.checkRange(offset, length);
      const out: AllocationExtent[] = [];
      let at = offset;
      for (const e of await this.head.contentExtents(offset, length)) {
        if (e.offset > at) out.push({ offset: at, length: e.offset - at, hole: true, zero: true });
        out.push({ offset: e.offset, length: e.length, hole: false, zero: e.zero ?? false });
        at = e.offset + e.length;
      }
      if (at < offset + length) out.push({ offset: at, length: offset + length - at, hole: true, zero: true });
      return out;
    });
  }

  // ---------------------------------------------------------------- pause, switch, checkpoint

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
   * With I/O paused: makes the current head durable, creates `childPath` over it and continues on the
   * child. The old head is from now on the frozen point of the checkpoint.
   */
  async cutCheckpoint(
    childPath: string,
    opts: { blockSize?: number } = {},
  ): Promise<{ id?: string; parentPath: string }> {
    const prepared = await this.prepareChild(childPath, opts);
    await this.switchHead(childPath);
    return prepared;
  }

  abstract prepareChild(
    childPath: string,
    opts?: { blockSize?: number; precreated?: boolean },
  ): Promise<{ id?: string; parentPath: string }>;

  /**
   * Creates `childPath` over the current head while I/O still runs (the slow part of a checkpoint) and
   * opens it over this very head instance, so that `prepareChild` only makes the head durable inside the
   * pause and `switchHead` re-opens nothing.
   */
  async precreateChild(childPath: string, opts: { blockSize?: number } = {}): Promise<void> {
    this.assertOpen();
    this.checkWritable();
    await this.dropStaged();
    await this.beforeNewChild();
    await this.createChild(childPath, opts);
    await this.stageChild(childPath);
    // What the guest wrote so far is committed now, while it still writes: the pause has less to flush.
    await this.head.flush();
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
        await this.afterRetire(staged.file);
      } catch (err) {
        // Neither head can be trusted to be consistent in memory: give up as a crash would; a re-open recovers.
        this.closed = true;
        staged.file.parent = undefined;
        await staged.file.abandon().catch(() => undefined);
        await this.abandonBeside().catch(() => undefined);
        await this.head.abandon().catch(() => undefined);
        throw err;
      }
      this.head = staged.file;
      return;
    }
    await this.dropStaged();
    await this.head.close();
    await this.continueOn(filePath);
  }

  // ---------------------------------------------------------------- online merge

  /** The differencing head to merge and its parent's path, once no checkpoint child is staged over it. */
  protected async headToMerge(): Promise<{ child: H; parentPath: string }> {
    this.assertOpen();
    this.checkWritable();
    await this.dropStaged();
    const child = this.head;
    if (!child.parent || !child.parentLink) {
      throw new TidemarkError('INVALID_ARGUMENT', `${child.path} is not a differencing disk: nothing to merge`);
    }
    if (this.mergeDirty) throw new TidemarkError('BUSY', `${child.path} is already being merged`);
    return { child, parentPath: child.parentLink.path };
  }

  /**
   * The passes of an online merge: the format's start with I/O held (writes are marked dirty from then),
   * copy passes while the guest writes, each copying again what it wrote meanwhile, until few blocks are
   * left or `maxLivePasses` ran; then the last pass and the format's switch with I/O held.
   */
  protected async mergeOnline(
    parentPath: string,
    opts: OnlineMergeOptions,
    steps: MergeSteps,
  ): Promise<OnlineMergeResult> {
    const dirty = new Set<number>();
    let pauseStarted = 0;
    let paused = false;
    const result: OnlineMergeResult = { parentPath, passes: 0, bytesCopied: 0, pauseMs: 0 };
    try {
      // 1. With I/O held, so that no write lands unmarked.
      await this.gate.pause();
      try {
        await steps.start();
        this.mergeDirty = dirty;
      } finally {
        this.gate.resume();
      }
      await steps.afterStart?.();

      // 2. Copy passes while the guest writes; blocks it writes meanwhile are copied again.
      let todo = await steps.blocks();
      const maxLive = opts.maxLivePasses ?? 4;
      while (true) {
        result.passes++;
        for (const block of todo) result.bytesCopied += await steps.copy(block, dirty);
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
      for (const block of todo) result.bytesCopied += await steps.copy(block, dirty);
      // Nothing writes while paused: no more marks are needed.
      this.mergeDirty = undefined;
      await steps.finish();
      return result;
    } catch (err) {
      this.mergeDirty = undefined;
      await steps.fail(err);
      throw err;
    } finally {
      if (paused) {
        result.pauseMs = performance.now() - pauseStarted;
        this.gate.resume();
      }
    }
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
    await this.abandonHead();
  }

  // ---------------------------------------------------------------- the staged child

  /** Opens `childPath` over the live head instance (it must link to the head as it is now). */
  protected async stageChild(childPath: string): Promise<void> {
    await this.dropStaged();
    const file = await this.openChild(childPath);
    this.staged = { path: path.resolve(childPath), file, prepared: false };
  }

  /** Closes a staged child that will not be switched to; the head (its parent) stays open and ours. */
  protected async dropStaged(opts: { abandon?: boolean } = {}): Promise<void> {
    const staged = this.staged;
    if (!staged) return;
    this.staged = undefined;
    this.releaseStaged(staged.file);
    staged.file.parent = undefined;
    if (opts.abandon) await staged.file.abandon().catch(() => undefined);
    else await staged.file.close().catch(() => undefined);
  }

  // ---------------------------------------------------------------- helpers

  /** Opens `filePath` as the head; a disk that could not is closed (its old head is gone already). */
  protected async continueOn(filePath: string): Promise<void> {
    try {
      await this.openHeadAt(filePath);
    } catch (err) {
      this.closed = true;
      throw err;
    }
  }

  protected async io<T>(fn: () => Promise<T>): Promise<T> {
    this.assertOpen();
    return this.gate.run(() => {
      this.assertOpen();
      return fn();
    });
  }

  /** A change of `[offset, +length)` through the head, marked for a running merge. */
  private async change(
    offset: number,
    length: number,
    opts: WriteOptions,
    apply: () => Promise<void>,
    check?: () => Promise<void>,
  ): Promise<void> {
    this.checkWritable();
    this.checkRange(offset, length);
    await check?.();
    this.noteMergeDirty(offset, length);
    await apply();
    // Again once it landed: a copy pass may have taken the first mark while the write was still queued.
    this.noteMergeDirty(offset, length);
    if (opts.fua) await this.head.flush();
  }

  private noteMergeDirty(offset: number, length: number): void {
    const dirty = this.mergeDirty;
    if (!dirty || length === 0) return;
    const bs = this.head.blockSize!;
    for (let b = Math.floor(offset / bs); b <= Math.floor((offset + length - 1) / bs); b++) dirty.add(b);
  }

  protected assertOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', `virtual disk ${this.head.path} is closed`);
  }

  protected assertPaused(): void {
    this.assertOpen();
    if (!this.gate.isPaused) throw new TidemarkError('INVALID_ARGUMENT', 'pause the disk before switching its head');
  }

  protected checkWritable(): void {
    if (this.readOnly) throw new TidemarkError('READ_ONLY', `${path.basename(this.head.path)} is exported read-only`);
  }

  protected checkRange(offset: number, length: number): void {
    checkRange(offset, length, this.size);
  }
}
