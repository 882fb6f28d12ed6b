/**
 * The software provider (VSS's system provider, per file instead of per volume): copy-on-write into a
 * diff area. While a snapshot lives, a write or truncate through NodeFile that would change bytes of a
 * file in the set as they were at the instant first copies the old content of the extents it touches
 * into the snapshot's diff area (once per extent), then goes on. A view reads preserved extents from the
 * diff area and the rest from the snapshot's own descriptor on the file, so a file deleted or replaced by
 * rename reads as it was. Cost: what is overwritten while the snapshot lives, nothing else.
 *
 * In-process only: it sees writes through this process's NodeFile (the host is the only writer of its
 * files, DESIGN.md). A write by another process is not preserved, and a view would show it.
 *
 * Diff area: `<diffAreaRoot>/cow-<pid>-<id>/` holding `snapshot.json` and `<n>.data` per file of the set
 * (preserved extents appended in the order they were preserved). The extent map lives in memory: a
 * snapshot does not outlive its process, and recovery only deletes.
 */
import { constants } from 'node:fs';
import { open, stat, type FileHandle } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, fromSystemError } from '../errors.js';
import { addFileWriteInterceptor, fileIdentity, type FileWriteInterceptor } from '../util/file.js';
import { dataExtentsOf, mergeExtents, type DataExtent } from '../util/holes.js';
import { openChecked } from '../util/safe-open.js';
import { mapBounded } from '../util/bounded.js';
import {
  OPEN_CONCURRENCY,
  checkFiles,
  checkRoot,
  createArea,
  normalizeFiles,
  recoverAreas,
  removeArea,
  usableRoot,
} from './area.js';
import type {
  PreparedSnapshot,
  SnapshotOptions,
  SnapshotProvider,
  SnapshotStats,
  StorageSnapshot,
} from './provider.js';
import { readFully, writeFully } from '../util/file.js';
import { PendingWork, SnapshotView, releasedError, type ViewOwner } from './view.js';

export interface CowProviderOptions {
  /** Granularity of preservation in bytes: a power of two from 4 KiB to 8 MiB. Default 64 KiB. */
  extentSize?: number;
  /**
   * Most bytes one snapshot's diff area may hold. A write that would need more discards the snapshot
   * (its views fail with LIMIT_EXCEEDED) and goes on, as VSS does when a diff area is full: the live
   * data matters more than the snapshot. Default: no limit.
   */
  maxDiffAreaBytes?: number;
}

const KiB = 1024;
const MiB = 1024 * KiB;
/** Bytes copied per read/write pair when preserving a long run (a truncate of a big file, say). */
const COPY_CHUNK = 4 * MiB;

export class CowProvider implements SnapshotProvider {
  readonly name = 'cow';
  readonly extentSize: number;
  readonly maxDiffAreaBytes: number | undefined;

  constructor(opts: CowProviderOptions = {}) {
    const e = opts.extentSize ?? 64 * KiB;
    if (!Number.isInteger(e) || e < 4 * KiB || e > 8 * MiB || (e & (e - 1)) !== 0)
      throw new TidemarkError('INVALID_ARGUMENT', `extent size ${e} is not a power of two from 4 KiB to 8 MiB`);
    const max = opts.maxDiffAreaBytes;
    if (max !== undefined && (!Number.isSafeInteger(max) || max < 0))
      throw new TidemarkError('INVALID_ARGUMENT', `maxDiffAreaBytes ${max} is not a byte count`);
    this.extentSize = e;
    this.maxDiffAreaBytes = max;
  }

  async supports(files: string[], opts: SnapshotOptions): Promise<string | undefined> {
    let paths: string[];
    let root: string;
    try {
      paths = normalizeFiles(files);
      root = checkRoot(opts);
      await checkFiles(paths);
    } catch (err) {
      return (err as Error).message;
    }
    return await usableRoot(root);
  }

  async prepare(files: string[], opts: SnapshotOptions): Promise<PreparedSnapshot> {
    const paths = normalizeFiles(files);
    const root = checkRoot(opts);
    await checkFiles(paths); // before opening: open(2) of a FIFO would wait for a writer
    // A set of hundreds of VMs has thousands of files: opened and given their diff files side by side.
    const sources = await mapBounded(paths, OPEN_CONCURRENCY, openSource, (made) =>
      closeAll(made.map((s) => s.handle)),
    );
    let area: { id: string; dir: string } | undefined;
    let data: FileHandle[];
    try {
      area = await createArea(root, this.name, paths);
      const dir = area.dir;
      data = await mapBounded(
        paths.map((_, i) => path.join(dir, `${i}.data`)),
        OPEN_CONCURRENCY,
        (f) => open(f, 'wx+').catch((err: unknown) => Promise.reject(fromSystemError(err, 'create', f))),
        closeAll,
      );
    } catch (err) {
      await closeAll(sources.map((s) => s.handle));
      if (area) await removeArea(area.dir);
      throw err;
    }
    return new CowPrepared(this, area.id, area.dir, sources, data);
  }

