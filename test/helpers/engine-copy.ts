/**
 * A private copy of the built engine for worker processes: dist/ (without maps and declarations) and the
 * native addon, in the same relative layout (`dist/util/native.js` loads `../../native/fs/build/Release/...`),
 * so a build running elsewhere meanwhile cannot hand a worker a half-written module.
 */
import { cpSync, existsSync } from 'node:fs';
import path from 'node:path';

const ADDON = path.join('native', 'fs', 'build', 'Release', 'tidemark_fs.node');

/** Copies `dist` (a dist/ directory beside its native/) to `to/dist` and its addon to `to/native/...`. */
export function copyEngine(dist: string, to: string): void {
  const addon = path.join(dist, '..', ADDON);
  if (!existsSync(addon)) throw new Error(`${addon} is missing: run \`npm run build:native\` first (npm test does)`);
  cpSync(dist, path.join(to, 'dist'), { recursive: true, filter: (f) => !/\.(map|d\.ts)$/.test(f) });
  cpSync(addon, path.join(to, ADDON));
}
