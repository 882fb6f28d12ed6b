/**
 * A private copy of the built engine for worker processes: dist/ (without maps and declarations) and the
 * native addon, in the same relative layout (`dist/util/native.js` loads `../../native/fs/build/Release/...`),
 * so a build running elsewhere meanwhile cannot hand a worker a half-written module.
 */
import { cpSync, existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const REPO = fileURLToPath(new URL('../..', import.meta.url));
const ADDON = path.join('native', 'fs', 'build', 'Release', 'tidemark_fs.node');

/** Copies `dist` (a dist/ directory beside its native/) to `to/dist` and its addon to `to/native/...`. */
export function copyEngine(dist: string, to: string): void {
  const addon = path.join(dist, '..', ADDON);
  if (!existsSync(addon)) throw new Error(`${addon} is missing: run \`npm run build:native\` first (npm test does)`);
  cpSync(dist, path.join(to, 'dist'), { recursive: true, filter: (f) => !/\.(map|d\.ts)$/.test(f) });
  cpSync(addon, path.join(to, ADDON));
}

/** The plain-ESM test modules every worker script may import (a worker's plan draws from the shared PRNG). */
const WORKER_SUPPORT = ['test/helpers/prng.mjs'];

/**
 * Copies worker scripts, named by their path in the repository (`test/vhdx/crash-worker.mjs`), to the same
 * path under `to`, with the modules they import, so their relative imports (`../helpers/prng.mjs`,
 * `../../dist/...`) resolve inside the copy.
 */
export function copyWorkerScripts(to: string, scripts: string[]): void {
  for (const f of [...scripts, ...WORKER_SUPPORT]) cpSync(path.join(REPO, f), path.join(to, f));
}
