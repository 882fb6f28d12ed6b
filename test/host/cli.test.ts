/**
 * The host's commands as a person runs them (the compiled CLI in dist/, against `tidemark host` in a child
 * process): configuration versions (unknown refused, upgrade with `vm upgrade`, no downgrade, not while
 * running), disks confined to the store and `--allow-disk-dir`, reference-point owners in `refpoint list`,
 * `backup` BUSY while another run holds the VM (and `--wait`), `restore --register` refusing a taken name
 * before writing and restoring straight into the store. Exit statuses and one-line errors as docs/cli.md says.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdir, readdir, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const BIN = path.join(REPO_ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(REPO_ROOT, 'dist', 'cli', 'main.js');

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let allowed: string;
let repoPath: string;
let host: ChildProcess | undefined;
let hostErr = '';

beforeAll(async () => {
  if (!existsSync(MAIN)) throw new Error(`${MAIN} is missing: build the CLI first (\`npm run build\`)`);
  ({ dir, cleanup } = await tempDir('host-cli'));
  store = path.join(dir, 'store');
  allowed = path.join(dir, 'allowed');
  repoPath = path.join(dir, 'repo');
  await mkdir(allowed);
  host = spawn(process.execPath, [BIN, 'host', '--store', store, '--allow-disk-dir', allowed], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  host.stderr!.on('data', (d) => (hostErr += d));
  for (let i = 0; ; i++) {
    try {
      if (JSON.parse(await readFile(path.join(store, 'host.json'), 'utf8')).pid === host.pid) break;
    } catch {
      // not yet
    }
    if (host.exitCode !== null || i > 500) throw new Error(`host did not start: ${hostErr}`);
    await sleep(20);
  }
});
afterAll(async () => {
  if (host && host.exitCode === null) {
    const gone = new Promise((r) => host!.once('exit', r));
    host.kill('SIGTERM');
    await gone;
  }
  await cleanup?.();
});

interface Result {
  status: number | null;
  stderr: string;
  text: string;
}

function tidemark(args: string[], cwd = dir): Result {
  const r = spawnSync(process.execPath, [BIN, ...args], { cwd, env: { ...process.env, NO_COLOR: '1' } });
  if (r.error) throw r.error;
  return { status: r.status, stderr: r.stderr.toString(), text: r.stdout.toString() };
}

const S = () => ['--store', store];
const R = () => ['--repo', repoPath];

function ok(args: string[], cwd?: string): Result {
  const r = tidemark(args, cwd);
  expect(r.status, `tidemark ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
function json(args: string[]): any {
  return JSON.parse(ok([...args, '--json']).text);
}

/** A failure: the exit status, and the error as the last line (`backup` logs its steps on stderr before it). */
function fails(args: string[], status: number, code: string): Result {
  const r = tidemark(args);
  expect(r.status, `tidemark ${args.join(' ')}: ${r.stderr}`).toBe(status);
  const lines = r.stderr.trimEnd().split('\n');
  if (args[0] !== 'backup') expect(lines, `one line: ${JSON.stringify(r.stderr)}`).toHaveLength(1);
  expect(lines.at(-1)).toMatch(new RegExp(`^tidemark: ${code}: \\S`));
  return { ...r, stderr: lines.at(-1)! };
}