  async recover(opts: SnapshotOptions): Promise<number> {
    return recoverAreas(checkRoot(opts), this.name);
  }
}

interface Source {
  path: string;
  handle: FileHandle;
  identity: string;
}

async function openSource(p: string): Promise<Source> {
  // Non-blocking and type-checked: a file replaced by a FIFO since checkFiles is refused, not waited on.
  const { handle, stat: st } = await openChecked(p, constants.O_RDONLY, { action: 'snapshot' });
  return { path: p, handle, identity: fileIdentity(st) };
}

async function closeAll(handles: FileHandle[]): Promise<void> {
  await Promise.all(handles.map((h) => h.close().catch(() => undefined)));
}

class CowPrepared implements PreparedSnapshot {
  private state: 'prepared' | 'committing' | 'committed' | 'aborted' = 'prepared';

  constructor(
    private readonly provider: CowProvider,
    private readonly id: string,
    private readonly dir: string,
    private readonly sources: Source[],
    private readonly data: FileHandle[],
  ) {}

  async commit(): Promise<StorageSnapshot> {
    if (this.state !== 'prepared')
      throw new TidemarkError('CLOSED', `snapshot ${this.id} was already ${this.state}`, { snapshot: this.id });
    this.state = 'committing';
    try {
      // A file replaced (renamed over) since prepare: the snapshot is of what its name holds now.
      await Promise.all(this.sources.map((s, i) => this.refresh(i)));
      const sizes = await Promise.all(this.sources.map((s) => s.handle.stat({ bigint: true })));
      // The instant. The caller holds writes to the set around commit, so nothing is in flight; from
      // here on every write through NodeFile to these files preserves first.
      const snap = new CowSnapshot(
        this.id,
        this.dir,
        this.sources.map((s) => s.path),
        this.provider.extentSize,
        this.provider.maxDiffAreaBytes,
        [...this.sources.map((s) => s.handle), ...this.data],
      );
      this.sources.forEach((s, i) => snap.add(s, this.data[i], Number(sizes[i].size)));
      snap.start();
      this.state = 'committed';
      return snap;
    } catch (err) {
      await this.cleanup();
      throw err;
    }
  }

  private async refresh(i: number): Promise<void> {
    const s = this.sources[i];
    let now: string;
    try {
      now = fileIdentity(await stat(s.path, { bigint: true }));
    } catch (err) {
      throw fromSystemError(err, 'snapshot', s.path);
    }
    if (now === s.identity) return;
    const fresh = await openSource(s.path);
    await s.handle.close().catch(() => undefined);
    this.sources[i] = fresh;
  }

  async abort(): Promise<void> {
    if (this.state === 'aborted') return;
    if (this.state !== 'prepared')
      throw new TidemarkError('CONFLICT', `snapshot ${this.id} is ${this.state}: release it instead of aborting`);
    await this.cleanup();
  }

  private async cleanup(): Promise<void> {
    this.state = 'aborted';
    await closeAll([...this.sources.map((s) => s.handle), ...this.data]);
    await removeArea(this.dir);
  }
}

interface Preserved {
  /** Where the extent's old content is in the diff-area file, in extents. */
  slot: number;
  /** Settles once the copy is in the diff area (never rejects: a failure discards the snapshot). */
  done: Promise<void>;
}

/** One file of the set (one inode: two names of one file share it). */
class CowFile implements FileWriteInterceptor {
  private readonly extents = new Map<number, Preserved>();
  private nextSlot = 0;
  private unregister: (() => void) | undefined;

  constructor(
    private readonly snap: CowSnapshot,
    readonly path: string,
    readonly identity: string,
    private readonly source: FileHandle,
    private readonly data: FileHandle,
    readonly instantSize: number,
  ) {}

  register(): void {
    this.unregister ??= addFileWriteInterceptor(this.identity, this);
  }

  unregisterNow(): void {
    this.unregister?.();
    this.unregister = undefined;
  }

  beforeWrite(position: number, length: number): Promise<void> {
    return this.preserve(position, Math.min(position + length, this.instantSize));
  }

