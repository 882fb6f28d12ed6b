/**
 * Resilient change tracking for a VHDX virtual disk (a file or the head of a chain). Its one promise:
 * an answer is either complete or refused.
 *
 * - The fine map (`BASE.vhdx.rct`) holds, per granule, the counter of the last change. `seal()`
 *   persists it and returns the id of the current state; writes after it get the next counter, so
 *   "changed since id c" is every granule whose counter is above c.
 * - The coarse map (`BASE.vhdx.mrt`) is written ahead of data: before the first write into a coarse
 *   region since the last persist, the region is durably marked. After an unclean close every marked
 *   region counts as changed at the current counter, so earlier ids stay valid.
 * - Lineage: an id names the one file instance that sealed it. Every seal draws a nonce the id carries and
 *   the tracking file keeps; a copy of the files, an older state put back or any other fork seals the same
 *   counter with another nonce, so an id from one branch is refused on every other. The chain's files are
 *   recorded as instances (device, inode, birth time; and at a clean close their change times and sizes):
 *   a copy, a replacement, or a write while Tidemark had the file closed resets the epoch.
 * - Foreign writers: the binding (the head file's name and DataWriteGuid) catches programs that install
 *   new write GUIDs (QEMU's tools, Windows); while a session writes, other processes opening the chain's
 *   files for writing are watched (fanotify, src/util/file-watch.ts) and the head's headers are compared
 *   with what we wrote, before any id is sealed or answered. What cannot be vouched for resets the epoch.
 * - Tracking files Tidemark did not write (another product's, e.g. Hyper-V's own `.rct`) are never modified;
 *   the disk counts as untracked until `enable({ replaceForeign: true })`. Reads never write.
 */
import { checkRange } from '../util/range.js';
import { createHash, randomBytes } from 'node:crypto';
import type { BigIntStats } from 'node:fs';
import { access, lstat, open, rename, stat, unlink } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError } from '../errors.js';
import type { VhdxFile, WriteObserver } from '../formats/vhdx/vhdx.js';
import { describeAccess, FileWatch } from '../util/file-watch.js';
import { NodeFile } from '../util/file.js';
import { FileTypeError, fileTypeName, SymlinkRefusedError } from '../util/safe-open.js';
import { guidEquals, guidToString, newGuid, type Guid } from '../util/guid.js';
import {
  HEADER_SLOT,
  MAX_CHAIN_RECORDS,
  MRT_SIGNATURE,
  SEAL_HISTORY,
  decodeMrtSlot,
  decodeRctHeader,
  encodeMrtSlot,
  encodeRctHeader,
  formatId,
  isTidemarkRct,
  mapCrc,
  mapSlotLength,
  mapSlotOffset,
  mrtSlotLength,
  parseId,
  type Binding,
  type FileRecord,
  type MrtSlot,
  type RctHeader,
} from './format.js';

export const DEFAULT_GRANULARITY = 256 * 1024;
export const COARSE_REGION = 64 * 1024 * 1024;
/** Regions marked one by one per persist interval before all are marked at once (bounds coarse-map syncs). */
const MARK_AHEAD_AFTER = 8;
/** A map larger than this (a tiny granularity on a huge disk) is refused at enable. */
const MAX_MAP_BYTES = 256 * 1024 * 1024;

export interface ChangeRange {
  offset: number;
  length: number;
}

export interface ChangesResult {
  ranges: ChangeRange[];
  /** How much of the requested window this answer covers; page on from offset + processedLength. */
  processedLength: number;
  /** Bytes in `ranges`. */
  totalBytes: number;
}

export interface TrackerStatus {
  enabled: true;
  state: 'valid' | 'reset';
  reason: string | null;
  epoch: string;
  granularity: number;
  counter: number;
  firstId: string | null;
  lastId: string | null;
  inUse: boolean;
  binding: { head: string; dataWriteGuid: string };
  epochStartedAt: string;
  lastSealAt: string | null;
  trackingFiles: { rct: string; mrt: string };
  /**
   * While this tracker writes: whether other processes' writes to the chain's files are watched, and if
   * not, why (then they are caught at the next open and by header checks only).
   */
  foreignWriterWatch: { active: boolean; why: string | null } | null;
}

/** What sits beside a disk: no tracking files, Tidemark's, or files of another product (never modified). */
export type TrackingFiles = { state: 'none' } | { state: 'ours' } | { state: 'foreign'; detail: string };

export function trackingPaths(basePath: string): { rct: string; mrt: string } {
  return { rct: `${basePath}.rct`, mrt: `${basePath}.mrt` };
}

async function exists(p: string): Promise<boolean> {
  return access(p).then(
    () => true,
    () => false,
  );
}

function baseOf(disk: VhdxFile): VhdxFile {
  const chain = disk.chain();
  return chain[chain.length - 1];
}

function currentBinding(disk: VhdxFile): Binding {
  return { head: path.basename(disk.path), dataWriteGuid: disk.header.dataWriteGuid };
}

function sameBinding(a: Binding, b: Binding): boolean {
  return a.head === b.head && guidEquals(a.dataWriteGuid, b.dataWriteGuid);
}

/** A non-zero random 64-bit nonce for a seal. */
function newNonce(): bigint {
  for (;;) {
    const n = randomBytes(8).readBigUInt64LE(0);
    if (n !== 0n) return n;
  }
}

function nameHash(file: string): string {
  return createHash('sha256').update(path.basename(file)).digest('hex').slice(0, 16);
}

/** The file at `p` as an instance (stat follows no link: a tracking file that is a link is refused earlier). */
async function fileRecord(p: string, named = true): Promise<FileRecord> {
  return recordOf(await stat(p, { bigint: true }), named ? nameHash(p) : '');
}

/**
 * An open tracking file as an instance (fstat): the file the header is written into, even when its path was
 * removed or names another file meanwhile (the watch reports that; the next open then finds what the path names).
 */
async function openFileRecord(f: NodeFile): Promise<FileRecord> {
  return recordOf(await f.stat(), '');
}

