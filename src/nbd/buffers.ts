/**
 * Reusable I/O buffers for read replies and write payloads. A fresh 256 KiB buffer per request costs a
 * mmap, a page fault per 4 KiB when it is first filled, a munmap and garbage-collector pressure; at
 * GB/s that is most of the server's CPU. Buffers come in power-of-two classes from 4 KiB to 32 MiB; at
 * most MAX_RETAINED bytes of free buffers are kept (a buffer never given back is simply collected).
 */

const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 25; // 32 MiB
const MAX_RETAINED = 64 * 1024 * 1024;

export class BufferPool {
  private readonly free: Buffer[][] = [];
  private retained = 0;
  /** Buffers allocated because none of their class was free (a measure of the pool's hit rate). */
  allocated = 0;
  /** The memory this pool handed out: nothing else is ever taken back. */
  private readonly mine = new WeakSet<ArrayBufferLike>();

  constructor(private readonly maxRetained = MAX_RETAINED) {
    for (let c = 0; c <= MAX_CLASS; c++) this.free.push([]);
  }

  /** A buffer of exactly `length` bytes (its content is garbage). */
  get(length: number): Buffer {
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
  }

  get retainedBytes(): number {
    return this.retained;
  }
}

function sizeClass(length: number): number {
  let c = MIN_CLASS;
  while (2 ** c < length) c++;
  return c;
}

/** The pool shared by every connection of the process. */
export const sharedPool = new BufferPool();
