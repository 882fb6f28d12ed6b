/**
 * NBD errors: the protocol error of a misbehaving peer, and the one place where Tidemark's error codes
 * become the error values the NBD protocol allows (EPERM, EIO, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP,
 * ESHUTDOWN).
 */
import { TidemarkError, TidemarkErrorBase } from '../errors.js';

/** The peer broke the protocol (bad magic, impossible lengths): its connection is dropped. */
export class NbdProtocolError extends TidemarkErrorBase<'PROTOCOL_ERROR'> {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('PROTOCOL_ERROR', message, details);
    this.name = 'NbdProtocolError';
  }
}

// Values from the protocol's "Error values" (Linux errno numbers); repeated here so this file stands alone.
const EPERM = 1;
const EIO = 5;
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;
const ENOTSUP = 95;
const ESHUTDOWN = 108;

/** Node/system errno names that mean "out of space" to a client (the protocol maps EDQUOT and EFBIG there). */
const SPACE_ERRNOS = new Set(['ENOSPC', 'EDQUOT', 'EFBIG']);

/** The NBD error value and a one-line message for any error a device operation threw. */
export function nbdErrorFor(err: unknown): { errno: number; message: string } {
  if (err instanceof TidemarkError) {
    const message = err.message;
    switch (err.code) {
      case 'READ_ONLY':
        return { errno: EPERM, message };
      case 'INVALID_ARGUMENT':
      case 'MISSING_CHANGE_TRACKING_INFORMATION':
      case 'TRACKING_NOT_ENABLED':
        return { errno: EINVAL, message };
      case 'NOT_SUPPORTED':
        return { errno: ENOTSUP, message };
      case 'LIMIT_EXCEEDED':
        return { errno: EOVERFLOW, message };
      case 'CLOSED':
        return { errno: ESHUTDOWN, message };
      default: {
        const sys = typeof err.details.errno === 'string' ? err.details.errno : undefined;
        return { errno: sys && SPACE_ERRNOS.has(sys) ? ENOSPC : EIO, message };
      }
    }
  }
  const e = err as NodeJS.ErrnoException | undefined;
  const message = e?.message ?? String(err);
  if (e?.code && SPACE_ERRNOS.has(e.code)) return { errno: ENOSPC, message };
  return { errno: EIO, message };
}