function recordOf(st: BigIntStats, hash: string): FileRecord {
  return {
    nameHash: hash,
    dev: st.dev,
    ino: st.ino,
    birthNs: st.birthtimeNs,
    ctimeNs: st.ctimeNs,
    mtimeNs: st.mtimeNs,
    size: st.size,
  };
}

function sameInstance(a: FileRecord, b: FileRecord): boolean {
  return a.dev === b.dev && a.ino === b.ino && a.birthNs === b.birthNs;
}

/**
 * Unchanged since recorded: the modification time and the size. Not the change time: a rename (moving the
 * disk with its tracking files, which keeps them valid) changes it too.
 */
function sameContent(a: FileRecord, b: FileRecord): boolean {
  return a.mtimeNs === b.mtimeNs && a.size === b.size;
}

function nsToIso(ns: bigint): string {
  return new Date(Number(ns / 1_000_000n)).toISOString();
}

async function chainRecords(disk: VhdxFile): Promise<FileRecord[]> {
  return Promise.all(
    disk
      .chain()
      .slice(0, MAX_CHAIN_RECORDS)
      .map((f) => fileRecord(f.path)),
  );
}

export class ChangeTracker implements WriteObserver {
  private sessionMarked = new Set<number>();
  private mrtSequence = 0n;
  private closed = false;
  /** A child whose first DataWriteGuid `sealForChild` recorded as pending, and the pending it replaced. */
  private preparedChild: { disk: VhdxFile; previous: Binding | null } | undefined;
  /** The merged parent's binding `beginMergeInto` persisted as pending, until `continueOnMergedParent`. */
  private merging: Binding | undefined;
  /** Found by the last check before a clean close: recorded as a reset by `afterClose`. */
  private resetAtClose: string | undefined;

  private constructor(
    private head: VhdxFile,
    readonly paths: { rct: string; mrt: string },
    private header: RctHeader,
    private map: Uint32Array,
    private readonly writable: boolean,
    private rct: NodeFile | undefined,
    private mrt: NodeFile | undefined,
    /** Other processes writing the chain's or the tracking files (writable trackers only). */
    private readonly watch: FileWatch | undefined,
  ) {}

  /** The tracked disk: the head of the chain, whose changes are recorded. */
  get disk(): VhdxFile {
    return this.head;
  }

  get granularity(): number {
    return this.header.granularity;
  }

  private get regionSize(): number {
    return Math.max(COARSE_REGION, this.header.granularity);
  }

  private get regions(): number {
    return Math.ceil(this.header.virtualSize / this.regionSize);
  }

  // ---------------------------------------------------------------- enable / disable

  /**
   * Creates the tracking files for `disk` (closed elsewhere, or about to be written) and a new epoch
   * (`reason`: why tracking starts again, when it had been tracked before and its files were lost).
   * Tracking files another product wrote are refused, or with `replaceForeign` moved aside to
   * `NAME.foreign-TIME` (never deleted) first.
   */
  static async enable(
    disk: VhdxFile,
    granularity = DEFAULT_GRANULARITY,
    opts: { replaceForeign?: boolean; reason?: string } = {},
  ): Promise<{ movedAside: string[] }> {
    if (
      !Number.isSafeInteger(granularity) ||
      granularity < 4096 ||
      granularity > 2 ** 30 ||
      (granularity & (granularity - 1)) !== 0
    ) {
      throw new TidemarkError('INVALID_ARGUMENT', `granularity ${granularity} is not a power of two from 4K to 1G`);
    }
    const granules = Math.ceil(disk.virtualSize / granularity);
    if (granules * 4 > MAX_MAP_BYTES) {
      throw new TidemarkError(
        'LIMIT_EXCEEDED',
        `granularity ${granularity} needs a ${granules * 4}-byte map for this disk; choose a larger one`,
      );
    }
    const basePath = baseOf(disk).path;
    const paths = trackingPaths(basePath);
    const found = await ChangeTracker.inspect(basePath);
    const movedAside: string[] = [];
    if (found.state === 'foreign') {
      if (!opts.replaceForeign) {
        throw new TidemarkError(
          'CONFLICT',
          `${path.basename(basePath)} is tracked by another product (${found.detail}); Tidemark never modifies its files: enable with --replace-foreign to move them aside and track with Tidemark's`,
        );
      }
      const stamp = new Date().toISOString().replace(/[:.]/g, '-');
      for (const p of [paths.rct, paths.mrt]) {
        if (
          await lstat(p).then(
            () => true,
            () => false,
          )
        ) {
          const aside = `${p}.foreign-${stamp}`;
          await rename(p, aside);
          movedAside.push(aside);
        }
      }
    } else if (found.state === 'ours') {
      throw new TidemarkError(
        'ALREADY_EXISTS',
        `change tracking is already enabled for ${basePath} (${paths.rct}); disable it first`,
      );
    } else {
      // No fine map: a coarse map of ours left alone (its .rct deleted) tracks nothing; the new epoch replaces it.
      await unlink(paths.mrt).catch((err: NodeJS.ErrnoException) => {
        if (err.code !== 'ENOENT') throw err;
      });
    }
    const header = newEpochHeader(disk, granularity, opts.reason ?? '');
    const rct = await NodeFile.openSidecar(paths.rct, 'wx');
    try {
      await rct.truncate(mapSlotOffset(granules, 1) + mapSlotLength(granules));
      header.mapCrc = mapCrc(new Uint32Array(granules));
      // Instances, but no clean-close times yet: the caller may still be writing the disk.
      header.chain = await chainRecords(disk);
      header.rctFile = await fileRecord(paths.rct, false);
      await rct.write(encodeRctHeader(header), 0);
      await rct.write(encodeRctHeader({ ...header, sequence: header.sequence + 1n }), HEADER_SLOT);
      await rct.datasync();
    } finally {
      await rct.close();
    }
    const mrt = await NodeFile.openSidecar(paths.mrt, 'wx');
    try {
      const regions = Math.ceil(disk.virtualSize / Math.max(COARSE_REGION, granularity));
      const slot = encodeMrtSlot({
        sequence: 1n,
        epoch: header.epoch,
        rctSequence: 0n,
        regionSize: Math.max(COARSE_REGION, granularity),
        regions,
        bitmap: Buffer.alloc(Math.ceil(regions / 8)),
      });
      await mrt.write(slot, 0);
      await mrt.write(Buffer.alloc(slot.length), slot.length);
      await mrt.datasync();
    } finally {
      await mrt.close();
    }
    return { movedAside };
  }

