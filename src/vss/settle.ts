/**
 * Calling code we do not trust (writers, providers, the host's hold callback) with a time limit and a way
 * to stop waiting, without ever letting its rejection or its late result escape.
 */
import { systemClock, type Clock } from '../util/clock.js';

export type Settled<T> =
  { kind: 'value'; value: T } | { kind: 'error'; error: unknown } | { kind: 'timeout' } | { kind: 'cancelled' };

/**
 * Runs `fn` and settles with its value, its error (a throw, sync or async), `timeout` after `timeoutMs`
 * (Infinity: never) on `clock`, or `cancelled` when `cancel` fires. After settling, whatever `fn` still does
 * is ignored.
 */
export function settle<T>(
  fn: () => Promise<T> | T,
  timeoutMs: number,
  cancel?: AbortSignal,
  clock: Clock = systemClock,
): Promise<Settled<T>> {
  return new Promise((resolve) => {
    if (cancel?.aborted) return resolve({ kind: 'cancelled' });
    let done = false;
    const timer = clock.setTimeout(() => finish({ kind: 'timeout' }), timeoutMs);
    const finish = (s: Settled<T>) => {
      if (done) return;
      done = true;
      timer.cancel();
      cancel?.removeEventListener('abort', onCancel);
      resolve(s);
    };
    const onCancel = () => finish({ kind: 'cancelled' });
    cancel?.addEventListener('abort', onCancel, { once: true });
    Promise.resolve()
      .then(fn)
      .then(
        (value) => finish({ kind: 'value', value }),
        (error: unknown) => finish({ kind: 'error', error }),
      );
  });
}

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message.replace(/\s*\n\s*/g, ' ');
  return String(err);
}

/** Milliseconds from `start` to `end`, rounded to 0.1 for reports. */
export function ms(start: number, end: number): number {
  return Math.round((end - start) * 10) / 10;
}