  beforeTruncate(size: number): Promise<void> {
    return this.preserve(size, this.instantSize);
  }

  /**
   * Preserves every extent meeting [from, to) that is not preserved yet; resolves when all of them (also
   * those another write started) are in the diff area. Entries are made before the first await, so a
   * concurrent write to the same extent waits for this copy instead of racing it.
   */
  private preserve(from: number, to: number): Promise<void> {
    if (!this.snap.usable || from >= to) return Promise.resolve();
    const E = this.snap.extentSize;
    const last = Math.floor((to - 1) / E);
    const waits: Promise<void>[] = [];
    let run = -1;
    for (let e = Math.floor(from / E); e <= last; e++) {
      const p = this.extents.get(e);
      if (!p) {
        if (run < 0) run = e;
        continue;
      }
      if (run >= 0) waits.push(this.copy(run, e));
      run = -1;
      waits.push(p.done);
    }
    if (run >= 0) waits.push(this.copy(run, last + 1));
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => undefined);
  }

  /** Copies extents [first, end) into consecutive slots, a chunk at a time. */
  private copy(first: number, end: number): Promise<void> {
    const E = this.snap.extentSize;
    if (!this.snap.reserve(Math.min(end * E, this.instantSize) - first * E)) return Promise.resolve();
    const slot0 = this.nextSlot;
    this.nextSlot += end - first;
    const perChunk = Math.max(1, COPY_CHUNK / E);
    let chain = Promise.resolve();
    for (let c = first; c < end; c += perChunk) {
      const cEnd = Math.min(end, c + perChunk);
      const slot = slot0 + (c - first);
      chain = this.snap.track(chain.then(() => this.copyChunk(c, cEnd, slot)));
      for (let e = c; e < cEnd; e++) this.extents.set(e, { slot: slot + (e - c), done: chain });
    }
    return chain;
  }

  private async copyChunk(first: number, end: number, slot: number): Promise<void> {
    if (!this.snap.usable) return;
    const E = this.snap.extentSize;
    const from = first * E;
    const length = Math.min(end * E, this.instantSize) - from;
    try {
      const buf = Buffer.allocUnsafe(length);
      await readFully(this.source, buf, from);
      await writeFully(this.data, buf, slot * E);
      this.snap.preserved(end - first, length);
    } catch (err) {
      this.snap.lose(
        new TidemarkError(
          'IO_ERROR',
          `snapshot ${this.snap.id} was discarded: preserving ${this.path} failed: ${(err as Error).message}`,
          { snapshot: this.snap.id, path: this.path },
          { cause: err },
        ),
      );
    }
  }

  /**
   * Where the file held data at the instant, within [offset, offset+length): every preserved extent, and
   * the live file's data elsewhere. An extent gets its entry before any write to it is issued, and this
   * runs without yielding, so an extent without one has not changed since the instant. undefined: unknown.
   */
  dataExtentsAt(offset: number, length: number): DataExtent[] | undefined {
    const end = Math.min(offset + length, this.instantSize);
    if (end <= offset) return [];
    const live = dataExtentsOf(this.source.fd, offset, end);
    if (!live) return undefined;
    const E = this.snap.extentSize;
    const first = Math.floor(offset / E);
    const last = Math.floor((end - 1) / E);
    const preserved = (e: number) => {
      const from = Math.max(offset, e * E);
      live.push({ offset: from, length: Math.min(end, (e + 1) * E) - from });
    };
    if (this.extents.size < last - first + 1) {
      for (const e of this.extents.keys()) if (e >= first && e <= last) preserved(e);
    } else {
      for (let e = first; e <= last; e++) if (this.extents.has(e)) preserved(e);
    }
    return mergeExtents(live);
  }

  /** The file as it was at the instant (zeros past its size then). */
  async readAt(buf: Uint8Array, position: number): Promise<void> {
    const end = Math.min(position + buf.length, this.instantSize);
    if (end <= position) {
      buf.fill(0);
      return;
    }
    if (end - position < buf.length) buf.fill(0, end - position);
    const E = this.snap.extentSize;
    const first = Math.floor(position / E);
    const last = Math.floor((end - 1) / E);
    let anyLive = false;
    for (let e = first; e <= last && !anyLive; e++) anyLive = !this.extents.has(e);
    if (anyLive) await readFully(this.source, buf.subarray(0, end - position), position);
    // A write is issued only after its extents got entries: an extent still without one after the live
    // read had not changed when it was read. The others come from the diff area.
    for (let e = first; e <= last;) {
      const p = this.extents.get(e);
      if (!p) {
        e++;
        continue;
      }
      let runEnd = e + 1; // extents with consecutive slots: one read
      const waits = [p.done];
      for (let q = this.extents.get(runEnd); q && q.slot === p.slot + (runEnd - e); q = this.extents.get(runEnd)) {
        waits.push(q.done);
        runEnd++;
      }
      await Promise.all(waits);
      this.snap.assertReadable();
      const from = Math.max(position, e * E);
      const to = Math.min(end, runEnd * E);
      await readFully(this.data, buf.subarray(from - position, to - position), p.slot * E + (from - e * E));
      e = runEnd;
    }
    // Discarded while reading: writes stopped being preserved, so what was read may be newer.
    this.snap.assertReadable();
  }
}

