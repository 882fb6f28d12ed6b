/**
 * Time as a dependency: code with time limits (the VSS requester's freeze window, hold and commit limits,
 * retry pauses) takes a Clock, so its tests can run it on a clock they advance instead of waiting.
 */
import { setTimeout as sleepFor } from 'node:timers/promises';

/** A pending callback; `cancel()` is safe to call twice and after it fired. */
export interface ClockTimer {
  cancel(): void;
}

export interface Clock {
  /** Milliseconds on a monotonic scale (only differences mean anything). */
  now(): number;
  /** Calls `fn` once after `ms` milliseconds (0 and below: as soon as possible; Infinity: never). */
  setTimeout(fn: () => void, ms: number): ClockTimer;
  /** Resolves after `ms` milliseconds; rejects with an AbortError when `signal` fires first. */
  sleep(ms: number, signal?: AbortSignal): Promise<void>;
}

// setTimeout takes a signed 32-bit delay: anything larger fires at once.
const MAX_DELAY = 2 ** 31 - 1;

/** The real clock: performance.now() and Node's timers. */
export const systemClock: Clock = {
  now: () => performance.now(),
  setTimeout(fn, ms) {
    if (!Number.isFinite(ms)) return { cancel() {} };
    const t = setTimeout(fn, Math.max(0, Math.min(ms, MAX_DELAY)));
    return { cancel: () => clearTimeout(t) };
  },
  sleep: (ms, signal) => sleepFor(ms, undefined, signal ? { signal } : {}),
};
