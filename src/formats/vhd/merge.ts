/**
 * Offline merge of a differencing VHD into its parent, crash-safe by what it writes and when it changes
 * the parent's identity. The parent only receives the child's own sectors, under the child: while the
 * child exists the chain reads the same at every instant. The parent keeps its time stamp during the
 * copy, so an interrupted merge leaves a chain that still links and opens; running the merge again
 * finishes it. Once the parent is durable the child is deleted, and only then does the parent take a
 * new time stamp, so other children of it (which the merge changed under them) refuse it from then on.
 */
import { unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, fromSystemError } from '../../errors.js';
import { syncDirectory } from '../../util/atomic.js';
import { VhdFile, type VhdOpenOptions } from './vhd.js';

export interface VhdMergeResult {
  parentPath: string;
  bytesCopied: number;
  /** Always 0: VHD has no zero-block state of its own (zeroed blocks are data and are copied). */
  bytesZeroed: number;
  blocks: number;
}

export interface VhdMergeOptions extends Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'> {
  /** Called after each block, for progress reporting. */
  onProgress?: (done: number, total: number) => void;
}

const COPY_PIECE = 8 * 1024 * 1024;

export async function mergeVhd(childPath: string, opts: VhdMergeOptions = {}): Promise<VhdMergeResult> {
  // Open the chain first: it finds and checks the parent with the usual locator rules.
  const probe = await VhdFile.open(childPath, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
  let parentPath: string;
  try {
    if (!probe.parent)
      throw new TidemarkError('INVALID_ARGUMENT', `${childPath} is not a differencing disk: nothing to merge`);
    if (probe.parent.virtualSize !== probe.virtualSize) {
      throw new TidemarkError(
        'VHD_UNSUPPORTED',
        `${childPath} is ${probe.virtualSize} bytes but its parent ${probe.parent.virtualSize}: resized chains cannot be merged`,
      );
    }
    parentPath = probe.parentLink!.path;
  } finally {
    await probe.close();
  }

  const child = await VhdFile.open(childPath, { noParent: true });
  let parent: VhdFile | undefined;
  try {
    parent = await VhdFile.open(parentPath, {
      writable: true,
      keepTimeStamp: true,
      allowedRoots: opts.allowedRoots,
      pathMap: opts.pathMap,
    });
    const result: VhdMergeResult = { parentPath, bytesCopied: 0, bytesZeroed: 0, blocks: 0 };
    const total = child.layout!.dataBlocks;
    const bs = child.layout!.blockSize;
    for await (const { block } of child.ownBlocks()) {
      const base = block * bs;
      for (const run of await child.presentRuns(block)) {
        for (let at = run.offset; at < run.offset + run.length; at += COPY_PIECE) {
          const n = Math.min(COPY_PIECE, run.offset + run.length - at);
          const buf = Buffer.alloc(n);
          await child.readOwn(block, at, buf);
          await parent.write(buf, base + at);
          result.bytesCopied += n;
        }
      }
      result.blocks++;
      opts.onProgress?.(block + 1, total);
    }
    // The parent holds everything the child did, durably; the child goes, then the parent's identity changes.
    await parent.flush();
    await child.close();
    try {
      await unlink(childPath);
      await syncDirectory(path.dirname(path.resolve(childPath)));
    } catch (err) {
      throw fromSystemError(err, 'delete', childPath);
    }
    await parent.markChanged();
    await parent.close();
    return result;
  } catch (err) {
    await parent?.close().catch(() => undefined);
    await child.close().catch(() => undefined);
    throw err;
  }
}
