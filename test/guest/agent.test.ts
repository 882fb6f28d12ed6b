/**
 * The reference agent with hook scripts (hooks only: no file system is frozen here; fsfreeze.test.ts freezes a
 * real one), driven through the real client, and freezeAround against it: order of hooks, failure and undo, the
 * watchdog, refusals while frozen, client replacement, garbage input, and the freeze window.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterEach, beforeAll, afterAll, describe, expect, it } from 'vitest';
import { GuestAgent, type GuestAgentOptions } from '../../src/guest/agent.js';
import { GuestAgentClient } from '../../src/guest/client.js';
import { freezeAround } from '../../src/guest/freeze.js';
import { GuestAgentError } from '../../src/guest/protocol.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { rawExchange, sleep, staleSocket, waitFor, writeHook } from './helpers.js';

const SEED = seedFrom('TIDEMARK_GUEST_SEED', 4242);
const FUZZ = Number(process.env.TIDEMARK_GUEST_CASES ?? 200);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('guest-agent'));
});
afterAll(async () => cleanup?.());

let n = 0;
const open: Array<{ close(): Promise<void> }> = [];
afterEach(async () => {
  for (const x of open.splice(0).reverse()) await x.close();
});

/** A fresh agent (hooks only) with its own hook directory and log; and a connected client. */
async function setup(
  hooks: Array<[string, Parameters<typeof writeHook>[3]?]>,
  opts: Partial<GuestAgentOptions> = {},
): Promise<{ agent: GuestAgent; client: GuestAgentClient; hookLog: () => string[]; agentLog: string[] }> {
  const id = ++n;
  const hooksDir = path.join(dir, `hooks${id}`);
  const log = path.join(dir, `hooks${id}.log`);
  writeFileSync(log, '');
  for (const [name, o] of hooks) writeHook(hooksDir, name, log, o);
  const agentLog: string[] = [];
  const agent = await GuestAgent.listen({
    socketPath: path.join(dir, `a${id}.sock`),
    hooksDir: hooks.length ? hooksDir : undefined,
    fsfreeze: false,
    log: (l) => agentLog.push(l),
    ...opts,
  });
  open.push(agent);
  const client = await GuestAgentClient.connect(agent.socketPath, { timeoutMs: 3000 });
  open.push(client);
  const hookLog = () => readFileSync(log, 'utf8').split('\n').filter(Boolean);
  return { agent, client, hookLog, agentLog };
}

