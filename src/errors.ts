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

/**
 * What every code means, in one line (docs/errors.md is generated from this, the CLI's exit statuses and the
 * API's HTTP statuses: scripts/errors-doc.mjs). A `Record<ErrorCode, string>`: a new code does not compile
 * until it is explained here.
 */
export const ERROR_MEANINGS: Record<ErrorCode, string> = {
  INVALID_ARGUMENT: 'a bad option, size, offset, range, request body or path kind (a FIFO where a disk file belongs)',
  NOT_FOUND: 'a file, VM, point, job, lease or other named thing does not exist',
  ALREADY_EXISTS: 'the file, VM or name to be created is taken',
  IO_ERROR: 'the operating system refused a read, write or flush',
  READ_ONLY: 'a write to a disk or file opened read-only',
  CLOSED: 'the object or channel was closed under the operation',
  VHDX_CORRUPT: 'a VHDX structure failed validation (the message names it and its file offset)',
  VHDX_UNSUPPORTED: 'a VHDX feature this engine does not implement',
  VHDX_TRUNCATED: 'a VHDX file is shorter than its structures say',
  VHD_CORRUPT: 'a VHD structure failed validation (the message names it and its file offset)',
  VHD_UNSUPPORTED: 'a VHD this engine does not handle (version, disk type, size)',
  VHD_TRUNCATED: 'a VHD file is shorter than its structures say',
  PARENT_NOT_FOUND: 'no parent locator path leads to an existing parent (details.tried lists them)',
  PARENT_MISMATCH: 'the parent was modified after the child was created, or its sector size differs',
  PATH_NOT_ALLOWED: 'a path outside the allowed directories, or a symbolic link where none is followed',
  LIMIT_EXCEEDED: 'more than the engine will hold in memory or accept in one request',
  TRACKING_NOT_ENABLED: 'the disk has no change-tracking files',
  TRACKING_CORRUPT: 'change-tracking files that cannot be used',
  MISSING_CHANGE_TRACKING_INFORMATION:
    'a change query with an id from another epoch, never sealed or malformed: read the disk in full',
  NOT_SUPPORTED: 'something this build does not do (another disk format, a newer format version, a downgrade)',
  TIMEOUT: 'a peer (a guest agent, a snapshot provider) did not answer in time',
  PROTOCOL_ERROR: 'a peer (guest agent, NBD server, host API) spoke outside its protocol',
  CONFLICT: "the VM's state forbids the operation (running, has checkpoints)",
  BUSY: 'another run, server or command holds what the operation needs (the message names the holder)',
  LOCKED: 'another program has the disk open in a way this open cannot share (image locks)',
  GUEST_AGENT_ERROR: 'the guest agent answered with an error (e.g. a freeze hook failed)',
  UNAUTHORIZED: 'a host API request without the right token',
  BAD_STATE: 'a library call out of sequence',
  WRONG_KEY: 'the passphrase or key file does not open the encrypted repository',
  REPOSITORY_CORRUPT: 'a repository object is missing, damaged, forged or not an object',
  QMP_ERROR: 'QEMU refused a QMP command the host sent',
  QEMU_FAILED: 'QEMU failed to start, save or load, or its QMP socket does not answer',
  INTERNAL: 'an error nobody expected (a bug: please report it)',
};

/** Every parent locator path tried, with what came of it. */
type Tried = { key: string; value: string; hostPath?: string; outcome: string }[];

/**
 * The `details` each code carries when Tidemark raises it, keyed by code: `new TidemarkError('LOCKED', msg,
 * { path, holder, byte })` is checked against `ErrorDetailsMap['LOCKED']`. A code without fields takes none.
 * Errors that come back from a host over the API carry what the host sent (`Record<string, unknown>`).
 */
