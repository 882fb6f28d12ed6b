/**
 * Writes that bypass the page cache (O_DIRECT), for data written once and not read back soon: a backup's packs,
 * a restored disk. Copying into the page cache was the largest CPU cost of both (measured: 2 GiB took 1–5 s of
 * system time on a 2-core VM, against ~0.1 s direct), and it evicts what the host's VMs have cached.
 *
 * O_DIRECT needs the memory, the file offset and the length aligned to the device's block size; JavaScript cannot
 * ask for aligned memory, so `DirectWriter.buffer()` finds the aligned start of a slightly larger buffer by trying
 * a direct write at each possible (16-byte) offset. Wherever direct I/O is refused (tmpfs, some network file
 * systems, unaligned data), the writes fall back to ordinary buffered ones: it is only ever a speed-up.
 */
import { constants } from 'node:fs';
import { open, unlink, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { randomBytes } from 'node:crypto';
import { writeFully } from './file.js';

/** Alignment that satisfies every block device (logical blocks of 512 or 4096 bytes). */
export const DIRECT_ALIGN = 4096;
/** Below this, a direct write is not worth its second open. */
export const DIRECT_MIN_BYTES = 256 * 1024;
/** malloc's alignment: the aligned start is one of these steps into a buffer */
const MALLOC_ALIGN = 16;

/** O_DIRECT is a Linux flag; elsewhere it is absent and everything is buffered. */
const O_DIRECT: number | undefined = (constants as Record<string, number>).O_DIRECT;

function isRefusal(err: unknown): boolean {
  const code = (err as NodeJS.ErrnoException).code;
  return code === 'EINVAL' || code === 'EOPNOTSUPP' || code === 'ENOTSUP';
}

/** Direct I/O in one directory (its file system): aligned buffers, and whole-file writes with a buffered tail. */
export class DirectWriter {
  private probe: Promise<FileHandle | null> | undefined;
  /** buffers handed out aligned: the byte offset in their ArrayBuffer where alignment starts */
  private readonly aligned = new WeakMap<ArrayBufferLike, number>();

  constructor(private readonly dir: string) {}

  /** An open, already unlinked file of this file system taking direct writes; null where it does not. */
  private probeFile(): Promise<FileHandle | null> {
    this.probe ??= (async () => {
      if (O_DIRECT === undefined) return null;
      const f = path.join(this.dir, `.direct-probe-${randomBytes(6).toString('hex')}`);
      try {
        const fh = await open(f, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | O_DIRECT, 0o600);
        await unlink(f).catch(() => undefined);
        return fh;
      } catch {
        await unlink(f).catch(() => undefined);
        return null;
      }
    })();
    return this.probe;
  }

  /** `size` bytes of memory, aligned for direct writes when this file system takes them. */
  async buffer(size: number): Promise<Buffer> {
    const raw = Buffer.allocUnsafeSlow(size + DIRECT_ALIGN);
    const probe = await this.probeFile();
    if (probe) {
      for (let k = 0; k < DIRECT_ALIGN; k += MALLOC_ALIGN) {
        try {
          await probe.write(raw, k, DIRECT_ALIGN, 0);
          this.aligned.set(raw.buffer, raw.byteOffset + k);
          return raw.subarray(k, k + size);
        } catch (err) {
          if (!isRefusal(err)) break;
        }
      }
    }
    return raw.subarray(0, size);
  }

  /**
   * Writes `data` as the whole content of a new file (`wx`, mode 0600): its aligned part directly, the rest
   * buffered; durable when `sync`. Falls back to a buffered write where direct I/O is refused.
   */
  async writeNewFile(file: string, data: Uint8Array, sync: boolean): Promise<void> {
    const head = data.length - (data.length % DIRECT_ALIGN);
    if (head >= DIRECT_MIN_BYTES && this.isAligned(data)) {
      let fh: FileHandle | undefined;
      try {
        fh = await open(file, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | (O_DIRECT ?? 0), 0o600);
        await writeFully(fh, data.subarray(0, head), 0);
        await fh.close();
        fh = undefined;
        await writeRest(file, data, head, sync);
        return;
      } catch (err) {
        await fh?.close().catch(() => undefined);
        if (!isRefusal(err)) throw err;
        await unlink(file).catch(() => undefined);
      }
    }
    const fh = await open(file, 'wx', 0o600);
    try {
      await writeFully(fh, data, 0);
      if (sync) await fh.datasync();
    } finally {
      await fh.close();
    }
  }

  /** whether `data` starts aligned in memory (it is, or starts at a multiple of the alignment in, a buffer()) */
  isAligned(data: Uint8Array): boolean {
    const start = this.aligned.get(data.buffer);
    return start !== undefined && (data.byteOffset - start) % DIRECT_ALIGN === 0 && data.byteOffset >= start;
  }

  async close(): Promise<void> {
    const fh = await this.probe;
    this.probe = undefined;
    await fh?.close().catch(() => undefined);
  }
}

async function writeRest(file: string, data: Uint8Array, from: number, sync: boolean): Promise<void> {
  if (from === data.length && !sync) return;
  const fh = await open(file, 'r+');
  try {
    await writeFully(fh, data.subarray(from), from);
    if (sync) await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** A file opened for direct writes (null where refused), e.g. a restored raw disk: see RawDiskWriter. */
export async function openDirect(file: string): Promise<FileHandle | null> {
  if (O_DIRECT === undefined) return null;
  try {
    // O_NONBLOCK: a FIFO put in the file's place fails (ENXIO) instead of waiting for a reader.
    return await open(file, constants.O_WRONLY | O_DIRECT | constants.O_NONBLOCK);
  } catch (err) {
    if (isRefusal(err)) return null;
    throw err;
  }
}
