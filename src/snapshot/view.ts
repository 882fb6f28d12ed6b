/**
 * What both providers share: the read-only view of one file of a snapshot
 * and the bookkeeping that lets `release` wait for the reads and copies still running.
 */
import { TidemarkError } from '../errors.js';
import type { RandomAccessFile } from '../util/file.js';
import type { DataExtent } from '../util/holes.js';

/** The side of a snapshot a view needs. */
export interface ViewOwner {
  readonly id: string;
  /** Throws CLOSED after release (or the error that discarded the snapshot). */
  assertReadable(): void;
  /** Runs `p` as work that release must wait for. */
  track<T>(p: Promise<T>): Promise<T>;
}

/** Promises `release` waits for; a rejected one is the caller's business, not release's. */
export class PendingWork {
  private readonly pending = new Set<Promise<unknown>>();

  track<T>(p: Promise<T>): Promise<T> {
    this.pending.add(p);
    const done = () => void this.pending.delete(p);
    p.then(done, done);
    return p;
  }

  async drain(): Promise<void> {
    while (this.pending.size > 0) await Promise.allSettled([...this.pending]);
  }
}

export class SnapshotView implements RandomAccessFile {
  readonly writable = false;
  private closed = false;

  constructor(
    private readonly owner: ViewOwner,
    /** The live file's path: the view stands for it. */
    readonly path: string,
    private readonly length: number,
    private readonly reader: (buf: Uint8Array, position: number) => Promise<void>,
    private readonly onClose: () => Promise<void> = async () => undefined,
    /** Where the file held data at the instant (see RandomAccessFile.dataExtents); absent: unknown. */
    private readonly extents?: (offset: number, length: number) => DataExtent[] | undefined,
  ) {}

  dataExtents(offset: number, length: number): DataExtent[] | undefined {
    if (this.closed || !this.extents) return undefined;
    this.owner.assertReadable();
    return this.extents(offset, length);
  }

  size(): number {
    return this.length;
  }

  async read(buf: Uint8Array, position: number): Promise<void> {
    if (this.closed) throw new TidemarkError('CLOSED', `the snapshot view of ${this.path} is closed`);
    this.owner.assertReadable();
    if (!Number.isSafeInteger(position) || position < 0 || !Number.isSafeInteger(position + buf.length))
      throw new TidemarkError('IO_ERROR', `cannot read ${this.path} at offset ${position}: out of range`);
    await this.owner.track(this.reader(buf, position));
  }

  async write(): Promise<void> {
    throw new TidemarkError('READ_ONLY', `${this.path} in snapshot ${this.owner.id} is read-only`);
  }

  async truncate(): Promise<void> {
    throw new TidemarkError('READ_ONLY', `${this.path} in snapshot ${this.owner.id} is read-only`);
  }

  async datasync(): Promise<void> {}

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.onClose();
  }
}

export function releasedError(id: string): TidemarkError {
  return new TidemarkError('CLOSED', `snapshot ${id} was released`, { snapshot: id });
}
