/**
 * `tidemark quickstart` as a new user runs it (the built CLI): with QEMU installed, real Linux guests by default
 * (application-consistent backups through qemu-ga, the restored disks checked with e2fsck and sqlite, a restored
 * VM registered and booted); without QEMU on PATH, one line says so and the built-in workload is verified byte
 * for byte; `--real-guest` without QEMU fails instead of falling back. Whole-command times are printed.
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { missingPeers, tempDir } from './helpers/peers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const REAL_PEERS = ['qemu-system-x86_64', 'apt-get', 'dpkg-deb', 'xz', 'e2fsck', 'debugfs', 'sqlite3'];

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('quickstart'));
});
afterAll(async () => {
  await cleanup?.();
});

async function quickstart(
  args: string[],
  env: NodeJS.ProcessEnv = process.env,
): Promise<{ code: number | null; out: string; err: string; ms: number }> {
  const t0 = performance.now();
  const child = spawn(process.execPath, [BIN, 'quickstart', ...args], {
    env: { ...env, NO_COLOR: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  return { code, out, err, ms: Math.round(performance.now() - t0) };
}

describe('tidemark quickstart', () => {
  it.skipIf(missingPeers(...REAL_PEERS))(
    'with QEMU installed: real guests by default, backed up app-consistently, restored, checked and booted',
    async () => {
      const r = await quickstart([path.join(dir, 'real')]);
      console.log(`quickstart (real guests) took ${(r.ms / 1000).toFixed(1)} s\n${r.out}`);
      expect(r.code, r.err.slice(-3000) + r.out).toBe(0);
      expect(r.out).toMatch(/QEMU found: the guests are real Linux guests/);
      expect(r.out).toMatch(/created and started linux01: QEMU pid \d+/);
      expect(r.out.match(/linux0[12]: ok; application-consistent/g)).toHaveLength(4); // two guests, two runs
      expect(r.out.match(/a clean ext4 file system \(e2fsck -fn\); wl\.db integrity_check ok/g)).toHaveLength(2);
      expect(r.out).toMatch(
        /registered linux01-restored .* boot 2 counts on from n=\d+; integrity_check inside the guest: ok/,
      );
      expect(r.out).toMatch(/^quickstart verified in \d+ s/m);
      expect(r.out).not.toMatch(/built-in workload/);
      // The guests were shut down: no QEMU of this quickstart is left.
      const left = await quickstartQemus(path.join(dir, 'real'));
      expect(left).toEqual([]);
    },
    600_000,
  );

  it('without QEMU on PATH: one line says so, the built-in workload runs and is verified', async () => {
    const r = await quickstart([path.join(dir, 'builtin')], { ...process.env, PATH: path.join(dir, 'no-such-dir') });
    console.log(`quickstart (no QEMU) took ${(r.ms / 1000).toFixed(1)} s`);
    expect(r.code, r.err + r.out).toBe(0);
    expect(r.out.match(/built-in workload/g)).toHaveLength(1);
    expect(r.out).toMatch(
      /QEMU \(qemu-system-x86_64\) is not installed: the guests are the built-in workload over NBD instead of real Linux guests/,
    );
    expect(r.out).toMatch(/quickstart verified: every restored disk equals the guest's disk at the checkpoint/);
    expect(r.out).not.toMatch(/linux01/);
  }, 300_000);

  it('--real-guest without QEMU fails instead of falling back; --built-in and --real-guest exclude each other', async () => {
    const noQemu = { ...process.env, PATH: path.join(dir, 'no-such-dir') };
    const r = await quickstart([path.join(dir, 'required'), '--real-guest'], noQemu);
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/tidemark: NOT_SUPPORTED: --real-guest: QEMU \(qemu-system-x86_64\) is not installed/);
    expect(existsSync(path.join(dir, 'required', 'store'))).toBe(false);
    const both = await quickstart([path.join(dir, 'both'), '--real-guest', '--built-in']);
    expect(both.code).not.toBe(0);
    expect(both.err).toMatch(/INVALID_ARGUMENT: --built-in and --real-guest exclude each other/);
  });
});

/** QEMU processes still running whose command line names this folder's store. */
async function quickstartQemus(folder: string): Promise<number[]> {
  const pids: number[] = [];
  for (const p of await readdir('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    const cmd = await readFile(`/proc/${p}/cmdline`, 'utf8').catch(() => '');
    if (cmd.startsWith('qemu-system') && cmd.includes(folder)) pids.push(Number(p));
  }
  return pids;
}
