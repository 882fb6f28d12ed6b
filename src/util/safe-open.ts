/**
 * Opening files by path without trusting what the path names. Every open here is non-blocking (O_NONBLOCK,
 * O_NOCTTY): open(2) of a FIFO would otherwise wait for a writer forever, holding a thread of Node's pool
 * (four such opens stop all file I/O of the process). The descriptor is then checked with fstat, and
 * anything but a regular file (or a block device, where a disk is meant) is refused with a typed error
 * that says what it is. `noFollow` adds O_NOFOLLOW: a symbolic link as the last component is refused
 * instead of followed (for files Tidemark owns: tracking files, repository objects).
 */
import { constants, type BigIntStats } from 'node:fs';
import { lstat, open, stat, type FileHandle } from 'node:fs/promises';
import { TidemarkError, fromSystemError, TidemarkErrorBase } from '../errors.js';

/** What a path must name: a regular file, or (`disk`) a regular file or a block device. */
export type FileKind = 'file' | 'disk';

/** The path names something else than the file kind wanted (a FIFO, a socket, a directory, ...). */
export class FileTypeError extends TidemarkErrorBase<'INVALID_ARGUMENT'> {
  constructor(
    readonly path: string,
    readonly type: string,
    kind: FileKind,
  ) {
    super('INVALID_ARGUMENT', `${path} is a ${type}, not a ${kind === 'disk' ? 'disk file' : 'regular file'}`, {
      path,
      type,
    });
    this.name = 'FileTypeError';
  }
}

/** The path is a symbolic link where none may be followed. */
export class SymlinkRefusedError extends TidemarkErrorBase<'PATH_NOT_ALLOWED'> {
  constructor(readonly path: string) {
    super('PATH_NOT_ALLOWED', `${path} is a symbolic link; it is not followed (replace it with the file itself)`, {
      path,
    });
    this.name = 'SymlinkRefusedError';
  }
}

/** What a stat says a file is, in words. */
export function fileTypeName(
  st: Pick<
    BigIntStats,
    'isFile' | 'isFIFO' | 'isSocket' | 'isDirectory' | 'isBlockDevice' | 'isCharacterDevice' | 'isSymbolicLink'
  >,
): string {
  if (st.isFile()) return 'regular file';
  if (st.isFIFO()) return 'FIFO';
  if (st.isSocket()) return 'socket';
  if (st.isDirectory()) return 'directory';
  if (st.isBlockDevice()) return 'block device';
  if (st.isCharacterDevice()) return 'character device';
  if (st.isSymbolicLink()) return 'symbolic link';
  return 'special file';
}

function fits(st: BigIntStats, kind: FileKind): boolean {
  return st.isFile() || (kind === 'disk' && st.isBlockDevice());
}

export interface OpenCheckedOptions {
  /** What the file must be (default `file`). */
  kind?: FileKind;
  /** Refuse a symbolic link as the last path component (O_NOFOLLOW). */
  noFollow?: boolean;
  /** Permission bits of a file this open creates (default 0o666, less the umask). */
  mode?: number;
  /** The verb of error messages ("open", "create", "read"). */
  action?: string;
}

/**
 * open(2) of `path` with `flags` (O_* constants) plus O_NONBLOCK and O_NOCTTY (and O_NOFOLLOW), then fstat:
 * the handle and its stat, or a typed error (NOT_FOUND, ALREADY_EXISTS, FileTypeError, SymlinkRefusedError,
 * IO_ERROR). Never waits on a FIFO, a terminal or a socket.
 */
