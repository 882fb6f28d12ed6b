/**
 * The layer rule (.dependency-cruiser.mjs, DESIGN.md's layers) in the suite, so that CI fails on a new upward
 * import or cycle: src/ has no violation, and a fixture with one import of each forbidden kind shows every rule
 * firing (the check can fail).
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from './helpers/peers.js';

const execFileP = promisify(execFile);
const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const DEPCRUISE = path.join(root, 'node_modules/dependency-cruiser/bin/dependency-cruise.mjs');
const CONFIG = '.dependency-cruiser.mjs';

interface Violation {
  from: string;
  to: string;
  rule: { name: string };
  cycle?: { name: string }[];
}

/** depcruise as `npm run lint` runs it, in `cwd`; its violations. */
async function cruise(cwd: string): Promise<{ violations: Violation[]; rules: string[] }> {
  // depcruise exits non-zero when it finds violations; the JSON on stdout is the answer either way.
  const out = await execFileP(process.execPath, [DEPCRUISE, 'src', '--config', CONFIG, '--output-type', 'json'], {
    cwd,
    maxBuffer: 64 * 1024 * 1024,
  }).catch((err: { stdout?: string; stderr?: string }) => {
    if (!err.stdout) throw new Error(`depcruise failed: ${err.stderr}`);
    return { stdout: err.stdout };
  });
  const result = JSON.parse(out.stdout);
  return {
    violations: result.summary.violations,
    rules: result.summary.ruleSetUsed.forbidden.map((r: { name: string }) => r.name),
  };
}

const show = (v: Violation) =>
  `${v.rule.name}: ${v.from} → ${v.to}${v.cycle ? ` (cycle ${v.cycle.map((c) => c.name).join(' → ')})` : ''}`;

const cleanups: (() => Promise<void>)[] = [];
afterAll(async () => {
  for (const c of cleanups) await c();
});

describe('layers (DESIGN.md) as a checked rule', () => {
  it('src/ has no upward import, no cycle, no import around the API', { timeout: 120_000 }, async () => {
    const { violations } = await cruise(root);
    expect(violations.map(show)).toEqual([]);
  });

  it('a fixture with one forbidden import of each kind fires every rule', { timeout: 120_000 }, async () => {
    const { dir, cleanup } = await tempDir('layers');
    cleanups.push(cleanup);
    await copyFile(path.join(root, CONFIG), path.join(dir, CONFIG));
    await writeFile(
      path.join(dir, 'tsconfig.json'),
      JSON.stringify({ compilerOptions: { module: 'NodeNext', moduleResolution: 'NodeNext', strict: true } }),
    );
    const files: Record<string, string> = {
      'errors.ts': "import { u } from './util/u.js';\nexport const e = u;",
      'util/u.ts': 'export const u = 1;',
      'util/lost.ts': "import { gone } from './gone.js';\nexport const lost = gone;",
      'util/up.ts': "import { f } from '../formats/f.js';\nexport const up = f;",
      // the probe the rule exists for: a format engine importing the command line
      'formats/__probe.ts': "import { main } from '../cli/main.js';\nexport const probe = main;",
      'formats/f.ts': "import { e } from '../errors.js';\nexport const f = e;",
      'cli/main.ts': 'export const main = 1;',
      // a type-only cycle inside one layer
      'disk/a.ts': "import type { B } from './b.js';\nexport interface A { b?: B }",
      'disk/b.ts': "import type { A } from './a.js';\nexport interface B { a?: A }",
      'host/host.ts': "import type { Server } from '../api/server.js';\nexport type Host = { s?: Server };",
      'api/server.ts': 'export type Server = { port: number };',
      'api/schemas.ts': "import type { Host } from '../host/host.js';\nexport type Wire = { h?: Host };",
      'api/client.ts': "import type { Wire } from './schemas.js';\nexport type Client = { w?: Wire };",
      'backup/ok.ts': "import type { Client } from '../api/client.js';\nexport type Ok = { c?: Client };",
      'backup/around.ts': "import type { Server } from '../api/server.js';\nexport type Around = { s?: Server };",
      'backup/direct.ts': "import type { Host } from '../host/host.js';\nexport type Direct = { h?: Host };",
      'daemon/daemon.ts': "import type { Host } from '../host/host.js';\nexport type Daemon = { h?: Host };",
      'nbd/n.ts': "import type { Daemon } from '../daemon/daemon.js';\nexport type N = { d?: Daemon };",
      'newfolder/z.ts': "import type { Host } from '../host/host.js';\nexport type Z = { h?: Host };",
    };
    for (const [name, text] of Object.entries(files)) {
      const file = path.join(dir, 'src', name);
      await mkdir(path.dirname(file), { recursive: true });
      await writeFile(file, text + '\n');
    }
    const { violations, rules } = await cruise(dir);
    const found = violations.map(show);
    console.log(`layer rule on the fixture: ${found.length} violations\n  ${found.join('\n  ')}`);
    expect(found).toEqual(
      expect.arrayContaining([
        'layer-formats: src/formats/__probe.ts → src/cli/main.ts',
        'layer-cli-on-top: src/formats/__probe.ts → src/cli/main.ts',
        'no-circular: src/disk/a.ts → src/disk/b.ts (cycle src/disk/b.ts → src/disk/a.ts)',
        'layer-host: src/host/host.ts → src/api/server.ts',
        'api-contract-is-wire: src/api/schemas.ts → src/host/host.ts',
        'backup-reaches-host-through-api: src/backup/around.ts → src/api/server.ts',
        'layer-backup: src/backup/direct.ts → src/host/host.ts',
        'daemon-only-from-cli: src/nbd/n.ts → src/daemon/daemon.ts',
        'layer-unplaced: src/newfolder/z.ts → src/host/host.ts',
        'util-imports-nothing-above: src/util/up.ts → src/formats/f.ts',
        'errors-imports-nothing: src/errors.ts → src/util/u.ts',
        'not-to-unresolvable: src/util/lost.ts → ./gone.js',
      ]),
    );
    // Every rule besides the rows of the layer table fires on the fixture: none is dead.
    const fired = new Set(violations.map((v) => v.rule.name));
    const general = rules.filter((r) => !r.startsWith('layer-') || r === 'layer-cli-on-top' || r === 'layer-unplaced');
    expect(general.filter((r) => !fired.has(r))).toEqual([]);
    // ...and what the layers allow is not reported: backup through the API client, the daemon on the host, the
    // contract within api/, formats on errors.
    for (const allowed of ['src/backup/ok.ts', 'src/daemon/daemon.ts', 'src/api/client.ts', 'src/formats/f.ts'])
      expect(violations.filter((v) => v.from === allowed).map(show)).toEqual([]);
  });
});
