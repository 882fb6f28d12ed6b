/**
 * The HTTP status of every error code, chosen one by one: a `Record<ErrorCode, number>`, so a new code does
 * not compile until it has a status here. 4xx: the request (or what it names) is at fault; 5xx: the host is.
 * Routing answers apart from codes: 404 for an unknown path (NOT_FOUND), 405 with `Allow` for a known path
 * with another method (NOT_SUPPORTED).
 */
import type { ErrorCode } from '../errors.js';

export const HTTP_STATUS: Record<ErrorCode, number> = {
  /** A malformed request: a body or query that fails its schema, a bad size, a FIFO where a disk belongs. */
  INVALID_ARGUMENT: 400,
  UNAUTHORIZED: 401,
  /** A disk path outside the store and the allowed directories; a symbolic link where none is followed. */
  PATH_NOT_ALLOWED: 403,
  /** Repository keys are not the host's business, but a wrong key is a refusal, not a fault. */
  WRONG_KEY: 403,
  NOT_FOUND: 404,
  ALREADY_EXISTS: 409,
  /** The VM's state forbids it (running, has checkpoints). */
  CONFLICT: 409,
  /** Another run holds the VM's lease, or a snapshot set belongs to a live run: retry once it ends. */
  BUSY: 409,
  /** Another program holds the disk (QEMU-compatible image locks). */
  LOCKED: 409,
  READ_ONLY: 409,
  BAD_STATE: 409,
  /** The disk has no tracking files: enable tracking (vm upgrade) first. */
  TRACKING_NOT_ENABLED: 409,
  LIMIT_EXCEEDED: 413,
  /** The request named a file that is damaged, truncated or of a kind this engine does not read. */
  VHDX_CORRUPT: 422,
  VHDX_TRUNCATED: 422,
  VHDX_UNSUPPORTED: 422,
  VHD_CORRUPT: 422,
  VHD_TRUNCATED: 422,
  VHD_UNSUPPORTED: 422,
  PARENT_NOT_FOUND: 422,
  PARENT_MISMATCH: 422,
  TRACKING_CORRUPT: 422,
  REPOSITORY_CORRUPT: 422,
  /** An id from another epoch, never sealed or malformed: the caller reads the disk in full. */
  MISSING_CHANGE_TRACKING_INFORMATION: 422,
  /** A version downgrade, a feature this host does not have. */
  NOT_SUPPORTED: 422,
  /** A bug or an error the host did not expect. */
  INTERNAL: 500,
  /** The operating system refused the host a read, write or flush. */
  IO_ERROR: 500,
  /** The guest agent (or another peer the host drives) answered with an error or spoke wrongly. */
  GUEST_AGENT_ERROR: 502,
  PROTOCOL_ERROR: 502,
  /** The VM's QEMU refused a QMP command, or failed to start or ended on its own: the host's worker failed. */
  QMP_ERROR: 502,
  QEMU_FAILED: 502,
  /** The host (or the disk) is closing. */
  CLOSED: 503,
  /** A peer the host waited on (a guest agent's freeze) did not answer in time. */
  TIMEOUT: 504,
};

export function httpStatus(code: ErrorCode): number {
  return HTTP_STATUS[code];
}
