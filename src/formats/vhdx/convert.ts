/**
 * Conversion between raw images and VHDX: raw → VHDX, VHDX → raw, VHDX → VHDX (compacting, changing
 * block size or type, flattening a chain). Unallocated blocks are never read, nor are the holes of a
 * raw file when the file system reports them (src/util/holes.ts); all-zero pieces are never written.
 * Reads run ahead of writes, and the output is written back to the disk during the copy. The source's
 * format is recognised by its magic (../detect.ts), never guessed: other disk formats are refused before
 * anything is created.
 */
import { unlink } from 'node:fs/promises';
import { InvalidArgumentError } from '../../errors.js';
import { NodeFile } from '../../util/file.js';
import { dataExtents } from '../../util/holes.js';
import { isAllZero } from '../../util/zero.js';
import { detectFormat, unsupportedFormatError } from '../detect.js';
import { MiB } from './constants.js';
import { createVhdx, DEFAULT_BLOCK_SIZE } from './create.js';
import { VhdxFile, type Extent, type OpenOptions } from './vhdx.js';

export type ImageFormat = 'vhdx' | 'raw';

export interface ConvertOptions extends Pick<OpenOptions, 'allowedRoots' | 'pathMap'> {
  /**
   * How to read the source; default: by its magic (a VHDX by its identifier, raw when it carries no known
   * magic; any other format is refused as NOT_SUPPORTED). `raw` copies the bytes of any file as they are.
   */
  sourceFormat?: ImageFormat;
  /** Output format; default: from the destination's extension (.vhdx/.avhdx → vhdx, else raw). */
  format?: ImageFormat;
  type?: 'dynamic' | 'fixed';
  blockSize?: number;
  logicalSectorSize?: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  onProgress?: (done: number, total: number) => void;
  /** Called with the open destination VHDX before data is written (change tracking attaches here). */
  onDestinationOpen?: (dst: VhdxFile) => Promise<void> | void;
}

export interface ConvertResult {
  sourceFormat: ImageFormat;
  format: ImageFormat;
  virtualSize: number;
  bytesRead: number;
  bytesWritten: number;
  bytesSkipped: number;
}

interface Source {
  format: ImageFormat;
  size: number;
  logicalSectorSize?: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  blockSize?: number;
  extents(): Promise<Extent[]>;
  read(buf: Buffer, offset: number): Promise<void>;
  close(): Promise<void>;
}

/** The source's format: the one asked for, else its magic's; formats this converter cannot read are refused. */
async function sourceFormatOf(path: string, opts: ConvertOptions): Promise<ImageFormat> {
  if (opts.sourceFormat !== undefined) {
    if (opts.sourceFormat !== 'vhdx' && opts.sourceFormat !== 'raw')
      throw new InvalidArgumentError(`unknown source format ${String(opts.sourceFormat)}`);
    return opts.sourceFormat;
  }
  const found = await detectFormat(path);
  if (found.format === 'vhdx' || found.format === 'raw') return found.format;
  throw unsupportedFormatError(path, found, {
    reader: 'vhdx convert',
    also: 'or give --source-format raw to copy its bytes as they are',
  });
}

