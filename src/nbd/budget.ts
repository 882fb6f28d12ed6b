/**
 * The NBD server's memory budget. Memory is counted as the buffers it really occupies, not as payload
 * bytes: data lives in CHUNK-sized buffers (a 4 KiB read holds a whole chunk), and every buffer a
 * socket holds costs BUFFER_OVERHEAD besides its bytes (so a flood of 16-byte replies is counted at
 * what it costs).
 *
 * Every message a client sends reserves what it will cost before the server reads or runs it (a
 * write's payload before its first byte is read, a read's data and reply before the device is asked),
 * and the reservation is released only when the socket has written the reply, not when it is queued.
 * A reservation is refused, and the connection stops reading until memory is released, when it would
 * take the connection over its own budget, or the server over its budget. The last eighth of the
 * server's budget is kept for light connections (holding little), so that heavy clients that stall
 * (half-sent payloads, replies nobody reads) do not at once keep a new client from being served; the
 * server also drops stalled holders when someone starves (server.ts).
 *
 * Why one buffer size: a buffer the pool lets go is freed only when V8 next collects garbage, which
 * may be tens of megabytes later. With one size, every free buffer the pool keeps serves any request,
 * so the pool never has to let one go to make another: the chunks allocated never exceed the most
 * ever in use at once, which the budget bounds. One message is always admitted when nothing at all is
 * in use, so a budget smaller than the largest message still makes progress.
 */
import type { BufferPool } from './buffers.js';

/** The one size of data buffers: the preferred block size, and the smallest VHDX block size. */
export const CHUNK = 1024 * 1024;

/**
 * What a buffer costs besides its bytes while a socket holds it: the Buffer object, the write request
 * and its callback (measured with Node 20: ~255 bytes per queued write, ~325 with a callback).
 */
export const BUFFER_OVERHEAD = 320;

/** The cost of a small buffer of `length` bytes queued on a socket. */
export const bufferCost = (length: number): number => length + BUFFER_OVERHEAD;

/** Chunks that hold `length` bytes. */
export const chunksFor = (length: number): number => Math.ceil(length / CHUNK);

/** The cost of the chunks that hold `length` bytes of data. */
export const dataCost = (length: number): number => chunksFor(length) * (CHUNK + BUFFER_OVERHEAD);

/** One holder's share of the budget (a connection). */
export class MemoryAccount {
  /** Bytes this holder has reserved and not released. */
  held = 0;
  /** Why the last reservation was refused: its own budget, or the server's (others hold the memory). */
  refusedBy: 'own' | 'server' | undefined;
  constructor(readonly limit: number) {}
}

export class MemoryBudget {
  /** Bytes reserved by all accounts. */
  private usedBytes = 0;
  /** Above `limit - reserved`, only light accounts are served. */
  readonly reserved: number;
  /** An account holding at most this much (after the grant) is light. */
  readonly light: number;
  private readonly waiters = new Set<() => void>();
  private wakeScheduled = false;

  constructor(
    readonly limit: number,
    private readonly pool: BufferPool,
  ) {
    this.reserved = Math.floor(limit / 8);
    this.light = Math.max(Math.floor(this.reserved / 16), 2 * (CHUNK + BUFFER_OVERHEAD));
  }

  get used(): number {
    return this.usedBytes;
  }

  /** Free chunks the pool keeps for reuse (never more than the most ever in use at once). */
  get pooled(): number {
    return this.pool.retainedBytes;
  }

  /**
   * Reserves `bytes` for `account` if its own budget (`limit`, default the account's) and the server's
   * allow it. One reservation is always allowed to an account that holds nothing as far as its own
   * budget goes, and to anyone when nothing at all is in use.
   */
  tryReserve(account: MemoryAccount, bytes: number, limit = account.limit): boolean {
    account.refusedBy = undefined;
    if (account.held > 0 && account.held + bytes > limit) {
      account.refusedBy = 'own';
      return false;
    }
    if (this.usedBytes > 0) {
      const after = this.usedBytes + bytes;
      if (after > this.limit || (after > this.limit - this.reserved && account.held + bytes > this.light)) {
        account.refusedBy = 'server';
        return false;
      }
    }
    this.charge(account, bytes);
    return true;
  }

  /** Adds (or with a negative value, returns) memory whatever the budgets say: for corrections to an estimate. */
  charge(account: MemoryAccount, bytes: number): void {
    account.held += bytes;
    this.usedBytes += bytes;
    if (bytes < 0) this.wakeWaiters();
  }

  release(account: MemoryAccount, bytes: number): void {
    if (bytes !== 0) this.charge(account, -bytes);
  }

  /** The chunks for `length` bytes of data (the last one cut to size), reserved as dataCost(length). */
  takeChunks(length: number): Buffer[] {
    const out: Buffer[] = [];
    for (let at = 0; at < length; at += CHUNK) out.push(this.pool.get(CHUNK).subarray(0, Math.min(CHUNK, length - at)));
    return out;
  }

  /** Gives chunks from takeChunks back to the pool (the caller releases their cost). */
  giveBack(chunks: readonly Buffer[]): void {
    for (const c of chunks) this.pool.put(c);
  }

  /** `wake` is called (once, soon) after memory is next released. */
  waitFor(wake: () => void): void {
    this.waiters.add(wake);
  }

  private wakeWaiters(): void {
    if (this.waiters.size === 0 || this.wakeScheduled) return;
    // Many releases in one turn of the event loop wake the waiters once.
    this.wakeScheduled = true;
    setImmediate(() => {
      this.wakeScheduled = false;
      const wake = [...this.waiters];
      this.waiters.clear();
      for (const w of wake) w();
    });
  }
}
