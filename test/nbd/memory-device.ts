/**
 * A BlockDevice in memory for the NBD tests: sparse by 64 KiB clusters (a cluster never written or
 * trimmed whole is a hole that reads zeros), dirty maps per sealed id, and hooks to inject failures and
 * to hold operations (for concurrency, shutdown and slow-device tests).
 */
import type { AllocationExtent, BlockDevice, DirtyExtent, WriteOptions, ZeroOptions } from '../../src/disk/device.js';
import { TidemarkError } from '../../src/errors.js';
import { sleep } from '../helpers/async.js';

export const CLUSTER = 64 * 1024;

type Op = 'read' | 'write' | 'flush' | 'trim' | 'writeZeroes' | 'blockStatus' | 'dirtyStatus';

export interface MemoryDeviceOptions {
  size: number;
  readOnly?: boolean;
  minimumBlockSize?: number;
  preferredBlockSize?: number;
  /** Zeroing that is not whole clusters is refused with fast (as a device that would have to write). */
  strictFastZero?: boolean;
}

export class MemoryDevice implements BlockDevice {
  readonly size: number;
  readonly readOnly: boolean;
  readonly minimumBlockSize: number;
  readonly preferredBlockSize: number;
  readonly data: Buffer;
  /** One byte per cluster: 1 allocated. */
  readonly allocated: Uint8Array;
  /** What happened, in order: `write 0 4096 fua`, `flush`, ... */
  readonly log: string[] = [];
  /** Operations that have started and not finished. */
  running = 0;
  maxRunning = 0;

  private readonly strictFastZero: boolean;
  private readonly bitmaps = new Map<string, Uint8Array>();
  private readonly sealed: string[] = [];
  private readonly faults = new Map<Op, Error>();
  private holds: { pred: (entry: string) => boolean; until: Promise<void>; release: () => void }[] = [];
  private sealCount = 0;

  constructor(opts: MemoryDeviceOptions) {
    this.size = opts.size;
    this.readOnly = !!opts.readOnly;
    this.minimumBlockSize = opts.minimumBlockSize ?? 512;
    this.preferredBlockSize = opts.preferredBlockSize ?? CLUSTER;
    this.strictFastZero = !!opts.strictFastZero;
    this.data = Buffer.alloc(opts.size);
    this.allocated = new Uint8Array(Math.ceil(opts.size / CLUSTER));
  }

  // ---------------------------------------------------------------- test hooks

  /** Reads touching [offset, offset+length) fail with EIO-like errors until cleared. */
  readonly badRanges: { offset: number; length: number }[] = [];

  /** The next `op` fails with `err`. */
  failNext(op: Op, err: Error): void {
    this.faults.set(op, err);
  }

  /** Operations whose log entry (`read 0 4096`, `flush`...) matches wait until the returned release is called. */
  holdWhere(pred: (entry: string) => boolean): () => void {
    let release!: () => void;
    const until = new Promise<void>((resolve) => (release = resolve));
    const hold = { pred, until, release };
    this.holds.push(hold);
    return () => {
      this.holds = this.holds.filter((h) => h !== hold);
      release();
    };
  }

  /** Every operation from now on waits until `releaseAll()`. */
  holdAll(): void {
    this.holdWhere(() => true);
  }

  releaseAll(): void {
    for (const h of this.holds.splice(0)) h.release();
  }

  /** Resolves once `n` operations are waiting on holds or running. */
  async untilRunning(n: number, timeoutMs = 5000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (this.running < n) {
      if (Date.now() > deadline) throw new Error(`only ${this.running} of ${n} operations started`);
      await sleep(5);
    }
  }

  /** Seals an id: from now on writes are dirty relative to it. */
  seal(): string {
    const id = `mem1:${(++this.sealCount).toString().padStart(8, '0')}`;
    this.bitmaps.set(id, new Uint8Array(Math.ceil(this.size / CLUSTER)));
    this.sealed.push(id);
    return id;
  }

  /** Fills [offset, offset+length) with `byte` and marks it allocated (without dirtying). */
  fill(offset: number, length: number, byte: number): void {
    this.data.fill(byte, offset, offset + length);
    this.markAllocated(offset, length);
  }

  // ---------------------------------------------------------------- BlockDevice

  async read(offset: number, length: number): Promise<Buffer> {
    await this.enter('read', `read ${offset} ${length}`);
    try {
      this.checkRange(offset, length);
      const bad = this.badRanges.find((r) => r.offset < offset + length && offset < r.offset + r.length);
      if (bad) throw new TidemarkError('IO_ERROR', `unreadable sectors at ${bad.offset}`);
      return Buffer.from(this.data.subarray(offset, offset + length));
    } finally {
      this.running--;
    }
  }

  async write(offset: number, data: Uint8Array, opts: WriteOptions = {}): Promise<void> {
    await this.enter('write', `write ${offset} ${data.length}${opts.fua ? ' fua' : ''}`);
    try {
      this.checkWritable();
      this.checkRange(offset, data.length);
      this.data.set(data, offset);
      this.markAllocated(offset, data.length);
      this.markDirty(offset, data.length);
    } finally {
      this.running--;
    }
  }

