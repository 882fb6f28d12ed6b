/**
 * Conversion between VHD, VHDX and raw images in any direction (VHD → VHD too: compacting, changing the
 * type or block size, flattening a chain). Entry points for callers: `probeImageFormat` (what a file
 * is), `openImageSource` (any of the three as a readable source), `convertVhdImage` (the whole copy).
 * Unallocated blocks are never read, nor the holes of a raw file when the file system reports them;
 * all-zero pieces are never written; the output is written back to the disk during the copy.
 */
import { unlink } from 'node:fs/promises';
import { InvalidArgumentError } from '../../errors.js';
import { NodeFile } from '../../util/file.js';
import { dataExtents } from '../../util/holes.js';
import { MiB as VHDX_MiB } from '../vhdx/constants.js';
import { Writeback, nonZeroRuns, roundExtents } from '../vhdx/convert.js';
import { DEFAULT_BLOCK_SIZE as VHDX_DEFAULT_BLOCK_SIZE, createVhdx } from '../vhdx/create.js';
import { VhdxFile } from '../vhdx/vhdx.js';
import { DEFAULT_BLOCK_SIZE, MAX_VIRTUAL_SIZE, SECTOR } from './constants.js';
import { createVhd } from './create.js';
import { detectFormat, unsupportedFormatError } from '../detect.js';
import { VhdFile, type Extent, type VhdOpenOptions } from './vhd.js';

export type ImageFormat = 'vhd' | 'vhdx' | 'raw';

export interface VhdConvertOptions extends Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'> {
  /** How to read the source (default: by its magic); `raw` copies the bytes of any file as they are. */
  sourceFormat?: ImageFormat;
  /** Output format; default from the destination's extension: .vhd/.avhd → vhd, .vhdx/.avhdx → vhdx, else raw. */
  format?: ImageFormat;
  /** VHD or VHDX output type (default dynamic). */
  type?: 'dynamic' | 'fixed';
  /** Output block size (default: the source's when the output format takes it, else 2 MiB for VHD, 32 MiB for VHDX). */
  blockSize?: number;
  /** VHD output: round the size up to a whole CHS geometry. */
  chsAligned?: boolean;
  /** VHDX output sector sizes (default: the source's, else 512 / 4096). */
  logicalSectorSize?: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  onProgress?: (done: number, total: number) => void;
}

export interface VhdConvertResult {
  sourceFormat: ImageFormat;
  format: ImageFormat;
  virtualSize: number;
  bytesRead: number;
  bytesWritten: number;
  bytesSkipped: number;
}

/** An image being read: its size, what may hold data, and reads. */
export interface ImageSource {
  format: ImageFormat;
  size: number;
  blockSize?: number;
  logicalSectorSize?: 512 | 4096;
  physicalSectorSize?: 512 | 4096;
  extents(): Promise<Extent[]>;
  read(buf: Buffer, offset: number): Promise<void>;
  close(): Promise<void>;
}

/**
 * What a file is, by its magic (src/formats/detect.ts): VHDX, VHD or raw; any other format is refused with
 * NOT_SUPPORTED naming it, never read as raw.
 */
export async function probeImageFormat(path: string): Promise<ImageFormat> {
  const found = await detectFormat(path);
  if (found.format === 'vhd' || found.format === 'vhdx' || found.format === 'raw') return found.format;
  throw unsupportedFormatError(path, found, { reader: 'convert', also: 'or give --source-format raw' });
}

export function formatFromName(path: string): ImageFormat {
  if (/\.a?vhdx$/i.test(path)) return 'vhdx';
  if (/\.a?vhd$/i.test(path)) return 'vhd';
  return 'raw';
}

