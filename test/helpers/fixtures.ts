/**
 * The real files in ../shared/fixtures/vhdx (VHDX-NOTES.md §4), decompressed once per test process.
 * The shared directory is $TIDEMARK_SHARED, else `../shared` beside the repository, else (a fresh clone made
 * elsewhere, e.g. in /tmp) `../shared` beside the local repository it was cloned from.
 */
import { spawnSync } from 'node:child_process';
import { closeSync, existsSync, mkdtempSync, openSync, renameSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';

/** The repository root: this file is test/helpers/fixtures.ts (independent of the current directory). */
export const REPO_ROOT = fileURLToPath(new URL('../..', import.meta.url));
export const SHARED = path.resolve(process.env.TIDEMARK_SHARED ?? findShared());

function findShared(): string {
  const beside = path.join(REPO_ROOT, '..', 'shared');
  if (existsSync(beside)) return beside;
  const origin = spawnSync('git', ['-C', REPO_ROOT, 'config', '--get', 'remote.origin.url'], { encoding: 'utf8' });
  const url = origin.status === 0 ? origin.stdout.trim() : '';
  const local = url.startsWith('file://') ? fileURLToPath(url) : url;
  if (local && path.isAbsolute(local)) {
    const besideOrigin = path.join(local, '..', 'shared');
    if (existsSync(besideOrigin)) return besideOrigin;
  }
  return beside;
}
export const FIXTURES = path.join(SHARED, 'fixtures', 'vhdx');

let dir: string | undefined;
function removeDir(): void {
  if (dir) rmSync(dir, { recursive: true, force: true });
  dir = undefined;
}
// Vitest ends its fork workers without an 'exit' event, so clean up after each test file (this module is
// evaluated in every file that imports it); 'exit' covers use outside vitest.
afterAll(removeDir);
process.on('exit', removeDir);

/**
 * Path of a decompressed fixture, e.g. fixturePath('iotest-dynamic-1G.vhdx') from `<name>.bz2`. The
 * copy is private to this test file (tests may write to it) and removed after it.
 */
export function fixturePath(name: string): string {
  name = name.replace(/\.bz2$/, '');
  dir ??= mkdtempSync(path.join(os.tmpdir(), 'tidemark-fixtures-'));
  const out = path.join(dir, name);
  if (existsSync(out)) return out;

  const src = path.join(FIXTURES, `${name}.bz2`);
  if (!existsSync(src)) throw new Error(`no fixture ${src} (set TIDEMARK_SHARED to the shared directory)`);
  // node:zlib has no bzip2: stream `bzip2 -dc` straight into a file (the images are 100-260 MiB), then
  // rename, so a failed run never leaves a truncated file behind for the next call.
  const partial = `${out}.partial`;
  const fd = openSync(partial, 'w');
  let r;
  try {
    r = spawnSync('bzip2', ['-dc', src], { stdio: ['ignore', fd, 'pipe'] });
  } finally {
    closeSync(fd);
  }
  if (r.error || r.status !== 0) {
    rmSync(partial, { force: true });
    const why = r.error ? r.error.message : `exit ${r.status}: ${r.stderr.toString().trim()}`;
    throw new Error(`bzip2 -dc ${src} failed (${why}); install: sudo bash scripts/install-peers.sh`);
  }
  renameSync(partial, out);
  return out;
}

export function fragmentPath(name: string): string {
  return path.join(FIXTURES, 'windows10-fragments', name);
}