class CowSnapshot implements StorageSnapshot, ViewOwner {
  readonly provider = 'cow';
  readonly createdAt = new Date();
  private readonly byPath = new Map<string, CowFile>();
  private readonly byIdentity = new Map<string, CowFile>();
  private readonly work = new PendingWork();
  private state: 'live' | 'released' = 'live';
  private releasing: Promise<void> | undefined;
  private lost: TidemarkError | undefined;
  private reserved = 0;
  private diffAreaBytes = 0;
  private preservedExtents = 0;

  constructor(
    readonly id: string,
    private readonly dir: string,
    readonly files: readonly string[],
    readonly extentSize: number,
    private readonly maxDiffAreaBytes: number | undefined,
    private readonly handles: FileHandle[],
  ) {}

  add(s: Source, data: FileHandle, size: number): void {
    let f = this.byIdentity.get(s.identity);
    if (!f) {
      f = new CowFile(this, s.path, s.identity, s.handle, data, size);
      this.byIdentity.set(s.identity, f);
    }
    this.byPath.set(s.path, f);
  }

  start(): void {
    for (const f of this.byIdentity.values()) f.register();
  }

  /** Preservation goes on: live, and not discarded. */
  get usable(): boolean {
    return this.state === 'live' && this.lost === undefined;
  }

  assertReadable(): void {
    if (this.state !== 'live') throw releasedError(this.id);
    if (this.lost) throw this.lost;
  }

  track<T>(p: Promise<T>): Promise<T> {
    return this.work.track(p);
  }

  /** Accounts for `bytes` more in the diff area; false (and the snapshot discarded) past the limit. */
  reserve(bytes: number): boolean {
    if (this.maxDiffAreaBytes !== undefined && this.reserved + bytes > this.maxDiffAreaBytes) {
      this.lose(
        new TidemarkError(
          'LIMIT_EXCEEDED',
          `snapshot ${this.id} was discarded: its diff area would exceed its limit of ${this.maxDiffAreaBytes} bytes`,
          { snapshot: this.id, limit: this.maxDiffAreaBytes },
        ),
      );
      return false;
    }
    this.reserved += bytes;
    return true;
  }

  preserved(extents: number, bytes: number): void {
    this.preservedExtents += extents;
    this.diffAreaBytes += bytes;
  }

  /** Discards the snapshot: writes stop waiting for it; views fail with `err`; release still cleans up. */
  lose(err: TidemarkError): void {
    if (this.lost || this.state !== 'live') return;
    this.lost = err;
    for (const f of this.byIdentity.values()) f.unregisterNow();
  }

  async openFile(p: string): Promise<SnapshotView> {
    this.assertReadable();
    const abs = path.resolve(p);
    const f = this.byPath.get(abs);
    if (!f)
      throw new TidemarkError('NOT_FOUND', `${abs} is not in snapshot ${this.id}`, { path: abs, snapshot: this.id });
    return new SnapshotView(
      this,
      abs,
      f.instantSize,
      (buf, position) => f.readAt(buf, position),
      undefined,
      (offset, length) => f.dataExtentsAt(offset, length),
    );
  }

  stats(): SnapshotStats {
    return { diffAreaBytes: this.diffAreaBytes, preservedExtents: this.preservedExtents };
  }

  release(): Promise<void> {
    this.releasing ??= this.doRelease();
    return this.releasing;
  }

  private async doRelease(): Promise<void> {
    this.state = 'released';
    for (const f of this.byIdentity.values()) f.unregisterNow();
    // Copies a write is waiting for, and reads in progress, finish before the files go.
    await this.work.drain();
    await closeAll(this.handles);
    await removeArea(this.dir);
  }
}
