/**
 * Calling code we do not trust (writers, providers, the host's hold callback) with a time limit and a way
 * to stop waiting, without ever letting its rejection or its late result escape.
 */

export type Settled<T> =
  { kind: 'value'; value: T } | { kind: 'error'; error: unknown } | { kind: 'timeout' } | { kind: 'cancelled' };

// setTimeout takes a signed 32-bit delay: anything larger fires at once.
const MAX_DELAY = 2 ** 31 - 1;

/**
 * Runs `fn` and settles with its value, its error (a throw, sync or async), `timeout` after `timeoutMs`
 * (Infinity: never) or `cancelled` when `cancel` fires. After settling, whatever `fn` still does is ignored.
 */
export function settle<T>(fn: () => Promise<T> | T, timeoutMs: number, cancel?: AbortSignal): Promise<Settled<T>> {
  return new Promise((resolve) => {
    let done = false;
    let timer: NodeJS.Timeout | undefined;
    const finish = (s: Settled<T>) => {
      if (done) return;
      done = true;
      if (timer) clearTimeout(timer);
      cancel?.removeEventListener('abort', onCancel);
      resolve(s);
    };
    const onCancel = () => finish({ kind: 'cancelled' });
    if (cancel?.aborted) return finish({ kind: 'cancelled' });
    cancel?.addEventListener('abort', onCancel, { once: true });
    if (Number.isFinite(timeoutMs))
      timer = setTimeout(() => finish({ kind: 'timeout' }), Math.min(timeoutMs, MAX_DELAY));
    Promise.resolve()
      .then(fn)
      .then(
        (value) => finish({ kind: 'value', value }),
        (error: unknown) => finish({ kind: 'error', error }),
      );
  });
}

/** A timer as a value: `cancel()` is safe to call twice and after it fired. */
export function timer(ms: number, fn: () => void): { cancel(): void } {
  if (!Number.isFinite(ms)) return { cancel() {} };
  const t = setTimeout(fn, Math.max(0, Math.min(ms, MAX_DELAY)));
  return { cancel: () => clearTimeout(t) };
}

export function errorMessage(err: unknown): string {
  if (err instanceof Error) return err.message.replace(/\s*\n\s*/g, ' ');
  return String(err);
}

export const now = (): number => performance.now();

/** Milliseconds rounded to 0.1 for reports. */
export function ms(start: number, end = now()): number {
  return Math.round((end - start) * 10) / 10;
}
