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
import type { BlockDevice, DirtyExtent, ZeroOptions } from './device.js';
import { GatedDisk, type OnlineMergeOptions, type OnlineMergeResult } from './gated-disk.js';

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

const COPY_PIECE = 8 * 1024 * 1024;

/**
 * The head behind the gate, the I/O, pause/resume, the switch and the merge passes are `GatedDisk`'s; this
 * class adds the VHD linkage (time stamps), the zeroing rules and the merge into a parent re-opened under
 * the child. The engine's discard (`trim`) deallocates whole blocks of a dynamic head and zeroes anything
 * else (VHD has no unmapped state; a differencing head takes a new block that is a hole in the file).
 */
export class VhdVirtualDisk extends GatedDisk<VhdFile, VhdVirtualDiskOptions> implements BlockDevice {
  readonly format = 'vhd' as const;
  /** Why this disk's changes cannot be queried (always: VHD has no RCT). */
  readonly trackingUnavailable = VHD_TRACKING_UNAVAILABLE;
  /** Never a tracker: the host's "tracking enabled?" reads this as VirtualDisk's. */
  readonly changeTracker: undefined = undefined;

  private constructor(head: VhdFile, opts: VhdVirtualDiskOptions) {
    super(head, opts);
  }

  static async open(filePath: string, opts: VhdVirtualDiskOptions = {}): Promise<VhdVirtualDisk> {
    return new VhdVirtualDisk(await openHead(filePath, opts), opts);
  }

  // ---------------------------------------------------------------- what it is

  /** The open head file (and through `.chain()` its parents). */
  get file(): VhdFile {
    return this.head;
  }

  /** The base disk's unique id (a VHD has no virtual disk id shared by its chain; the base's stays). */
  get virtualDiskId(): string {
    return this.head.chain().at(-1)!.uniqueId;
  }

  get minimumBlockSize(): number {
    return SECTOR;
  }

  /** The head's block size (a fixed disk: 2 MiB, the default VHD block). */
  get preferredBlockSize(): number {
    return Math.min(this.head.blockSize ?? 2 * 1024 * 1024, 32 * 1024 * 1024);
  }

  /**
   * Zeroing is a metadata change for blocks of a dynamic head (deallocated, unless `noHole`) and for blocks
   * a differencing head does not have yet (a new block that is a hole in the file); anywhere else zeros
   * are written. `fast` is refused (NOT_SUPPORTED) when zeros would have to be written anywhere but in the
   * first and last block of the range, and always on a fixed head.
   */
  protected override async checkFastZero(offset: number, length: number, opts: ZeroOptions): Promise<void> {
    if (opts.fast && length > 0 && !(await this.zeroIsFast(offset, length, !!opts.noHole))) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `zeroing [${offset}, +${length}) of the ${this.head.diskType} VHD ${path.basename(this.head.path)} means writing zeros`,
      );
    }
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

  // ---------------------------------------------------------------- no change tracking

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

  // ---------------------------------------------------------------- checkpoint, merge

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
   * Merges the head (a differencing VHD) into its parent while the guest keeps writing, then continues on
   * the parent and deletes the child. The parent is re-opened writable under the child (in the chain's
   * place) and keeps its time stamp while it receives only the child's own sectors: the chain reads the
   * same at every instant, and after a crash at any point it opens and an offline merge finishes it. Once
   * the child is deleted the parent takes a new time stamp (other children of it no longer match).
   */
  async mergeHeadOnline(opts: OnlineMergeOptions = {}): Promise<OnlineMergeResult> {
    const { child, parentPath } = await this.headToMerge();
    if (child.parent!.virtualSize !== child.virtualSize) {
      throw new TidemarkError(
        'VHD_UNSUPPORTED',
        `${child.path} is ${child.virtualSize} bytes but its parent ${child.parent!.virtualSize}: resized chains cannot be merged`,
      );
    }
    let parent: VhdFile | undefined;
    let switched = false;
    return this.mergeOnline(parentPath, opts, {
      // The parent, writable and keeping its time stamp, takes the read-only one's place under the child.
      start: async () => {
        await child.flush();
        parent = await VhdFile.open(parentPath, {
          writable: true,
          keepTimeStamp: true,
          allowedRoots: this.opts.allowedRoots,
          pathMap: this.opts.pathMap,
          openFile: this.opts.openFile,
        });
        const old = child.parent!;
        if (parent.footer.timeStamp !== old.footer.timeStamp || !parent.footer.uniqueId.equals(old.footer.uniqueId)) {
          throw new TidemarkError('PARENT_MISMATCH', `${parentPath} changed under its child ${child.path}`);
        }
        child.parent = parent;
        await old.close();
      },
      blocks: async () => {
        const all: number[] = [];
        for await (const { block } of child.ownBlocks()) all.push(block);
        return all;
      },
      copy: (block) => this.copyBlock(child, parent!, block),
      finish: async () => {
        await parent!.flush();
        child.parent = undefined;
        await child.close();
        try {
          await unlink(child.path);
          await syncDirectory(path.dirname(child.path));
        } catch (err) {
          throw fromSystemError(err, 'delete', child.path);
        }
        // The child is gone: from now on the parent is changed as itself.
        await parent!.markChanged();
        this.head = parent!;
        switched = true;
        await opts.beforeSwitch?.(parentPath);
      },
      fail: async () => {
        if (switched || !parent) return;
        if (child.parent === parent) {
          // The child goes on over the parent, which receives nothing more: a read-only parent again.
          await parent.retire().catch(() => undefined);
        } else {
          await parent.close().catch(() => undefined);
          if (!child.parent) this.closed = true;
        }
      },
    });
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

  // ---------------------------------------------------------------- GatedDisk's hooks

  protected async createChild(childPath: string, opts: { blockSize?: number }): Promise<void> {
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
  protected openChild(childPath: string): Promise<VhdFile> {
    return VhdFile.open(childPath, {
      writable: true,
      parent: this.head,
      allowedRoots: this.opts.allowedRoots,
      pathMap: this.opts.pathMap,
      openFile: this.opts.openFile,
    });
  }

  protected async openHeadAt(filePath: string): Promise<void> {
    this.head = await openHead(filePath, this.opts);
  }

  protected async abandonHead(): Promise<void> {
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
}

function openHead(filePath: string, opts: VhdVirtualDiskOptions): Promise<VhdFile> {
  return VhdFile.open(filePath, {
    writable: !opts.readOnly,
    allowedRoots: opts.allowedRoots,
    pathMap: opts.pathMap,
    openFile: opts.openFile,
  });
}