/** Any of the three formats as a source; a differencing disk is read through its chain. */
export async function openImageSource(
  path: string,
  opts: Pick<VhdConvertOptions, 'allowedRoots' | 'pathMap' | 'sourceFormat'> = {},
): Promise<ImageSource> {
  const format = opts.sourceFormat ?? (await probeImageFormat(path));
  if (format === 'vhd') {
    const disk = await VhdFile.open(path, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
    return {
      format,
      size: disk.virtualSize,
      blockSize: disk.blockSize,
      extents: () => disk.allocatedExtents(),
      read: (buf, offset) => disk.read(buf, offset),
      close: () => disk.close(),
    };
  }
  if (format === 'vhdx') {
    const disk = await VhdxFile.open(path, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
    return {
      format,
      size: disk.virtualSize,
      blockSize: disk.blockSize,
      logicalSectorSize: disk.logicalSectorSize,
      physicalSectorSize: disk.physicalSectorSize,
      extents: () => disk.allocatedExtents(),
      read: (buf, offset) => disk.read(buf, offset),
      close: () => disk.close(),
    };
  }
  const file = await NodeFile.open(path, 'r', { lock: 'reader' });
  const size = file.size();
  return {
    format,
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

/** Pieces read ahead of the one being written, and their size. */
const READ_AHEAD = 8;
const PIECE = 4 * VHDX_MiB;
/** All-zero runs this long (and aligned) are not written. */
const ZERO_GRAIN = 64 * 1024;

interface Sink {
  piece: number;
  write(buf: Buffer, offset: number): Promise<void>;
  writeback(): Promise<void>;
  finish(): Promise<void>;
  abort(): Promise<void>;
}

async function openSink(dstPath: string, format: ImageFormat, size: number, src: ImageSource, opts: VhdConvertOptions) {
  if (format === 'raw') {
    const dst = await NodeFile.open(dstPath, 'wx', { lock: 'writer' });
    await dst.truncate(size);
    return {
      piece: PIECE,
      write: (buf: Buffer, offset: number) => dst.write(buf, offset),
      writeback: () => dst.datasync(),
      finish: async () => {
        await dst.datasync();
        await dst.close();
      },
      abort: () => dst.close(),
    } satisfies Sink;
  }
  let disk: VhdFile | VhdxFile;
  let blockSize: number;
  if (format === 'vhd') {
    blockSize = opts.blockSize ?? (src.format === 'vhd' ? src.blockSize : undefined) ?? DEFAULT_BLOCK_SIZE;
    await createVhd(dstPath, { size, type: opts.type ?? 'dynamic', blockSize, chsAligned: opts.chsAligned });
    disk = await openCreated(dstPath, () => VhdFile.open(dstPath, { writable: true }));
  } else {
    blockSize = opts.blockSize ?? (src.format === 'vhdx' ? src.blockSize : undefined) ?? VHDX_DEFAULT_BLOCK_SIZE;
    await createVhdx(dstPath, {
      size,
      type: opts.type ?? 'dynamic',
      blockSize,
      logicalSectorSize: opts.logicalSectorSize ?? src.logicalSectorSize ?? 512,
      physicalSectorSize: opts.physicalSectorSize ?? src.physicalSectorSize ?? 4096,
    });
    disk = await openCreated(dstPath, () => VhdxFile.open(dstPath, { writable: true }));
  }
  // A second descriptor on the same file: fdatasync through it writes back data already written
  // without committing the disk's metadata (that happens once, at close).
  let syncFile: NodeFile;
  try {
    syncFile = await NodeFile.open(dstPath, 'r');
  } catch (err) {
    await disk.close().catch(() => undefined);
    throw err;
  }
  return {
    piece: Math.min(blockSize, PIECE),
    write: (buf: Buffer, offset: number) => disk.write(buf, offset),
    writeback: () => syncFile.datasync({ writtenElsewhere: true }),
    finish: async () => {
      await syncFile.close();
      await disk.close();
    },
    abort: async () => {
      await syncFile.close().catch(() => undefined);
      await disk.close();
    },
  } satisfies Sink;
}

/** Opens a file just created; if that fails the file goes (the caller never saw it). */
async function openCreated<T>(path: string, open: () => Promise<T>): Promise<T> {
  try {
    return await open();
  } catch (err) {
    await unlink(path).catch(() => undefined);
    throw err;
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

/** Copies `srcPath` (VHD, VHDX or raw, detected) into a new `dstPath` of `opts.format`. */
export async function convertVhdImage(
  srcPath: string,
  dstPath: string,
  opts: VhdConvertOptions = {},
): Promise<VhdConvertResult> {
  const format = opts.format ?? formatFromName(dstPath);
  if (format !== 'vhd' && format !== 'vhdx' && format !== 'raw')
    throw new InvalidArgumentError(`unknown output format ${String(format)}`);
  if (format === 'raw' && (opts.type || opts.blockSize))
    throw new InvalidArgumentError('--type and --block-size apply to VHD and VHDX output only');
  if (format !== 'vhd' && opts.chsAligned) throw new InvalidArgumentError('--chs-size applies to VHD output only');
  const src = await openImageSource(srcPath, opts);
  let created = false;
  try {
    // The output's sectors: whole 512-byte (VHD) or logical (VHDX) sectors; a raw source is padded with zeros.
    const unit =
      format === 'vhd' ? SECTOR : format === 'vhdx' ? (opts.logicalSectorSize ?? src.logicalSectorSize ?? 512) : 1;
    const virtualSize = Math.ceil(src.size / unit) * unit;
    if (virtualSize === 0) throw new InvalidArgumentError(`${srcPath} is empty`);
    if (format === 'vhd' && virtualSize > MAX_VIRTUAL_SIZE)
      throw new InvalidArgumentError(`${srcPath} is ${virtualSize} bytes; a VHD holds at most 2040 GiB`);
    const sink = await openSink(dstPath, format, virtualSize, src, opts);
    created = true;
    const result: VhdConvertResult = {
      sourceFormat: src.format,
      format,
      virtualSize,
      bytesRead: 0,
      bytesWritten: 0,
      bytesSkipped: 0,
    };
    const flusher = new Writeback(sink.writeback);
    try {
      const extents = await src.extents();
      const total = extents.reduce((n, e) => n + e.length, 0);
      const queue: { extent: Extent; data: Promise<Buffer> }[] = [];
      const it = pieces(extents, sink.piece);
      const pool: Buffer[] = [];
      const refill = () => {
        while (queue.length < READ_AHEAD) {
          const next = it.next();
          if (next.done) return;
          const buf = (pool.pop() ?? Buffer.allocUnsafe(sink.piece)).subarray(0, next.value.length);
          const data = src.read(buf, next.value.offset).then(() => buf);
          data.catch(() => undefined); // awaited in order below
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
        for (const run of runs)
          await sink.write(buf.subarray(run.offset, run.offset + run.length), extent.offset + run.offset);
        const written = runs.reduce((n, run) => n + run.length, 0);
        result.bytesWritten += written;
        flusher.wrote(written);
        pool.push(Buffer.from(buf.buffer, buf.byteOffset, sink.piece));
        done += extent.length;
        opts.onProgress?.(done, total);
      }
      await flusher.drain();
      await sink.finish();
      result.bytesSkipped = virtualSize - result.bytesWritten;
    } catch (err) {
      await flusher.drain().catch(() => undefined);
      await sink.abort().catch(() => undefined);
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
