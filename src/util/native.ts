/**
 * The native addon (native/fs, built by `npm run build:native`): the file-system calls Node has no
 * binding for. It is required: image locks (image-lock.ts) keep other writers off the disks Tidemark has
 * open. One addon, one C file per concern (seek.c, lock.c, watch.c, crc32c.c); this module is the only place that
 * loads it.
 */
import { createRequire } from 'node:module';
import { TidemarkError } from '../errors.js';

/** Lock types of setLock/testLock. */
export const LOCK_UNLOCK = 0;
export const LOCK_SHARED = 1;
export const LOCK_EXCLUSIVE = 2;

/** A lock in the way, as F_OFD_GETLK reports it (`pid` is -1 for an OFD lock, the owner for a POSIX lock). */
export interface LockConflict {
  type: typeof LOCK_SHARED | typeof LOCK_EXCLUSIVE;
  start: number;
  length: number;
  pid: number;
}

export interface NativeFs {
  /** seek.c: data extents of `fd` in [start, end) as [offset0, length0, offset1, length1, ...]. */
  dataExtents(fd: number, end: number, start?: number): number[];
  /** lock.c: F_OFD_SETLK (non-blocking); false when another open file description's lock is in the way. */
  setLock(fd: number, start: number, length: number, type: number): boolean;
  /** lock.c: F_OFD_GETLK: null when the lock could be taken now, else the first lock in the way. */
  testLock(fd: number, start: number, length: number, type: number): LockConflict | null;
  /** lock.c: F_DUPFD_CLOEXEC: a second descriptor of the same open file description. */
  dupFd(fd: number): number;
  /** watch.c: a fanotify group ("fid": events carry file handles, unprivileged; "fd": classic, root). */
  watchInit(): { fd: number; mode: 'fid' | 'fd' };
  /** watch.c: marks `path` (FAN_OPEN, FAN_CLOSE_WRITE); returns the key its events will carry. */
  watchAdd(fd: number, mode: string, path: string): string;
  /** watch.c: removes the mark of `path` (a file already gone has none). */
  watchRemove(fd: number, mode: string, path: string): void;
  /** watch.c: the queued events, non-blocking, as [mask, pid, key, mask, pid, key, ...]. */
  watchDrain(fd: number, mode: string): (number | string)[];
  /** crc32c.c: the CRC-32C of `data` continued from `crc` (0 to start); `portable`: the table, not the instruction. */
  crc32c(data: Uint8Array, crc: number, portable?: boolean): number;
}

// Same relative path from src/util (tests) and dist/util (the CLI).
const ADDON_PATH = '../../native/fs/build/Release/tidemark_fs.node';
let loaded: NativeFs | undefined;
let failure: string | undefined;

/** The addon; throws NOT_SUPPORTED, saying how to build it, when it is not built or does not load. */
export function nativeFs(): NativeFs {
  if (loaded) return loaded;
  if (failure === undefined) {
    try {
      loaded = createRequire(import.meta.url)(ADDON_PATH) as NativeFs;
      return loaded;
    } catch (err) {
      failure = (err as Error).message.split('\n')[0];
    }
  }
  throw new TidemarkError(
    'NOT_SUPPORTED',
    `the native addon native/fs is not built or does not load (${failure}); build it: npm run build:native`,
  );
}
