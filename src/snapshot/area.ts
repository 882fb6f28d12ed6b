/**
 * A snapshot's own directory under `diffAreaRoot` (its diff area, or its clones), and crash recovery.
 *
 * The directory is named `<provider>-<pid>-<uuid>`, so an owner can be told from the name alone (even if
 * the process died before writing `snapshot.json`). A directory is a leftover when its owner process is
 * gone (or the pid now belongs to a process started later), or when the owner is this process and no
 * live snapshot here holds it. Recovery removes leftovers only; the live files are never touched.
 */
import { randomUUID } from 'node:crypto';
import { constants, readFileSync } from 'node:fs';
import { access, mkdir, readdir, rm, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, fromSystemError } from '../errors.js';
import { mapBounded } from '../util/bounded.js';
import { readSmallFile } from '../util/safe-open.js';

export const MANIFEST = 'snapshot.json';
/** A manifest lists the snapshot's files: this bounds what reading a damaged one allocates. */
const MAX_MANIFEST_BYTES = 16 * 1024 * 1024;

export interface AreaManifest {
  format: 'tidemark-snapshot-area/1';
  provider: string;
  id: string;
  pid: number;
  /** The owner's start time in clock ticks since boot (Linux), to notice a reused pid. */
  processStart: string | null;
  createdAt: string;
  files: string[];
}

/**
 * Areas held by live snapshots of this process. Shared through globalThis so that two copies of this
 * module in one process (src and dist, say) never take each other's areas for leftovers.
 */
const LIVE_KEY = Symbol.for('tidemark.snapshot.liveAreas');
const g = globalThis as { [LIVE_KEY]?: Set<string> };
const liveAreas: Set<string> = (g[LIVE_KEY] ??= new Set());

/** Start time of a process (field 22 of /proc/<pid>/stat), or null where there is no procfs. */
function processStart(pid: number): string | null {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name (field 2) may hold spaces and parentheses: count fields after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return fields[19] ?? null;
  } catch {
    return null;
  }
}
const ownStart = processStart(process.pid);

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'; // exists, owned by someone else
  }
}

/** The absolute paths of a file set, in order; refuses an empty set and repeated paths. */
export function normalizeFiles(files: readonly string[]): string[] {
  if (!Array.isArray(files) || files.length === 0)
    throw new TidemarkError('INVALID_ARGUMENT', 'a snapshot needs at least one file');
  const out = files.map((f) => {
    if (typeof f !== 'string' || f === '') throw new TidemarkError('INVALID_ARGUMENT', `bad file name ${String(f)}`);
    return path.resolve(f);
  });
  const seen = new Set<string>();
  for (const f of out) {
    if (seen.has(f))
      throw new TidemarkError('INVALID_ARGUMENT', `${f} is named twice in the snapshot set`, { path: f });
    seen.add(f);
  }
  return out;
}

/** Stats every file of a set: NOT_FOUND for a missing one, INVALID_ARGUMENT for what is not a regular file. */
export async function checkFiles(paths: string[]): Promise<Map<string, bigint>> {
  const devs = await mapBounded(paths, OPEN_CONCURRENCY, async (p) => {
    let st;
    try {
      st = await stat(p, { bigint: true });
    } catch (err) {
      throw fromSystemError(err, 'snapshot', p);
    }
    if (!st.isFile()) throw new TidemarkError('INVALID_ARGUMENT', `${p} is not a regular file`, { path: p });
    return st.dev;
  });
  return new Map(paths.map((p, i) => [p, devs[i]]));
}

/** Files a snapshot opens or checks at once (a set of hundreds of VMs has thousands). */
export const OPEN_CONCURRENCY = 16;

export function checkRoot(opts: { diffAreaRoot: string } | undefined): string {
  const root = opts?.diffAreaRoot;
  if (typeof root !== 'string' || root === '')
    throw new TidemarkError('INVALID_ARGUMENT', 'diffAreaRoot must name a directory for the snapshot areas');
  return path.resolve(root);
}

/** undefined when the root exists (or can be made) and is writable; otherwise why not. */
export async function usableRoot(root: string): Promise<string | undefined> {
  try {
    await mkdir(root, { recursive: true });
    await access(root, constants.W_OK);
    return undefined;
  } catch (err) {
    return `the snapshot area root cannot be used: ${fromSystemError(err, 'write to', root).message}`;
  }
}

/** Creates the directory of a new snapshot with its manifest, and marks it live in this process. */
export async function createArea(
  root: string,
  provider: string,
  files: string[],
): Promise<{ id: string; dir: string }> {
  const id = randomUUID();
  const dir = path.join(root, `${provider}-${process.pid}-${id}`);
  try {
    await mkdir(root, { recursive: true });
    await mkdir(dir);
  } catch (err) {
    throw fromSystemError(err, 'create the snapshot area', dir);
  }
  liveAreas.add(dir);
  const manifest: AreaManifest = {
    format: 'tidemark-snapshot-area/1',
    provider,
    id,
    pid: process.pid,
    processStart: ownStart,
    createdAt: new Date().toISOString(),
    files,
  };
  try {
    await writeFile(path.join(dir, MANIFEST), `${JSON.stringify(manifest, null, 2)}\n`, { flag: 'wx' });
  } catch (err) {
    await removeArea(dir);
    throw fromSystemError(err, 'write', path.join(dir, MANIFEST));
  }
  return { id, dir };
}

/** Deletes a snapshot's directory and forgets it. */
export async function removeArea(dir: string): Promise<void> {
  try {
    await rm(dir, { recursive: true, force: true });
  } catch (err) {
    throw fromSystemError(err, 'remove the snapshot area', dir);
  } finally {
    liveAreas.delete(dir);
  }
}

/** Whether the owner of an area is still running and may still use it. */
async function ownerAlive(dir: string, pid: number): Promise<boolean> {
  if (pid === process.pid) return liveAreas.has(dir);
  if (!processAlive(pid)) return false;
  let manifest: Partial<AreaManifest>;
  try {
    const text = await readSmallFile(path.join(dir, MANIFEST), { maxBytes: MAX_MANIFEST_BYTES, noFollow: true });
    manifest = JSON.parse(text.toString('utf8')) as Partial<AreaManifest>;
  } catch {
    return true; // maybe still being created by that process: leave it for a later recovery
  }
  const now = processStart(pid);
  // A process with that pid started after the owner did (or at another time): the owner is gone.
  return !(manifest.processStart && now && manifest.processStart !== now);
}

/** Removes every leftover area of `provider` under `root`; returns how many it removed. */
export async function recoverAreas(root: string, provider: string): Promise<number> {
  let entries;
  try {
    entries = await readdir(root, { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw fromSystemError(err, 'list', root);
  }
  const pattern = new RegExp(`^${provider}-(\\d+)-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`);
  let removed = 0;
  for (const e of entries) {
    const m = pattern.exec(e.name);
    if (!m || !e.isDirectory()) continue; // never follows a symlink, never touches what is not ours
    const dir = path.join(root, e.name);
    if (await ownerAlive(dir, Number(m[1]))) continue;
    await removeArea(dir);
    removed++;
  }
  return removed;
}
