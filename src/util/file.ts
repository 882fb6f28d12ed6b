import { constants, type BigIntStats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import { TidemarkError, fromSystemError } from '../errors.js';
import { dataExtentsOf, type DataExtent } from './holes.js';
import { lockImage, type ImageLock, type ImageLockMode } from './image-lock.js';
import { openChecked, type FileKind } from './safe-open.js';

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
  /**
   * Where [offset, offset+length) may hold bytes other than zeros, in order (the rest reads zeros), or
   * undefined when the file cannot tell (then all of it may). Answered from file-system metadata
   * (SEEK_DATA), so a caller can skip holes without reading them.
   */
  dataExtents?(offset: number, length: number): DataExtent[] | undefined;
  /**
   * Holds the file's image locks as `mode` from now on (a disk that became a read-only parent keeps other
   * writers out but lets readers in). Only files opened with a lock have it.
   */
  relock?(mode: ImageLockMode): Promise<void>;
  /** Takes the file's size from the file system again (another program may have changed it meanwhile). */
  refreshSize?(): Promise<void>;
}

/**
 * Work that must happen before bytes of a file change through NodeFile (the cow snapshot provider
 * preserves old content there). Keyed by file identity, not by handle or name, so every handle on the
 * file is covered, opened before or after the interceptor was added.
 */
export interface FileWriteInterceptor {
  /** Before bytes [position, position + length) are overwritten. */
  beforeWrite(position: number, length: number): Promise<void>;
  /** Before the file's size is set to `size` (bytes from `size` on are discarded). */
  beforeTruncate(size: number): Promise<void>;
}

/** Interceptors by fileIdentity(). While it is empty a write costs one `size` check. */
export const fileWriteInterceptors = new Map<string, Set<FileWriteInterceptor>>();

/** What identifies a file while it exists, whatever its names: `dev:ino`. */
export function fileIdentity(st: { dev: bigint; ino: bigint }): string {
  return `${st.dev}:${st.ino}`;
}

/** Registers `interceptor` for the file `identity`; returns the function that removes it. */
export function addFileWriteInterceptor(identity: string, interceptor: FileWriteInterceptor): () => void {
  let set = fileWriteInterceptors.get(identity);
  if (!set) fileWriteInterceptors.set(identity, (set = new Set()));
  set.add(interceptor);
  return () => {
    if (set.delete(interceptor) && set.size === 0 && fileWriteInterceptors.get(identity) === set)
      fileWriteInterceptors.delete(identity);
  };
}

async function runInterceptors(
  set: Set<FileWriteInterceptor>,
  call: (i: FileWriteInterceptor) => Promise<void>,
): Promise<void> {
  for (const i of [...set]) await call(i);
}

export interface NodeFileOptions {
  /**
   * Take QEMU-compatible image locks (image-lock.ts) for as long as the file is open: LOCKED, naming the
   * holder, when another program uses the file in a way this mode cannot share. Default: none.
   */
  lock?: ImageLockMode;
  /** Refuse a symbolic link as the last path component (files Tidemark owns, such as tracking files). */
  noFollow?: boolean;
  /** What the path must name (default `disk`: a regular file or a block device). */
  kind?: FileKind;
}

export class NodeFile implements RandomAccessFile {
  /** Writes and truncates completed (or failed) through this file, and how many of them a datasync covered. */
  private changes = 0;
  private synced = 0;

  private constructor(
    readonly path: string,
    readonly writable: boolean,
    private handle: FileHandle,
    private length: number,
    /** fileIdentity() of the open file: the key of fileWriteInterceptors. */
    readonly identity: string,
    private imageLock: ImageLock | undefined,
  ) {}

  /**
   * Opens without ever waiting on a FIFO (O_NONBLOCK) and refuses what is not a `kind` file with a typed
   * error; 'wx' creates with O_EXCL (never through an existing link).
   */
  static async open(path: string, mode: 'r' | 'r+' | 'w' | 'wx', opts: NodeFileOptions = {}): Promise<NodeFile> {
    // Shared (read) locks need a descriptor open for reading: a locked file being created is opened read-write.
    const writeOnly = opts.lock ? constants.O_RDWR : constants.O_WRONLY;
    // 'w' truncates through truncate() below instead of O_TRUNC, so interceptors see it.
    const flags =
      mode === 'r'
        ? constants.O_RDONLY
        : mode === 'r+'
          ? constants.O_RDWR
          : mode === 'w'
            ? writeOnly | constants.O_CREAT
            : writeOnly | constants.O_CREAT | constants.O_EXCL;
    const { handle, stat: st } = await openChecked(path, flags, {
      kind: opts.kind ?? 'disk',
      noFollow: opts.noFollow,
      action: mode === 'wx' || mode === 'w' ? 'create' : 'open',
    });
    let lock: ImageLock | undefined;
    try {
      if (opts.lock) lock = await lockImage(handle.fd, st, path, opts.lock);
      const file = new NodeFile(path, mode !== 'r', handle, Number(st.size), fileIdentity(st), lock);
      if (mode === 'w' && st.size > 0n) await file.truncate(0);
      return file;
    } catch (err) {
      await handle.close().catch(() => undefined);
      lock?.release();
      throw fromSystemError(err, 'open', path);
    }
  }

