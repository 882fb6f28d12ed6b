/**
 * Reusable I/O buffers for read replies and write payloads (the NBD server keeps one pool and takes
 * only CHUNK-sized buffers from it: see budget.ts). A fresh 256 KiB buffer per request costs a
 * mmap, a page fault per 4 KiB when it is first filled, a munmap and garbage-collector pressure (V8
 * answers the external-memory churn with a mark-compact every ~100 ms); at GB/s that is most of the
 * server's user CPU. Buffers come in power-of-two classes from 4 KiB to 32 MiB. While I/O runs the pool
 * keeps up to `maxRetained` bytes of free buffers, enough for nbdcopy's 4 connections × 64 requests
 * and the replies queued behind them; once no buffer was taken for `idleMs` it shrinks to
 * `idleRetained`, so an idle server does not sit on a burst's memory.
 */

const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 25; // 32 MiB
const MAX_RETAINED = 256 * 1024 * 1024;
const IDLE_RETAINED = 32 * 1024 * 1024;
const IDLE_MS = 5000;

export interface BufferPoolOptions {
  maxRetained?: number;
  idleRetained?: number;
  idleMs?: number;
}

export class BufferPool {
  private readonly free: Buffer[][] = [];
  private retained = 0;
  /** Buffers allocated because none of their class was free (a measure of the pool's hit rate). */
  allocated = 0;
  /** The memory this pool handed out: nothing else is ever taken back. */
  private readonly mine = new WeakSet<ArrayBufferLike>();
  private readonly maxRetained: number;
  private readonly idleRetained: number;
  private readonly idleMs: number;
  private lastGet = 0;
  private idleTimer: NodeJS.Timeout | undefined;

  constructor(opts: BufferPoolOptions | number = {}) {
    const o = typeof opts === 'number' ? { maxRetained: opts } : opts;
    this.maxRetained = o.maxRetained ?? MAX_RETAINED;
    this.idleRetained = Math.min(o.idleRetained ?? IDLE_RETAINED, this.maxRetained);
    this.idleMs = o.idleMs ?? IDLE_MS;
    for (let c = 0; c <= MAX_CLASS; c++) this.free.push([]);
  }

  /** A buffer of exactly `length` bytes (its content is garbage). */
  get(length: number): Buffer {
    this.lastGet = performance.now();
    const c = sizeClass(length);
    if (c > MAX_CLASS) return Buffer.allocUnsafeSlow(length);
    let b = this.free[c].pop();
    if (b) this.retained -= b.length;
    else {
      b = Buffer.allocUnsafeSlow(2 ** c);
      this.mine.add(b.buffer);
      this.allocated++;
    }
    return b.subarray(0, length);
  }

  /** Gives back a buffer from `get`, once nothing uses it any more (others are ignored). */
  put(buf: Buffer): void {
    const ab = buf.buffer;
    if (!this.mine.has(ab) || this.retained + ab.byteLength > this.maxRetained) return;
    this.retained += ab.byteLength;
    this.free[sizeClass(ab.byteLength)].push(Buffer.from(ab));
    if (this.retained > this.idleRetained) this.armIdleTrim();
  }

  get retainedBytes(): number {
    return this.retained;
  }

  /** Lets free buffers go, largest first, until at most `keep` bytes are retained. */
  trim(keep = this.idleRetained): void {
    for (let c = MAX_CLASS; c >= MIN_CLASS && this.retained > keep; c--) {
      const list = this.free[c];
      while (list.length > 0 && this.retained > keep) this.retained -= list.pop()!.length;
    }
  }

  private armIdleTrim(): void {
    if (this.idleTimer) return;
    const check = () => {
      const idle = performance.now() - this.lastGet;
      if (idle >= this.idleMs) {
        this.idleTimer = undefined;
        this.trim();
      } else {
        this.idleTimer = setTimeout(check, this.idleMs - idle).unref();
      }
    };
    this.idleTimer = setTimeout(check, this.idleMs).unref();
  }
}

function sizeClass(length: number): number {
  let c = MIN_CLASS;
  while (2 ** c < length) c++;
  return c;
}
