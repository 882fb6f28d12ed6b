/** The real files in ../shared/fixtures, decompressed once per test process. */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const repoRoot = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
export const SHARED = process.env.TIDEMARK_SHARED ?? path.resolve(repoRoot, '../shared');
export const FIXTURES = path.join(SHARED, 'fixtures', 'vhdx');

let dir: string | undefined;

/** Path of a decompressed fixture, e.g. fixturePath('iotest-dynamic-1G.vhdx'). */
export function fixturePath(name: string): string {
  dir ??= mkdtempSync(path.join(os.tmpdir(), 'tidemark-fixtures-'));
  const out = path.join(dir, name);
  if (!existsSync(out))
    writeFileSync(out, execFileSync('bzip2', ['-dc', path.join(FIXTURES, `${name}.bz2`)], { maxBuffer: 2 ** 31 }));
  return out;
}

export function fragmentPath(name: string): string {
  return path.join(FIXTURES, 'windows10-fragments', name);
}
