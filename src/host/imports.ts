/**
 * Imports (a restore registering a VM): the host reserves the name and makes the VM's folder before one byte
 * is restored, the restore writes the disks into that folder, and the host registers them, or removes the
 * folder with everything in it. The reservation is marked on disk (`vms/NAME/import.json`), so a host that
 * stops mid-import knows at its next start that the folder is an unfinished import: kept while the process
 * restoring into it lives, removed once it has ended.
 */
import { readFile, unlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { writeFileAtomic } from '../util/atomic.js';
import { pidAlive } from '../util/process.js';

export const IMPORT_MARKER = 'import.json';

export const ImportOwner = z
  .object({
    pid: z.number().int().positive(),
    hostname: z.string().min(1).max(255),
    command: z.string().max(500),
  })
  .strict();
export type ImportOwner = z.infer<typeof ImportOwner>;

export interface ImportInfo {
  name: string;
  /** The new VM's folder in the store. */
  dir: string;
  /** Where the restore writes the disks (`DIR/disks`). */
  disksDir: string;
  owner: ImportOwner;
  createdAt: string;
}

const Marker = z.object({ name: z.string(), owner: ImportOwner, createdAt: z.string() });

export async function writeImportMarker(info: ImportInfo): Promise<void> {
  const { name, owner, createdAt } = info;
  await writeFileAtomic(
    path.join(info.dir, IMPORT_MARKER),
    JSON.stringify({ name, owner, createdAt }, null, 2) + '\n',
    0o600,
  );
}

/** The marker of a VM folder, or undefined when it has none (or one that cannot be read: then not ours). */
export async function readImportMarker(dir: string): Promise<ImportInfo | undefined> {
  let raw: string;
  try {
    raw = await readFile(path.join(dir, IMPORT_MARKER), 'utf8');
  } catch {
    return undefined;
  }
  let json: unknown;
  try {
    json = JSON.parse(raw);
  } catch {
    return undefined;
  }
  const parsed = Marker.safeParse(json);
  if (!parsed.success) return undefined;
  return { ...parsed.data, dir, disksDir: path.join(dir, 'disks') };
}

export async function dropImportMarker(dir: string): Promise<void> {
  await unlink(path.join(dir, IMPORT_MARKER)).catch(() => undefined);
}

/** Whether the process restoring into an import still exists (a process of another machine: assumed so). */
export function importOwnerAlive(owner: ImportOwner): boolean {
  return owner.hostname !== os.hostname() || pidAlive(owner.pid);
}
