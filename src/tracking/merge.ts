/**
 * Merging a child of a tracked chain: the merge changes no guest-visible data, so it adds no changes;
 * the tracker only learns the binding (head file and DataWriteGuid) the merged parent will carry,
 * before the parent changes, so neither an interrupted merge nor its end looks like a foreign writer.
 */
import path from 'node:path';
import { mergeIntoParent, type MergeOptions, type MergeResult } from '../formats/vhdx/merge.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import { ChangeTracker, updateIdleHeader } from './tracker.js';

export async function mergeWithTracking(childPath: string, opts: MergeOptions = {}): Promise<MergeResult> {
  // Bring the tracker to a clean, idle state first (this recovers an unclean close, or resets the epoch).
  const disk = await VhdxFile.open(childPath, {
    writable: true,
    allowedRoots: opts.allowedRoots,
    pathMap: opts.pathMap,
  });
  const chain = disk.chain().map((f) => f.path);
  const basePath = chain[chain.length - 1];
  let tracked = false;
  try {
    tracked = (await ChangeTracker.attach(disk, { writable: true })) !== undefined;
  } finally {
    await disk.close();
  }
  if (!tracked) return mergeIntoParent(childPath, opts);
  // In use while the merge writes the parent: should it be interrupted, the next open knows the files
  // changed under a session of ours (and checks them as after a crash), not behind Tidemark's back.
  await updateIdleHeader(basePath, (h) => {
    h.inUse = true;
  });
  const result = await mergeIntoParent(childPath, {
    ...opts,
    beforeParentChange: async (parentPath, next) => {
      await updateIdleHeader(
        basePath,
        (h) => {
          h.pending = { head: path.basename(parentPath), dataWriteGuid: next };
        },
        { inUse: true },
      );
      await opts.beforeParentChange?.(parentPath, next);
    },
  });
  // The merged chain, as it is now, is what the next open compares with.
  await updateIdleHeader(
    basePath,
    (h) => {
      if (h.pending) h.binding = h.pending;
      h.pending = null;
      h.inUse = false;
    },
    { inUse: true, chain: chain.filter((f) => f !== path.resolve(childPath)) },
  );
  return result;
}
