/**
 * The client against the real QEMU guest agent (Debian qemu-guest-agent), run on a unix socket with the freeze
 * commands blocked (freezing this machine's file systems is not something a test may do). Also: our reference
 * agent answers the same raw inputs in the same shapes as qemu-ga.
 */
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgent } from '../../src/guest/agent.js';
import { GuestAgentClient } from '../../src/guest/client.js';
import { freezeAround } from '../../src/guest/freeze.js';
import { GuestAgentError } from '../../src/guest/protocol.js';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { InjectingProxy, rawExchange, startQemuGa } from './helpers.js';

describe.skipIf(requirePeers('qemu-ga').skip)('client against the real qemu-ga', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let qga: Awaited<ReturnType<typeof startQemuGa>>;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('qga'));
    qga = await startQemuGa(dir);
  });
  afterAll(async () => {
    await qga?.stop();
    await cleanup?.();
  });

  async function withClient<T>(fn: (c: GuestAgentClient) => Promise<T>, address = qga.socket): Promise<T> {
    const c = await GuestAgentClient.connect(address, { timeoutMs: 3000 });
    try {
      return await fn(c);
    } finally {
      await c.close();
    }
  }

  it('syncs (delimited), pings, reads guest-info and the freeze status', async () => {
    await withClient(async (c) => {
      await c.sync();
      expect(c.stats).toMatchObject({ resyncs: 1, syncFallbacks: 0, garbageLines: 0 });
      await c.ping();
      expect(c.stats.resyncs).toBe(1); // synced once, not before every command
      const info = await c.info();
      expect(info.version).toMatch(/^\d+\.\d+/);
      const byName = new Map(info.supportedCommands.map((x) => [x.name, x]));
      expect(byName.get('guest-ping')).toEqual({ name: 'guest-ping', enabled: true, successResponse: true });
      expect(byName.get('guest-fsfreeze-freeze')?.enabled).toBe(false); // blocked with -b
      expect(byName.get('guest-shutdown')?.successResponse).toBe(false);
      expect(await c.fsfreezeStatus()).toBe('thawed');
    });
  });

  it('a refused freeze is NOT_SUPPORTED with the agent class, its words, and a cannotFreeze reason', async () => {
    await withClient(async (c) => {
      const err = (await c.fsfreezeFreeze().catch((e) => e)) as GuestAgentError;
      expect(err).toBeInstanceOf(GuestAgentError);
      expect(err.code).toBe('NOT_SUPPORTED');
      expect(err.agentClass).toBe('CommandNotFound');
      expect(err.agentDesc).toBe('Command guest-fsfreeze-freeze has been disabled');
      expect(err.cannotFreeze).toMatch(/guest agent has guest-fsfreeze-freeze disabled/);
      // The error answer leaves the stream in step: no resync needed for the next command.
      await c.ping();
      expect(c.stats.resyncs).toBe(1);
    });
  });

  it("freezeAround with fallback 'crash' runs the work unfrozen and reports crash consistency and why", async () => {
    await withClient(async (c) => {
      let ran = 0;
      const out = await freezeAround(c, async () => ++ran, { fallback: 'crash' });
      expect(ran).toBe(1);
      expect(out.result).toBe(1);
      expect(out.consistency).toBe('crash');
      expect(out.cannotFreeze).toMatch(/guest-fsfreeze-freeze disabled/);
      expect(out.reason).toBe(out.cannotFreeze);
      expect(out.freezeWindowMs).toBe(0);
      expect(out.thawed).toBe(true);
      expect(await c.fsfreezeStatus()).toBe('thawed');
    });
  });

  it("freezeAround with fallback 'fail' throws the reason and never runs the work", async () => {
    await withClient(async (c) => {
      let ran = false;
      const err = (await freezeAround(c, async () => (ran = true), { fallback: 'fail' }).catch(
        (e) => e,
      )) as GuestAgentError;
      expect(ran).toBe(false);
      expect(err).toBeInstanceOf(GuestAgentError);
      expect(err.code).toBe('NOT_SUPPORTED');
      expect(err.cannotFreeze).toMatch(/guest-fsfreeze-freeze disabled/);
      expect(err.message).toMatch(/^cannot freeze the guest for an application-consistent point: /);
    });
  });

  describe('through a proxy that injects bytes', () => {
    let proxy: InjectingProxy;
    beforeAll(async () => {
      proxy = await InjectingProxy.start(path.join(dir, 'proxy.sock'), qga.socket);
    });
    afterAll(async () => proxy?.close());

    it('garbage before an answer (a partial line, then a whole garbage line) is recovered by resync', async () => {
      await withClient(async (c) => {
        await c.ping();
        expect(c.stats.resyncs).toBe(1);
        // A partial answer left in the stream: the real answer is glued to it and cannot be read.
        proxy.toClient('{"return": {"half');
        expect(await c.fsfreezeStatus()).toBe('thawed');
        expect(c.stats.resyncs).toBe(2);
        expect(c.stats.garbageLines).toBe(1);
        proxy.toClient('\x00\x01 not json at all\n');
        await c.ping();
        expect(c.stats.resyncs).toBe(3);
        expect(c.stats.garbageLines).toBe(2);
        // In step again: the next command needs no resync.
        await c.ping();
        expect(c.stats.resyncs).toBe(3);
      }, proxy.path);
    });

    it('a stale answer with another id is discarded, not taken for the answer', async () => {
      await withClient(async (c) => {
        await c.ping();
        proxy.toClient('{"return": "frozen", "id": "tidemark-999"}\n');
        expect(await c.fsfreezeStatus()).toBe('thawed');
        expect(c.stats.discardedLines).toBeGreaterThanOrEqual(1);
        expect(c.stats.resyncs).toBe(1);
      }, proxy.path);
    });

    it("a partial request in the agent's parser: the command times out, the 0xFF resync repairs it", async () => {
      await withClient(async (c) => {
        await c.ping();
        // qemu-ga's parser now holds an unfinished object and swallows what follows.
        proxy.toAgent('{"execute":"guest-ping"');
        const t0 = Date.now();
        const err = (await c.ping({ timeoutMs: 300 }).catch((e) => e)) as GuestAgentError;
        expect(err.code).toBe('TIMEOUT');
        expect(Date.now() - t0).toBeLessThan(2000);
        await c.ping();
        expect(c.stats.resyncs).toBe(2);
        expect(c.stats.timeouts).toBe(1);
      }, proxy.path);
    });
  });

  it('our reference agent answers the same raw inputs in the same shapes as qemu-ga', async () => {
    // A fresh qemu-ga: its parser state outlives connections, and earlier tests left things in it on purpose.
    const fresh = await startQemuGa(path.join(dir, 'fresh'));
    const ours = await GuestAgent.listen({ socketPath: path.join(dir, 'ours.sock'), fsfreeze: false });
    try {
      const inputs = [
        '{"execute":"guest-sync","arguments":{"id":123}}\n',
        '\xff{"execute":"guest-sync-delimited","arguments":{"id":77}}\n',
        '{"execute":"guest-sync","arguments":{"id":-5}}\n',
        '{"execute":"guest-ping","id":"abc"}\n',
        '{"execute":"guest-ping","id":{"a":[1]}}\n',
        '{"execute":"guest-fsfreeze-status"}\n',
        '{"execute":"guest-nonexistent"}\n',
        '{"execute":"guest-ping","arguments":{"x":1}}\n',
        '{"execute":"guest-sync"}\n',
        '{"execute":"guest-sync","arguments":{"id":"x"}}\n',
        '{"execute":"guest-sync","arguments":{"id":1.5}}\n',
        '{}\n',
        '[1,2]\n',
        '{"foo":1}\n',
        '{"execute":5}\n',
        '{"execute":"guest-ping","arguments":null}\n',
        '{"execute":"guest-ping"}{"execute":"guest-ping"}',
        '{\n"execute"\n:\n"guest-ping"\n}',
        '12 "s" null\n',
        'garbage here\n',
        '\xff\xff{"execute":"guest-ping"}\n',
      ];
      for (const input of inputs) {
        const raw = Buffer.from(input, 'latin1');
        const [theirs, mine] = await Promise.all([
          rawExchange(fresh.socket, raw, 80),
          rawExchange(ours.socketPath, raw, 80),
        ]);
        expect(theirs.length, `qemu-ga answered ${JSON.stringify(input)}`).toBeGreaterThan(0);
        expect(mine, `answers to ${JSON.stringify(input)}`).toEqual(theirs);
      }
    } finally {
      await ours.close();
      await fresh.stop();
    }
  });
});