async function openSource(path: string, opts: ConvertOptions): Promise<Source> {
  if ((await sourceFormatOf(path, opts)) === 'vhdx') {
    const disk = await VhdxFile.open(path, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
    return {
      format: 'vhdx',
      size: disk.virtualSize,
      logicalSectorSize: disk.logicalSectorSize,
      physicalSectorSize: disk.physicalSectorSize,
      blockSize: disk.blockSize,
      extents: () => disk.allocatedExtents(),
      read: (buf, offset) => disk.read(buf, offset),
      close: () => disk.close(),
    };
  }
  const file = await NodeFile.open(path, 'r', { lock: 'reader' });
  const size = file.size();
  return {
    format: 'raw',
    size,
    // Holes are skipped when the file system can tell where they are; otherwise all is read and scanned.
    extents: async () => {
      const data = await dataExtents(path, size);
      return data ? roundExtents(data, ZERO_GRAIN, size) : size > 0 ? [{ offset: 0, length: size }] : [];
    },
    read: (buf, offset) => file.read(buf, offset),
    close: () => file.close(),
  };
}

function formatFromName(path: string): ImageFormat {
  return /\.a?vhdx$/i.test(path) ? 'vhdx' : 'raw';
}

/** Bytes written between two background writebacks. */
const WRITEBACK_EVERY = 64 * MiB;

/**
 * Starts writing the output back to the disk while conversion goes on: one fdatasync in flight at a
 * time, every WRITEBACK_EVERY bytes. The final flush then finds little left to do, so the disk works
 * during the copy instead of after it. A failure is reported by drain().
 */
export class Writeback {
  private pending = 0;
  private inFlight: Promise<void> | undefined;
  private error: unknown;

  constructor(
    private readonly sync: () => Promise<void>,
    private readonly every = WRITEBACK_EVERY,
  ) {}

  wrote(bytes: number): void {
    this.pending += bytes;
    if (this.pending < this.every || this.inFlight || this.error !== undefined) return;
    this.pending = 0;
    this.inFlight = this.sync().then(
      () => (this.inFlight = undefined),
      (err) => {
        this.error ??= err;
        this.inFlight = undefined;
      },
    );
  }

  async drain(): Promise<void> {
    await this.inFlight;
    if (this.error !== undefined) throw this.error;
  }
}

/** Splits extents into pieces aligned to `piece` boundaries. */
function* pieces(extents: Extent[], piece: number): Generator<Extent> {
  for (const e of extents) {
    for (let at = e.offset; at < e.offset + e.length;) {
      const end = Math.min(e.offset + e.length, (Math.floor(at / piece) + 1) * piece);
      yield { offset: at, length: end - at };
      at = end;
    }
  }
}

/** Pieces read ahead of the one being written, and their size: small, reused buffers fault less. */
const READ_AHEAD = 8;
const PIECE = 4 * MiB;
/** All-zero runs this long (and aligned) are not written. */
const ZERO_GRAIN = 64 * 1024;

/**
 * Extents widened to `grain` boundaries (clipped to `size`) and merged: a small gap costs less to read
 * as zeros than a separate read and write would.
 */
export function roundExtents(extents: readonly Extent[], grain: number, size: number): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    const from = Math.floor(e.offset / grain) * grain;
    const to = Math.min(size, Math.ceil((e.offset + e.length) / grain) * grain);
    if (to <= from) continue;
    const last = out[out.length - 1];
    if (last && from <= last.offset + last.length) last.length = Math.max(last.length, to - last.offset);
    else out.push({ offset: from, length: to - from });
  }
  return out;
}

/** The runs of `buf` that hold a non-zero byte, at `grain` granularity, coalesced. */
export function nonZeroRuns(buf: Buffer, grain: number): Extent[] {
  const runs: Extent[] = [];
  for (let at = 0; at < buf.length; at += grain) {
    const n = Math.min(grain, buf.length - at);
    if (isAllZero(buf.subarray(at, at + n))) continue;
    const last = runs[runs.length - 1];
    if (last && last.offset + last.length === at) last.length += n;
    else runs.push({ offset: at, length: n });
  }
  return runs;
}

