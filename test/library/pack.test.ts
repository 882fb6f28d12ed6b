/**
 * A packed tarball is importable: `npm pack` of the build, installed into a temporary project offline (the
 * dependencies come from the npm cache, pinned by the repository's lockfile), then the examples of
 * docs/library.md run there by package name (`import ... from 'tidemark/vhdx'`) and print what the doc says they
 * print. The examples are read out of the doc, so doc and test cannot drift. The package's type declarations are
 * checked by compiling an import of every entry point, and `bin` by starting a host the client example talks to.
 *
 * Needs the build (`npm run build && npm run build:native`), as every test that runs the CLI.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';

const ENTRIES = ['vhdx', 'vhd', 'disk', 'rct', 'nbd', 'repository', 'client', 'errors'];

interface Example {
  file: string;
  code: string;
  output: string;
}

/** Every ```js block of docs/library.md that starts with `// NAME.mjs`, with the ```text block after "Prints:". */
function examples(): Example[] {
  const doc = readFileSync(path.join(REPO_ROOT, 'docs', 'library.md'), 'utf8');
  const re = /```js\n\/\/ (\S+\.mjs)\n([\s\S]*?)```\s*\nPrints:\s*\n\s*```text\n([\s\S]*?)```/g;
  return [...doc.matchAll(re)].map((m) => ({ file: m[1], code: m[2], output: m[3] }));
}

/** npm without what the outer `npx vitest` put in the environment (it would point npm at this repository). */
function npmEnv(): NodeJS.ProcessEnv {
  return Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.toLowerCase().startsWith('npm_')));
}

function run(cmd: string, args: string[], cwd: string, env: NodeJS.ProcessEnv = npmEnv()) {
  const r = spawnSync(cmd, args, { cwd, env, encoding: 'utf8', timeout: 120_000 });
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(' ')} failed (${r.status ?? r.signal}):\n${r.stderr}\n${r.stdout}`);
  }
  return r.stdout;
}

let dir: string;
let cleanup: (() => Promise<void>) | undefined;
let project: string;
let tarball: string;
let host: ChildProcess | undefined;

beforeAll(async () => {
  for (const n of ENTRIES) {
    if (!existsSync(path.join(REPO_ROOT, 'dist', 'lib', `${n}.js`)))
      throw new Error(`dist/lib/${n}.js is missing: run npm run build first`);
  }
  ({ dir, cleanup } = await tempDir('pack'));
  // The build is there already: `prepare` would compile it again.
  run('npm', ['pack', '--ignore-scripts', '--silent', '--pack-destination', dir], REPO_ROOT);
  const name = readdirSync(dir).find((f) => f.endsWith('.tgz'));
  if (!name) throw new Error('npm pack wrote no tarball');
  tarball = path.join(dir, name);

  project = path.join(dir, 'project');
  mkdirSync(project);
  // The dependencies pinned as this repository pins them, so npm finds every one in its cache (--offline).
  const lock = JSON.parse(readFileSync(path.join(REPO_ROOT, 'package-lock.json'), 'utf8'));
  const packages: Record<string, unknown> = { '': { name: 'tidemark-pack-test' } };
  for (const [key, entry] of Object.entries(lock.packages as Record<string, { dev?: boolean; link?: boolean }>)) {
    if (key !== '' && !entry.dev && !entry.link) packages[key] = entry;
  }
  writeFileSync(
    path.join(project, 'package-lock.json'),
    JSON.stringify({ name: 'tidemark-pack-test', lockfileVersion: 3, requires: true, packages }),
  );
  writeFileSync(
    path.join(project, 'package.json'),
    JSON.stringify({
      name: 'tidemark-pack-test',
      private: true,
      type: 'module',
      // Tidemark's install script builds its addon (what this test installs for). zstd-napi's compiles zstd from
      // source (about a minute); its binding is taken from this repository's install instead, the same build.
      allowScripts: { tidemark: true, 'zstd-napi': false },
    }),
  );
  run('npm', ['install', tarball, '--offline', '--no-audit', '--no-fund', '--loglevel=error'], project);
  const zstd = path.join(project, 'node_modules', 'zstd-napi', 'build', 'Release');
  mkdirSync(zstd, { recursive: true });
  copyFileSync(
    path.join(REPO_ROOT, 'node_modules', 'zstd-napi', 'build', 'Release', 'binding.node'),
    path.join(zstd, 'binding.node'),
  );
}, 180_000);

afterAll(async () => {
  if (host && host.exitCode === null) {
    const ended = new Promise((resolve) => host!.once('exit', resolve));
    host.kill('SIGTERM');
    await ended;
  }
  await cleanup?.();
});

describe('the packed package', () => {
  it('holds the build, the addon sources and bin, and no tests', () => {
    const files = run('tar', ['tzf', tarball], dir).split('\n');
    for (const n of ENTRIES) {
      expect(files).toContain(`package/dist/lib/${n}.js`);
      expect(files).toContain(`package/dist/lib/${n}.d.ts`);
    }
    expect(files).toContain('package/bin/tidemark.js');
    expect(files).toContain('package/native/fs/binding.gyp');
    expect(files).toContain('package/native/fs/build.mjs');
    expect(files.filter((f) => /^package\/(test|bench|scripts)\//.test(f) || f.includes('/build/Release/'))).toEqual(
      [],
    );
  });

  it('built its native addon when installed', () => {
    const addon = path.join(
      project,
      'node_modules',
      'tidemark',
      'native',
      'fs',
      'build',
      'Release',
      'tidemark_fs.node',
    );
    expect(existsSync(addon), addon).toBe(true);
  });

  it('exports only the entry points, each with type declarations that compile', () => {
    const check = ENTRIES.map((n, i) => `import * as m${i} from 'tidemark/${n}';`).join('\n');
    const use = `