  /** Removes Tidemark's tracking files of the chain whose base is `basePath` (never another product's). */
  static async disable(basePath: string): Promise<boolean> {
    const found = await ChangeTracker.inspect(basePath);
    if (found.state === 'foreign') {
      throw new TidemarkError(
        'CONFLICT',
        `${path.basename(basePath)} is tracked by another product (${found.detail}); Tidemark does not remove its files`,
      );
    }
    const paths = trackingPaths(basePath);
    let removed = false;
    for (const p of [paths.rct, paths.mrt]) {
      try {
        await unlink(p);
        removed = true;
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      }
    }
    return removed;
  }

  static async isEnabled(disk: VhdxFile): Promise<boolean> {
    return (await ChangeTracker.inspect(baseOf(disk).path)).state === 'ours';
  }

  /**
   * Whose tracking files sit beside the base disk `basePath`, by reading a few bytes (nothing is written):
   * Tidemark's own (of any version, damaged or not), none, or another product's. A link or a FIFO there is
   * refused (PATH_NOT_ALLOWED, INVALID_ARGUMENT): it is nobody's tracking file, and it is never followed.
   */
  static async inspect(basePath: string): Promise<TrackingFiles> {
    const paths = trackingPaths(basePath);
    const rct = await sidecarSignatures(paths.rct, [0, 4096, HEADER_SLOT], isTidemarkRct);
    const mrt = await sidecarSignatures(paths.mrt, [], (b) => b.toString('latin1', 0, 8) === MRT_SIGNATURE);
    if (rct === 'missing' && mrt === 'missing') return { state: 'none' };
    for (const [file, found] of [
      [paths.rct, rct],
      [paths.mrt, mrt],
    ] as const) {
      if (found !== 'ours' && found !== 'missing' && found !== 'empty')
        return { state: 'foreign', detail: `${path.basename(file)} ${found}` };
    }
    if (rct === 'missing') return { state: 'none' }; // a lone coarse map of ours tracks nothing
    return { state: 'ours' };
  }

  // ---------------------------------------------------------------- open

  /**
   * Binds to an open disk. Returns undefined when the disk has no Tidemark tracking files (none, or another
   * product's: `inspect` tells). With `writable` (the disk must be writable too) every change to the disk is
   * tracked from now on, and the tracker is closed when the disk closes cleanly. A read-only tracker never
   * writes: a reset it finds lives in memory (every old id refused, status says why) until a writer records it.
   */
  static async attach(disk: VhdxFile, opts: { writable?: boolean } = {}): Promise<ChangeTracker | undefined> {
    const writable = opts.writable ?? disk.writable;
    if (writable && disk.observer) {
      throw new TidemarkError('INVALID_ARGUMENT', `a change tracker is already attached to ${disk.path}`);
    }
    const paths = trackingPaths(baseOf(disk).path);
    if ((await ChangeTracker.inspect(baseOf(disk).path)).state !== 'ours') return undefined;
    const rct = await NodeFile.openSidecar(paths.rct, writable ? 'r+' : 'r');
    let mrt: NodeFile | undefined;
    let watch: FileWatch | undefined;
    try {
      const loaded = await loadState(rct, disk);
      let reason = loaded.problem;
      if (!reason) reason = await checkInstances(loaded.header!, disk, paths, 'identity');
      if (!reason && loaded.header!.inUse) {
        // Unclean close: everything the coarse map marked since the last persist counts as changed now.
        reason = await recoverFromCoarseMap(paths.mrt, loaded.header!, loaded.map);
      }
      if (!reason) reason = await checkBinding(loaded.header!, disk);
      if (!reason && loaded.header!.closedClean) reason = await checkInstances(loaded.header!, disk, paths, 'content');
      if (writable) {
        mrt = await openOrCreate(paths.mrt);
        // From now on other processes' writes to these files are seen; one already writing is a reason.
        watch = FileWatch.start([...disk.chain().map((f) => f.path), paths.rct, paths.mrt]);
        const found = watch.findings();
        if (!reason && found.length > 0) reason = describeFindings(found);
      }
      let state = { header: loaded.header!, map: loaded.map };
      if (reason) {
        // A new epoch: every earlier id is refused from now on, and status says why.
        const granularity = loaded.header?.granularity ?? DEFAULT_GRANULARITY;
        const header = newEpochHeader(disk, granularity, reason);
        header.sequence = (loaded.header?.sequence ?? 0n) + 1n;
        state = { header, map: new Uint32Array(granulesOf(disk, granularity)) };
      }
      const tracker = new ChangeTracker(
        disk,
        paths,
        state.header,
        state.map,
        writable,
        writable ? rct : undefined,
        mrt,
        watch,
      );
      if (writable) {
        const needed = mapSlotOffset(state.map.length, 1) + mapSlotLength(state.map.length);
        if (rct.size() < needed) await rct.truncate(needed);
        await tracker.startSession();
        disk.observer = tracker;
      } else {
        await rct.close();
      }
      return tracker;
    } catch (err) {
      watch?.close();
      await rct.close().catch(() => undefined);
      await mrt?.close().catch(() => undefined);
      throw err;
    }
  }

  /** Marks the tracker in use and records the DataWriteGuid this session's first write will install. */
  private async startSession(): Promise<void> {
    const pending: Binding = { head: path.basename(this.disk.path), dataWriteGuid: newGuid() };
    this.disk.setNextDataWriteGuid(pending.dataWriteGuid);
    this.header.binding = currentBinding(this.disk);
    this.header.pending = pending;
    this.header.inUse = true;
    await this.persist();
  }

  // ---------------------------------------------------------------- the write path

