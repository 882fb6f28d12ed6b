/**
 * The data phase for one disk: read the chunks that changed (or every allocated chunk) from a read-only
 * NBD export of the frozen disk, hash and store them, keep the previous index's chunks everywhere else.
 * Reads are pipelined (several chunks in flight) so hashing, compression and I/O overlap.
 */
import type { NbdClient } from '../nbd/client.js';
import { CONTEXT_BASE_ALLOCATION, STATE_ZERO } from '../nbd/protocol.js';
import { forEachBounded } from '../util/bounded.js';
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
 * The chunks of `chunks` that read as zeros, from the export's `base:allocation` block status (holes,
 * and ranges the server knows are zeros): they are marked zero without being read. Empty when the
 * server offers no such context.
 */
export async function zeroChunks(
  nbd: NbdClient,
  chunks: number[],
  chunkSize: number,
  size: number,
  parallel = 8,
): Promise<Set<number>> {
  const zero = new Set<number>();
  if (!nbd.hasContext(CONTEXT_BASE_ALLOCATION)) return zero;
  // Runs of consecutive chunks (an incremental's are many and short: they are asked several at a time).
  const runs: [number, number][] = [];
  for (let i = 0; i < chunks.length;) {
    let j = i + 1;
    while (j < chunks.length && chunks[j] === chunks[j - 1] + 1) j++;
    runs.push([i, j]);
    i = j;
  }
  const inspect = async ([i, j]: [number, number]) => {
    // The run's zero ranges (joined), then the chunks lying wholly inside one.
    const start = chunks[i] * chunkSize;
    const end = Math.min(size, chunks[j - 1] * chunkSize + chunkSize);
    const zeros: Range[] = [];
    for (let at = start; at < end;) {
      const extents = await nbd.blockStatus(at, Math.min(end - at, MAX_STATUS_REQUEST), CONTEXT_BASE_ALLOCATION);
      for (const e of extents) {
        const eEnd = Math.min(e.offset + e.length, end);
        if (eEnd <= at) continue;
        if ((e.flags & STATE_ZERO) !== 0) {
          const last = zeros[zeros.length - 1];
          if (last && last.offset + last.length === at) last.length = eEnd - last.offset;
          else zeros.push({ offset: at, length: eEnd - at });
        }
        at = eEnd;
        if (at >= end) break;
      }
    }
    let z = 0;
    for (let k = i; k < j; k++) {
      const from = chunks[k] * chunkSize;
      const to = Math.min(size, from + chunkSize);
      while (z < zeros.length && zeros[z].offset + zeros[z].length < to) z++;
      if (z < zeros.length && zeros[z].offset <= from && zeros[z].offset + zeros[z].length >= to) zero.add(chunks[k]);
    }
  };
  await forEachBounded(runs, parallel, inspect);
  return zero;
}

/** Block-status requests ask for at most this much (the length is 32 bits; chunk-aligned). */
const MAX_STATUS_REQUEST = 2 ** 31;

/**
 * Reads the given chunks from `nbd` and stores them through `writer` with `parallel` reads in flight,
 * each into its own reused buffer. Chunks the export's block status says read as zeros are marked zero
 * without a read; a read that came back all holes is too. Returns the bytes read.
 */
export async function copyChunks(
  nbd: NbdClient,
  writer: DiskWriter,
  chunks: number[],
  opts: { size: number; parallel?: number; onProgress?: ReadProgress },
): Promise<number> {
  const cs = writer.chunkSize;
  const parallel = Math.max(1, opts.parallel ?? 8);
  const zero = await zeroChunks(nbd, chunks, cs, opts.size, parallel);
  const toRead: number[] = [];
  for (const c of chunks) {
    const offset = c * cs;
    const length = Math.min(cs, opts.size - offset);
    if (zero.has(c)) {
      writer.zero(offset, length);
      opts.onProgress?.(length);
    } else toRead.push(c);
  }
  let bytes = 0;
  const buffers: Buffer[] = []; // one read buffer per runner, reused for each of its chunks
  await forEachBounded(toRead, Math.min(parallel, toRead.length), async (c, worker) => {
    const buf = (buffers[worker] ??= Buffer.allocUnsafe(cs));
    const offset = c * cs;
    const length = Math.min(cs, opts.size - offset);
    const data = buf.subarray(0, length);
    const { holeBytes } = await nbd.readInto(data, offset);
    if (holeBytes === length) writer.zero(offset, length);
    else await writer.put(offset, data);
    bytes += length;
    opts.onProgress?.(length);
  });
  return bytes;
}
