/**
 * How the CLI talks to people and scripts: one-line errors on stderr, an exit status per error code
 * (docs/errors.md lists them), JSON on stdout with --json.
 */
import { TidemarkError, type ErrorCode } from '../errors.js';

export const EXIT = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  NOT_FOUND: 3,
  CORRUPT: 4,
  UNSUPPORTED: 5,
  REFUSED: 6,
  IO: 7,
  INTERNAL: 70,
} as const;

/**
 * The exit status of every code: a `Record<ErrorCode, number>`, so a new code does not compile until it has one
 * (docs/errors.md is generated from it).
 */
export const EXIT_BY_CODE: Record<ErrorCode, number> = {
  INVALID_ARGUMENT: EXIT.USAGE,
  NOT_FOUND: EXIT.NOT_FOUND,
  ALREADY_EXISTS: EXIT.REFUSED,
  IO_ERROR: EXIT.IO,
  READ_ONLY: EXIT.REFUSED,
  CLOSED: EXIT.INTERNAL,
  VHDX_CORRUPT: EXIT.CORRUPT,
  VHDX_TRUNCATED: EXIT.CORRUPT,
  VHDX_UNSUPPORTED: EXIT.UNSUPPORTED,
  VHD_CORRUPT: EXIT.CORRUPT,
  VHD_TRUNCATED: EXIT.CORRUPT,
  VHD_UNSUPPORTED: EXIT.UNSUPPORTED,
  PARENT_NOT_FOUND: EXIT.NOT_FOUND,
  PARENT_MISMATCH: EXIT.REFUSED,
  PATH_NOT_ALLOWED: EXIT.REFUSED,
  LIMIT_EXCEEDED: EXIT.UNSUPPORTED,
  TRACKING_NOT_ENABLED: EXIT.NOT_FOUND,
  TRACKING_CORRUPT: EXIT.CORRUPT,
  MISSING_CHANGE_TRACKING_INFORMATION: EXIT.REFUSED,
  NOT_SUPPORTED: EXIT.UNSUPPORTED,
  TIMEOUT: EXIT.FAILED,
  PROTOCOL_ERROR: EXIT.FAILED,
  CONFLICT: EXIT.REFUSED,
  BUSY: EXIT.REFUSED,
  LOCKED: EXIT.REFUSED,
  GUEST_AGENT_ERROR: EXIT.FAILED,
  UNAUTHORIZED: EXIT.REFUSED,
  BAD_STATE: EXIT.REFUSED,
  WRONG_KEY: EXIT.REFUSED,
  REPOSITORY_CORRUPT: EXIT.CORRUPT,
  QMP_ERROR: EXIT.FAILED,
  QEMU_FAILED: EXIT.FAILED,
  INTERNAL: EXIT.INTERNAL,
};

/** Any error that is not a TidemarkError is a bug: INTERNAL's status, as through the API and a job. */
export function exitCodeFor(err: unknown): number {
  // `?? FAILED`: a code a newer host sent that this build does not know.
  return err instanceof TidemarkError ? (EXIT_BY_CODE[err.code] ?? EXIT.FAILED) : EXIT.INTERNAL;
}

/** One line on stderr: `tidemark: CODE: message`. */
export function reportError(err: unknown): number {
  if (err instanceof TidemarkError) {
    process.stderr.write(`tidemark: ${err.code}: ${err.message.replace(/\s*\n\s*/g, ' ')}\n`);
  } else {
    process.stderr.write(`tidemark: internal error: ${(err as Error)?.stack ?? String(err)}\n`);
  }
  return exitCodeFor(err);
}

export function printJson(value: unknown): void {
  process.stdout.write(JSON.stringify(value, (_k, v) => (typeof v === 'bigint' ? v.toString() : v), 2) + '\n');
}

export function println(line = ''): void {
  process.stdout.write(line + '\n');
}

/** A progress line on stderr when it is a terminal; nothing otherwise (logs stay quiet). */
export function progressReporter(label: string): { update(done: number, total: number): void; end(): void } {
  if (!process.stderr.isTTY) return { update() {}, end() {} };
  const start = Date.now();
  let last = 0;
  return {
    update(done, total) {
      const now = Date.now();
      if (now - last < 100 && done < total) return;
      last = now;
      const pct = total ? Math.floor((done / total) * 100) : 100;
      const secs = (now - start) / 1000;
      const rate = secs > 0 ? done / secs / 2 ** 20 : 0;
      const eta = rate > 0 ? (total - done) / 2 ** 20 / rate : 0;
      process.stderr.write(
        `\r${label} ${pct.toString().padStart(3)}%  ${rate.toFixed(0)} MiB/s  ${eta.toFixed(0)}s left   `,
      );
    },
    end() {
      process.stderr.write('\r\x1b[K');
    },
  };
}