  /**
   * Called by the disk before every guest-visible change is issued to the file. Synchronous (no promise)
   * unless a coarse region must be marked durably first: the common write pays no extra await.
   */
  beforeChange(offset: number, length: number): Promise<void> | void {
    if (this.closed || !this.writable) throw new TidemarkError('CLOSED', 'change tracker is closed');
    const g = this.header.granularity;
    const first = Math.floor(offset / g);
    const last = Math.min(this.map.length - 1, Math.floor((offset + Math.max(length, 1) - 1) / g));
    const counter = this.header.counter;
    this.map.fill(counter, first, last + 1);
    const r0 = Math.floor(offset / this.regionSize);
    const r1 = Math.floor((offset + Math.max(length, 1) - 1) / this.regionSize);
    let added = false;
    for (let r = r0; r <= r1; r++) {
      if (!this.sessionMarked.has(r)) {
        this.sessionMarked.add(r);
        added = true;
      }
    }
    if (!added) return;
    // Scattered writes would cost a durable write per region: past a few, mark every region at once.
    // The only price is a larger over-report after an unclean close.
    if (this.sessionMarked.size > MARK_AHEAD_AFTER) for (let r = 0; r < this.regions; r++) this.sessionMarked.add(r);
    return this.writeCoarseMap();
  }

  /** Writes the coarse map (the regions marked since the last persist) to the other slot, durably. */
  private async writeCoarseMap(): Promise<void> {
    const regions = this.regions;
    const bitmap = Buffer.alloc(Math.ceil(regions / 8));
    for (const r of this.sessionMarked) bitmap[r >> 3] |= 1 << (r & 7);
    this.mrtSequence++;
    const slot = encodeMrtSlot({
      sequence: this.mrtSequence,
      epoch: this.header.epoch,
      rctSequence: this.header.sequence,
      regionSize: this.regionSize,
      regions,
      bitmap,
    });
    await this.mrt!.write(slot, Number(this.mrtSequence % 2n) * mrtSlotLength(regions));
    await this.mrt!.datasync();
  }

  // ---------------------------------------------------------------- vouching

  /**
   * Why this session can no longer vouch for the disk's history, or undefined: another process opened one
   * of its files for writing or wrote it, or the head's headers on disk are not the ones we wrote (a writer
   * that ignores locks). `held`: our own metadata writes are held off (inside `flushAndHold`).
   */
  private async unvouched(held: boolean): Promise<string | undefined> {
    const found = this.watch?.findings() ?? [];
    if (found.length > 0) return describeFindings(found);
    if (this.head.writable) return held ? this.head.headersOnDiskDiffer() : this.head.verifyHeadersOnDisk();
    return undefined;
  }

  /** Checks, and on a doubt starts a new epoch now (persisted): every earlier id is refused from here on. */
  private async vouch(held: boolean): Promise<void> {
    if (!this.writable || this.closed) return;
    const why = await this.unvouched(held);
    if (why) await this.restartEpoch(why);
  }

  /** Starts a new epoch now (persisted) because the caller found what the tracker cannot vouch for. */
  async distrust(reason: string): Promise<void> {
    if (!this.writable || this.closed) return;
    await this.restartEpoch(reason);
  }

  private async restartEpoch(reason: string): Promise<void> {
    const h = this.header;
    const fresh = newEpochHeader(this.head, h.granularity, reason);
    this.header = {
      ...fresh,
      sequence: h.sequence,
      inUse: h.inUse,
      binding: h.binding,
      pending: h.pending,
      mapSlot: h.mapSlot,
    };
    this.map = new Uint32Array(this.map.length);
    if (this.rct) await this.persist();
  }

  // ---------------------------------------------------------------- seal, close

  /** Makes the disk's current state durable and returns its id; later writes belong to later ids. */
  async seal(): Promise<string> {
    this.assertWritable();
    // Writes are held off from the flush to the persisted header: none can slip between the two.
    return this.disk.flushAndHold(async () => {
      await this.vouch(true);
      const id = this.sealCounter();
      this.header.binding = currentBinding(this.disk);
      await this.persist();
      return id;
    });
  }

  /** Takes the current counter as a sealed id (nonce drawn and recorded); later writes get the next one. */
  private sealCounter(): string {
    const h = this.header;
    const c = h.counter;
    const nonce = newNonce();
    h.nonces[c % SEAL_HISTORY] = nonce;
    h.counter++;
    h.lastSealAt = Date.now();
    return formatId(h.epoch, c, nonce);
  }

  /**
   * `seal()` for a checkpoint that will continue on `child` (a new, unwritten differencing disk opened over
   * the tracked disk; I/O paused). The same persist records, as pending, the DataWriteGuid the child's first
   * write will install, so the switch (`moveTo`) needs no I/O; the disk's log is left clean meanwhile. A
   * crash from here on finds the old head bound (binding) or the child written under tracking (pending);
   * an unwritten child over the bound head is accepted by `checkBinding` as before.
   */
  async sealForChild(child: VhdxFile): Promise<string> {
    this.assertWritable();
    if (child.parent !== this.head)
      throw new TidemarkError('INVALID_ARGUMENT', `${child.path} is not a child of ${this.head.path}`);
    // The head's DataWriteGuid of this session goes in first (no I/O when a write already did it): should
    // the checkpoint be abandoned and the head written on, no write installs one the tracker did not record.
    await this.head.markDataChanged();
    return this.head.flushAndHold(
      async () => {
        if (!child.linksToParent())
          throw new TidemarkError('PARENT_MISMATCH', `${child.path} no longer matches ${this.head.path}`);
        await this.vouch(true);
        const next: Binding = { head: path.basename(child.path), dataWriteGuid: newGuid() };
        child.setNextDataWriteGuid(next.dataWriteGuid);
        const previous = this.header.pending;
        const id = this.sealCounter();
        this.header.binding = currentBinding(this.head);
        this.header.pending = next;
        await this.persist();
        this.preparedChild = { disk: child, previous };
        return id;
      },
      { cleanLog: true },
    );
  }

