/**
 * `tidemark guest-agent` as a process (the compiled CLI in dist/, built by `npm test` before vitest): options,
 * usage errors, the watchdog with a short --freeze-timeout, and a stop by signal that thaws first.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgentClient } from '../../src/guest/client.js';
import { tempDir } from '../helpers/peers.js';
import { waitFor, writeHook } from './helpers.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(ROOT, 'dist', 'cli', 'main.js');

let dir: string;
let cleanup: () => Promise<void>;
const procs: ChildProcess[] = [];

beforeAll(async () => {
  if (!existsSync(path.join(ROOT, 'dist', 'cli', 'guest-agent.js'))) {
    throw new Error(`${MAIN} has no guest-agent command: build the CLI first (\`npm run build\`)`);
  }
  ({ dir, cleanup } = await tempDir('guest-cli'));
});
afterEach(() => {
  for (const p of procs.splice(0)) if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
});
afterAll(async () => cleanup?.());

function runCli(args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Starts the agent; resolves once its socket is up. stderr is collected in `err()`. */
async function startAgent(args: string[]): Promise<{ proc: ChildProcess; err: () => string; exited: Promise<number> }> {
  const proc = spawn(process.execPath, [BIN, 'guest-agent', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  procs.push(proc);
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  const exited = new Promise<number>((resolve) => proc.once('exit', (code) => resolve(code ?? -1)));
  await waitFor(() => /listening on /.test(stderr) || proc.exitCode !== null, 10_000, 'the agent to listen');
  if (proc.exitCode !== null) throw new Error(`agent exited ${proc.exitCode}: ${stderr}`);
  return { proc, err: () => stderr, exited };
}

describe('tidemark guest-agent', () => {
  it('usage errors are one line and exit 2', () => {
    const sock = path.join(dir, 'u.sock');
    for (const [args, pattern] of [
      [['guest-agent', '--socket', sock], /--mount PATH .* or pass --no-fsfreeze/],
      [['guest-agent', '--socket', sock, '--no-fsfreeze', '--freeze-timeout', 'abc'], /--freeze-timeout wants/],
      [['guest-agent', '--no-fsfreeze'], /--socket/],
    ] as const) {
      const r = runCli([...args]);
      expect(r.status, r.stderr).toBe(2);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^tidemark: INVALID_ARGUMENT: /);
      expect(r.stderr).toMatch(pattern);
    }
  });

  it('runs hooks, thaws on its own after --freeze-timeout, and stops cleanly on SIGTERM', async () => {
    const hooks = path.join(dir, 'hooks-a');
    const log = path.join(dir, 'hooks-a.log');
    writeFileSync(log, '');
    writeHook(hooks, '10-db', log);
    writeHook(hooks, '20-app', log);
    const sock = path.join(dir, 'a.sock');
    const agent = await startAgent(['--socket', sock, '--hooks', hooks, '--no-fsfreeze', '--freeze-timeout', '0.3']);
    const c = await GuestAgentClient.connect(sock, { timeoutMs: 3000 });
    try {
      expect(await c.fsfreezeFreeze()).toBe(0);
      expect(await c.fsfreezeStatus()).toBe('frozen');
      await waitFor(async () => (await c.fsfreezeStatus()) === 'thawed', 5000, 'the watchdog');
      expect(readFileSync(log, 'utf8').split('\n').filter(Boolean)).toEqual([
        '10-db freeze',
        '20-app freeze',
        '20-app thaw',
        '10-db thaw',
      ]);
      expect(agent.err()).toMatch(/guest-agent: watchdog: no thaw within 300 ms of the freeze; thawing by itself/);
    } finally {
      await c.close();
    }
    agent.proc.kill('SIGTERM');
    expect(await agent.exited).toBe(0);
    expect(existsSync(sock)).toBe(false);
  });

  it('a SIGTERM while frozen thaws (hooks in reverse) before the agent exits', async () => {
    const hooks = path.join(dir, 'hooks-b');
    const log = path.join(dir, 'hooks-b.log');
    writeFileSync(log, '');
    writeHook(hooks, '10-db', log);
    writeHook(hooks, '20-app', log);
    const sock = path.join(dir, 'b.sock');
    const agent = await startAgent(['--socket', sock, '--hooks', hooks, '--no-fsfreeze']);
    const c = await GuestAgentClient.connect(sock, { timeoutMs: 3000 });
    try {
      await c.fsfreezeFreeze();
    } finally {
      await c.close();
    }
    agent.proc.kill('SIGTERM');
    expect(await agent.exited).toBe(0);
    expect(readFileSync(log, 'utf8').split('\n').filter(Boolean)).toEqual([
      '10-db freeze',
      '20-app freeze',
      '20-app thaw',
      '10-db thaw',
    ]);
    expect(agent.err()).toMatch(/shutting down while frozen: thawing first/);
  });
});