describe('tidemark guest agent (hooks only)', () => {
  it('runs hooks in name order on freeze and in reverse on thaw; status follows', async () => {
    const { client, hookLog } = await setup([['20-db'], ['10-app'], ['30-cache'], ['README.txt~']]);
    // Not executable, or a leftover: not hooks.
    writeFileSync(path.join(dir, `hooks${n}`, '40-notes'), 'not a hook');
    expect(await client.fsfreezeStatus()).toBe('thawed');
    expect(await client.fsfreezeFreeze()).toBe(0); // hooks only: no file system frozen
    expect(await client.fsfreezeStatus()).toBe('frozen');
    expect(hookLog()).toEqual(['10-app freeze', '20-db freeze', '30-cache freeze']);
    expect(await client.fsfreezeThaw()).toBe(0);
    expect(await client.fsfreezeStatus()).toBe('thawed');
    expect(hookLog().slice(3)).toEqual(['30-cache thaw', '20-db thaw', '10-app thaw']);
    // Thaw when thawed: nothing to do, hooks not called again.
    expect(await client.fsfreezeThaw()).toBe(0);
    expect(hookLog()).toHaveLength(6);
  });

  it('while frozen, refuses a second freeze as qemu-ga does and shows it disabled in guest-info', async () => {
    const { client } = await setup([['10-a']]);
    await client.fsfreezeFreeze();
    const err = (await client.fsfreezeFreeze().catch((e) => e)) as GuestAgentError;
    expect(err.code).toBe('NOT_SUPPORTED');
    expect(err.agentDesc).toBe('Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state');
    const info = await client.info();
    const enabled = Object.fromEntries(info.supportedCommands.map((c) => [c.name, c.enabled]));
    expect(enabled).toEqual({
      'guest-sync': true,
      'guest-sync-delimited': true,
      'guest-ping': true,
      'guest-info': true,
      'guest-fsfreeze-status': true,
      'guest-fsfreeze-freeze': false,
      'guest-fsfreeze-thaw': true,
    });
    await client.ping();
    await client.fsfreezeThaw();
    expect((await client.info()).supportedCommands.every((c) => c.enabled)).toBe(true);
  });

  it('a failing hook fails the freeze; the hooks already run get thaw (in reverse); later ones never run', async () => {
    const { client, hookLog, agent } = await setup([['10-a'], ['20-b', { exit: 3, exitOn: 'freeze' }], ['30-c']]);
    const err = (await client.fsfreezeFreeze().catch((e) => e)) as GuestAgentError;
    expect(err.code).toBe('GUEST_AGENT_ERROR');
    expect(err.agentClass).toBe('GenericError');
    expect(err.agentDesc).toMatch(/^fsfreeze hook 20-b failed \(exit status 3: 20-b says no\); everything frozen/);
    expect(err.cannotFreeze).toMatch(/20-b failed/);
    expect(hookLog()).toEqual(['10-a freeze', '20-b freeze', '20-b thaw', '10-a thaw']);
    expect(await client.fsfreezeStatus()).toBe('thawed');
    expect(agent.status).toBe('thawed');
  });

  it('a hook that hangs is killed at the hook timeout and fails the freeze', async () => {
    const { client, hookLog } = await setup([['10-a'], ['20-slow', { sleepSeconds: 30, exitOn: 'freeze' }]], {
      hookTimeoutMs: 300,
    });
    const t0 = Date.now();
    const err = (await client.fsfreezeFreeze().catch((e) => e)) as GuestAgentError;
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(err.agentDesc).toMatch(/fsfreeze hook 20-slow failed \(timed out after 300 ms\)/);
    expect(hookLog()).toEqual(['10-a freeze', '20-slow freeze', '20-slow thaw', '10-a thaw']);
    expect(await client.fsfreezeStatus()).toBe('thawed');
  });

  it('a hook that leaves a background process holding its output does not stall the freeze', async () => {
    const { client, hookLog } = await setup([['10-a']]);
    const daemon = path.join(dir, `hooks${n}`, '20-daemon');
    writeFileSync(daemon, '#!/bin/sh\nsleep 3 &\necho started\nexit 0\n', { mode: 0o755 });
    const t0 = Date.now();
    expect(await client.fsfreezeFreeze()).toBe(0);
    expect(Date.now() - t0).toBeLessThan(2000);
    expect(await client.fsfreezeThaw()).toBe(0);
    expect(hookLog()).toEqual(['10-a freeze', '10-a thaw']);
  });

  it('the watchdog thaws by itself when no thaw comes, runs the thaw hooks, and logs it', async () => {
    const { client, hookLog, agentLog } = await setup([['10-a'], ['20-b']], { freezeTimeoutMs: 300 });
    await client.fsfreezeFreeze();
    const t0 = Date.now();
    await waitFor(async () => (await client.fsfreezeStatus()) === 'thawed', 3000, 'the watchdog thaw');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(200);
    expect(hookLog()).toEqual(['10-a freeze', '20-b freeze', '20-b thaw', '10-a thaw']);
    expect(agentLog.some((l) => /^watchdog: no thaw within 300 ms/.test(l))).toBe(true);
    // A late thaw from the host is harmless.
    expect(await client.fsfreezeThaw()).toBe(0);
  });

  it('a thaw before the watchdog disarms it (no second thaw later)', async () => {
    const { client, hookLog, agentLog } = await setup([['10-a']], { freezeTimeoutMs: 200 });
    await client.fsfreezeFreeze();
    await client.fsfreezeThaw();
    await client.fsfreezeFreeze();
    await client.fsfreezeThaw();
    await sleep(400);
    expect(hookLog()).toEqual(['10-a freeze', '10-a thaw', '10-a freeze', '10-a thaw']);
    expect(agentLog.some((l) => l.startsWith('watchdog'))).toBe(false);
  });

  it('a new client replaces the old one (the old one sees CLOSED); a frozen state carries over', async () => {
    const { client, agent } = await setup([['10-a']]);
    await client.fsfreezeFreeze();
    const second = await GuestAgentClient.connect(agent.socketPath, { timeoutMs: 3000 });
    open.push(second);
    expect(await second.fsfreezeStatus()).toBe('frozen');
    const err = (await client.ping().catch((e) => e)) as GuestAgentError;
    expect(err.code).toBe('CLOSED');
    expect(await second.fsfreezeThaw()).toBe(0);
  });

  it(`keeps answering after random garbage (seed ${SEED}, ${FUZZ} bursts)`, async () => {
    const { agent } = await setup([]);
    const r = rng(SEED);
    const sock = net.createConnection({ path: agent.socketPath });
    let answers = 0;
    sock.on('data', (d) => (answers += d.length));
    await new Promise((resolve) => sock.once('connect', resolve));
    const fragments = [
      '{"execute":',
      '"guest-ping"',
      '}',
      '{',
      '[',
      '"',
      '\\',
      '\n',
      ' ',
      'null',
      '{"execute":"guest-sync"',
    ];
    for (let i = 0; i < FUZZ; i++) {
      sock.write(r.next() < 0.5 ? r.bytes(1 + r.int(64)) : Buffer.from(r.pick(fragments)));
    }
    await sleep(50);
    sock.destroy();
    expect(answers).toBeGreaterThan(0); // it answered the garbage with errors
    // A client resyncs (0xFF flushes whatever the parser holds) and everything works.
    const c = await GuestAgentClient.connect(agent.socketPath, { timeoutMs: 3000 });
    open.push(c);
    await c.ping();
    expect(await c.fsfreezeStatus()).toBe('thawed');
  });

  it('answers the 0xFF-delimited sync with 0xFF first, and echoes ids', async () => {
    const { agent } = await setup([]);
    const out = await rawExchange(
      agent.socketPath,
      Buffer.from('\xff{"execute":"guest-sync-delimited","arguments":{"id":5},"id":"x"}\n', 'latin1'),
      80,
    );
    expect(out).toEqual([
      { delimited: false, msg: { error: { class: 'GenericError', desc: "JSON parse error, stray '\uFFFD'" } } },
      { delimited: true, msg: { return: 5, id: 'x' } },
    ]);
  });

  it('refuses bad setups with clear errors', async () => {
    const sock = path.join(dir, 'bad.sock');
    await expect(GuestAgent.listen({ socketPath: sock })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
      message: expect.stringMatching(/--mount PATH .* or pass --no-fsfreeze/),
    });
    await expect(GuestAgent.listen({ socketPath: sock, mounts: ['relative/dir'] })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
    });
    await expect(
      GuestAgent.listen({ socketPath: sock, fsfreeze: false, hooksDir: path.join(dir, 'nope') }),
    ).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(GuestAgent.listen({ socketPath: '/tmp/' + 'x'.repeat(120), fsfreeze: false })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
    });
    // A live agent's socket is not taken over; a stale one is.
    const live = await GuestAgent.listen({ socketPath: sock, fsfreeze: false });
    open.push(live);
    await expect(GuestAgent.listen({ socketPath: sock, fsfreeze: false })).rejects.toMatchObject({ code: 'BUSY' });
    const stale = staleSocket(path.join(dir, 'stale-agent.sock'));
    const taken = await GuestAgent.listen({ socketPath: stale, fsfreeze: false });
    open.push(taken);
    const c = await GuestAgentClient.connect(stale, { timeoutMs: 2000 });
    open.push(c);
    await c.ping();
  });
});