  /**
   * Continues tracking on `child`, a differencing disk over the tracked disk, once the old head is retired
   * (read-only: nothing can change it unseen) and before anything writes the child. Unless `sealForChild`
   * recorded the child already, one persist records binding = the old head and pending = the child's first
   * DataWriteGuid, before that write can happen.
   */
  async moveTo(child: VhdxFile): Promise<void> {
    this.assertWritable();
    const old = this.head;
    if (child.parent !== old)
      throw new TidemarkError('INVALID_ARGUMENT', `${child.path} is not a child of ${old.path}`);
    if (old.writable) throw new TidemarkError('INVALID_ARGUMENT', `retire ${old.path} before tracking moves off it`);
    if (!child.linksToParent())
      throw new TidemarkError('PARENT_MISMATCH', `${child.path} no longer matches ${old.path}`);
    if (child.observer)
      throw new TidemarkError('INVALID_ARGUMENT', `a change tracker is already attached to ${child.path}`);
    const prepared = this.preparedChild?.disk === child;
    this.preparedChild = undefined;
    this.watch?.add(child.path, { fresh: true }); // made by this process a moment ago
    if (!prepared) {
      const next: Binding = { head: path.basename(child.path), dataWriteGuid: newGuid() };
      child.setNextDataWriteGuid(next.dataWriteGuid);
      this.header.binding = currentBinding(old);
      this.header.pending = next;
      await this.persist();
    }
    if (old.observer === this) old.observer = undefined;
    this.head = child;
    child.observer = this;
  }

  /**
   * An online merge of the head (a differencing disk) into its parent begins (I/O held), before the parent changes:
   * after the usual look for other writers, the head's own DataWriteGuid goes in now (no I/O when a write already
   * did it) and one persist records binding = the head as it is and pending = the parent as the merge will leave it
   * (`parentName`, the DataWriteGuid it installs first). A crash at any point of the merge then finds one of the two:
   * the head (the merge not yet switched; an unwritten child whose parent the merge already changed was refused
   * before) or the merged parent.
   */
  async beginMergeInto(parentName: string, next: Guid): Promise<void> {
    this.assertWritable();
    await this.vouch(false);
    await this.head.markDataChanged();
    const merged: Binding = { head: parentName, dataWriteGuid: next };
    this.header.binding = currentBinding(this.head);
    this.header.pending = merged;
    this.header.inUse = true;
    await this.persist();
    this.merging = merged;
  }

  /**
   * The online merge `beginMergeInto` announced has copied the head into `parent`, open writable by the merge;
   * everything copied is durable and I/O is held. Tracking continues on `parent` as it is open, with no close and
   * re-open in between, after the checks a clean close of the child and an open of the parent would make (other
   * writers, headers on disk); a doubt restarts the epoch (persisted). Otherwise nothing is written: the persisted
   * header already accepts the parent as it is now (pending), and what the guest wrote since is in the coarse map.
   * The merge's copies into the parent were made unobserved: they are the child's data, tracked when written.
   */
  async continueOnMergedParent(parent: VhdxFile): Promise<void> {
    this.assertWritable();
    const child = this.head;
    if (!parent.writable) throw new TidemarkError('INVALID_ARGUMENT', `${parent.path} is not open for writing`);
    if (child.parentLink?.path !== parent.path)
      throw new TidemarkError('INVALID_ARGUMENT', `${parent.path} is not the parent of ${child.path}`);
    if (parent.observer)
      throw new TidemarkError('INVALID_ARGUMENT', `a change tracker is already attached to ${parent.path}`);
    if (!this.merging || !sameBinding(this.merging, currentBinding(parent)))
      throw new TidemarkError('INVALID_ARGUMENT', `no merge into ${parent.path} was begun (beginMergeInto)`);
    this.merging = undefined;
    const why = (await this.unvouched(false)) ?? (await parent.verifyHeadersOnDisk());
    if (why) await this.restartEpoch(why);
    this.watch?.remove(child.path);
    if (child.observer === this) child.observer = undefined;
    this.head = parent;
    parent.observer = this;
  }

  /** Forgets a child `sealForChild` recorded that will not be switched to (the checkpoint was abandoned). */
  cancelChild(child: VhdxFile): void {
    if (this.preparedChild?.disk !== child) return;
    // In memory only: the persisted pending names a child nobody will write, which accepts nothing else.
    this.header.pending = this.preparedChild.previous;
    this.preparedChild = undefined;
  }

  /** Called by the disk as a clean close begins: the last look for foreign writers while it is open. */
  async beforeClose(): Promise<void> {
    if (this.closed || !this.writable) return;
    this.resetAtClose = await this.unvouched(false);
  }

