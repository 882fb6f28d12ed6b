/**
 * The "hardware" provider: the file system makes the snapshot. `commit` clones every file of the set into
 * the snapshot's directory with FICLONE (XFS made with reflink=1, btrfs): the clone shares the file's
 * extents, and the file system copies on write from then on, whoever writes (other processes too).
 * Where the file system cannot clone, it says so and refuses: it never falls back to copying, which would
 * make the instant as long as the copy.
 *
 * Clones live in `<diffAreaRoot>/reflink-<pid>-<id>/<n>-<name>`, so diffAreaRoot must be on the same file
 * system as the files (on btrfs: the same subvolume, as st_dev tells them apart).
 */
import { constants } from 'node:fs';
import { copyFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, fromSystemError } from '../errors.js';
import { NodeFile } from '../util/file.js';
import { checkFiles, checkRoot, createArea, normalizeFiles, recoverAreas, removeArea, usableRoot } from './area.js';
import type {
  PreparedSnapshot,
  SnapshotOptions,
  SnapshotProvider,
  SnapshotStats,
  StorageSnapshot,
} from './provider.js';
import { PendingWork, SnapshotView, releasedError, type ViewOwner } from './view.js';

/** errno values by which a file system (or a pair of them) says it cannot clone. */
const CANNOT_CLONE = new Set(['ENOTSUP', 'EOPNOTSUPP', 'ENOSYS', 'ENOTTY', 'EINVAL', 'EXDEV']);

function cloneRefusal(root: string, err: unknown): string {
  const code = (err as NodeJS.ErrnoException).code ?? 'error';
  return (
    `the file system of ${root} cannot clone files (${code}): reflink needs XFS made with ` +
    '`mkfs.xfs -m reflink=1`, or btrfs'
  );
}

export class ReflinkProvider implements SnapshotProvider {
  readonly name = 'reflink';

  async supports(files: string[], opts: SnapshotOptions): Promise<string | undefined> {
    let paths: string[];
    let root: string;
    try {
      paths = normalizeFiles(files);
      root = checkRoot(opts);
    } catch (err) {
      return (err as Error).message;
    }
    let devs: Map<string, bigint>;
    try {
      devs = await checkFiles(paths);
    } catch (err) {
      return (err as Error).message;
    }
    const unusable = await usableRoot(root);
    if (unusable) return unusable;
    const rootDev = (await stat(root, { bigint: true })).dev;
    for (const [p, dev] of devs) {
      if (dev !== rootDev)
        return `${p} is on another file system than ${root}: a clone cannot leave its file system (btrfs: its subvolume)`;
    }
    // Probe in an area of its own, so a crash mid-probe leaves something recover() removes.
    const probe = await createArea(root, this.name, []);
    try {
      const src = path.join(probe.dir, 'probe');
      await writeFile(src, 'tidemark reflink probe\n');
      await copyFile(src, `${src}.clone`, constants.COPYFILE_FICLONE_FORCE);
      return undefined;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code ?? '';
      return CANNOT_CLONE.has(code) ? cloneRefusal(root, err) : `cannot probe reflink in ${root}: ${String(err)}`;
    } finally {
      await removeArea(probe.dir);
    }
  }

  async prepare(files: string[], opts: SnapshotOptions): Promise<PreparedSnapshot> {
    const paths = normalizeFiles(files);
    const root = checkRoot(opts);
    await checkFiles(paths); // a missing file is NOT_FOUND, not a file system that cannot clone
    const reason = await this.supports(paths, opts);
    if (reason) throw new TidemarkError('NOT_SUPPORTED', reason, { provider: this.name });
    const area = await createArea(root, this.name, paths);
    return new ReflinkPrepared(area.id, area.dir, paths);
  }

  async recover(opts: SnapshotOptions): Promise<number> {
    return recoverAreas(checkRoot(opts), this.name);
  }
}

