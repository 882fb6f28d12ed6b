/**
 * The client's bounds and failure modes, against small socket servers that misbehave in one precise way (an agent
 * that never answers, one that only emits garbage, one that hangs up, one too old for guest-sync-delimited), and
 * the character-device transport through a real pseudo-terminal bridged to our agent.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { GuestAgent } from '../../src/guest/agent.js';
import { GuestAgentClient } from '../../src/guest/client.js';
import { GuestAgentError } from '../../src/guest/protocol.js';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { staleSocket } from './helpers.js';

const BRIDGE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'pty-bridge.py');

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('guest-client'));
});
afterAll(async () => cleanup?.());

let serial = 0;
/** A unix socket server whose every connection is handed to `onConn`. */
async function server(onConn: (s: net.Socket) => void): Promise<{ path: string; close(): Promise<void> }> {
  const p = path.join(dir, `s${++serial}.sock`);
  const conns: net.Socket[] = [];
  const srv = net.createServer((s) => {
    conns.push(s);
    s.on('error', () => {});
    onConn(s);
  });
  await new Promise<void>((resolve) => srv.listen(p, resolve));
  return {
    path: p,
    close: async () => {
      for (const c of conns) c.destroy();
      await new Promise<void>((resolve) => srv.close(() => resolve()));
    },
  };
}

async function rejection(p: Promise<unknown>): Promise<GuestAgentError> {
  const r = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(r instanceof GuestAgentError)) throw new Error(`expected a GuestAgentError, got ${String(r)}`);
  return r;
}

