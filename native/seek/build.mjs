// Builds the optional SEEK_DATA/SEEK_HOLE addon (run by `npm run build:native`, part of `prepare`).
// It is optional: when it cannot be built, this says so in one line and exits 0, and conversions
// read holes instead of skipping them.
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
// npm puts its own node-gyp in every script's environment; outside npm, npm's copy beside this node,
// else one on PATH.
const bundled = join(
  dirname(process.execPath),
  '..',
  'lib',
  'node_modules',
  'npm',
  'node_modules',
  'node-gyp',
  'bin',
  'node-gyp.js',
);
const gyp = process.env.npm_config_node_gyp || (existsSync(bundled) ? bundled : undefined);
const [cmd, pre] = gyp ? [process.execPath, [gyp]] : ['node-gyp', []];
const args = [...pre, 'rebuild', '--loglevel=warn'];
// Headers installed beside this node (distribution packages do that) avoid a download from nodejs.org.
const prefix = dirname(dirname(process.execPath));
if (!process.env.npm_config_nodedir && existsSync(join(prefix, 'include', 'node', 'node_api.h')))
  args.push(`--nodedir=${prefix}`);

const r = spawnSync(cmd, args, { cwd: here, encoding: 'utf8' });
if (r.status === 0) {
  console.log('tidemark: built the SEEK_DATA addon (native/seek): raw sources skip their holes');
} else {
  // The compiler's first error says more than node-gyp's closing lines.
  const lines = `${r.stderr}\n${r.stdout}`.split('\n').map((l) => l.trim());
  const why =
    r.error?.message ?? lines.find((l) => /\berror\b/i.test(l) && !l.startsWith('gyp')) ?? lines.find((l) => l);
  console.warn(`tidemark: the optional SEEK_DATA addon (native/seek) was not built; raw holes will be read (${why})`);
}