  async flush(): Promise<void> {
    await this.enter('flush', 'flush');
    this.running--;
  }

  async trim(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    await this.enter('trim', `trim ${offset} ${length}${opts.fua ? ' fua' : ''}`);
    try {
      this.checkWritable();
      this.checkRange(offset, length);
      this.zero(offset, length, true);
    } finally {
      this.running--;
    }
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    const flags = [opts.fua && 'fua', opts.noHole && 'nohole', opts.fast && 'fast'].filter(Boolean).join(' ');
    await this.enter('writeZeroes', `zero ${offset} ${length}${flags ? ' ' + flags : ''}`);
    try {
      this.checkWritable();
      this.checkRange(offset, length);
      if (opts.fast && this.strictFastZero && (offset % CLUSTER !== 0 || length % CLUSTER !== 0)) {
        throw new TidemarkError('NOT_SUPPORTED', 'zeroing part of a cluster is not fast');
      }
      this.zero(offset, length, !opts.noHole);
    } finally {
      this.running--;
    }
  }

  async blockStatus(offset: number, length: number): Promise<AllocationExtent[]> {
    await this.enter('blockStatus', `blockStatus ${offset} ${length}`);
    try {
      this.checkRange(offset, length);
      return runs(offset, length, (c) => this.allocated[c] === 1).map((r) => ({
        offset: r.offset,
        length: r.length,
        hole: !r.set,
        zero: !r.set,
      }));
    } finally {
      this.running--;
    }
  }

  async dirtyContexts(): Promise<string[]> {
    return [...this.sealed];
  }

  async dirtyStatus(name: string, offset: number, length: number): Promise<DirtyExtent[]> {
    await this.enter('dirtyStatus', `dirtyStatus ${name} ${offset} ${length}`);
    try {
      const map = this.bitmaps.get(name);
      if (!map) throw new TidemarkError('MISSING_CHANGE_TRACKING_INFORMATION', `no sealed id ${name}`);
      this.checkRange(offset, length);
      return runs(offset, length, (c) => map[c] === 1).map((r) => ({
        offset: r.offset,
        length: r.length,
        dirty: r.set,
      }));
    } finally {
      this.running--;
    }
  }

  // ---------------------------------------------------------------- internals

  private async enter(op: Op, entry: string): Promise<void> {
    this.running++;
    this.maxRunning = Math.max(this.maxRunning, this.running);
    for (const h of this.holds) if (h.pred(entry)) await h.until;
    this.log.push(entry);
    const fault = this.faults.get(op);
    if (fault) {
      this.faults.delete(op);
      this.running--;
      throw fault;
    }
  }

  private checkWritable(): void {
    if (this.readOnly) throw new TidemarkError('READ_ONLY', 'memory device is read-only');
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new TidemarkError('INVALID_ARGUMENT', `bad range [${offset}, +${length})`);
    }
    if (offset + length > this.size) {
      throw new TidemarkError('INVALID_ARGUMENT', `range [${offset}, +${length}) is past the end (${this.size})`);
    }
  }

  private markAllocated(offset: number, length: number): void {
    if (length === 0) return;
    for (let c = Math.floor(offset / CLUSTER); c <= Math.floor((offset + length - 1) / CLUSTER); c++) {
      this.allocated[c] = 1;
    }
  }

  private markDirty(offset: number, length: number): void {
    if (length === 0) return;
    for (const map of this.bitmaps.values()) {
      for (let c = Math.floor(offset / CLUSTER); c <= Math.floor((offset + length - 1) / CLUSTER); c++) map[c] = 1;
    }
  }

  private zero(offset: number, length: number, deallocate: boolean): void {
    if (length === 0) return;
    this.data.fill(0, offset, offset + length);
    this.markDirty(offset, length);
    if (!deallocate) {
      this.markAllocated(offset, length);
      return;
    }
    const first = Math.ceil(offset / CLUSTER);
    const end = Math.floor((offset + length) / CLUSTER);
    for (let c = first; c < end; c++) this.allocated[c] = 0;
    // The tail cluster of a disk whose size is not a cluster multiple.
    if (offset + length === this.size && this.size % CLUSTER !== 0 && offset <= end * CLUSTER) this.allocated[end] = 0;
  }
}

/** Maximal runs of clusters with the same predicate value, clipped to [offset, offset+length). */
function runs(offset: number, length: number, set: (cluster: number) => boolean) {
  const out: { offset: number; length: number; set: boolean }[] = [];
  const end = offset + length;
  let pos = offset;
  while (pos < end) {
    const c = Math.floor(pos / CLUSTER);
    const v = set(c);
    let next = (c + 1) * CLUSTER;
    while (next < end && set(Math.floor(next / CLUSTER)) === v) next += CLUSTER;
    const to = Math.min(next, end);
    out.push({ offset: pos, length: to - pos, set: v });
    pos = to;
  }
  return out;
}