describe('freezeAround against the reference agent', () => {
  it('application consistency: the work runs while frozen; thawed after; the window is measured', async () => {
    const { client, hookLog } = await setup([['10-a'], ['20-b']]);
    const t0 = performance.now();
    const out = await freezeAround(client, async () => {
      // Inside the work the guest is frozen and its writers have been told.
      const status = await client.fsfreezeStatus();
      await sleep(100);
      return { status, hooks: hookLog() };
    });
    const wall = performance.now() - t0;
    expect(out.result).toEqual({ status: 'frozen', hooks: ['10-a freeze', '20-b freeze'] });
    expect(out.consistency).toBe('application');
    expect(out.reason).toBeUndefined();
    expect(out.frozenFilesystems).toBe(0);
    expect(out.thawed).toBe(true);
    expect(out.freezeWindowMs).toBeGreaterThanOrEqual(100);
    expect(out.freezeWindowMs).toBeLessThanOrEqual(wall);
    expect(hookLog().slice(2)).toEqual(['20-b thaw', '10-a thaw']);
    expect(await client.fsfreezeStatus()).toBe('thawed');
  });

  it("a failing hook: 'crash' runs the work unfrozen with the reason; 'fail' throws and does not run it", async () => {
    const { client } = await setup([['10-a', { exit: 1, exitOn: 'freeze' }]]);
    const out = await freezeAround(client, async () => client.fsfreezeStatus());
    expect(out.result).toBe('thawed');
    expect(out.consistency).toBe('crash');
    expect(out.reason).toMatch(/fsfreeze hook 10-a failed/);
    let ran = false;
    const err = (await freezeAround(client, async () => (ran = true), { fallback: 'fail' }).catch(
      (e) => e,
    )) as GuestAgentError;
    expect(ran).toBe(false);
    expect(err.code).toBe('GUEST_AGENT_ERROR');
    expect(err.cannotFreeze).toMatch(/fsfreeze hook 10-a failed/);
  });

  it('work that outlives the freeze window: the guest is thawed at the window, the outcome says crash', async () => {
    const { client, agentLog } = await setup([['10-a']]);
    const logs: string[] = [];
    const out = await freezeAround(
      client,
      async () => {
        await sleep(500);
        return client.fsfreezeStatus(); // already thawed by the window timer
      },
      { maxFreezeWindowMs: 150, log: (l) => logs.push(l) },
    );
    expect(out.result).toBe('thawed');
    expect(out.consistency).toBe('crash');
    expect(out.reason).toMatch(/longer than the freeze window of 150 ms/);
    expect(out.freezeWindowMs).toBeGreaterThanOrEqual(150);
    expect(out.freezeWindowMs).toBeLessThan(500); // fn alone took 500 ms
    expect(logs.some((l) => /freeze window of 150 ms exceeded/.test(l))).toBe(true);
    expect(agentLog.filter((l) => l.startsWith('thawed'))).toHaveLength(1);
  });

  it('work that throws: the guest is still thawed and the error comes through', async () => {
    const { client, hookLog } = await setup([['10-a']]);
    await expect(
      freezeAround(client, async () => {
        throw new Error('checkpoint failed');
      }),
    ).rejects.toThrow('checkpoint failed');
    expect(await client.fsfreezeStatus()).toBe('thawed');
    expect(hookLog()).toEqual(['10-a freeze', '10-a thaw']);
  });

  it('a freeze whose answer comes too late: the status shows it took effect, it counts, and is thawed', async () => {
    const { client, hookLog } = await setup([['10-slow', { sleepSeconds: 0.6, exitOn: 'freeze' }]]);
    const out = await freezeAround(client, async () => 'done', { freezeTimeoutMs: 200 });
    expect(out.consistency).toBe('application');
    expect(out.warnings[0]).toMatch(/no answer .* guest-fsfreeze-freeze within 200 ms.*reports frozen/);
    expect(out.frozenFilesystems).toBeUndefined();
    expect(hookLog()).toEqual(['10-slow freeze', '10-slow thaw']);
    expect(await client.fsfreezeStatus()).toBe('thawed');
    expect(client.stats.timeouts).toBe(1);
  });

  it('a guest already frozen by someone else is left frozen and counts as cannot-freeze', async () => {
    const { client, agent } = await setup([['10-a']]);
    await client.fsfreezeFreeze();
    const out = await freezeAround(client, async () => 1);
    expect(out.consistency).toBe('crash');
    expect(out.cannotFreeze).toMatch(/already frozen by another caller/);
    expect(out.thawed).toBe(false);
    expect(agent.status).toBe('frozen');
    await client.fsfreezeThaw();
  });

  it('no agent behind the channel: cannot freeze, crash consistency, within the command bound', async () => {
    const quiet = net.createServer((s) => s.on('error', () => {}));
    const p = path.join(dir, 'quiet.sock');
    await new Promise<void>((resolve) => quiet.listen(p, resolve));
    const c = await GuestAgentClient.connect(p, { timeoutMs: 300 });
    try {
      const t0 = Date.now();
      const out = await freezeAround(c, async () => 'ran', { commandTimeoutMs: 300 });
      expect(Date.now() - t0).toBeLessThan(2500);
      expect(out).toMatchObject({ result: 'ran', consistency: 'crash', freezeWindowMs: 0 });
      expect(out.cannotFreeze).toMatch(/^the guest agent does not answer \(no answer from a guest agent/);
    } finally {
      await c.close();
      quiet.close();
    }
  });
});