export interface ErrorDetailsMap {
  INVALID_ARGUMENT: {
    path?: string;
    /** what a path names instead of a file (FileTypeError) */
    type?: string;
    offset?: number;
    writer?: string;
    /** a repository object key or key prefix a backend refused */
    key?: string;
    prefix?: string;
    /** the part of an API request that failed its schema, and every issue */
    in?: string;
    issues?: { field: string; message: string }[];
  };
  NOT_FOUND: { path?: string; key?: string; snapshot?: string; errno?: string };
  ALREADY_EXISTS: { path?: string; errno?: string };
  /** errno: Node's name (`ENOSPC`), or the number an NBD server answered */
  IO_ERROR: { path?: string; errno?: string | number; snapshot?: string };
  READ_ONLY: NoDetails;
  CLOSED: { path?: string; snapshot?: string };
  VHDX_CORRUPT: VhdxDamage;
  VHDX_UNSUPPORTED: VhdxDamage;
  VHDX_TRUNCATED: VhdxDamage;
  VHD_CORRUPT: { structure?: string; offset?: number };
  VHD_UNSUPPORTED: { structure?: string; offset?: number };
  VHD_TRUNCATED: { structure?: string; offset?: number };
  PARENT_NOT_FOUND: { tried?: Tried };
  PARENT_MISMATCH: { tried?: Tried };
  PATH_NOT_ALLOWED: { path?: string; name?: string; root?: string; tried?: Tried };
  LIMIT_EXCEEDED: { path?: string; key?: string; size?: number; maxBytes?: number; limit?: number; snapshot?: string };
  TRACKING_NOT_ENABLED: NoDetails;
  TRACKING_CORRUPT: NoDetails;
  MISSING_CHANGE_TRACKING_INFORMATION: { id?: string };
  NOT_SUPPORTED: { path?: string; format?: string; provider?: string; files?: string[] };
  TIMEOUT: { path?: string };
  PROTOCOL_ERROR: Record<string, unknown>;
  CONFLICT: NoDetails;
  BUSY: { path?: string; holder?: unknown; holders?: unknown[] };
  LOCKED: { path: string; holder: string; byte: number };
  GUEST_AGENT_ERROR: { command?: string; agentClass?: string; agentDesc?: string; cannotFreeze?: string };
  UNAUTHORIZED: NoDetails;
  BAD_STATE: NoDetails;
  WRONG_KEY: NoDetails;
  REPOSITORY_CORRUPT: {
    /** what kind of object, its key, and what is wrong with it (verify's damage report) */
    object?: string;
    key?: string;
    problem?: string;
    where?: string;
    pointId?: string;
    indexId?: string;
    chunk?: string;
  };
  QMP_ERROR: { command: string; qmpClass: string; qmpDesc: string };
  QEMU_FAILED: NoDetails;
  INTERNAL: NoDetails;
}

type NoDetails = Record<string, never>;
type VhdxDamage = { structure?: string; offset?: number; path?: string; damagedEntries?: number };

/**
 * The details of code `C`. Any other fields are allowed when reading (an error read off the wire carries what the
 * host sent), so `err.details.errno` reads as `unknown` on any TidemarkError.
 */
export type ErrorDetails<C extends ErrorCode = ErrorCode> = ErrorDetailsMap[C] & Record<string, unknown>;

/** Every error Tidemark raises: a stable `code` (docs/errors.md), a one-line message and the code's details. */
export interface TidemarkError<C extends ErrorCode = ErrorCode> extends Error {
  readonly code: C;
  readonly details: ErrorDetails<C>;
}

/**
 * The constructor checks `details` against the code's entry in ErrorDetailsMap. It is declared apart from the
 * class so that `err instanceof TidemarkError` narrows to `TidemarkError` (any code, typed), not to a class
 * instantiated with `any`.
 */
export interface TidemarkErrorConstructor {
  new <C extends ErrorCode>(
    code: C,
    message: string,
    details?: ErrorDetailsMap[C],
    options?: ErrorOptions,
  ): TidemarkError<C>;
  readonly prototype: TidemarkError;
}

/**
 * The class behind TidemarkError, for subclasses: `class QmpError extends TidemarkErrorBase<'QMP_ERROR'>` has its
 * details checked as `new TidemarkError('QMP_ERROR', …)` has; a subclass that takes the code as a parameter
 * extends `TidemarkErrorBase` (any code). `instanceof TidemarkError` holds for all of them.
 */
export class TidemarkErrorBase<C extends ErrorCode = ErrorCode> extends Error {
  readonly code: C;
  readonly details: ErrorDetails<C>;

  constructor(code: C, message: string, details?: ErrorDetailsMap[C], options?: ErrorOptions) {
    super(message, options);
    this.name = 'TidemarkError';
    this.code = code;
    this.details = (details ?? {}) as ErrorDetails<C>;
  }
}

export const TidemarkError = TidemarkErrorBase as TidemarkErrorConstructor;

/** Whether `err` is a TidemarkError with code `code`; its details are then typed for that code. */
export function hasCode<C extends ErrorCode>(err: unknown, code: C): err is TidemarkError<C> {
  return err instanceof TidemarkError && err.code === code;
}

/** A VHDX structure failed validation: names the structure and its file offset. */
export class VhdxCorruptError extends TidemarkErrorBase {
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
export class VhdCorruptError extends TidemarkErrorBase {
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

export class InvalidArgumentError extends TidemarkErrorBase<'INVALID_ARGUMENT'> {
  constructor(message: string, details: ErrorDetailsMap['INVALID_ARGUMENT'] = {}) {
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
