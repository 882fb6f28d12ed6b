/**
 * Where a repository's objects live. The interface is what an object store offers (S3 and alike): whole-object
 * get (whole or a byte range)/put/delete, existence and size, and listing by key prefix. No appends, no renames, no partial writes, no
 * compare-and-swap: the repository layer never needs them (locks work by write-then-list, see lock.ts).
 *
 * Keys are `/`-separated segments of `[A-Za-z0-9._-]`, each starting with a letter or digit: never absolute,
 * never `.` or `..`, never hidden, so no key can name a path outside the backend's root.
 */
import { InvalidArgumentError } from '../errors.js';

export interface ObjectInfo {
  key: string;
  size: number;
  /** last modification, ms since the epoch */
  mtimeMs: number;
  /**
   * Set (only with `list(prefix, { unusable: true })`) on an entry that stands where an object could but holds
   * none — what it is instead: 'a directory', 'a symbolic link', 'a FIFO', 'a socket', 'a device'. Its size is 0.
   */
  unusable?: string;
}

export interface ListOptions {
  /**
   * Also yield entries that stand where a key could but are not objects (a local directory's symlinks, FIFOs,
   * sockets, devices and directories), marked `unusable`: so that a reader can report them as damage instead of
   * not seeing them. A directory is yielded as well as listed through. Object stores have none.
   */
  unusable?: boolean;
}

export interface GetOptions {
  /**
   * Refuse (LIMIT_EXCEEDED, before reading or allocating) an object larger than this: damaged or hostile
   * repositories must not make the reader allocate what a header claims.
   */
  maxBytes?: number;
  /**
   * Only the bytes [offset, offset + length) of the object (an HTTP range request); fewer when the object ends
   * first. maxBytes then bounds `length`, not the object.
   */
  range?: { offset: number; length: number };
  /** read into this buffer when it is large enough (the result is then a view of it): saves an allocation */
  into?: Buffer;
}

export interface PutOptions {
  /** durable when put() returns (a manifest, the config); otherwise durable after the next sync() */
  sync?: boolean;
  /**
   * May stay invisible to other processes until the next sync() (chunks written by a backup): lets a backend
   * batch the flushes. This process sees it at once. Never used for locks, the config or manifests.
   */
  deferred?: boolean;
}

export interface Backend {
  /** where the objects are, for messages (a path or a URL) */
  readonly location: string;
  /** the whole object (or opts.range of it); NOT_FOUND when there is none; LIMIT_EXCEEDED above opts.maxBytes */
  get(key: string, opts?: GetOptions): Promise<Buffer>;
  /** atomic: a reader sees the old object or the new one, never a mix; replaces an existing object. `data` is not
   * kept once the promise settles (the caller may reuse it). */
  put(key: string, data: Uint8Array, opts?: PutOptions): Promise<void>;
  /** idempotent: deleting what is not there is not an error */
  delete(key: string): Promise<void>;
  exists(key: string): Promise<boolean>;
  /** size and time, or null when there is no such object */
  stat(key: string): Promise<ObjectInfo | null>;
  /**
   * every object whose key starts with `prefix`, in no particular order (with `unusable`, also what stands where
   * an object could but is not one). Entries whose names cannot be keys are never listed.
   */
  list(prefix: string, opts?: ListOptions): AsyncIterable<ObjectInfo>;
  /** makes every put() so far durable */
  sync(): Promise<void>;
  /**
   * Memory that put() writes fastest from (a local directory: aligned for direct I/O), for large objects built in
   * place, such as packs. Any buffer works with put(); this one may just be cheaper to write.
   */
  allocate?(size: number): Promise<Buffer>;
  /** removes leftovers of interrupted puts older than `olderThanMs` (a local directory's temporary files) */
  sweepTemporary?(olderThanMs: number): Promise<number>;
  close(): Promise<void>;
}

const SEGMENT = /^[A-Za-z0-9][A-Za-z0-9._-]*$/;

/** Whether `name` can be one segment of a key. */
export function isKeySegment(name: string): boolean {
  return SEGMENT.test(name);
}

export function isValidKey(key: string): boolean {
  if (key.length === 0 || key.length > 512) return false;
  return key.split('/').every((s) => SEGMENT.test(s));
}

export function checkKey(key: string): void {
  if (!isValidKey(key)) throw new InvalidArgumentError(`"${key}" is not a valid object key`, { key });
}

/** A list prefix is empty, or whole segments followed by `/` or by the start of a segment. */
export function checkPrefix(prefix: string): void {
  if (prefix === '') return;
  const segs = prefix.split('/');
  const last = segs.pop()!;
  const ok = segs.every((s) => SEGMENT.test(s)) && (last === '' ? segs.length > 0 : SEGMENT.test(last));
  if (!ok || prefix.length > 512) throw new InvalidArgumentError(`"${prefix}" is not a valid key prefix`, { prefix });
}
