/**
 * A clock the test moves: code given a ManualClock (src/util/clock.ts's Clock) sees time pass only when
 * the test advances it, so a time-limit test neither waits for real nor depends on how busy the machine is.
 * Time starts at 0; timers due at the same instant fire in the order they were set.
 */
import type { Clock, ClockTimer } from '../../src/util/clock.js';

interface Pending {
  at: number;
  seq: number;
  fn: () => void;
}

/** Lets everything that is not waiting on this clock run: promise chains, then a few event-loop turns. */
async function drain(): Promise<void> {
  for (let i = 0; i < 3; i++) await new Promise<void>((r) => setImmediate(r));
}

export class ManualClock implements Clock {
  private t = 0;
  private seq = 0;
  private pending: Pending[] = [];

  now(): number {
    return this.t;
  }

  setTimeout(fn: () => void, ms: number): ClockTimer {
    if (!Number.isFinite(ms)) return { cancel() {} };
    const p: Pending = { at: this.t + Math.max(0, ms), seq: this.seq++, fn };
    this.pending.push(p);
    return { cancel: () => (this.pending = this.pending.filter((q) => q !== p)) };
  }

  sleep(ms: number, signal?: AbortSignal): Promise<void> {
    return new Promise((resolve, reject) => {
      // As node:timers/promises does: an AbortError whose cause is the signal's reason.
      const aborted = () => {
        timer.cancel();
        reject(
          Object.assign(new Error('The operation was aborted'), {
            name: 'AbortError',
            code: 'ABORT_ERR',
            cause: signal?.reason,
          }),
        );
      };
      const timer = this.setTimeout(() => {
        signal?.removeEventListener('abort', aborted);
        resolve();
      }, ms);
      if (signal?.aborted) return aborted();
      signal?.addEventListener('abort', aborted, { once: true });
    });
  }

  /** Timers not yet fired. */
  get timers(): number {
    return this.pending.length;
  }

  /** Fires the earliest timer due at or before `limit`, moving time to it; false when there is none. */
  private fireNext(limit: number): boolean {
    let next: Pending | undefined;
    for (const p of this.pending)
      if (p.at <= limit && (!next || p.at < next.at || (p.at === next.at && p.seq < next.seq))) next = p;
    if (!next) return false;
    this.pending = this.pending.filter((q) => q !== next);
    this.t = Math.max(this.t, next.at);
    next.fn();
    return true;
  }

  /** Moves time forward by `ms`, firing every timer due on the way in order and letting the code react to each. */
  async advance(ms: number): Promise<void> {
    const end = this.t + ms;
    await drain();
    while (this.fireNext(end)) await drain();
    this.t = end;
    await drain();
  }

  /**
   * Drives `work` to its end: runs what is ready, then moves time to the next timer, and again, until `work`
   * settles. Throws when `work` waits while no timer is left (it would never finish), or past `maxMs`.
   */
  async run<T>(work: Promise<T>, maxMs = 24 * 3600_000): Promise<T> {
    let settled = false;
    const watched = work.finally(() => (settled = true));
    watched.catch(() => undefined);
    const end = this.t + maxMs;
    await drain();
    while (!settled) {
      if (!this.fireNext(end))
        throw new Error(
          `ManualClock.run: still waiting at ${this.t} ms with ${this.pending.length} timer(s) pending past ${end} ms`,
        );
      await drain();
    }
    return watched;
  }
}
