/**
 * Offline merge of a differencing disk into its parent, following the parent_linkage2 protocol
 * (MS-VHDX 2.6.2.6.3 note 12): the child first accepts the parent's future DataWriteGuid, then the
 * parent takes it and receives the child's data. A crash at any step leaves a chain that opens and
 * reads the same content; running the merge again finishes it.
 */
import { unlink } from 'node:fs/promises';
import { TidemarkError } from '../../errors.js';
import { newGuid, type Guid } from '../../util/guid.js';
import { BlockState } from './constants.js';
import { formatLinkage, locatorSet } from './metadata.js';
import { VhdxFile, type OpenOptions } from './vhdx.js';

export interface MergeResult {
  parentPath: string;
  bytesCopied: number;
  bytesZeroed: number;
  blocks: number;
}

export interface MergeOptions extends Pick<OpenOptions, 'allowedRoots' | 'pathMap'> {
  /**
   * Called once the child accepts the parent's next DataWriteGuid and before the parent changes
   * (change tracking records the binding the merged disk will carry here).
   */
  beforeParentChange?: (parentPath: string, nextDataWriteGuid: Guid) => Promise<void>;
  /** Called after each block, for progress reporting. */
  onProgress?: (done: number, total: number) => void;
}

const COPY_PIECE = 8 * 1024 * 1024;

export async function mergeIntoParent(childPath: string, opts: MergeOptions = {}): Promise<MergeResult> {
  // Open the chain read-only first: it finds and checks the parent with the usual locator rules.
  const probe = await VhdxFile.open(childPath, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
  let parentPath: string;
  try {
    if (!probe.parent)
      throw new TidemarkError('INVALID_ARGUMENT', `${childPath} is not a differencing disk: nothing to merge`);
    if (probe.parent.virtualSize !== probe.virtualSize) {
      throw new TidemarkError(
        'VHDX_UNSUPPORTED',
        `${childPath} is ${probe.virtualSize} bytes but its parent ${probe.parent.virtualSize}: resized chains cannot be merged`,
      );
    }
    parentPath = probe.parentLink!.path;
  } finally {
    await probe.close();
  }

  const child = await VhdxFile.open(childPath, { writable: true, noParent: true });
  let parent: VhdxFile | undefined;
  try {
    parent = await VhdxFile.open(parentPath, {
      writable: true,
      allowedRoots: opts.allowedRoots,
      pathMap: opts.pathMap,
    });
    // A damaged file is refused before anything changes (see placement.ts).
    child.checkWritable();
    parent.checkWritable();
    // Step 1: the child accepts the parent's next DataWriteGuid (parent_linkage2). parent_linkage is
    // set to the parent's current GUID, which an interrupted merge may already have changed.
    const next = newGuid();
    const current = formatLinkage(parent.header.dataWriteGuid);
    await child.setParentLocator(
      locatorSet(locatorSet(child.parentLocator!, 'parent_linkage', current), 'parent_linkage2', formatLinkage(next)),
    );
    await child.flush();
    // Step 2: the parent's first change installs that GUID; then the child's data is copied.
    await opts.beforeParentChange?.(parentPath, next);
    parent.setNextDataWriteGuid(next);
    await parent.markDataChanged();
    const result: MergeResult = { parentPath, bytesCopied: 0, bytesZeroed: 0, blocks: 0 };
    const total = child.geometry.dataBlocks;
    const bs = child.blockSize;
    for await (const { block, entry } of child.ownBlocks()) {
      const base = block * bs;
      const extent = Math.min(bs, child.virtualSize - base);
      const runs =
        entry.state === BlockState.FullyPresent
          ? [{ offset: 0, length: extent }]
          : entry.state === BlockState.PartiallyPresent
            ? await child.presentRuns(block)
            : [];
      for (const run of runs) {
        for (let at = run.offset; at < run.offset + run.length; at += COPY_PIECE) {
          const n = Math.min(COPY_PIECE, run.offset + run.length - at);
          const buf = Buffer.alloc(n);
          await child.readOwn(block, at, buf);
          await parent.write(buf, base + at);
          result.bytesCopied += n;
        }
      }
      if (
        entry.state === BlockState.Zero ||
        entry.state === BlockState.Unmapped ||
        entry.state === BlockState.Undefined
      ) {
        await parent.writeZeroes(base, extent);
        result.bytesZeroed += extent;
      }
      if (runs.length > 0 || entry.state !== BlockState.NotPresent) result.blocks++;
      opts.onProgress?.(block + 1, total);
    }
    // Step 3: the parent is complete and durable; the child is no longer needed.
    await parent.flush();
    await parent.close();
    await child.close();
    await unlink(childPath);
    return result;
  } catch (err) {
    await parent?.close().catch(() => undefined);
    await child.close().catch(() => undefined);
    throw err;
  }
}
