import { open, type FileHandle } from 'node:fs/promises';
import { TidemarkError, fromSystemError } from '../errors.js';

/** Node turns a position that is not a safe integer into "the current file position": refuse it instead. */
function checkPosition(position: number, length: number, action: string, path: string): void {
  if (!Number.isSafeInteger(position) || position < 0 || !Number.isSafeInteger(position + length)) {
    throw new TidemarkError('IO_ERROR', `cannot ${action} ${path} at offset ${position}: out of range`);
  }
}

/**
 * Positioned I/O on one file. Reads past the end return zeros (a short file reads like a sparse one);
 * the caller decides whether that is an error. `datasync` is what "flush means durable" rests on.
 */
export interface RandomAccessFile {
  readonly path: string;
  readonly writable: boolean;
  size(): number;
  read(buf: Uint8Array, position: number): Promise<void>;
  write(buf: Uint8Array, position: number): Promise<void>;
  truncate(size: number): Promise<void>;
  datasync(): Promise<void>;
  close(): Promise<void>;
}

export class NodeFile implements RandomAccessFile {
  private constructor(
    readonly path: string,
    readonly writable: boolean,
    private handle: FileHandle,
    private length: number,
  ) {}

  static async open(path: string, mode: 'r' | 'r+' | 'w' | 'wx'): Promise<NodeFile> {
    let handle: FileHandle;
    try {
      handle = await open(path, mode);
    } catch (err) {
      throw fromSystemError(err, mode === 'wx' || mode === 'w' ? 'create' : 'open', path);
    }
    try {
      const st = await handle.stat();
      if (!st.isFile() && !st.isBlockDevice()) {
        throw fromSystemError(Object.assign(new Error('not a regular file'), { code: 'EINVAL' }), 'open', path);
      }
      return new NodeFile(path, mode !== 'r', handle, st.size);
    } catch (err) {
      await handle.close().catch(() => undefined);
      throw fromSystemError(err, 'open', path);
    }
  }

  size(): number {
    return this.length;
  }

  async read(buf: Uint8Array, position: number): Promise<void> {
    checkPosition(position, buf.length, 'read', this.path);
    let done = 0;
    const want = buf.length;
    const available = Math.max(0, Math.min(want, this.length - position));
    try {
      while (done < available) {
        const { bytesRead } = await this.handle.read(buf, done, available - done, position + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    } catch (err) {
      throw fromSystemError(err, 'read', this.path);
    }
    if (done < want) buf.fill(0, done);
  }

  async write(buf: Uint8Array, position: number): Promise<void> {
    checkPosition(position, buf.length, 'write', this.path);
    let done = 0;
    try {
      while (done < buf.length) {
        const { bytesWritten } = await this.handle.write(buf, done, buf.length - done, position + done);
        done += bytesWritten;
      }
    } catch (err) {
      throw fromSystemError(err, 'write', this.path);
    }
    if (position + buf.length > this.length) this.length = position + buf.length;
  }

  async truncate(size: number): Promise<void> {
    try {
      await this.handle.truncate(size);
    } catch (err) {
      throw fromSystemError(err, 'resize', this.path);
    }
    this.length = size;
  }

  async datasync(): Promise<void> {
    try {
      await this.handle.datasync();
    } catch (err) {
      throw fromSystemError(err, 'flush', this.path);
    }
  }

  async close(): Promise<void> {
    await this.handle.close();
  }
}

/**
 * A read-only view of a file with in-memory patches on top: how a read-only open replays a VHDX log
 * without touching the file. Patches are byte ranges; later patches win.
 */
export class PatchedFile implements RandomAccessFile {
  readonly writable = false;
  private patches: { offset: number; data: Uint8Array | null; length: number }[] = [];
  private length: number;

  constructor(private readonly base: RandomAccessFile) {
    this.length = base.size();
  }

  get path(): string {
    return this.base.path;
  }

  /** `data === null` patches zeros. */
  patch(offset: number, length: number, data: Uint8Array | null): void {
    this.patches.push({ offset, length, data });
    this.length = Math.max(this.length, offset + length);
  }

  extend(size: number): void {
    this.length = Math.max(this.length, size);
  }

  size(): number {
    return this.length;
  }

  async read(buf: Uint8Array, position: number): Promise<void> {
    await this.base.read(buf, position);
    const end = position + buf.length;
    for (const p of this.patches) {
      const from = Math.max(position, p.offset);
      const to = Math.min(end, p.offset + p.length);
      if (from >= to) continue;
      if (p.data) buf.set(p.data.subarray(from - p.offset, to - p.offset), from - position);
      else buf.fill(0, from - position, to - position);
    }
  }

  async write(): Promise<void> {
    throw new Error('PatchedFile is read-only');
  }

  async truncate(): Promise<void> {
    throw new Error('PatchedFile is read-only');
  }

  async datasync(): Promise<void> {}

  async close(): Promise<void> {
    await this.base.close();
  }
}
