/**
 * A guest workload: seeded random writes of whole units (64 KiB by default) to a disk, through NBD or
 * directly, with a log of every write (when issued, when acknowledged, when a flush made it durable, and
 * the hash of its content). From the log it answers what a disk may hold at an instant:
 * - at a checkpoint cut between t0 and t1: every unit holds the last write acknowledged before t0, or a
 *   write in flight across the cut; nothing issued after t1;
 * - after a crash at t: every unit holds at least its last write made durable by a completed flush, or a
 *   later write issued before t.
 * Writes to one unit never overlap in time, so "the last write" is well defined.
 */
import { createHash } from 'node:crypto';
import { TidemarkError } from '../errors.js';

export interface WorkloadTarget {
  readonly size: number;
  write(offset: number, data: Uint8Array): Promise<void>;
  flush(): Promise<void>;
}

export interface WorkloadOptions {
  seed: number;
  unit?: number;
  /** Writes in flight at once (default 4). */
  concurrency?: number;
  /** A flush after this many writes (default 32). */
  flushEvery?: number;
  /** Only units in [firstUnit, firstUnit+units) (default: the whole disk). */
  firstUnit?: number;
  units?: number;
  /** Pause between writes per writer, in ms (default 0). */
  delayMs?: number;
}

export interface WriteRecord {
  seq: number;
  unit: number;
  hash: string;
  issuedAt: number;
  ackedAt: number | null;
  /** When a flush issued after the acknowledgement completed (durable from then on). */
  durableAt: number | null;
}

export class Workload {
  readonly unit: number;
  readonly log: WriteRecord[] = [];
  private running = false;
  private loops: Promise<void>[] = [];
  private state: number;
  private busyUnits = new Set<number>();
  private sinceFlush: WriteRecord[] = [];
  private failure: Error | undefined;
  private flushing: Promise<void> | undefined;

  constructor(
    private readonly target: WorkloadTarget,
    private readonly opts: WorkloadOptions,
  ) {
    this.unit = opts.unit ?? 64 * 1024;
    this.state = opts.seed >>> 0 || 1;
    if (target.size < this.unit) throw new TidemarkError('INVALID_ARGUMENT', 'disk smaller than one workload unit');
  }

  get units(): number {
    return this.opts.units ?? Math.floor(this.target.size / this.unit);
  }

  get writes(): number {
    return this.log.filter((w) => w.ackedAt !== null).length;
  }

  get bytesWritten(): number {
    return this.writes * this.unit;
  }