export async function convertImage(
  srcPath: string,
  dstPath: string,
  opts: ConvertOptions = {},
): Promise<ConvertResult> {
  const format = opts.format ?? formatFromName(dstPath);
  if (format !== 'vhdx' && format !== 'raw') throw new InvalidArgumentError(`unknown output format ${format}`);
  if (format === 'raw' && (opts.type || opts.blockSize))
    throw new InvalidArgumentError('--type and --block-size apply to VHDX output only');
  if (format === 'raw' && opts.onDestinationOpen)
    throw new InvalidArgumentError('change tracking (--track) applies to VHDX output only');
  const src = await openSource(srcPath, opts);
  let created = false;
  try {
    const lss = opts.logicalSectorSize ?? src.logicalSectorSize ?? 512;
    // A raw image whose size is not a whole number of sectors is padded with zeros to the next one.
    const virtualSize = format === 'vhdx' ? Math.ceil(src.size / lss) * lss : src.size;
    if (virtualSize === 0) throw new InvalidArgumentError(`${srcPath} is empty`);
    const result: ConvertResult = {
      sourceFormat: src.format,
      format,
      virtualSize,
      bytesRead: 0,
      bytesWritten: 0,
      bytesSkipped: 0,
    };

    let write: (buf: Buffer, offset: number) => Promise<void>;
    let finish: () => Promise<void>;
    let abort: () => Promise<void>;
    let piece: number;
    let writeback: () => Promise<void>;
    if (format === 'vhdx') {
      const blockSize = opts.blockSize ?? src.blockSize ?? DEFAULT_BLOCK_SIZE;
      await createVhdx(dstPath, {
        size: virtualSize,
        type: opts.type ?? 'dynamic',
        blockSize,
        logicalSectorSize: lss,
        physicalSectorSize: opts.physicalSectorSize ?? src.physicalSectorSize ?? 4096,
      });
      created = true;
      const dst = await VhdxFile.open(dstPath, { writable: true });
      // A second descriptor on the same file: fdatasync through it writes back payload already written
      // without committing VHDX metadata (that happens once, at close).
      let syncFile: NodeFile;
      try {
        await opts.onDestinationOpen?.(dst);
        syncFile = await NodeFile.open(dstPath, 'r');
      } catch (err) {
        await dst.close().catch(() => undefined);
        throw err;
      }
      piece = Math.min(blockSize, PIECE);
      write = (buf, offset) => dst.write(buf, offset);
      writeback = () => syncFile.datasync({ writtenElsewhere: true });
      finish = async () => {
        await syncFile.close();
        await dst.close();
      };
      abort = async () => {
        await syncFile.close().catch(() => undefined);
        await dst.close();
      };
    } else {
      const dst = await NodeFile.open(dstPath, 'wx', { lock: 'writer' });
      created = true;
      await dst.truncate(virtualSize);
      piece = PIECE;
      write = (buf, offset) => dst.write(buf, offset);
      writeback = () => dst.datasync();
      finish = async () => {
        await dst.datasync();
        await dst.close();
      };
      abort = () => dst.close();
    }

    const flusher = new Writeback(writeback);
    try {
      const extents = await src.extents();
      const total = extents.reduce((n, e) => n + e.length, 0);
      // Read ahead: up to READ_AHEAD pieces are being read while one is written.
      const queue: { extent: Extent; data: Promise<Buffer> }[] = [];
      const it = pieces(extents, piece);
      const pool: Buffer[] = []; // buffers whose piece has been written
      const refill = () => {
        while (queue.length < READ_AHEAD) {
          const next = it.next();
          if (next.done) return;
          const buf = (pool.pop() ?? Buffer.allocUnsafe(piece)).subarray(0, next.value.length);
          const data = src.read(buf, next.value.offset).then(() => buf);
          data.catch(() => undefined); // awaited in order below; this only keeps an early failure from going unhandled
          queue.push({ extent: next.value, data });
        }
      };
      refill();
      let done = 0;
      while (queue.length > 0) {
        const { extent, data } = queue.shift()!;
        refill();
        const buf = await data;
        result.bytesRead += extent.length;
        // The destination is new, so what is not written reads zeros: write only the non-zero runs.
        const runs = nonZeroRuns(buf, ZERO_GRAIN);
        await Promise.all(
          runs.map((run) => write(buf.subarray(run.offset, run.offset + run.length), extent.offset + run.offset)),
        );
        const written = runs.reduce((n, run) => n + run.length, 0);
        result.bytesWritten += written;
        flusher.wrote(written);
        pool.push(Buffer.from(buf.buffer, buf.byteOffset, piece));
        done += extent.length;
        opts.onProgress?.(done, total);
      }
      await flusher.drain();
      await finish();
      result.bytesSkipped = virtualSize - result.bytesWritten;
    } catch (err) {
      await flusher.drain().catch(() => undefined);
      await abort().catch(() => undefined);
      throw err;
    }
    return result;
  } catch (err) {
    if (created) await unlink(dstPath).catch(() => undefined);
    throw err;
  } finally {
    await src.close();
  }
}