class ReflinkPrepared implements PreparedSnapshot {
  private state: 'prepared' | 'committing' | 'committed' | 'aborted' = 'prepared';

  constructor(
    private readonly id: string,
    private readonly dir: string,
    private readonly paths: string[],
  ) {}

  async commit(): Promise<StorageSnapshot> {
    if (this.state !== 'prepared')
      throw new TidemarkError('CLOSED', `snapshot ${this.id} was already ${this.state}`, { snapshot: this.id });
    this.state = 'committing';
    const clones = this.paths.map((p, i) => path.join(this.dir, `${i}-${path.basename(p).slice(0, 200)}`));
    try {
      // The instant: all clones at once (the caller holds writes to the set meanwhile). All settle
      // before a failure is reported, so no clone is still being made while the directory goes.
      const settled = await Promise.allSettled(
        this.paths.map(async (p, i) => {
          try {
            await copyFile(p, clones[i], constants.COPYFILE_FICLONE_FORCE);
          } catch (err) {
            const code = (err as NodeJS.ErrnoException).code ?? '';
            if (CANNOT_CLONE.has(code))
              throw new TidemarkError('NOT_SUPPORTED', `cannot clone ${p}: ${cloneRefusal(this.dir, err)}`, {
                path: p,
              });
            throw fromSystemError(err, 'clone', p);
          }
        }),
      );
      const failed = settled.find((s) => s.status === 'rejected');
      if (failed) throw failed.reason;
    } catch (err) {
      this.state = 'aborted';
      await removeArea(this.dir);
      throw err;
    }
    this.state = 'committed';
    return new ReflinkSnapshot(this.id, this.dir, this.paths, clones);
  }

  async abort(): Promise<void> {
    if (this.state === 'aborted') return;
    if (this.state !== 'prepared')
      throw new TidemarkError('CONFLICT', `snapshot ${this.id} is ${this.state}: release it instead of aborting`);
    this.state = 'aborted';
    await removeArea(this.dir);
  }
}

class ReflinkSnapshot implements StorageSnapshot, ViewOwner {
  readonly provider = 'reflink';
  readonly createdAt = new Date();
  private readonly clones = new Map<string, string>();
  private readonly open = new Set<NodeFile>();
  private readonly work = new PendingWork();
  private released = false;
  private releasing: Promise<void> | undefined;

  constructor(
    readonly id: string,
    private readonly dir: string,
    readonly files: readonly string[],
    clones: string[],
  ) {
    files.forEach((f, i) => this.clones.set(f, clones[i]));
  }

  assertReadable(): void {
    if (this.released) throw releasedError(this.id);
  }

  track<T>(p: Promise<T>): Promise<T> {
    return this.work.track(p);
  }

  async openFile(p: string): Promise<SnapshotView> {
    this.assertReadable();
    const abs = path.resolve(p);
    const clone = this.clones.get(abs);
    if (!clone)
      throw new TidemarkError('NOT_FOUND', `${abs} is not in snapshot ${this.id}`, { path: abs, snapshot: this.id });
    const file = await this.track(NodeFile.open(clone, 'r'));
    if (this.released) {
      await file.close();
      throw releasedError(this.id);
    }
    this.open.add(file);
    return new SnapshotView(
      this,
      abs,
      file.size(),
      (buf, position) => file.read(buf, position),
      async () => {
        if (this.open.delete(file)) await file.close();
      },
      (offset, length) => file.dataExtents(offset, length),
    );
  }

  stats(): SnapshotStats {
    // The clones share the files' extents; what the file system copies on write is not visible from here.
    return { diffAreaBytes: 0, preservedExtents: 0 };
  }

  release(): Promise<void> {
    this.releasing ??= this.doRelease();
    return this.releasing;
  }

  private async doRelease(): Promise<void> {
    this.released = true;
    await this.work.drain();
    await Promise.all([...this.open].map((f) => f.close().catch(() => undefined)));
    this.open.clear();
    await removeArea(this.dir);
  }
}
