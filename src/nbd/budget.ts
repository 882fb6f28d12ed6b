/**
 * The NBD server's memory budget. Memory is counted as the buffers it really occupies, not as payload
 * bytes: a pooled buffer costs its power-of-two class, and every buffer a socket holds costs
 * BUFFER_OVERHEAD besides its bytes (so a flood of 16-byte replies is counted at what it costs).
 *
 * Every message a client sends reserves what it will cost before the server reads or runs it (a
 * write's payload before its first byte is read, a read's data and reply before the device is asked),
 * and the reservation is released only when the socket has written the reply, not when it is queued.
 * A reservation is refused, and the connection stops reading until memory is released, when it would
 * take the connection over its own budget, or the server over its budget. The last eighth of the
 * server's budget is kept for light connections (holding at most a 1/16 of that eighth), so that
 * heavy clients that stall (half-sent payloads, replies nobody reads) cannot keep a new client
 * from being served while the stall timeout runs.
 *
 * The server's free pooled buffers count too: they are trimmed to make room, so that what is in use
 * plus what the pool keeps never exceeds the budget. One message is always admitted when nothing at
 * all is in use, so a budget smaller than the largest message still makes progress.
 */
import type { BufferPool } from './buffers.js';
import { pooledSize } from './buffers.js';

/**
 * What a buffer costs besides its bytes while a socket holds it: the Buffer object, the write request
 * and its callback (measured with Node 20: ~255 bytes per queued write, ~325 with a callback).
 */
export const BUFFER_OVERHEAD = 320;

/** The cost of a small buffer of `length` bytes queued on a socket. */
export const bufferCost = (length: number): number => length + BUFFER_OVERHEAD;

/** The cost of a buffer of `length` bytes taken from the pool. */
export const pooledCost = (length: number): number => pooledSize(length) + BUFFER_OVERHEAD;

/** One holder's share of the budget (a connection). */
export class MemoryAccount {
  /** Bytes this holder has reserved and not released. */
  held = 0;
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
    this.light = Math.floor(this.reserved / 16);
  }

  get used(): number {
    return this.usedBytes;
  }

  /**
   * Reserves `bytes` for `account` if its own budget (`limit`, default the account's) and the server's
   * allow it. One reservation is always allowed to an account that holds nothing as far as its own
   * budget goes, and to anyone when nothing at all is in use.
   */
  tryReserve(account: MemoryAccount, bytes: number, limit = account.limit): boolean {
    if (account.held > 0 && account.held + bytes > limit) return false;
    if (this.usedBytes > 0) {
      const after = this.usedBytes + bytes;
      if (after > this.limit) return false;
      if (after > this.limit - this.reserved && account.held + bytes > this.light) return false;
    }
    this.charge(account, bytes);
    return true;
  }

  /** Adds (or with a negative value, returns) memory whatever the budgets say: for corrections to an estimate. */
  charge(account: MemoryAccount, bytes: number): void {
    account.held += bytes;
    this.usedBytes += bytes;
    if (bytes > 0) {
      // Free pooled buffers give way to memory in use.
      const over = this.usedBytes + this.pool.retainedBytes - this.limit;
      if (over > 0) this.pool.trim(Math.max(0, this.pool.retainedBytes - over));
    } else if (bytes < 0) {
      this.wakeWaiters();
    }
  }

  release(account: MemoryAccount, bytes: number): void {
    if (bytes !== 0) this.charge(account, -bytes);
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
