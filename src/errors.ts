/**
 * One error hierarchy for all of Tidemark. Every error carries a stable `code` (documented in
 * docs/errors.md) that callers and the CLI switch on; the message is one line a person can act on.
 */
export type ErrorCode =
  | 'INVALID_ARGUMENT'
  | 'NOT_FOUND'
  | 'ALREADY_EXISTS'
  | 'IO_ERROR'
  | 'READ_ONLY'
  | 'CLOSED'
  | 'VHDX_CORRUPT'
  | 'VHDX_UNSUPPORTED'
  | 'VHDX_TRUNCATED'
  | 'VHD_CORRUPT'
  | 'VHD_UNSUPPORTED'
  | 'VHD_TRUNCATED'
  | 'PARENT_NOT_FOUND'
  | 'PARENT_MISMATCH'
  | 'PATH_NOT_ALLOWED'
  | 'LIMIT_EXCEEDED'
  | 'TRACKING_NOT_ENABLED'
  | 'TRACKING_CORRUPT'
  | 'MISSING_CHANGE_TRACKING_INFORMATION'
  | 'NOT_SUPPORTED'
  | 'TIMEOUT'
  | 'PROTOCOL_ERROR'
  | 'CONFLICT'
  | 'BUSY'
  | 'LOCKED'
  | 'GUEST_AGENT_ERROR'
  | 'UNAUTHORIZED'
  | 'BAD_STATE'
  | 'WRONG_KEY'
  | 'REPOSITORY_CORRUPT'
  | 'QMP_ERROR'
  | 'QEMU_FAILED'
  /** An error nobody expected (a bug): the message says what happened. */
  | 'INTERNAL';

export class TidemarkError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown>;

  constructor(code: ErrorCode, message: string, details: Record<string, unknown> = {}, options?: ErrorOptions) {
    super(message, options);
    this.name = 'TidemarkError';
    this.code = code;
    this.details = details;
  }
}

/** A VHDX structure failed validation: names the structure and its file offset. */
export class VhdxCorruptError extends TidemarkError {
  readonly structure: string;
  readonly offset: number | undefined;

  constructor(structure: string, offset: number | undefined, problem: string, code: ErrorCode = 'VHDX_CORRUPT') {
    const where = offset === undefined ? structure : `${structure} at offset ${offset}`;
    super(code, `${where}: ${problem}`, { structure, offset });
    this.name = 'VhdxCorruptError';
    this.structure = structure;
    this.offset = offset;
  }
}

/** A legacy VHD structure failed validation: names the structure and its file offset. */
export class VhdCorruptError extends TidemarkError {
  readonly structure: string;
  readonly offset: number | undefined;

  constructor(structure: string, offset: number | undefined, problem: string, code: ErrorCode = 'VHD_CORRUPT') {
    const where = offset === undefined ? structure : `${structure} at offset ${offset}`;
    super(code, `${where}: ${problem}`, { structure, offset });
    this.name = 'VhdCorruptError';
    this.structure = structure;
    this.offset = offset;
  }
}

export class InvalidArgumentError extends TidemarkError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('INVALID_ARGUMENT', message, details);
    this.name = 'InvalidArgumentError';
  }
}

/** Wraps a Node system error (ENOENT, EACCES, ENOSPC, ...) with the path it concerns. */
export function fromSystemError(err: unknown, action: string, path: string): TidemarkError {
  if (err instanceof TidemarkError) return err;
  const e = err as NodeJS.ErrnoException;
  const sys = e?.code ?? 'EIO';
  const code: ErrorCode = sys === 'ENOENT' ? 'NOT_FOUND' : sys === 'EEXIST' ? 'ALREADY_EXISTS' : 'IO_ERROR';
  const reason = sys === 'ENOENT' ? 'no such file' : sys === 'EEXIST' ? 'file exists' : (e?.message ?? String(err));
  return new TidemarkError(code, `cannot ${action} ${path}: ${reason}`, { path, errno: sys }, { cause: err });
}