import type { VhdxFile } from 'tidemark/vhdx';
import type { VhdVirtualDisk as VhdDevice } from 'tidemark/vhd';
import { childExtension, openDisk, VhdVirtualDisk, type HostDisk, type OpenedDisk } from 'tidemark/disk';
import type { ChangesResult } from 'tidemark/rct';
import type { HostClient } from 'tidemark/client';
import { TidemarkError, type ErrorCode } from 'tidemark/errors';
export type Used = [VhdxFile, ChangesResult, HostClient];
// Both devices openDisk returns are HostDisks; the VHD one is the same class from either entry point.
export const opened = async (file: string): Promise<HostDisk> => openDisk(file);
export const ext = (d: OpenedDisk): '.avhdx' | '.avhd' => childExtension(d);
export const isVhd = (d: OpenedDisk): d is VhdDevice => d instanceof VhdVirtualDisk;
const code: ErrorCode = 'LOCKED';
export const e = new TidemarkError(code, 'x');
// @ts-expect-error details are typed per code
export const bad = new TidemarkError('LOCKED', 'x', { nobody: 1 });
export const all = [${ENTRIES.map((_, i) => `m${i}`).join(', ')}];
`;
    writeFileSync(path.join(project, 'check.ts'), `${check}\n${use}`);
    writeFileSync(
      path.join(project, 'tsconfig.json'),
      JSON.stringify({
        compilerOptions: {
          module: 'NodeNext',
          moduleResolution: 'NodeNext',
          target: 'ES2022',
          strict: true,
          noEmit: true,
          skipLibCheck: true,
          types: ['node'],
          typeRoots: [path.join(REPO_ROOT, 'node_modules', '@types')],
        },
        files: ['check.ts'],
      }),
    );
    run(process.execPath, [path.join(REPO_ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', project], project);
    // A private path is not importable.
    const deep = spawnSync(process.execPath, ['--input-type=module', '-e', "import 'tidemark/dist/errors.js'"], {
      cwd: project,
      encoding: 'utf8',
    });
    expect(deep.stderr).toContain('ERR_PACKAGE_PATH_NOT_EXPORTED');
  });

  it("docs/library.md's examples run by package name and print what the doc shows", async () => {
    const all = examples();
    expect(all.map((e) => e.file)).toEqual(['vhdx.mjs', 'rct.mjs', 'disk.mjs', 'repository.mjs', 'client.mjs']);
    // The client's example talks to a host: started with the installed bin, as a user would.
    const store = path.join(dir, 'store');
    mkdirSync(store);
    host = spawn(path.join(project, 'node_modules', '.bin', 'tidemark'), ['host', '--store', store], {
      cwd: project,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let hostErr = '';
    host.stderr!.on('data', (c: Buffer) => (hostErr += c.toString()));
    const deadline = Date.now() + 20_000;
    while (!existsSync(path.join(store, 'host.json'))) {
      if (host.exitCode !== null || Date.now() > deadline) throw new Error(`the host did not start: ${hostErr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    for (const ex of all) {
      writeFileSync(path.join(project, ex.file), `// ${ex.file}\n${ex.code}`);
      const out = run(process.execPath, [ex.file], project, { ...process.env, TIDEMARK_STORE: store });
      expect(out, ex.file).toBe(ex.output);
    }
  });
});
