/**
 * The data phase for one disk: read the chunks that changed (or every allocated chunk) from a read-only
 * NBD export of the frozen disk, hash and store them, keep the previous index's chunks everywhere else.
 * Reads are pipelined (several chunks in flight) so hashing, compression and I/O overlap.
 */
import type { NbdClient } from '../nbd/client.js';
import type { DiskWriter } from '../repository/index.js';

export interface Range {
  offset: number;
  length: number;
}

export interface ReadProgress {
  (bytes: number): void;
}

/** Chunk offsets (aligned to `chunkSize`) that any of `ranges` touches, in order, without repeats. */
export function chunksTouched(ranges: Range[], chunkSize: number, size: number): number[] {
  const out: number[] = [];
  let last = -1;
  for (const r of ranges) {
    if (r.length <= 0) continue;
    const first = Math.floor(r.offset / chunkSize);
    const end = Math.floor((Math.min(size, r.offset + r.length) - 1) / chunkSize);
    for (let c = Math.max(first, last + 1); c <= end; c++) out.push(c);
    last = Math.max(last, end);
  }
  return out;
}

/**
 * Reads the given chunks from `nbd` and stores them through `writer` with `parallel` reads in flight.
 * Returns the bytes read.
 */
export async function copyChunks(
  nbd: NbdClient,
  writer: DiskWriter,
  chunks: number[],
  opts: { size: number; parallel?: number; onProgress?: ReadProgress },
): Promise<number> {
  const cs = writer.chunkSize;
  const parallel = Math.max(1, opts.parallel ?? 8);
  let next = 0;
  let bytes = 0;
  const worker = async () => {
    while (next < chunks.length) {
      const c = chunks[next++];
      const offset = c * cs;
      const length = Math.min(cs, opts.size - offset);
      const data = await nbd.read(offset, length);
      await writer.put(offset, data);
      bytes += length;
      opts.onProgress?.(length);
    }
  };
  await Promise.all(Array.from({ length: Math.min(parallel, chunks.length) }, worker));
  return bytes;
}
