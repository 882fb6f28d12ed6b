/**
 * Repository locks (docs/formats/repository.md §8). Backups, restores and verify take a shared lock (any number side by side); prune,
 * gc and forget take an exclusive one. A lock is an object `locks/<kind>-<random>` holding who took it.
 *
 * Taking a lock is write-then-list, which needs no compare-and-swap from the backend: write our lock, list the
 * locks, and if one conflicts, delete ours and give up (BUSY). Two contenders that race both see each other and
 * both give up: never both proceed. A lock whose holder was a process on this host that no longer exists is stale
 * and is deleted by whoever finds it; a lock from another host is never broken automatically (we cannot know that
 * its holder is gone): `tidemark repo unlock --force` removes it.
 */
import { randomBytes } from 'node:crypto';
import os from 'node:os';
import { TidemarkError } from '../errors.js';
import { pidAlive } from '../util/process.js';
import type { Backend } from './backend.js';

export type LockKind = 'shared' | 'exclusive';

export interface LockInfo {
  kind: LockKind;
  operation: string;
  pid: number;
  hostname: string;
  createdAt: string;
}

export interface LockEntry extends Partial<LockInfo> {
  key: string;
  /** the holder is a process of this host that has ended */
  stale: boolean;
  /** set when the lock object cannot be read or parsed (it then counts as held) */
  damaged?: string;
}

const MAX_LOCK_BYTES = 4096;

/** Text a lock holds that is printed (BUSY messages, `repo info`): short, no control characters. */
const PRINTABLE = /^[\x20-\x7e]{1,255}$/;

function parseLock(key: string, raw: Buffer): LockEntry {
  let o: LockInfo;
  try {
    o = JSON.parse(raw.toString('utf8')) as LockInfo;
  } catch {
    return { key, stale: false, damaged: 'not JSON' };
  }
  if (
    typeof o !== 'object' ||
    o === null ||
    (o.kind !== 'shared' && o.kind !== 'exclusive') ||
    !Number.isSafeInteger(o.pid) ||
    o.pid <= 0 ||
    typeof o.hostname !== 'string' ||
    !PRINTABLE.test(o.hostname) ||
    typeof o.operation !== 'string' ||
    !PRINTABLE.test(o.operation) ||
    typeof o.createdAt !== 'string' ||
    !PRINTABLE.test(o.createdAt)
  ) {
    return { key, stale: false, damaged: 'missing or malformed fields' };
  }
  const stale = o.hostname === os.hostname() && !pidAlive(o.pid);
  return { key, kind: o.kind, operation: o.operation, pid: o.pid, hostname: o.hostname, createdAt: o.createdAt, stale };
}

export async function listLocks(backend: Backend): Promise<LockEntry[]> {
  const out: LockEntry[] = [];
  for await (const o of backend.list('locks/', { unusable: true })) {
    if (o.unusable) {
      // Never opened (a FIFO would block): it counts as held, like any lock that cannot be read.
      out.push({ key: o.key, stale: false, damaged: `it is ${o.unusable}, not a lock object` });
      continue;
    }
    let raw: Buffer;
    try {
      raw = await backend.get(o.key, { maxBytes: MAX_LOCK_BYTES });
    } catch (err) {
      // Released between list and get.
      if ((err as TidemarkError).code === 'NOT_FOUND') continue;
      out.push({ key: o.key, stale: false, damaged: (err as Error).message });
      continue;
    }
    out.push(parseLock(o.key, raw));
  }
  return out;
}

/** Deletes the locks of dead local processes; returns them. */
export async function breakStaleLocks(backend: Backend): Promise<LockEntry[]> {
  const stale = (await listLocks(backend)).filter((l) => l.stale);
  for (const l of stale) await backend.delete(l.key);
  return stale;
}

function describe(l: LockEntry): string {
  if (l.damaged) return `${l.key} (unreadable: ${l.damaged})`;
  return `${l.operation} (${l.kind} lock, pid ${l.pid} on ${l.hostname} since ${l.createdAt})`;
}

export class RepositoryLock {
  private released = false;

  constructor(
    private readonly backend: Backend,
    readonly key: string,
    readonly info: LockInfo,
  ) {}

  get held(): boolean {
    return !this.released;
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await this.backend.delete(this.key);
  }
}

export async function acquireLock(backend: Backend, kind: LockKind, operation: string): Promise<RepositoryLock> {
  const info: LockInfo = {
    kind,
    operation,
    pid: process.pid,
    hostname: os.hostname(),
    createdAt: new Date().toISOString(),
  };
  const key = `locks/${kind}-${randomBytes(8).toString('hex')}`;
  await backend.put(key, Buffer.from(JSON.stringify(info) + '\n', 'utf8'));
  const conflicts: LockEntry[] = [];
  try {
    for (const l of await listLocks(backend)) {
      if (l.key === key) continue;
      if (l.stale) {
        await backend.delete(l.key);
        continue;
      }
      if (kind === 'exclusive' || l.kind !== 'shared' || l.damaged) conflicts.push(l);
    }
  } catch (err) {
    await backend.delete(key).catch(() => undefined);
    throw err;
  }
  if (conflicts.length > 0) {
    await backend.delete(key);
    const more = conflicts.length > 1 ? ` and ${conflicts.length - 1} more` : '';
    throw new TidemarkError(
      'BUSY',
      `repository ${backend.location} is locked by ${describe(conflicts[0])}${more}; try again when it ends`,
      { holders: conflicts },
    );
  }
  return new RepositoryLock(backend, key, info);
}
