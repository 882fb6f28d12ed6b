/**
 * The embedded default backend: objects are files under a root directory, the key is the relative path.
 * put() writes a temporary file in `ROOT/.tmp/` (large ones from allocate()'d memory with O_DIRECT, past the page
 * cache: see util/direct-io.ts), makes it durable (fdatasync), then renames it over the key: a
 * reader or a crash sees the old object or the new one, never part of one. Directory entries become durable at
 * sync() (or at once with `{ sync: true }`), so a backup pays one directory fsync per directory, not per chunk.
 * A `deferred` put (chunks) is staged instead: this process reads it at once under its key, but it takes its
 * place only at the next sync(), after the data of the whole batch is durable (one syncfs of the file system,
 * per-file fdatasync where syncfs is missing). A crash leaves only temporary files (sweepTemporary removes
 * them), never a torn object under a key — so a later backup can never deduplicate against a damaged chunk.
 */
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { constants, type Dirent } from 'node:fs';
import { lstat, mkdir, open, readdir, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, fromSystemError } from '../errors.js';
import { forEachBounded } from '../util/bounded.js';
import { DirectWriter } from '../util/direct-io.js';
import { FileTypeError, openChecked } from '../util/safe-open.js';
import {
  checkKey,
  checkPrefix,
  isKeySegment,
  type Backend,
  type GetOptions,
  type ListOptions,
  type ObjectInfo,
  type PutOptions,
} from './backend.js';

const TMP = '.tmp';
/** Staged objects made durable and put in place together once this many wait (bounds memory and loss). */
const MAX_STAGED = 4096;

export class LocalBackend implements Backend {
  readonly location: string;
  private readonly tmpDir: string;
  private readonly knownDirs = new Set<string>();
  private dirtyDirs = new Set<string>();
  /** key → temporary file written but not yet durable nor in place. */
  private staged = new Map<string, string>();
  private syncing: Promise<void> | undefined;
  /** large puts from allocate()'d memory skip the page cache */
  private readonly direct: DirectWriter;

  constructor(root: string) {
    this.location = path.resolve(root);
    this.tmpDir = path.join(this.location, TMP);
    this.direct = new DirectWriter(this.tmpDir);
  }

  /** Memory aligned for direct writes (when the file system takes them): a pack put from it skips the page cache. */
  async allocate(size: number): Promise<Buffer> {
    await this.ensureDir(this.tmpDir);
    return this.direct.buffer(size);
  }

  private pathOf(key: string): string {
    checkKey(key);
    return path.join(this.location, ...key.split('/'));
  }

