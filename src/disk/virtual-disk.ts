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
import { ChangeTracker, type ChangesResult } from '../tracking/tracker.js';
import { guidToString, newGuid } from '../util/guid.js';
import type { BlockDevice, DirtyExtent } from './device.js';
import { GatedDisk, type OnlineMergeOptions, type OnlineMergeResult } from './gated-disk.js';

export type { MergeProgress, OnlineMergeOptions, OnlineMergeResult } from './gated-disk.js';

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

const COPY_PIECE = 8 * 1024 * 1024;

/**
 * The head behind the gate, the I/O, pause/resume, the switch and the merge passes are `GatedDisk`'s; this
 * class adds the change tracker (sealed at each cut, moved onto each new head) and the VHDX linkage.
 */
export class VirtualDisk extends GatedDisk<VhdxFile, VirtualDiskOptions> implements BlockDevice {
  private constructor(
    head: VhdxFile,
    private tracker: ChangeTracker | undefined,
    opts: VirtualDiskOptions,
  ) {
    super(head, opts);
  }

  static async open(filePath: string, opts: VirtualDiskOptions = {}): Promise<VirtualDisk> {
    const { head, tracker } = await openHead(filePath, opts);
    return new VirtualDisk(head, tracker, opts);
  }

  // ---------------------------------------------------------------- what it is

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

  get minimumBlockSize(): number {
    return this.head.logicalSectorSize;
  }

  get preferredBlockSize(): number {
    return Math.min(this.head.blockSize, 32 * 1024 * 1024);
  }

  // ---------------------------------------------------------------- change tracking

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

  // ---------------------------------------------------------------- checkpoint, merge

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
   * Merges the head (a differencing disk) into its parent while the guest keeps writing, then continues
   * on the parent and deletes the child. Follows the parent_linkage2 protocol: the child accepts the
   * parent's next DataWriteGuid before the parent changes, so a crash at any point leaves a chain that
   * opens, reads the same, and that an offline merge finishes. The merge adds no tracked changes.
   */
  async mergeHeadOnline(opts: OnlineMergeOptions = {}): Promise<OnlineMergeResult> {
    const { child, parentPath } = await this.headToMerge();
    const parent = await VhdxFile.open(parentPath, {
      writable: true,
      allowedRoots: this.opts.allowedRoots,
      pathMap: this.opts.pathMap,
    });
    const next = newGuid();
    return this.mergeOnline(parentPath, opts, {
      // The child accepts the parent's next DataWriteGuid, durably, before the parent changes.
      start: async () => {
        await child.setParentLocator(
          locatorSet(
            locatorSet(child.parentLocator!, 'parent_linkage', formatLinkage(parent.header.dataWriteGuid)),
            'parent_linkage2',
            formatLinkage(next),
          ),
        );
        await child.flush();
        // Tracking records both ends of the merge before the parent changes.
        await this.tracker?.beginMergeInto(path.basename(parentPath), next);
      },
      afterStart: async () => {
        parent.setNextDataWriteGuid(next);
        await parent.markDataChanged();
      },
      blocks: async () => {
        const all: number[] = [];
        for await (const { block, entry } of child.ownBlocks())
          if (entry.state !== BlockState.NotPresent) all.push(block);
        return all;
      },
      copy: (block, dirty) => this.copyBlock(child, parent, block, dirty),
      finish: async () => {
        // What the guest wrote is durable in the child first, then what was merged in the parent: a merge
        // finished again after a crash copies the same data.
        await child.flush();
        await parent.flush();
        await opts.onStep?.('merged');
        try {
          // The merged parent, open as it is, becomes the head: the tracker moves onto it (no close, no re-open).
          await this.tracker?.continueOnMergedParent(parent);
          await opts.onStep?.('tracking moved');
          this.head = parent;
          // The child is deleted: its clean close would write headers nobody reads.
          await child.abandon();
          await unlink(child.path);
          await opts.onStep?.('child deleted');
          await opts.beforeSwitch?.(parentPath);
        } catch (err) {
          // Neither head can be trusted to be consistent in memory: give up as a crash would; a re-open recovers
          // (a parent not yet the head is closed by `fail`).
          this.closed = true;
          await this.tracker?.abandon().catch(() => undefined);
          await child.abandon().catch(() => undefined);
          if (this.head === parent) await parent.abandon().catch(() => undefined);
          throw err;
        }
      },
      fail: () => parent.close().catch(() => undefined),
    });
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

  // ---------------------------------------------------------------- GatedDisk's hooks

  /**
   * Before a child is precreated: the head's headers are adopted (see `adoptForeignHeaders`) and its
   * DataWriteGuid installed, so the child's parent_linkage stays right whatever is written until the cut.
   */
  protected override async beforeNewChild(): Promise<void> {
    await this.adoptForeignHeaders();
    await this.head.markDataChanged();
  }

  protected createChild(childPath: string, opts: { blockSize?: number }): Promise<void> {
    return createVhdx(childPath, {
      parent: this.head.path,
      // The head is open: what the child copies of it is read there (its DataWriteGuid as installed for the cut).
      parentFile: this.head,
      blockSize: opts.blockSize ?? DEFAULT_CHILD_BLOCK_SIZE,
      parentOpenOptions: { allowedRoots: this.opts.allowedRoots, pathMap: this.opts.pathMap },
    });
  }

  protected openChild(childPath: string): Promise<VhdxFile> {
    return VhdxFile.open(childPath, {
      writable: true,
      parent: this.head,
      allowedRoots: this.opts.allowedRoots,
      pathMap: this.opts.pathMap,
      openFile: this.opts.openFile,
    });
  }

  /** The staged child's first DataWriteGuid, recorded by `sealForChild`, is forgotten with it. */
  protected override releaseStaged(file: VhdxFile): void {
    this.tracker?.cancelChild(file);
  }

  /** The tracker moves onto the new head in place (its files stay with the base disk). */
  protected override async afterRetire(next: VhdxFile): Promise<void> {
    await this.tracker?.moveTo(next);
  }

  protected override async abandonBeside(): Promise<void> {
    await this.tracker?.abandon();
  }

  protected async openHeadAt(filePath: string): Promise<void> {
    const next = await openHead(filePath, this.opts);
    this.head = next.head;
    this.tracker = next.tracker;
  }

  protected async abandonHead(): Promise<void> {
    await this.tracker?.abandon();
    await this.head.abandon();
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
