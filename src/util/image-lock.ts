/**
 * QEMU-compatible image locks (QEMU's block/file-posix.c), so that QEMU's tools and Tidemark keep out of
 * each other's open disks. QEMU describes a user of an image by the permissions it takes (BLK_PERM_* of
 * include/block/block-common.h) and the ones it shares with others, and marks both in the file with OFD
 * byte-range locks, all of them shared (F_RDLCK) locks of one byte:
 *
 * - byte 100 + i (RAW_LOCK_PERM_BASE): "I use permission i";
 * - byte 200 + i (RAW_LOCK_SHARED_BASE): "I do not share permission i".
 *
 * Before claiming them a user tests (F_OFD_GETLK, as an exclusive lock) that nobody holds byte 200 + i of
 * a permission it uses, nor byte 100 + i of a permission it does not share (raw_check_lock_bytes). The
 * bytes are locked first and tested after, so two users racing both see each other and both back off.
 *
 * Tidemark takes exactly what QEMU's tools take on a VHDX file (observed with qemu-io / qemu-nbd 7.2):
 * - a writer: consistent read, write and resize (bytes 100, 101, 103), and it shares neither write nor
 *   resize (bytes 201, 203); `qemu-io`, `qemu-img` and `qemu-nbd` then fail to open it with QEMU's own
 *   "Failed to get "write" lock" / "Failed to get shared "write" lock";
 * - a reader: consistent read (byte 100), sharing neither write nor resize (201, 203), as `qemu-img info`
 *   without -U does: writers are kept out, other readers are welcome. QEMU's force-share (-U) readers take
 *   byte 100 only and test nothing that Tidemark holds, so `qemu-img info -U` works on an open disk.
 *
 * OFD locks belong to an open file description: two descriptions of one file in one process conflict like
 * two processes would. So each file (by dev:ino) has one lock descriptor per process, a duplicate made at
 * the first open, holding the union of what this process's users need; users are counted and the
 * descriptor is closed (every lock released) when the last one goes. Locks cost nothing on the I/O path:
 * they are taken at open and dropped at close; a crash drops them with the process.
 */
import { closeSync } from 'node:fs';
import { TidemarkError } from '../errors.js';
import { describeLockHolder, findLockHolder } from './lock-holder.js';
import { LOCK_EXCLUSIVE, LOCK_SHARED, LOCK_UNLOCK, nativeFs, type LockConflict } from './native.js';

/** BLK_PERM_* of QEMU (include/block/block-common.h); bit i is locked at byte 100 + i and 200 + i. */
export const BLK_PERM_CONSISTENT_READ = 0x01;
export const BLK_PERM_WRITE = 0x02;
export const BLK_PERM_WRITE_UNCHANGED = 0x04;
export const BLK_PERM_RESIZE = 0x08;
const BLK_PERM_COUNT = 4;
/** QEMU's bdrv_perm_names(), used in its (and our) error messages. */
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];

export const RAW_LOCK_PERM_BASE = 100;
export const RAW_LOCK_SHARED_BASE = 200;

export type ImageLockMode = 'reader' | 'writer';

/** What a user takes (`perm`) and what it does not share with other users (`unshared`). */
export interface ImagePermissions {
  perm: number;
  unshared: number;
}

export const IMAGE_LOCK_PERMISSIONS: Readonly<Record<ImageLockMode, Readonly<ImagePermissions>>> = {
  reader: { perm: BLK_PERM_CONSISTENT_READ, unshared: BLK_PERM_WRITE | BLK_PERM_RESIZE },
  writer: {
    perm: BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE | BLK_PERM_RESIZE,
    unshared: BLK_PERM_WRITE | BLK_PERM_RESIZE,
  },
};

/** The lock bytes that mark `p`, ascending. */
export function lockBytes(p: ImagePermissions): number[] {
  const out: number[] = [];
  for (let i = 0; i < BLK_PERM_COUNT; i++) if (p.perm & (1 << i)) out.push(RAW_LOCK_PERM_BASE + i);
  for (let i = 0; i < BLK_PERM_COUNT; i++) if (p.unshared & (1 << i)) out.push(RAW_LOCK_SHARED_BASE + i);
  return out;
}

/** A held image lock: one user's claim on the file's process-wide lock descriptor. */
export interface ImageLock {
  readonly mode: ImageLockMode;
  /** Takes `mode`'s permissions instead (a writer turned into a read-only parent). LOCKED when refused. */
  setMode(mode: ImageLockMode): Promise<void>;
  /** Gives the claim up; the last user's release closes the lock descriptor. Idempotent. */
  release(): void;
}

interface Refusal {
  byte: number;
  what: string;
  conflict: LockConflict | null;
}

class LockedFile {
  held: ImagePermissions = { perm: 0, unshared: 0 };
  readonly users = new Map<object, ImageLockMode>();

  constructor(
    /** The process's lock descriptor of the file (a duplicate of its first open's). */
    readonly fd: number,
    readonly file: { dev: bigint; ino: bigint },
  ) {}

  wanted(extra?: ImageLockMode): ImagePermissions {
    const out = { perm: 0, unshared: 0 };
    for (const m of [...this.users.values(), ...(extra ? [extra] : [])]) {
      out.perm |= IMAGE_LOCK_PERMISSIONS[m].perm;
      out.unshared |= IMAGE_LOCK_PERMISSIONS[m].unshared;
    }
    return out;
  }