  async get(key: string, opts: GetOptions = {}): Promise<Buffer> {
    const file = this.staged.get(key) ?? this.pathOf(key);
    let fh;
    let st;
    try {
      // Never through a link, never waiting on a FIFO: an object is a regular file under the root.
      ({ handle: fh, stat: st } = await openChecked(file, constants.O_RDONLY, { noFollow: true, action: 'read' }));
    } catch (err) {
      // A directory is a "folder" of keys, not an object.
      if (err instanceof FileTypeError && err.type === 'directory')
        throw new TidemarkError('NOT_FOUND', `no object ${key} in ${this.location}`, { key });
      throw this.notFoundOr(err, 'read', key);
    }
    try {
      const start = opts.range?.offset ?? 0;
      const fileSize = Number(st.size);
      const size = opts.range ? Math.max(0, Math.min(opts.range.length, fileSize - start)) : fileSize;
      const claimed = opts.range ? opts.range.length : fileSize;
      if (opts.maxBytes !== undefined && claimed > opts.maxBytes) {
        throw new TidemarkError(
          'LIMIT_EXCEEDED',
          `${opts.range ? 'a read of' : 'object'} ${key} is ${claimed} bytes, more than the ${opts.maxBytes} it may have`,
          { key, size: claimed, maxBytes: opts.maxBytes },
        );
      }
      const buf = opts.into && opts.into.length >= size ? opts.into.subarray(0, size) : Buffer.allocUnsafe(size);
      let done = 0;
      while (done < buf.length) {
        const { bytesRead } = await fh.read(buf, done, buf.length - done, start + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
      // A file that shrank under us reads short: hand back what is there, the envelope check names it truncated.
      return done === buf.length ? buf : buf.subarray(0, done);
    } catch (err) {
      throw fromSystemError(err, 'read', path.join(this.location, key));
    } finally {
      await fh.close();
    }
  }

  async put(key: string, data: Uint8Array, opts: PutOptions = {}): Promise<void> {
    const file = this.pathOf(key);
    await this.ensureDir(this.tmpDir);
    const tmp = path.join(this.tmpDir, `${randomBytes(12).toString('hex')}.tmp`);
    const deferred = opts.deferred === true && !opts.sync;
    try {
      await this.direct.writeNewFile(tmp, data, !deferred);
      if (!deferred) {
        await this.ensureDir(path.dirname(file));
        await rename(tmp, file);
      }
    } catch (err) {
      await unlink(tmp).catch(() => undefined);
      throw fromSystemError(err, 'write', path.join(this.location, key));
    }
    if (deferred) {
      const previous = this.staged.get(key);
      this.staged.set(key, tmp);
      if (previous) await unlink(previous).catch(() => undefined);
      if (this.staged.size >= MAX_STAGED) await this.sync();
      return;
    }
    const previous = this.staged.get(key);
    if (previous) {
      this.staged.delete(key);
      await unlink(previous).catch(() => undefined);
    }
    this.dirtyDirs.add(path.dirname(file));
    if (opts.sync) await this.sync();
  }

  async delete(key: string): Promise<void> {
    const file = this.pathOf(key);
    const staged = this.staged.get(key);
    if (staged) {
      this.staged.delete(key);
      await unlink(staged).catch(() => undefined);
    }
    try {
      await unlink(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
      throw fromSystemError(err, 'delete', file);
    }
    this.dirtyDirs.add(path.dirname(file));
  }

  async exists(key: string): Promise<boolean> {
    return (await this.stat(key)) !== null;
  }

  async stat(key: string): Promise<ObjectInfo | null> {
    const file = this.staged.get(key) ?? this.pathOf(key);
    try {
      // lstat: a link is not an object (get refuses to follow it).
      const st = await lstat(file);
      return st.isFile() ? { key, size: st.size, mtimeMs: st.mtimeMs } : null;
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return null;
      throw fromSystemError(err, 'stat', file);
    }
  }

  async *list(prefix: string, opts: ListOptions = {}): AsyncIterable<ObjectInfo> {
    checkPrefix(prefix);
    const slash = prefix.lastIndexOf('/');
    const base = slash < 0 ? '' : prefix.slice(0, slash);
    const seen = new Set<string>();
    for (const [key, tmp] of [...this.staged]) {
      if (!key.startsWith(prefix)) continue;
      const info = await stat(tmp).catch(() => undefined);
      if (info) {
        seen.add(key);
        yield { key, size: info.size, mtimeMs: info.mtimeMs };
      }
    }
    for await (const info of this.walk(base, prefix, opts.unusable === true)) if (!seen.has(info.key)) yield info;
  }

  /**
   * The entries under `dirKey` whose keys start with `prefix`. Types come from the directory entry and lstat,
   * never from following a link: a symlink is not an object whatever it points at.
   */
  private async *walk(dirKey: string, prefix: string, unusable: boolean): AsyncIterable<ObjectInfo> {
    const dir = dirKey ? path.join(this.location, ...dirKey.split('/')) : this.location;
    let entries;
    try {
      entries = await readdir(dir, { withFileTypes: true });
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return;
      throw fromSystemError(err, 'list', dir);
    }
    for (const e of entries) {
      // Hidden names (.tmp) and names that cannot be keys are not objects, and never listed.
      if (e.name.startsWith('.') || !isKeySegment(e.name)) continue;
      const key = dirKey ? `${dirKey}/${e.name}` : e.name;
      if (e.isDirectory()) {
        if (unusable && key.startsWith(prefix)) yield { key, size: 0, mtimeMs: 0, unusable: 'a directory' };
        // Descend only where keys under this directory can still match the prefix.
        if (prefix.startsWith(`${key}/`) || key.startsWith(prefix)) yield* this.walk(key, prefix, unusable);
      } else if (key.startsWith(prefix)) {
        const file = path.join(dir, e.name);
        const st = e.isFile() ? await lstat(file).catch(() => undefined) : undefined;
        if (st?.isFile()) yield { key, size: st.size, mtimeMs: st.mtimeMs };
        else if (unusable && (st || !e.isFile())) {
          yield { key, size: 0, mtimeMs: 0, unusable: describeEntry(st ?? e) };
        }
      }
    }
  }

  async sync(): Promise<void> {
    // One sync at a time; a caller arriving during one waits and then syncs what it staged.
    while (this.syncing) await this.syncing;
    this.syncing = this.syncNow().finally(() => (this.syncing = undefined));
    return this.syncing;
  }

  private async syncNow(): Promise<void> {
    const batch = [...this.staged];
    if (batch.length > 0) {
      await this.makeDurable(batch.map(([, tmp]) => tmp));
      for (const [key, tmp] of batch) {
        const file = this.pathOf(key);
        await this.ensureDir(path.dirname(file));
        try {
          await rename(tmp, file);
        } catch (err) {
          throw fromSystemError(err, 'write', file);
        }
        if (this.staged.get(key) === tmp) this.staged.delete(key);
        this.dirtyDirs.add(path.dirname(file));
      }
    }
    const dirs = [...this.dirtyDirs];
    this.dirtyDirs = new Set();
    for (const d of dirs) {
      try {
        const fh = await open(d, 'r');
        try {
          await fh.sync();
        } finally {
          await fh.close();
        }
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code === 'ENOENT') continue;
        throw fromSystemError(err, 'flush', d);
      }
    }
  }

  /** The data of these files durable: syncfs of the file system (coreutils `sync -f`), else each file. */
  private async makeDurable(files: string[]): Promise<void> {
    if (files.length > 8) {
      const ok = await new Promise<boolean>((resolve) => execFile('sync', ['-f', this.tmpDir], (err) => resolve(!err)));
      if (ok) return;
    }
    try {
      await forEachBounded(files, 16, async (f) => {
        const fh = await open(f, 'r+');
        try {
          await fh.datasync();
        } finally {
          await fh.close();
        }
      });
    } catch (err) {
      throw fromSystemError(err, 'flush', this.tmpDir);
    }
  }

  async sweepTemporary(olderThanMs: number): Promise<number> {
    let names: string[];
    try {
      names = await readdir(this.tmpDir);
    } catch {
      return 0;
    }
    let removed = 0;
    const cutoff = Date.now() - olderThanMs;
    for (const n of names) {
      const f = path.join(this.tmpDir, n);
      try {
        if ((await stat(f)).mtimeMs < cutoff) {
          await unlink(f);
          removed++;
        }
      } catch {
        // gone already
      }
    }
    return removed;
  }

  async close(): Promise<void> {
    await this.sync();
    await this.direct.close();
  }

  /** mkdir -p; a directory it creates is a new entry in its parent, which must become durable too. */
  private async ensureDir(dir: string): Promise<void> {
    if (this.knownDirs.has(dir)) return;
    let first: string | undefined;
    try {
      first = await mkdir(dir, { recursive: true, mode: 0o700 });
    } catch (err) {
      throw fromSystemError(err, 'create directory', dir);
    }
    if (first !== undefined) {
      for (let d = dir; ; d = path.dirname(d)) {
        this.dirtyDirs.add(path.dirname(d));
        if (d === first || d === path.dirname(d)) break;
      }
    }
    this.knownDirs.add(dir);
  }

  private notFoundOr(err: unknown, action: string, key: string): TidemarkError {
    // A system error, or one openChecked already typed (its errno is in the details).
    const code = err instanceof TidemarkError ? err.details.errno : (err as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      return new TidemarkError('NOT_FOUND', `no object ${key} in ${this.location}`, { key }, { cause: err });
    }
    return fromSystemError(err, action, path.join(this.location, key));
  }
}

/** What a directory entry that is not a regular file is, for damage reports. */
function describeEntry(e: Pick<Dirent, 'isDirectory' | 'isSymbolicLink' | 'isFIFO' | 'isSocket'>): string {
  if (e.isSymbolicLink()) return 'a symbolic link';
  if (e.isFIFO()) return 'a FIFO';
  if (e.isSocket()) return 'a socket';
  if (e.isDirectory()) return 'a directory';
  return 'a device';
}
