/**
 * Damage: how a stored object that cannot be used is reported. Readers throw REPOSITORY_CORRUPT errors carrying
 * what verify needs (`details`: object, key, problem); verify, gc and `repo info` turn them into reports.
 */
import { TidemarkError } from '../errors.js';
import type { ObjectInfo } from './backend.js';

export interface Affected {
  pointId: string;
  vm?: string;
  diskId?: string;
  disk?: string;
  /** stored slots of that disk the damage covers */
  slots?: number;
  /** the first few byte offsets of those slots */
  offsets?: number[];
}

export interface Damage {
  object: 'chunk' | 'index' | 'manifest' | 'pack-index' | 'pack';
  /** the object holding the damage: for a chunk, its pack (or, when no pack index lists it, its name) */
  key: string;
  /** where in its pack a damaged chunk lies */
  range?: { offset: number; length: number };
  id: string;
  /** unreadable: the entry is not an object (a symlink, FIFO, directory, …) or the backend cannot read it */
  problem: 'missing' | 'truncated' | 'corrupt' | 'unreadable';
  message: string;
  affects: Affected[];
}

/** A repository entry that cannot be read, as `repo info` reports it. */
export interface EntryDamage {
  object: Damage['object'];
  key: string;
  problem: Damage['problem'];
  message: string;
}

/** A stored object that cannot be used: REPOSITORY_CORRUPT with what verify needs in `details`. */
export function damaged(
  object: Damage['object'],
  key: string,
  problem: Damage['problem'],
  message: string,
  cause?: unknown,
): DamageError {
  return new TidemarkError('REPOSITORY_CORRUPT', message, { object, key, problem }, { cause }) as DamageError;
}

export type DamageError = TidemarkError & { details: { object: string; key: string; problem: string } };

/** Failures of the machine rather than of the object: they stop a command instead of being reported as damage. */
const TRANSIENT_ERRNO = new Set(['EMFILE', 'ENFILE', 'ENOMEM', 'EAGAIN', 'EINTR', 'ENOSPC']);

/**
 * Whether a backend's failure to read one object is damage to that object (an unreadable file, an entry the
 * safe opener refuses: a symlink, a FIFO, a directory) rather than a reason to stop (a closed repository, a bug).
 */
export function isUnreadableEntry(err: unknown): boolean {
  if (!(err instanceof TidemarkError)) return false;
  if (err.code === 'CLOSED' || err.code === 'INVALID_ARGUMENT' || err.code === 'BUSY') return false;
  return !TRANSIENT_ERRNO.has(String(err.details.errno ?? ''));
}

/** The message for an entry that stands where an object belongs but is not one. */
export function unusableMessage(what: string, o: ObjectInfo): string {
  return `${what} (${o.key}) cannot be read: it is ${o.unusable}, not an object`;
}

/** A damage error (as damaged() makes them), as opposed to a failure that stops the command. */
export function isDamage(err: unknown): err is DamageError {
  return err instanceof TidemarkError && err.code === 'REPOSITORY_CORRUPT' && typeof err.details.problem === 'string';
}