  /**
   * Holds exactly `want`: locks the new bytes, tests for conflicts as QEMU does, unlocks what is no longer
   * wanted. On a conflict (or a failing fcntl) everything is left as it was. Synchronous: no other open of
   * this process can interleave.
   */
  apply(want: ImagePermissions): Refusal | undefined {
    const have = new Set(lockBytes(this.held));
    const need = lockBytes(want);
    const added: number[] = [];
    let refusal: Refusal | undefined;
    try {
      refusal = this.lockNew(need, have, added);
      // Nothing new claimed (a user left, a writer became a reader): nothing to test.
      if (!refusal && added.length > 0) refusal = this.conflict(want);
    } catch (err) {
      this.unlock(added);
      throw err;
    }
    if (refusal) {
      this.unlock(added);
      return refusal;
    }
    this.unlock([...have].filter((b) => !need.includes(b)));
    this.held = want;
    return undefined;
  }

  /** Takes the shared locks of `need` not in `have`, noting each in `added`; a byte someone holds exclusively refuses. */
  private lockNew(need: number[], have: Set<number>, added: number[]): Refusal | undefined {
    const native = nativeFs();
    for (const b of need) {
      if (have.has(b)) continue;
      if (!native.setLock(this.fd, b, 1, LOCK_SHARED))
        return { byte: b, what: `failed to lock byte ${b}`, conflict: native.testLock(this.fd, b, 1, LOCK_SHARED) };
      added.push(b);
    }
    return undefined;
  }

  /**
   * QEMU's raw_check_lock_bytes: nobody else may hold the "not shared" byte of a permission `want` uses, nor
   * the permission byte of one it does not share. (This description's own locks never conflict.)
   */
  private conflict(want: ImagePermissions): Refusal | undefined {
    const native = nativeFs();
    for (let i = 0; i < BLK_PERM_COUNT; i++) {
      if (!(want.perm & (1 << i))) continue;
      const conflict = native.testLock(this.fd, RAW_LOCK_SHARED_BASE + i, 1, LOCK_EXCLUSIVE);
      if (conflict) return { byte: RAW_LOCK_SHARED_BASE + i, what: `failed to get "${PERM_NAMES[i]}" lock`, conflict };
    }
    for (let i = 0; i < BLK_PERM_COUNT; i++) {
      if (!(want.unshared & (1 << i))) continue;
      const conflict = native.testLock(this.fd, RAW_LOCK_PERM_BASE + i, 1, LOCK_EXCLUSIVE);
      if (conflict)
        return { byte: RAW_LOCK_PERM_BASE + i, what: `failed to get shared "${PERM_NAMES[i]}" lock`, conflict };
    }
    return undefined;
  }

  private unlock(bytes: number[]): void {
    for (const b of bytes) nativeFs().setLock(this.fd, b, 1, LOCK_UNLOCK);
  }
}

/** Lock descriptors of this process by file identity (dev:ino). */
const registry = new Map<string, LockedFile>();

/** What this process holds on the file `identity` (dev:ino): for tests and diagnostics. */
export function imageLockState(identity: string): { users: number; bytes: number[] } | undefined {
  const f = registry.get(identity);
  return f && { users: f.users.size, bytes: lockBytes(f.held) };
}

async function refusalError(path: string, mode: ImageLockMode, f: LockedFile, r: Refusal): Promise<TidemarkError> {
  let holder: string;
  try {
    const pid = await findLockHolder(f.file, r.byte, r.conflict?.pid);
    holder = pid === undefined ? 'another process' : await describeLockHolder(pid, path);
  } catch {
    holder = 'another process';
  }
  return new TidemarkError(
    'LOCKED',
    `cannot open ${path} for ${mode === 'writer' ? 'writing' : 'reading'}: ${r.what}: held by ${holder}`,
    { path, byte: r.byte, holder },
  );
}

/**
 * Takes the image locks of `mode` on the open file `fd` (whose fstat is `st`), or throws LOCKED naming the
 * holder. Opens of the same file elsewhere in this process share one lock descriptor and never refuse
 * each other.
 */
export async function lockImage(
  fd: number,
  st: { dev: bigint; ino: bigint },
  path: string,
  mode: ImageLockMode,
): Promise<ImageLock> {
  const key = `${st.dev}:${st.ino}`;
  let f = registry.get(key);
  const fresh = !f;
  let refused: Refusal | undefined;
  try {
    if (!f) f = new LockedFile(nativeFs().dupFd(fd), { dev: st.dev, ino: st.ino });
    refused = f.apply(f.wanted(mode));
  } catch (err) {
    if (fresh && f) closeSync(f.fd);
    throw err instanceof TidemarkError
      ? err
      : new TidemarkError('IO_ERROR', `cannot lock ${path}: ${(err as Error).message}`, { path }, { cause: err });
  }
  if (refused) {
    if (fresh) closeSync(f.fd);
    throw await refusalError(path, mode, f, refused);
  }
  const entry = f;
  const token = {};
  entry.users.set(token, mode);
  registry.set(key, entry);
  let current = mode;
  let released = false;
  return {
    get mode() {
      return current;
    },
    async setMode(next: ImageLockMode) {
      if (released || next === current) return;
      const before = current;
      entry.users.set(token, next);
      const r = entry.apply(entry.wanted());
      if (r) {
        entry.users.set(token, before);
        throw await refusalError(path, next, entry, r);
      }
      current = next;
    },
    release() {
      if (released) return;
      released = true;
      entry.users.delete(token);
      if (entry.users.size > 0) {
        entry.apply(entry.wanted());
        return;
      }
      registry.delete(key);
      closeSync(entry.fd); // the last descriptor of this description: the kernel drops its locks
    },
  };
}