describe('host commands', () => {
  it('configuration versions: the known list only, upgrade upwards with the VM off, tracking made at once', () => {
    const bad = fails(
      ['vm', 'create', 'x', '--new-disk', 'scsi0-0:8M', '--config-version', '4.7', ...S()],
      2,
      'INVALID_ARGUMENT',
    );
    expect(bad.stderr).toMatch(/5\.0, 6\.2, 7\.0/);
    const old = json(['vm', 'create', 'old', '--new-disk', 'scsi0-0:8M', '--config-version', '5.0', ...S()]);
    expect(old.configVersion).toBe('5.0');
    expect(old.disks[0].tracking).toBe('none');
    fails(['vm', 'set', 'old', '--config-version', '4.7', ...S()], 2, 'INVALID_ARGUMENT');
    ok(['vm', 'start', 'old', ...S()]);
    const running = fails(['vm', 'upgrade', 'old', ...S()], 6, 'CONFLICT');
    expect(running.stderr).toMatch(/stop it/);
    ok(['vm', 'stop', 'old', ...S()]);
    const up = ok(['vm', 'upgrade', 'old', '--version', '8.0', ...S()]);
    expect(up.text).toMatch(/configuration version 8\.0/);
    expect(up.text).toMatch(/scsi0-0: tracking enabled/);
    expect(existsSync(`${old.disks[0].base}.rct`)).toBe(true);
    const down = fails(['vm', 'set', 'old', '--config-version', '5.0', ...S()], 5, 'NOT_SUPPORTED');
    expect(down.stderr).toMatch(/cannot be lowered/);
    expect(json(['vm', 'upgrade', 'old', ...S()]).configVersion).toBe('9.0');
    expect(json(['vm', 'show', 'old', ...S()]).disks[0].tracking).toBe('enabled');
  });

  it('disks come from the store or an allowed directory; a relative path is the caller’s', () => {
    ok(['vhdx', 'create', path.join(dir, 'out.vhdx'), '--size', '4M']);
    const refused = fails(
      ['vm', 'create', 'ext', '--disk', `scsi0-0:${path.join(dir, 'out.vhdx')}`, ...S()],
      6,
      'PATH_NOT_ALLOWED',
    );
    expect(refused.stderr).toContain('--allow-disk-dir');
    expect(existsSync(path.join(dir, 'out.vhdx.rct'))).toBe(false);
    ok(['vhdx', 'create', path.join(allowed, 'data.vhdx'), '--size', '4M']);
    const ext = JSON.parse(ok(['vm', 'create', 'ext', '--disk', 'scsi0-0:data.vhdx', ...S(), '--json'], allowed).text);
    expect(ext.disks[0].base).toBe(path.join(allowed, 'data.vhdx'));
    expect(existsSync(path.join(allowed, 'data.vhdx.rct'))).toBe(true);
  });

  it('reference points show their owners', () => {
    const a = json(['refpoint', 'create', 'old', '--owner', 'alice', ...S()]);
    expect(a.owner).toEqual({ kind: 'user', name: 'alice' });
    const mine = json(['refpoint', 'create', 'old', ...S()]);
    expect(mine.owner).toEqual({ kind: 'user', name: os.userInfo().username });
    fails(['refpoint', 'create', 'old', '--owner', 'a\tb', ...S()], 2, 'INVALID_ARGUMENT');
    const text = ok(['refpoint', 'list', 'old', ...S()]).text;
    expect(text).toContain(`${a.id} `);
    expect(text).toMatch(/owner user:alice/);
    expect(text).toContain(`owner user:${os.userInfo().username}`);
    const list = json(['refpoint', 'list', 'old', ...S()]);
    expect(list.map((r: { owner: unknown }) => r.owner)).toEqual([a.owner, mine.owner]);
  });

  it('backup is BUSY while another run holds the VM, waits with --wait, and runs once it is free', async () => {
    ok(['repo', 'init', repoPath]);
    const api = await HostClient.connect({ store });
    const lease = await api.acquireLease('old', {
      owner: { runId: 'other-run', pid: process.pid, hostname: os.hostname(), command: 'tidemark backup old' },
      ttlSeconds: 600,
    });
    const busy = fails(['backup', 'old', ...S(), ...R()], 6, 'BUSY');
    expect(busy.stderr).toContain('other-run');
    expect(busy.stderr).toContain(`pid ${process.pid}`);
    expect(ok(['vm', 'show', 'old', ...S()]).text).toMatch(/leased by run other-run/);
    const t0 = performance.now();
    fails(['backup', 'old', '--wait', '1', ...S(), ...R()], 6, 'BUSY');
    expect(performance.now() - t0).toBeGreaterThanOrEqual(1000);
    fails(['backup', 'old', '--wait', 'soon', ...S(), ...R()], 2, 'INVALID_ARGUMENT');
    await api.releaseLease(lease.id);
    const s = json(['backup', 'old', '--wait', '5', '--consistency', 'crash', ...S(), ...R()]);
    expect(s.ok).toBe(true);
    expect(s.vms[0].errorCode).toBeNull();
  });

  it('restore --register refuses a taken name before writing, and restores straight into the store', async () => {
    const point = JSON.parse(ok(['points', 'list', ...R(), '--json']).text).points[0].id;
    const vms = (await readdir(path.join(store, 'vms'))).sort();
    const taken = fails(['restore', point, '--register', '--name', 'old', ...S(), ...R()], 6, 'ALREADY_EXISTS');
    expect(taken.stderr).toMatch(/a VM named old exists/);
    expect((await readdir(path.join(store, 'vms'))).sort()).toEqual(vms);
    fails(['restore', point, ...R()], 2, 'INVALID_ARGUMENT');
    fails(['restore', point, '--register', '--format', 'raw', ...S(), ...R()], 2, 'INVALID_ARGUMENT');
    const r = json(['restore', point, '--register', '--name', 'fresh', ...S(), ...R()]);
    expect(r.registered).toEqual(['fresh']);
    expect(r.disks[0].file).toBe(path.join(store, 'vms', 'fresh', 'disks', 'scsi0-0.vhdx'));
    expect(json(['vm', 'show', 'fresh', ...S()]).configVersion).toBe('9.0');
  });

  it('a host refuses to start with an allowed disk directory that does not exist', () => {
    const r = tidemark(['host', '--store', path.join(dir, 'store2'), '--allow-disk-dir', path.join(dir, 'nope')]);
    expect(r.status).toBe(3);
    expect(r.stderr).toMatch(/^tidemark: NOT_FOUND: allowed disk directory .*nope does not exist/);
  });
});
