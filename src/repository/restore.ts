/**
 * Restore: writes one disk of a restore point to a sink, chunks fetched, opened and checked a few at a time, under
 * a shared lock (gc, which moves chunks between packs, waits).
 */
import { ZEROES } from '../util/zero.js';
import { forEachBounded } from '../util/bounded.js';
import { findDisk, readPoint, type PointStore } from './points.js';
import type { ObjectStore } from './store.js';

/** What a restore needs of the repository. */
type RestoreStore = PointStore & Pick<ObjectStore, 'packIndexes' | 'readChunkIn' | 'readIndex' | 'recycle'>;

export interface RestoreSink {
  write(offset: number, data: Buffer): Promise<void>;
  /** zero a range (punch a hole, write zeros); when absent, zero ranges are written as zero bytes */
  zero?(offset: number, length: number): Promise<void>;
}

export interface RestoreOptions {
  /** chunks fetched and opened at once; default 8 */
  parallel?: number;
  /** the target already reads as zeros (a new sparse file): zero slots are skipped */
  assumeZeroed?: boolean;
  onProgress?: (doneBytes: number, totalBytes: number) => void;
}

export interface RestoreResult {
  pointId: string;
  diskId: string;
  virtualSize: number;
  bytesWritten: number;
  zeroBytes: number;
  chunksRead: number;
  durationMs: number;
}

/**
 * Writes a disk of a restore point to `sink`, fetching, opening and checking up to `parallel` chunks at once.
 * Writes may arrive in any order; every byte of the disk is written once (zero slots through sink.zero, as zero
 * bytes, or not at all with assumeZeroed). Holds a shared lock: gc, which moves chunks between packs, waits.
 */
export async function restoreDisk(
  store: RestoreStore,
  pointId: string,
  diskId: string,
  sink: RestoreSink,
  opts: RestoreOptions = {},
): Promise<RestoreResult> {
  const lock = await store.lock('shared', 'restore');
  try {
    return await restoreDiskLocked(store, pointId, diskId, sink, opts);
  } finally {
    await lock.release();
  }
}

async function restoreDiskLocked(
  store: RestoreStore,
  pointId: string,
  diskId: string,
  sink: RestoreSink,
  opts: RestoreOptions,
): Promise<RestoreResult> {
  const started = Date.now();
  const m = await readPoint(store, pointId);
  const { map } = await store.packIndexes();
  const { disk } = findDisk(m, diskId);
  const index = await store.readIndex(disk.index);
  const scratch: Buffer[] = [];
  const parallel = Math.min(64, Math.max(1, opts.parallel ?? 8));
  let done = 0;
  let bytesWritten = 0;
  let zeroBytes = 0;
  let chunksRead = 0;
  const slots = (function* () {
    for (let s = 0; s < index.slotCount; s++) yield s;
  })();
  await forEachBounded(slots, parallel, async (slot) => {
    const offset = index.slotOffset(slot);
    const length = index.slotLength(slot);
    const id = index.idAt(slot);
    if (id === null) {
      zeroBytes += length;
      if (sink.zero) await sink.zero(offset, length);
      else if (!opts.assumeZeroed) {
        for (let at = 0; at < length; at += ZEROES.length) {
          const n = Math.min(ZEROES.length, length - at);
          await sink.write(offset + at, ZEROES.subarray(0, n));
        }
      }
    } else {
      const { plain: data } = await store.readChunkIn(map, id, length, scratch);
      chunksRead++;
      await sink.write(offset, data);
      store.recycle(data);
      bytesWritten += length;
    }
    done += length;
    opts.onProgress?.(done, index.virtualSize);
  });
  return {
    pointId: m.id,
    diskId: disk.diskId,
    virtualSize: index.virtualSize,
    bytesWritten,
    zeroBytes,
    chunksRead,
    durationMs: Date.now() - started,
  };
}