  /** The content of write `seq` (deterministic: it can be recomputed for any record). */
  data(seq: number, unit: number): Buffer {
    const b = Buffer.allocUnsafe(this.unit);
    let x = (Math.imul(seq + 1, 0x9e3779b1) ^ Math.imul(unit + 1, 0x85ebca77) ^ this.opts.seed) >>> 0 || 1;
    for (let i = 0; i < b.length; i += 4) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      b.writeUInt32LE(x >>> 0, i);
    }
    b.writeUInt32LE(seq, 0); // the first word names the write
    return b;
  }

  start(): void {
    if (this.running) return;
    this.running = true;
    for (let i = 0; i < (this.opts.concurrency ?? 4); i++) this.loops.push(this.loop());
  }

  /** Stops issuing, waits for what is in flight, then flushes. Throws the first write error. */
  async stop(opts: { flush?: boolean } = {}): Promise<void> {
    this.running = false;
    await Promise.all(this.loops);
    this.loops = [];
    if (this.failure) throw this.failure;
    if (opts.flush !== false) await this.flush();
  }

  /** Runs `n` writes (not concurrently with start/stop). */
  async run(n: number): Promise<void> {
    for (let i = 0; i < n; i++) await this.writeOne();
    await this.flush();
  }

  async flush(): Promise<void> {
    const batch = this.sinceFlush;
    this.sinceFlush = [];
    await this.target.flush();
    const now = performance.now();
    for (const w of batch) w.durableAt ??= now;
  }

  /** What every unit holds once all acknowledged writes landed (the client's view). */
  expectedImage(): Buffer {
    const img = Buffer.alloc(this.units * this.unit);
    for (const w of this.lastWrites(() => true).values()) {
      this.data(w.seq, w.unit).copy(img, (w.unit - (this.opts.firstUnit ?? 0)) * this.unit);
    }
    return img;
  }

  /**
   * Checks content read at a checkpoint cut made between t0 and t1. `read(unit)` gives the unit's bytes.
   * Returns the problems found (empty when the content is exactly a possible state).
   */
  async verifyCut(
    read: (unit: number) => Promise<Buffer>,
    t0: number,
    t1: number,
    before?: (unit: number) => Buffer,
  ): Promise<string[]> {
    const acked = this.lastWrites((w) => w.ackedAt !== null && w.ackedAt < t0);
    const during = (w: WriteRecord) => w.issuedAt < t1 && (w.ackedAt === null || w.ackedAt >= t0);
    return this.verify(read, acked, during, 'at the checkpoint', false, before);
  }

  /**
   * Checks content after a crash at `t`: nothing made durable is missing. `before(unit)` is what a unit
   * held before this workload started (default zeros).
   */
  async verifyAfterCrash(
    read: (unit: number) => Promise<Buffer>,
    t: number,
    before?: (unit: number) => Buffer,
  ): Promise<string[]> {
    const durable = this.lastWrites((w) => w.durableAt !== null && w.durableAt < t);
    const later = (w: WriteRecord) => w.issuedAt < t && !(w.durableAt !== null && w.durableAt < t);
    return this.verify(read, durable, later, 'after the crash', true, before, true);
  }

  private async verify(
    read: (unit: number) => Promise<Buffer>,
    base: Map<number, WriteRecord>,
    alsoAllowed: (w: WriteRecord) => boolean,
    when: string,
    laterOnlyAfterBase = false,
    before?: (unit: number) => Buffer,
    /** After a crash a write never acknowledged as durable may be torn: each sector from some allowed version. */
    sectorAtomic = false,
  ): Promise<string[]> {
    const problems: string[] = [];
    const touched = new Set(this.log.map((w) => w.unit));
    for (const unit of touched) {
      const got = await read(unit);
      const gotSeq = got.readUInt32LE(0);
      const allowed: WriteRecord[] = [];
      const b = base.get(unit);
      if (b) allowed.push(b);
      for (const w of this.log) {
        if (w.unit !== unit || !alsoAllowed(w)) continue;
        if (laterOnlyAfterBase && b && w.seq < b.seq) continue;
        allowed.push(w);
      }
      const zero = got.every((x) => x === 0);
      if (!b && (before ? got.equals(before(unit)) : zero)) continue;
      const match = allowed.find((w) => w.seq === gotSeq && w.hash === hash(got));
      if (!match && sectorAtomic) {
        const versions = allowed.map((w) => this.data(w.seq, w.unit));
        versions.push(b ? this.data(b.seq, b.unit) : before ? before(unit) : Buffer.alloc(this.unit));
        let torn = true;
        for (let at = 0; at < got.length && torn; at += 512) {
          const sector = got.subarray(at, at + 512);
          torn = versions.some((v) => v.subarray(at, at + 512).equals(sector));
        }
        // A torn write is allowed only where a write was still in flight (never made durable).
        if (torn && allowed.some((w) => w !== b)) continue;
      }
      if (!match) {
        problems.push(
          `unit ${unit} ${when}: holds ${zero ? 'zeros' : `write ${gotSeq}`}${zero ? '' : hash(got) === this.hashOf(gotSeq, unit) ? '' : ` (damaged: ${this.sectorsMatching(got, gotSeq, unit)} of ${this.unit / 512} sectors match)`}, expected ${allowed.map((w) => `write ${w.seq}`).join(' or ') || 'zeros'}`,
        );
        if (problems.length >= 10) break;
      }
    }
    return problems;
  }

  private sectorsMatching(got: Buffer, seq: number, unit: number): number {
    const want = this.data(seq, unit);
    let n = 0;
    for (let at = 0; at < got.length; at += 512)
      if (got.subarray(at, at + 512).equals(want.subarray(at, at + 512))) n++;
    return n;
  }

  private hashOf(seq: number, unit: number): string {
    return hash(this.data(seq, unit));
  }

  private lastWrites(filter: (w: WriteRecord) => boolean): Map<number, WriteRecord> {
    const last = new Map<number, WriteRecord>();
    for (const w of this.log) if (filter(w) && w.ackedAt !== null) last.set(w.unit, w);
    return last;
  }

  private next(): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x >>> 0;
    return this.state / 4294967296;
  }

  private async loop(): Promise<void> {
    while (this.running && !this.failure) {
      try {
        await this.writeOne();
        if (this.opts.delayMs) await new Promise((r) => setTimeout(r, this.opts.delayMs));
      } catch (err) {
        this.failure = err as Error;
      }
    }
  }

  private async writeOne(): Promise<void> {
    let unit: number;
    do unit = (this.opts.firstUnit ?? 0) + Math.floor(this.next() * this.units);
    while (this.busyUnits.has(unit));
    this.busyUnits.add(unit);
    const seq = this.log.length;
    const data = this.data(seq, unit);
    const rec: WriteRecord = {
      seq,
      unit,
      hash: hash(data),
      issuedAt: performance.now(),
      ackedAt: null,
      durableAt: null,
    };
    this.log.push(rec);
    try {
      await this.target.write(unit * this.unit, data);
      rec.ackedAt = performance.now();
      this.sinceFlush.push(rec);
    } finally {
      this.busyUnits.delete(unit);
    }
    if (this.sinceFlush.length >= (this.opts.flushEvery ?? 32)) {
      this.flushing ??= this.flush().finally(() => (this.flushing = undefined));
      await this.flushing;
    }
  }
}

function hash(b: Uint8Array): string {
  return createHash('sha256').update(b).digest('hex').slice(0, 32);
}
