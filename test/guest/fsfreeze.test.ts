/**
 * The reference agent freezing a real file system: a small ext4 image loop-mounted for the test (needs root and
 * loop devices; skipped with a loud line otherwise). A writer started while frozen must block until the thaw;
 * hooks must run before the freeze and after the thaw (they write into the file system themselves to prove it).
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { GuestAgent } from '../../src/guest/agent.js';
import { GuestAgentClient } from '../../src/guest/client.js';
import { freezeAround } from '../../src/guest/freeze.js';
import type { GuestAgentError } from '../../src/guest/protocol.js';
import { requirePeers } from '../helpers/peers.js';
import { sleep, writeHook } from './helpers.js';

/** Mounts a fresh ext4 image; null (and why) when this machine does not allow it. */
function mountScratch(): { dir: string; mnt: string } | { skip: string } {
  if (requirePeers('mkfs.ext4', 'fsfreeze', 'mount').skip) return { skip: 'peers missing' };
  if (process.getuid?.() !== 0) return { skip: 'not root' };
  const dir = mkdtempSync(path.join(os.tmpdir(), 'tidemark-fsfreeze-'));
  const img = path.join(dir, 'fs.img');
  const mnt = path.join(dir, 'mnt');
  mkdirSync(mnt);
  writeFileSync(img, '');
  const steps: Array<[string, string[]]> = [
    ['truncate', ['-s', '32M', img]],
    ['mkfs.ext4', ['-q', '-F', img]],
    ['mount', ['-o', 'loop', img, mnt]],
  ];
  for (const [cmd, args] of steps) {
    const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000 });
    if (r.status !== 0) {
      rmSync(dir, { recursive: true, force: true });
      return { skip: `${cmd} failed: ${(r.stderr || r.error?.message || '').trim()}` };
    }
  }
  return { dir, mnt };
}

const scratch = mountScratch();
if ('skip' in scratch)
  console.warn(`SKIPPED fsfreeze tests: cannot loop-mount a scratch file system (${scratch.skip})`);

describe.skipIf('skip' in scratch)('fsfreeze of a real file system', () => {
  const { dir, mnt } = scratch as { dir: string; mnt: string };
  const open: Array<{ close(): Promise<void> }> = [];

  afterEach(async () => {
    for (const x of open.splice(0).reverse()) await x.close();
  });
  afterAll(() => {
    // Whatever happened, leave nothing frozen or mounted.
    spawnSync('fsfreeze', ['-u', mnt]);
    spawnSync('umount', [mnt]);
    rmSync(dir, { recursive: true, force: true });
  });

  /** A writer as a separate process (it may block in the kernel, which this test process must not). */
  function startWriter(file: string) {
    const child = spawn('sh', ['-c', `echo data > "${file}"`], { stdio: 'ignore' });
    const done = new Promise<number>((resolve) => child.once('exit', (code) => resolve(code ?? -1)));
    let exited = false;
    void done.then(() => (exited = true));
    /** 'D' while it waits in the kernel for the thaw (uninterruptible sleep), as /proc/PID/stat says */
    const state = () => {
      try {
        return readFileSync(`/proc/${child.pid}/stat`, 'utf8').replace(/^.*\) /s, '')[0];
      } catch {
        return 'gone';
      }
    };
    return { done, exited: () => exited, state };
  }

  it('freezes the mount after the hooks, blocks writers until the thaw, thaws before the thaw hooks', async () => {
    const hooks = path.join(dir, 'hooks');
    const log = path.join(dir, 'hooks.log');
    writeFileSync(log, '');
    writeHook(hooks, '10-db', log);
    // Writes into the file system on each call: it would hang (and time out) if the mount were frozen then.
    writeFileSync(path.join(hooks, '20-probe'), `#!/bin/sh\necho "$1" > "${mnt}/probe-$1"\n`, { mode: 0o755 });
    const agent = await GuestAgent.listen({
      socketPath: path.join(dir, 'agent.sock'),
      hooksDir: hooks,
      mounts: [mnt],
      freezeTimeoutMs: 10_000,
      hookTimeoutMs: 3_000,
    });
    open.push(agent);
    const client = await GuestAgentClient.connect(agent.socketPath, { timeoutMs: 5000 });
    open.push(client);

    let writer: ReturnType<typeof startWriter> | undefined;
    const out = await freezeAround(client, async () => {
      writer = startWriter(path.join(mnt, 'written-while-frozen'));
      // Blocked in the kernel by the freeze (not merely slow to start): it reaches state D and stays there.
      const end = Date.now() + 3000;
      while (writer.state() !== 'D' && !writer.exited() && Date.now() < end) await sleep(20);
      await sleep(200);
      return { blocked: !writer.exited() && writer.state() === 'D', status: await client.fsfreezeStatus() };
    });
    expect(out.result).toEqual({ blocked: true, status: 'frozen' });
    expect(out.consistency).toBe('application');
    expect(out.frozenFilesystems).toBe(1);
    expect(out.thawed).toBe(true);
    // Released by the thaw.
    expect(await Promise.race([writer!.done, sleep(5000).then(() => 'still blocked')])).toBe(0);
    expect(readFileSync(path.join(mnt, 'written-while-frozen'), 'utf8')).toBe('data\n');
    expect(readFileSync(path.join(mnt, 'probe-freeze'), 'utf8')).toBe('freeze\n');
    expect(readFileSync(path.join(mnt, 'probe-thaw'), 'utf8')).toBe('thaw\n');
    expect(readFileSync(log, 'utf8').split('\n').filter(Boolean)).toEqual(['10-db freeze', '10-db thaw']);
  });

  it('a path that is not a mount point fails the freeze, and what was frozen before it is thawed', async () => {
    const sub = path.join(mnt, 'not-a-mount');
    mkdirSync(sub, { recursive: true });
    const agent = await GuestAgent.listen({
      socketPath: path.join(dir, 'agent2.sock'),
      mounts: [mnt, sub],
      freezeTimeoutMs: 10_000,
      hookTimeoutMs: 3_000,
    });
    open.push(agent);
    const client = await GuestAgentClient.connect(agent.socketPath, { timeoutMs: 5000 });
    open.push(client);
    const err = (await client.fsfreezeFreeze().catch((e) => e)) as GuestAgentError;
    expect(err.code).toBe('GUEST_AGENT_ERROR');
    expect(err.agentDesc).toMatch(/^cannot freeze .*not-a-mount \(not a mount point\); everything frozen so far/);
    expect(await client.fsfreezeStatus()).toBe('thawed');
    // The first mount was frozen, then thawed: a write goes through at once.
    const w = startWriter(path.join(mnt, 'after-failure'));
    expect(await Promise.race([w.done, sleep(3000).then(() => 'blocked')])).toBe(0);
  });
});