describe('bounds: the client never hangs', () => {
  it('an agent that reads and never answers: TIMEOUT within the bound, for queued calls too', async () => {
    let received = 0;
    const s = await server((c) => c.on('data', (d) => (received += d.length)));
    const c = await GuestAgentClient.connect(s.path, { timeoutMs: 300 });
    try {
      const t0 = Date.now();
      const [a, b] = await Promise.all([rejection(c.ping()), rejection(c.fsfreezeStatus({ timeoutMs: 400 }))]);
      const elapsed = Date.now() - t0;
      expect(a.code).toBe('TIMEOUT');
      expect(a.message).toMatch(/no answer from a guest agent on .* to guest-sync-delimited within 300 ms/);
      // The second call's deadline started when it was made: it gives up while the first is still waiting.
      expect(b.code).toBe('TIMEOUT');
      expect(elapsed).toBeGreaterThanOrEqual(390);
      expect(elapsed).toBeLessThan(2000);
      expect(received).toBeGreaterThan(0); // it did send the resync
      expect(c.stats.timeouts).toBe(2);
    } finally {
      await c.close();
      await s.close();
    }
  });

  it('an agent that only answers garbage: PROTOCOL_ERROR (resync cannot fix it), within the bound', async () => {
    const s = await server((c) => c.on('data', () => c.write('garbage, garbage\n')));
    const c = await GuestAgentClient.connect(s.path, { timeoutMs: 400 });
    try {
      const t0 = Date.now();
      const err = await rejection(c.ping());
      expect(err.code).toBe('PROTOCOL_ERROR');
      expect(err.message).toMatch(/stays unreadable: 1 garbage line\(s\)/);
      expect(Date.now() - t0).toBeLessThan(1200);
    } finally {
      await c.close();
      await s.close();
    }
  });

  it('a line larger than the cap is skipped, not buffered, and counts as garbage', async () => {
    const s = await server((c) => c.once('data', () => c.write(Buffer.alloc(8 << 20, 0x61))));
    const c = await GuestAgentClient.connect(s.path, { timeoutMs: 600, maxLineBytes: 1 << 20 });
    try {
      const err = await rejection(c.ping());
      expect(err.code).toBe('PROTOCOL_ERROR');
      expect(err.message).toMatch(/a line over 1048576 bytes/);
    } finally {
      await c.close();
      await s.close();
    }
  });

  it('an agent that hangs up: CLOSED at once (not at the timeout), and for every later call', async () => {
    const s = await server((c) => c.once('data', () => c.destroy()));
    const c = await GuestAgentClient.connect(s.path, { timeoutMs: 5000 });
    try {
      const t0 = Date.now();
      const err = await rejection(c.ping());
      expect(err.code).toBe('CLOSED');
      expect(Date.now() - t0).toBeLessThan(1000);
      expect(c.closed).toBe(true);
      expect((await rejection(c.ping())).code).toBe('CLOSED');
    } finally {
      await c.close();
      await s.close();
    }
  });

  it('connect errors are typed: missing path, not a socket, nobody listening', async () => {
    await expect(GuestAgentClient.connect(path.join(dir, 'absent.sock'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
    const file = path.join(dir, 'plain-file');
    writeFileSync(file, 'x');
    await expect(GuestAgentClient.connect(file)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    const stale = staleSocket(path.join(dir, 'stale.sock'));
    await expect(GuestAgentClient.connect(`unix:${stale}`)).rejects.toMatchObject({ code: 'CLOSED' });
  });
});

describe('resynchronisation', () => {
  it('falls back to guest-sync with an agent that does not know guest-sync-delimited, and remembers it', async () => {
    const seen: string[] = [];
    // An old agent: line-based, no id echo, no delimited sync.
    const s = await server((c) => {
      let buf = '';
      c.on('data', (d) => {
        buf += d.toString('latin1').replace(/\xff/g, '');
        let nl: number;
        while ((nl = buf.indexOf('\n')) >= 0) {
          const req = JSON.parse(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
          seen.push(req.execute);
          if (req.execute === 'guest-sync') c.write(`{"return": ${req.arguments.id}}\n`);
          else if (req.execute === 'guest-ping') c.write('{"return": {}}\n');
          else
            c.write(
              `{"error": {"class": "CommandNotFound", "desc": "The command ${req.execute} has not been found"}}\n`,
            );
        }
      });
    });
    const c = await GuestAgentClient.connect(s.path, { timeoutMs: 1000 });
    try {
      await c.ping();
      await c.sync();
      await c.ping();
      expect(seen).toEqual(['guest-sync-delimited', 'guest-sync', 'guest-ping', 'guest-sync', 'guest-ping']);
      expect(c.stats.syncFallbacks).toBe(1);
    } finally {
      await c.close();
      await s.close();
    }
  });

  it('an agent with neither sync command: PROTOCOL_ERROR naming both', async () => {
    const s = await server((c) =>
      c.on('data', (d) => {
        const cmd = /"execute":"([^"]+)"/.exec(d.toString('latin1'))?.[1];
        c.write(`{"error": {"class": "CommandNotFound", "desc": "The command ${cmd} has not been found"}}\n`);
      }),
    );
    const c = await GuestAgentClient.connect(s.path, { timeoutMs: 1000 });
    try {
      const err = await rejection(c.ping());
      expect(err.code).toBe('PROTOCOL_ERROR');
      expect(err.message).toMatch(/neither guest-sync-delimited nor guest-sync/);
    } finally {
      await c.close();
      await s.close();
    }
  });
});

describe.skipIf(requirePeers('python3').skip)('character device transport (a pty, as QEMU -chardev pty)', () => {
  it('talks to the agent through /dev/pts/N', async () => {
    const agent = await GuestAgent.listen({ socketPath: path.join(dir, 'pty-agent.sock'), fsfreeze: false });
    const bridge = spawn('python3', [BRIDGE, agent.socketPath], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const ptyPath = await new Promise<string>((resolve, reject) => {
        bridge.stdout!.once('data', (d: Buffer) => resolve(d.toString().trim()));
        bridge.once('exit', (code) => reject(new Error(`pty bridge exited ${code}`)));
      });
      expect(ptyPath).toMatch(/^\/dev\/pts\/\d+$/);
      const c = await GuestAgentClient.connect(ptyPath, { timeoutMs: 3000 });
      try {
        await c.ping();
        const info = await c.info();
        expect(info.supportedCommands.map((x) => x.name)).toContain('guest-fsfreeze-freeze');
        expect(await c.fsfreezeFreeze()).toBe(0);
        expect(await c.fsfreezeStatus()).toBe('frozen');
        expect(await c.fsfreezeThaw()).toBe(0);
        expect(agent.status).toBe('thawed');
      } finally {
        await c.close();
      }
    } finally {
      bridge.kill();
      await agent.close();
    }
  });
});
