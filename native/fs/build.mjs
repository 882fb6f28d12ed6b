// Builds the native addon native/fs (run by `npm run build:native`, part of `prepare`). It is required:
// image locks (lock.c) keep other writers off open disks, so when it cannot be built this prints the
// compiler's first error and exits 1, and the install fails. g++, make, python3 and Node's headers are
// all it needs; the headers are taken from beside this node when they are there (no download).
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
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
let why;
if (r.status === 0) {
  // Built is not enough: it must load into this node and have every function src/util/native.ts uses.
  try {
    const addon = createRequire(import.meta.url)('./build/Release/tidemark_fs.node');
    const missing = ['dataExtents', 'setLock', 'testLock', 'dupFd', 'crc32c'].filter((f) => typeof addon[f] !== 'function');
    if (missing.length > 0) why = `the built addon lacks ${missing.join(', ')}`;
  } catch (err) {
    why = `the built addon does not load: ${err.message}`;
  }
} else {
  // The compiler's first error says more than node-gyp's closing lines.
  const lines = `${r.stderr}\n${r.stdout}`.split('\n').map((l) => l.trim());
  why = r.error?.message ?? lines.find((l) => /\berror\b/i.test(l) && !l.startsWith('gyp')) ?? lines.find((l) => l);
}
if (why) {
  console.error(`tidemark: ERROR: the native addon native/fs could not be built (${why}).`);
  console.error('tidemark: it is required (image locks, SEEK_DATA, fanotify, CRC-32C); install g++, make, python3 and the Node headers');
  console.error('tidemark: (the headers come with nodejs from nodesource/nodejs.org, or Debian libnode-dev),');
  console.error('tidemark: then run: npm run build:native');
  process.exit(1);
}
console.log('tidemark: built the native addon (native/fs): image locks, SEEK_DATA, fanotify, CRC-32C');