export async function openChecked(
  path: string,
  flags: number,
  opts: OpenCheckedOptions = {},
): Promise<{ handle: FileHandle; stat: BigIntStats }> {
  const kind = opts.kind ?? 'file';
  const action = opts.action ?? ((flags & constants.O_CREAT) !== 0 ? 'create' : 'open');
  const all = flags | constants.O_NONBLOCK | constants.O_NOCTTY | (opts.noFollow ? constants.O_NOFOLLOW : 0);
  let handle: FileHandle;
  try {
    handle = await open(path, all, opts.mode);
  } catch (err) {
    throw await openFailure(err, path, kind, action, opts.noFollow === true);
  }
  try {
    const st = await handle.stat({ bigint: true });
    if (!fits(st, kind)) throw new FileTypeError(path, fileTypeName(st), kind);
    return { handle, stat: st };
  } catch (err) {
    await handle.close().catch(() => undefined);
    throw fromSystemError(err, action, path);
  }
}

/** Why an open failed, as a typed error: ELOOP under O_NOFOLLOW is a symlink, ENXIO a FIFO or socket. */
async function openFailure(
  err: unknown,
  path: string,
  kind: FileKind,
  action: string,
  noFollow: boolean,
): Promise<TidemarkError> {
  const code = (err as NodeJS.ErrnoException)?.code;
  if (code === 'ELOOP' && noFollow) {
    const st = await lstat(path).catch(() => undefined);
    if (st?.isSymbolicLink()) return new SymlinkRefusedError(path);
  }
  if (code === 'ENXIO' || code === 'EISDIR') {
    // A FIFO opened for writing with no reader, a socket, a directory opened for writing.
    const st = await (noFollow ? lstat(path) : stat(path)).catch(() => undefined);
    if (st && !st.isFile()) return new FileTypeError(path, fileTypeName(st), kind);
  }
  return fromSystemError(err, action, path);
}

/**
 * Checks what `path` names without opening it (stat follows links, and never blocks on a FIFO): for checks
 * made before taking a lock, so that no lock is held while a suspicious path is opened.
 */
export async function checkFileType(path: string, kind: FileKind): Promise<void> {
  let st;
  try {
    st = await stat(path, { bigint: true });
  } catch (err) {
    throw fromSystemError(err, 'open', path);
  }
  if (!fits(st, kind)) throw new FileTypeError(path, fileTypeName(st), kind);
}

const READ_PIECE = 64 * 1024;

function tooLarge(path: string, size: bigint | number, maxBytes: number): TidemarkError {
  return new TidemarkError('LIMIT_EXCEEDED', `${path} holds ${size} bytes or more; at most ${maxBytes} are read`, {
    path,
    maxBytes,
  });
}

export interface ReadSmallFileOptions {
  /** Refuse (LIMIT_EXCEEDED) a file larger than this, before reading it. */
  maxBytes: number;
  /** Refuse a symbolic link as the last component. */
  noFollow?: boolean;
}

/**
 * The whole content of a small regular file whose content is input (a definition, host.json, a key file):
 * never blocks on a FIFO, never follows a link where asked, never allocates more than `maxBytes` + 1.
 */
export async function readSmallFile(path: string, opts: ReadSmallFileOptions): Promise<Buffer> {
  const { handle, stat: st } = await openChecked(path, constants.O_RDONLY, {
    kind: 'file',
    noFollow: opts.noFollow,
    action: 'read',
  });
  try {
    if (st.size > BigInt(opts.maxBytes)) throw tooLarge(path, st.size, opts.maxBytes);
    // Read in pieces up to one byte past the limit: a file that grows after fstat is still caught.
    const pieces: Buffer[] = [];
    let total = 0;
    for (;;) {
      const want = Math.min(READ_PIECE, opts.maxBytes + 1 - total);
      const piece = Buffer.allocUnsafe(want);
      const { bytesRead } = await handle.read(piece, 0, want, total);
      if (bytesRead === 0) break;
      pieces.push(piece.subarray(0, bytesRead));
      total += bytesRead;
      if (total > opts.maxBytes) throw tooLarge(path, total, opts.maxBytes);
    }
    return Buffer.concat(pieces, total);
  } catch (err) {
    throw fromSystemError(err, 'read', path);
  } finally {
    await handle.close();
  }
}
