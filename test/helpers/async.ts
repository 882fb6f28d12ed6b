/** Small async helpers the tests share: a real-time pause, polling for a condition, the error code of a rejected promise. */
import { TidemarkError } from '../../src/errors.js';

/** Waits `ms` real milliseconds (for code that has no Clock to inject: processes, sockets, the file system). */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * What `p` ends in, as a string to compare: the TidemarkError code it rejects with, `resolved` when it
 * resolves, or `not a TidemarkError: ...` for any other rejection (so a test expecting a code fails on it).
 */
export async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
    return 'resolved';
  } catch (err) {
    return err instanceof TidemarkError ? err.code : `not a TidemarkError: ${String(err)}`;
  }
}

/** Polls `cond` every 20 ms until it holds (throws after `ms`). */
export async function waitFor(cond: () => Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error('timed out waiting');
    await sleep(20);
  }
}