  /**
   * Called by the disk after a clean close: the map is persisted, the chain's files recorded as they are
   * now (so a write by anything else before the next open is seen), and the tracker marked not in use.
   */
  async afterClose(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.writable) {
        const found = this.watch?.findings() ?? [];
        const why = this.resetAtClose ?? (found.length > 0 ? describeFindings(found) : undefined);
        if (why) await this.restartEpoch(why);
        this.header.binding = currentBinding(this.disk);
        this.header.pending = null;
        this.header.inUse = false;
        await this.persist({ closedClean: true });
      }
    } finally {
      await this.closeFiles();
    }
  }

  /** Stops tracking without a clean close (the next open recovers through the coarse map). */
  async abandon(): Promise<void> {
    await this.closeFiles();
  }

  private async closeFiles(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.watch?.close();
    if (this.disk.observer === this) this.disk.observer = undefined;
    await this.rct?.close();
    await this.mrt?.close();
  }

  /**
   * Writes the map into the slot the current header does not use, then the next header (sequence + 1).
   * The map always goes with the header: coarse marks made under the previous header are then covered
   * by the persisted map, and marking starts afresh. The chain's files and the tracking files are recorded
   * as instances each time; `closedClean` says their times are final (a clean close).
   */
  private async persist(opts: { closedClean?: boolean } = {}): Promise<void> {
    const rct = this.rct!;
    const h = this.header;
    h.chain = await chainRecords(this.head);
    h.rctFile = await openFileRecord(rct);
    h.mrtFile = this.mrt ? await openFileRecord(this.mrt) : h.mrtFile;
    h.closedClean = opts.closedClean ?? false;
    const slot: 0 | 1 = h.mapSlot === 0 ? 1 : 0;
    await rct.write(
      new Uint8Array(this.map.buffer, this.map.byteOffset, this.map.byteLength),
      mapSlotOffset(this.map.length, slot),
    );
    await rct.datasync();
    h.mapSlot = slot;
    h.mapCrc = mapCrc(this.map);
    h.sequence++;
    await rct.write(encodeRctHeader(h), Number(h.sequence % 2n) * HEADER_SLOT);
    await rct.datasync();
    this.sessionMarked.clear();
  }

  private assertWritable(): void {
    if (this.closed) throw new TidemarkError('CLOSED', 'change tracker is closed');
    if (!this.writable) throw new TidemarkError('READ_ONLY', 'change tracker is open read-only');
  }

  // ---------------------------------------------------------------- queries

  /** The id a query would refuse, with why; undefined when the id is good. */
  private refusal(id: string): string | undefined {
    const parsed = parseId(id);
    const h = this.header;
    const why = h.resetReason ? ` (tracking restarted: ${h.resetReason})` : '';
    if (!parsed) return `"${id}" is not a change tracking id`;
    if (parsed.version === 1)
      return `${id} was sealed by an older Tidemark tracking format that cannot prove its lineage${why}`;
    if (!guidEquals(parsed.epoch, h.epoch))
      return `${id} belongs to another tracking epoch; the current epoch is ${guidToString(h.epoch)}${why}`;
    if (parsed.counter < h.firstCounter || parsed.counter >= h.counter) return `${id} was never sealed in this epoch`;
    if (parsed.counter < h.counter - SEAL_HISTORY)
      return `${id} is older than the last ${SEAL_HISTORY} seals, whose lineage the tracking file keeps`;
    if (h.nonces[parsed.counter % SEAL_HISTORY] !== parsed.nonce)
      return `${id} was sealed on another copy or another state of this disk (its lineage is not this file's: a copy, a restore or an older copy put back)`;
    return undefined;
  }

  /**
   * QueryChangesVirtualDisk: granularity-aligned, coalesced ranges of [offset, offset+length) changed
   * since `sinceId`, at most `maxRanges` of them; `processedLength` tells where to continue.
   * `sinceId` "*" answers every allocated range (for a first full backup). A writing tracker first checks
   * that nothing else wrote the disk; if something did, the epoch restarts and the id is refused.
   */
  async changes(sinceId: string, offset = 0, length?: number, maxRanges = Infinity): Promise<ChangesResult> {
    const size = this.header.virtualSize;
    const len = length ?? size - offset;
    checkRange(offset, len, size);
    if (maxRanges < 1) throw new TidemarkError('INVALID_ARGUMENT', 'maxRanges must be at least 1');
    if (sinceId === '*') return limitRanges(await this.disk.allocatedExtents(offset, len), offset, len, maxRanges);
    await this.vouch(false);
    const refused = this.refusal(sinceId);
    if (refused) throw new TidemarkError('MISSING_CHANGE_TRACKING_INFORMATION', refused, { id: sinceId });
    const since = parseId(sinceId)!.counter;
    const g = this.header.granularity;
    const end = offset + len;
    const ranges: ChangeRange[] = [];
    const map = this.map;
    let i = Math.floor(offset / g);
    const last = Math.ceil(end / g);
    while (i < last) {
      if (map[i] <= since) {
        i++;
        continue;
      }
      const start = i;
      while (i < last && map[i] > since) i++;
      const from = Math.max(offset, start * g);
      const to = Math.min(end, i * g);
      if (ranges.length === maxRanges) return { ranges, processedLength: from - offset, totalBytes: sum(ranges) };
      ranges.push({ offset: from, length: to - from });
    }
    return { ranges, processedLength: len, totalBytes: sum(ranges) };
  }

  /** The sealed ids of the current epoch that queries answer, oldest first (at most `limit`, the newest). */
  sealedIds(limit = 64): string[] {
    const h = this.header;
    const out: string[] = [];
    const from = Math.max(h.firstCounter, h.counter - Math.min(limit, SEAL_HISTORY));
    for (let c = from; c < h.counter; c++) out.push(formatId(h.epoch, c, h.nonces[c % SEAL_HISTORY]));
    return out;
  }

  status(): TrackerStatus {
    const h = this.header;
    const last = h.counter - 1;
    const first = Math.max(h.firstCounter, h.counter - SEAL_HISTORY);
    return {
      enabled: true,
      // A reset epoch is 'reset' until its first seal; the reason stays for the whole epoch.
      state: h.resetReason && h.counter === h.firstCounter ? 'reset' : 'valid',
      reason: h.resetReason || null,
      epoch: guidToString(h.epoch),
      granularity: h.granularity,
      counter: h.counter,
      firstId: h.counter > h.firstCounter ? formatId(h.epoch, first, h.nonces[first % SEAL_HISTORY]) : null,
      lastId: h.counter > h.firstCounter ? formatId(h.epoch, last, h.nonces[last % SEAL_HISTORY]) : null,
      inUse: h.inUse,
      binding: { head: h.binding.head, dataWriteGuid: guidToString(h.binding.dataWriteGuid) },
      epochStartedAt: new Date(h.epochStartedAt).toISOString(),
      lastSealAt: h.lastSealAt ? new Date(h.lastSealAt).toISOString() : null,
      trackingFiles: this.paths,
      foreignWriterWatch: this.watch
        ? { active: this.watch.available, why: this.watch.available ? null : this.watch.why }
        : null,
    };
  }

  /** Memory held by the fine map. */
  get mapBytes(): number {
    return this.map.byteLength;
  }
}

/**
 * Rewrites the current header of a tracker no session holds (an offline merge: nothing else has the
 * files open). `mutate` changes it; the chain's files are recorded again when `chainOf` gives the disk's
 * files as they are now (after the merge, with their final times: `closedClean`).
 */
