/**
 * Who may reach the store's files, and which files the host may be pointed at.
 *
 * - Permissions: the store, its `vms` folder and every VM folder are 0700; disks, tracking files, definitions,
 *   `host.json` and `leases.json` are 0600, set explicitly after creation so that no umask widens them. A store
 *   made by an older Tidemark is tightened when the host opens it.
 * - Confinement: a disk given to the host (a VM's attached disk) must lie in the store or in a directory the
 *   host was started with (`--allow-disk-dir`), also once symbolic links are resolved; anything else is
 *   PATH_NOT_ALLOWED before a file is opened or a tracking file written beside it.
 */
import { chmod, lstat, mkdir, readdir, realpath } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';

export const PRIVATE_DIR_MODE = 0o700;
export const PRIVATE_FILE_MODE = 0o600;

/** Creates a directory (and its missing parents) and makes the directory itself 0700. */
export async function privateDir(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true, mode: PRIVATE_DIR_MODE });
  await chmod(dir, PRIVATE_DIR_MODE);
}

/** Makes files the host created 0600 (missing ones are skipped: tracking files of a disk without tracking). */
export async function privateFiles(...files: string[]): Promise<void> {
  for (const f of files) {
    await chmod(f, PRIVATE_FILE_MODE).catch((err: NodeJS.ErrnoException) => {
      if (err.code !== 'ENOENT') throw err;
    });
  }
}

/**
 * Tightens a store: the store, `vms`, each VM folder and its `disks` folder to 0700, the regular files in them
 * to 0600 (symbolic links are left alone). Returns how many modes it changed.
 */
export async function tightenStore(store: string): Promise<number> {
  let changed = 0;
  const fix = async (p: string, mode: number, dir: boolean) => {
    const st = await lstat(p).catch(() => undefined);
    if (!st || st.isSymbolicLink() || st.isDirectory() !== dir || (!dir && !st.isFile())) return;
    if ((st.mode & 0o777) !== mode) {
      await chmod(p, mode);
      changed++;
    }
  };
  await fix(store, PRIVATE_DIR_MODE, true);
  for (const f of ['host.json', 'leases.json']) await fix(path.join(store, f), PRIVATE_FILE_MODE, false);
  const vms = path.join(store, 'vms');
  await fix(vms, PRIVATE_DIR_MODE, true);
  for (const name of await readdir(vms).catch(() => [] as string[])) {
    const vmDir = path.join(vms, name);
    await fix(vmDir, PRIVATE_DIR_MODE, true);
    for (const f of await readdir(vmDir).catch(() => [] as string[])) {
      await fix(path.join(vmDir, f), PRIVATE_FILE_MODE, false);
    }
    const disks = path.join(vmDir, 'disks');
    await fix(disks, PRIVATE_DIR_MODE, true);
    for (const f of await readdir(disks).catch(() => [] as string[])) {
      await fix(path.join(disks, f), PRIVATE_FILE_MODE, false);
    }
  }
  return changed;
}

function within(p: string, root: string): boolean {
  return p === root || p.startsWith(root.endsWith(path.sep) ? root : root + path.sep);
}

/** Where disks may come from: the store and the directories the host was started with. */
export class DiskPathPolicy {
  private constructor(
    readonly store: string,
    /** As given (absolute). */
    readonly allowedDirs: string[],
    /** The same, symbolic links resolved. */
    private readonly realRoots: string[],
  ) {}

  static async create(store: string, allowedDirs: string[]): Promise<DiskPathPolicy> {
    const dirs = [...new Set(allowedDirs.map((d) => path.resolve(d)))];
    const real: string[] = [await realpath(store)];
    for (const d of dirs) {
      let r: string;
      try {
        r = await realpath(d);
      } catch {
        throw new TidemarkError('NOT_FOUND', `allowed disk directory ${d} does not exist`);
      }
      if (!(await lstat(r)).isDirectory()) {
        throw new TidemarkError('INVALID_ARGUMENT', `allowed disk directory ${d} is not a directory`);
      }
      real.push(r);
    }
    return new DiskPathPolicy(store, dirs, real);
  }

  private describe(): string {
    const where =
      this.allowedDirs.length === 0
        ? `the host's store ${this.store}`
        : `the host's store ${this.store} and its allowed disk directories (${this.allowedDirs.join(', ')})`;
    return `${where}; start the host with --allow-disk-dir DIR to allow another directory`;
  }

  /**
   * The absolute path of a disk a client names (relative paths are relative to the store), once it is known
   * to lie in an allowed place: PATH_NOT_ALLOWED before anything is opened, NOT_FOUND when it does not exist.
   */
  async check(p: string): Promise<string> {
    const abs = path.resolve(this.store, p);
    const lexical = [this.store, ...this.allowedDirs];
    if (!lexical.some((r) => within(abs, r))) {
      throw new TidemarkError('PATH_NOT_ALLOWED', `disk ${abs} is outside ${this.describe()}`, { path: abs });
    }
    let real: string;
    try {
      real = await realpath(abs);
    } catch {
      throw new TidemarkError('NOT_FOUND', `disk ${abs} does not exist`, { path: abs });
    }
    if (!this.realRoots.some((r) => within(real, r))) {
      throw new TidemarkError(
        'PATH_NOT_ALLOWED',
        `disk ${abs} resolves (through a symbolic link) to ${real}, outside ${this.describe()}`,
        { path: abs },
      );
    }
    return abs;
  }
}