  /**
   * Opens a file Tidemark keeps beside a disk (the tracking files .rct and .mrt): a regular file, never
   * through a symbolic link (a link there would have Tidemark overwrite whatever it names), created with
   * O_EXCL, and locked like a disk (writer when writable): two processes never both write it.
   */
  static openSidecar(path: string, mode: 'r' | 'r+' | 'wx'): Promise<NodeFile> {
    return NodeFile.open(path, mode, { noFollow: true, kind: 'file', lock: mode === 'r' ? 'reader' : 'writer' });
  }

  async relock(mode: ImageLockMode): Promise<void> {
    await this.imageLock?.setMode(mode);
  }

  size(): number {
    return this.length;
  }

  async refreshSize(): Promise<void> {
    this.length = Number((await this.stat()).size);
  }

  /** The open file's status (fstat): what it is even when its path now names another file, or none. */
  stat(): Promise<BigIntStats> {
    return this.handle.stat({ bigint: true });
  }

  dataExtents(offset: number, length: number): DataExtent[] | undefined {
    // Past the end of the file everything reads zeros.
    return dataExtentsOf(this.handle.fd, offset, Math.min(offset + length, this.length));
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
    const hooks = fileWriteInterceptors.size === 0 ? undefined : fileWriteInterceptors.get(this.identity);
    if (hooks) await runInterceptors(hooks, (i) => i.beforeWrite(position, buf.length));
    try {
      await writeFully(this.handle, buf, position);
    } catch (err) {
      throw fromSystemError(err, 'write', this.path);
    } finally {
      this.changes++; // a failed write may have written part: a datasync still syncs
    }
    if (position + buf.length > this.length) this.length = position + buf.length;
  }

  async truncate(size: number): Promise<void> {
    const hooks = fileWriteInterceptors.size === 0 ? undefined : fileWriteInterceptors.get(this.identity);
    if (hooks) await runInterceptors(hooks, (i) => i.beforeTruncate(size));
    try {
      await this.handle.truncate(size);
    } catch (err) {
      throw fromSystemError(err, 'resize', this.path);
    } finally {
      this.changes++;
    }
    this.length = size;
  }

  /**
   * Makes this file's completed writes durable. None since the last datasync that succeeded: nothing to do (a
   * flush of a disk nobody wrote costs no system call); a write completing while it runs counts for the next.
   * `writtenElsewhere`: sync anyway, for what another descriptor of the file wrote (a converter's write-back).
   */
  async datasync(opts: { writtenElsewhere?: boolean } = {}): Promise<void> {
    const upTo = this.changes;
    if (upTo === this.synced && !opts.writtenElsewhere) return;
    try {
      await this.handle.datasync();
    } catch (err) {
      throw fromSystemError(err, 'flush', this.path);
    }
    this.synced = Math.max(this.synced, upTo);
  }

  async close(): Promise<void> {
    try {
      await this.handle.close();
    } finally {
      this.imageLock?.release();
    }
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
    throw new TidemarkError('READ_ONLY', 'PatchedFile is read-only');
  }

  async truncate(): Promise<void> {
    throw new TidemarkError('READ_ONLY', 'PatchedFile is read-only');
  }

  async datasync(): Promise<void> {}

  async close(): Promise<void> {
    await this.base.close();
  }

  async relock(mode: ImageLockMode): Promise<void> {
    await this.base.relock?.(mode);
  }
}

/** Reads `buf.length` bytes at `position`; what lies past the end of the file reads as zeros. */
export async function readFully(handle: FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesRead } = await handle.read(buf, done, buf.length - done, position + done);
    if (bytesRead === 0) break;
    done += bytesRead;
  }
  if (done < buf.length) buf.fill(0, done);
}

/** Writes all of `buf` at `position` (one write may take only part). */
export async function writeFully(handle: FileHandle, buf: Uint8Array, position: number): Promise<void> {
  let done = 0;
  while (done < buf.length) {
    const { bytesWritten } = await handle.write(buf, done, buf.length - done, position + done);
    done += bytesWritten;
  }
}