export async function updateIdleHeader(
  basePath: string,
  mutate: (h: RctHeader) => void,
  opts: { chain?: string[]; inUse?: boolean } = {},
): Promise<boolean> {
  const paths = trackingPaths(basePath);
  if ((await ChangeTracker.inspect(basePath)).state !== 'ours') return false;
  const rct = await NodeFile.openSidecar(paths.rct, 'r+');
  try {
    const slots = Buffer.alloc(2 * HEADER_SLOT);
    await rct.read(slots, 0);
    const cur = pickHeader(
      decodeRctHeader(slots.subarray(0, HEADER_SLOT)),
      decodeRctHeader(slots.subarray(HEADER_SLOT)),
    );
    if (!cur || cur.inUse !== (opts.inUse ?? false)) return false;
    mutate(cur);
    if (opts.chain) {
      cur.chain = await Promise.all(opts.chain.slice(0, MAX_CHAIN_RECORDS).map((f) => fileRecord(f)));
      cur.closedClean = !cur.inUse;
    } else if (cur.inUse) cur.closedClean = false;
    cur.sequence++;
    await rct.write(encodeRctHeader(cur), Number(cur.sequence % 2n) * HEADER_SLOT);
    await rct.datasync();
    return true;
  } finally {
    await rct.close();
  }
}

function pickHeader(a: RctHeader | string, b: RctHeader | string): RctHeader | undefined {
  if (typeof a === 'string') return typeof b === 'string' ? undefined : b;
  if (typeof b === 'string') return a;
  return b.sequence > a.sequence ? b : a;
}

function sum(ranges: ChangeRange[]): number {
  return ranges.reduce((n, r) => n + r.length, 0);
}

function limitRanges(extents: ChangeRange[], offset: number, len: number, maxRanges: number): ChangesResult {
  if (extents.length <= maxRanges) return { ranges: extents, processedLength: len, totalBytes: sum(extents) };
  const ranges = extents.slice(0, maxRanges);
  return { ranges, processedLength: extents[maxRanges].offset - offset, totalBytes: sum(ranges) };
}

function granulesOf(disk: VhdxFile, granularity: number): number {
  return Math.ceil(disk.virtualSize / granularity);
}

function newEpochHeader(disk: VhdxFile, granularity: number, reason: string): RctHeader {
  const now = Date.now();
  return {
    sequence: 1n,
    inUse: false,
    granularity,
    epoch: newGuid(),
    counter: 1,
    firstCounter: 1,
    mapSlot: 0,
    mapCrc: 0,
    virtualSize: disk.virtualSize,
    virtualDiskId: Buffer.from(disk.virtualDiskId),
    binding: currentBinding(disk),
    pending: null,
    epochStartedAt: now,
    lastSealAt: 0,
    resetReason: reason,
    chain: [],
    closedClean: false,
    rctFile: null,
    mrtFile: null,
    nonces: new BigUint64Array(SEAL_HISTORY),
  };
}

/** Reads the current header and its map; `problem` says why they cannot be trusted. */
async function loadState(
  rct: NodeFile,
  disk: VhdxFile,
): Promise<{ header: RctHeader | undefined; map: Uint32Array; problem?: string }> {
  const slots = Buffer.alloc(2 * HEADER_SLOT);
  await rct.read(slots, 0);
  const a = decodeRctHeader(slots.subarray(0, HEADER_SLOT));
  const b = decodeRctHeader(slots.subarray(HEADER_SLOT));
  const header = pickHeader(a, b);
  if (!header) {
    return {
      header: undefined,
      map: new Uint32Array(0),
      problem:
        a === b ? `the tracking file holds ${a}` : `the tracking file is damaged (header 1: ${a}; header 2: ${b})`,
    };
  }
  const granules = Math.ceil(header.virtualSize / header.granularity);
  const bad = (problem: string) => ({ header, map: new Uint32Array(0), problem });
  if (header.virtualSize !== disk.virtualSize)
    return bad(`the disk was resized (${header.virtualSize} → ${disk.virtualSize} bytes)`);
  if (!guidEquals(header.virtualDiskId, disk.virtualDiskId))
    return bad('the tracking files belong to another virtual disk');
  if (granules * 4 > MAX_MAP_BYTES) return bad('the tracking file claims an oversized map');
  if (rct.size() < mapSlotOffset(granules, header.mapSlot) + granules * 4) return bad('the tracking file is truncated');
  const map = new Uint32Array(granules);
  await rct.read(new Uint8Array(map.buffer), mapSlotOffset(granules, header.mapSlot));
  if (mapCrc(map) !== header.mapCrc) return bad('the change map failed its checksum');
  for (let i = 0; i < map.length; i++) {
    if (map[i] > header.counter) return bad('the change map holds counters from the future');
  }
  return { header, map };
}

/**
 * Are these the file instances tracking last saw? 'identity': the tracking file itself and every file of the
 * chain it recorded must be the same instance (a copy, a restore or a replacement is another lineage).
 * 'content' (after a clean close): they must also be unchanged, nothing having written them while Tidemark
 * had them closed. Files new to the chain (a checkpoint's child) are left to `checkBinding`. Returns why
 * not, or undefined.
 */
async function checkInstances(
  header: RctHeader,
  disk: VhdxFile,
  paths: { rct: string; mrt: string },
  what: 'identity' | 'content',
): Promise<string | undefined> {
  if (what === 'identity' && header.rctFile && !sameInstance(header.rctFile, await fileRecord(paths.rct, false)))
    return `${path.basename(paths.rct)} is a copy or a replacement of the tracking file that recorded this epoch`;
  for (const f of disk.chain()) {
    const now = await fileRecord(f.path);
    const then = header.chain.find((r) => r.nameHash === now.nameHash);
    if (!then) continue;
    const name = path.basename(f.path);
    if (what === 'identity' && !sameInstance(then, now))
      return `${name} is another file than the one tracking last saw (a copy, a restore or a replacement: inode ${then.ino} → ${now.ino})`;
    if (what === 'content' && !sameContent(then, now)) {
      return `${name} was written by another program while Tidemark had it closed (modified ${nsToIso(then.mtimeNs)} → ${nsToIso(now.mtimeNs)}, ${then.size} → ${now.size} bytes)`;
    }
  }
  return undefined;
}

/** After an unclean close: stamps every region the coarse map marked since the last persist. */
async function recoverFromCoarseMap(mrtPath: string, header: RctHeader, map: Uint32Array): Promise<string | undefined> {
  if (!(await exists(mrtPath))) return 'the disk was not closed cleanly and its coarse change map is missing';
  if (header.mrtFile && !sameInstance(header.mrtFile, await fileRecord(mrtPath, false)))
    return 'the disk was not closed cleanly and its coarse change map is a copy or a replacement';
  const regionSize = Math.max(COARSE_REGION, header.granularity);
  const regions = Math.ceil(header.virtualSize / regionSize);
  const len = mrtSlotLength(regions);
  const f = await NodeFile.openSidecar(mrtPath, 'r');
  const slots = Buffer.alloc(2 * len);
  const size = f.size();
  try {
    await f.read(slots, 0);
  } finally {
    await f.close();
  }
  const decoded = [decodeMrtSlot(slots.subarray(0, len), regions), decodeMrtSlot(slots.subarray(len), regions)];
  // Both slots must be good: a damaged one may have held the newest marks (a torn write of it is not
  // told apart from damage, so it resets too). The one exception: the second slot still empty while
  // the first is the one `enable` wrote.
  const secondUnused = isEnableTimeSlot(decoded[0]) && slots.subarray(len).every((x) => x === 0);
  if (
    size < len ||
    typeof decoded[0] === 'string' ||
    (!secondUnused && (size < 2 * len || typeof decoded[1] === 'string'))
  ) {
    return 'the disk was not closed cleanly and its coarse change map cannot be trusted (damaged or truncated)';
  }
  const candidates = decoded.filter(
    (x): x is MrtSlot => typeof x !== 'string' && guidEquals(x.epoch, header.epoch) && x.regionSize === regionSize,
  );
  if (candidates.length === 0)
    return 'the disk was not closed cleanly and its coarse change map belongs to another epoch';
  // The newest marks: those of the newest map generation, then the later write of the two slots.
  const newer = (x: MrtSlot, y: MrtSlot) =>
    y.rctSequence > x.rctSequence || (y.rctSequence === x.rctSequence && y.sequence > x.sequence);
  const latest = candidates.reduce((x, y) => (newer(x, y) ? y : x));
  if (latest.rctSequence > header.sequence) return 'the coarse change map is newer than the change map';
  if (latest.rctSequence < header.sequence) return undefined; // every mark is already in the map
  const g = header.granularity;
  for (let r = 0; r < regions; r++) {
    if ((latest.bitmap[r >> 3] >> (r & 7)) & 1) {
      map.fill(
        header.counter,
        Math.floor((r * regionSize) / g),
        Math.min(map.length, Math.ceil(((r + 1) * regionSize) / g)),
      );
    }
  }
  return undefined;
}

/** The slot `enable` writes: sequence 1, before any map generation. */
function isEnableTimeSlot(d: MrtSlot | string): boolean {
  return typeof d !== 'string' && d.sequence === 1n && d.rctSequence === 0n;
}

/** Is the disk still the one the tracker last saw? Returns why not, or undefined. */
async function checkBinding(header: RctHeader, disk: VhdxFile): Promise<string | undefined> {
  const now = currentBinding(disk);
  if (sameBinding(now, header.binding) || (header.pending && sameBinding(now, header.pending))) return undefined;
  if (now.head !== header.binding.head) {
    // New differencing disks over the recorded head (checkpoints): fine while none of them holds data.
    const chain = disk.chain();
    const k = chain.findIndex((d) => path.basename(d.path) === header.binding.head);
    if (k > 0 && guidEquals(chain[k].header.dataWriteGuid, header.binding.dataWriteGuid)) {
      for (const d of chain.slice(0, k)) {
        if (await ownsData(d)) return `${path.basename(d.path)} was written without change tracking`;
      }
      return undefined;
    }
    return `the disk's head is ${now.head}, but tracking last saw ${header.binding.head}`;
  }
  return `${now.head} was modified by another program or replaced by another copy (DataWriteGuid ${guidToString(now.dataWriteGuid)}, tracking expected ${guidToString(header.binding.dataWriteGuid)})`;
}

/** Whether the head file itself (not its parents) holds any block. */
async function ownsData(disk: VhdxFile): Promise<boolean> {
  for await (const { entry } of disk.ownBlocks()) {
    if (entry.state !== 0) return true;
  }
  return false;
}

async function openOrCreate(p: string): Promise<NodeFile> {
  try {
    return await NodeFile.openSidecar(p, 'r+');
  } catch (err) {
    if (err instanceof TidemarkError && err.code === 'NOT_FOUND') return NodeFile.openSidecar(p, 'wx');
    throw err;
  }
}

function describeFindings(found: ReturnType<FileWatch['findings']>): string {
  const first = describeAccess(found[0]);
  return found.length > 1 ? `${first} (and ${found.length - 1} more)` : first;
}

/**
 * What a sidecar is, by its first bytes at `offsets` (and at 4 KiB steps within its first MiB when no
 * offsets are given): 'missing', 'empty', 'ours', or a phrase saying why it is not ours.
 */
async function sidecarSignatures(
  file: string,
  offsets: number[],
  isOurs: (first: Buffer) => boolean,
): Promise<'missing' | 'empty' | 'ours' | string> {
  let st;
  try {
    st = await lstat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 'missing';
    throw err;
  }
  // A link or a FIFO where a tracking file belongs is hostile, not another product's: refused, never followed.
  if (st.isSymbolicLink()) throw new SymlinkRefusedError(file);
  if (!st.isFile()) throw new FileTypeError(file, fileTypeName(st), 'file');
  if (st.size === 0) return 'empty';
  const handle = await open(file, 'r');
  try {
    const at = offsets.length > 0 ? offsets : Array.from({ length: 256 }, (_, i) => i * 4096);
    const probe = Buffer.alloc(8);
    for (const o of at) {
      if (o + 8 > st.size) continue;
      const { bytesRead } = await handle.read(probe, 0, 8, o);
      if (bytesRead === 8 && isOurs(probe)) return 'ours';
    }
  } finally {
    await handle.close();
  }
  return "was not written by Tidemark (another product's tracking file, e.g. Hyper-V's own)";
}
