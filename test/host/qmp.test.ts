/**
 * The QMP client: framing, id matching, events, timeouts and errors against an in-process fake QEMU (a unix
 * socket server that sends exactly the bytes we choose, split where we choose), then against a real
 * `qemu-system-x86_64 -machine none`.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QmpClient, QmpError, type QmpEvent } from '../../src/host/qmp.js';
import { TidemarkError } from '../../src/errors.js';
import { missingPeers } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}\r\n';

/** The error a promise rejects with (fails the test if it resolves). */
async function failure(p: Promise<unknown>): Promise<QmpError> {
  return p.then(
    (v) => {
      throw new Error(`expected a failure, got ${JSON.stringify(v)}`);
    },
    (e: QmpError) => e,
  );
}

let dir: string;
beforeAll(() => {
  dir = mkdtempSync(path.join(os.tmpdir(), 'tm-qmp-'));
});
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** A fake QEMU: greets, then hands each request line to `onRequest`, which writes what it wants. */
async function fakeQemu(
  onRequest: (req: { execute: string; id?: string; arguments?: unknown }, sock: net.Socket) => void,
  opts: { greeting?: string | null } = {},
): Promise<{ path: string; close: () => Promise<void>; sockets: net.Socket[] }> {
  const p = path.join(dir, `fake-${Math.random().toString(36).slice(2)}.sock`);
  const sockets: net.Socket[] = [];
  const server = net.createServer((sock) => {
    sockets.push(sock);
    if (opts.greeting !== null) sock.write(opts.greeting ?? GREETING);
    let buf = '';
    sock.on('data', (d) => {
      buf += d.toString();
      let i: number;
      while ((i = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        onRequest(JSON.parse(line), sock);
      }
    });
    sock.on('error', () => undefined);
  });
  await new Promise<void>((r) => server.listen(p, r));
  return {
    path: p,
    sockets,
    close: () =>
      new Promise<void>((r) => {
        for (const s of sockets) s.destroy();
        server.close(() => r());
      }),
  };
}

/** Standard behaviour: qmp_capabilities → {}; echo → its arguments; anything else → CommandNotFound. */
function standard(req: { execute: string; id?: string; arguments?: unknown }, sock: net.Socket): void {
  if (req.execute === 'qmp_capabilities') sock.write(JSON.stringify({ return: {}, id: req.id }) + '\r\n');
  else if (req.execute === 'echo') sock.write(JSON.stringify({ return: req.arguments, id: req.id }) + '\r\n');
  else if (req.execute !== 'hang')
    sock.write(
      JSON.stringify({
        error: { class: 'CommandNotFound', desc: `The command ${req.execute} has not been found` },
        id: req.id,
      }) + '\r\n',
    );
}

describe('QMP framing and matching (fake QEMU)', () => {
  it('reads the greeting, negotiates, and matches answers to commands by id, out of order too', async () => {
    const held: { id?: string; arguments?: unknown; sock: net.Socket }[] = [];
    const fake = await fakeQemu((req, sock) => {
      if (req.execute === 'slow') held.push({ ...req, sock });
      else standard(req, sock);
    });
    const c = await QmpClient.connect(fake.path, { timeoutMs: 2000 });
    expect(c.version).toEqual({ major: 7, minor: 2, micro: 22, package: 'Debian' });
    expect(c.capabilities).toEqual(['oob']);
    const a = c.execute('slow', { n: 1 });
    const b = c.execute('slow', { n: 2 });
    await sleep(50);
    expect(held).toHaveLength(2);
    // Answer the second first: each promise gets its own answer.
    for (const h of [held[1], held[0]]) h.sock.write(JSON.stringify({ return: h.arguments, id: h.id }) + '\r\n');
    expect(await a).toEqual({ n: 1 });
    expect(await b).toEqual({ n: 2 });
    await c.close();
    await fake.close();
  });

  it('reassembles messages split at every byte and separates events from answers', async () => {
    const fake = await fakeQemu((req, sock) => {
      if (req.execute === 'qmp_capabilities') return standard(req, sock);
      const bytes = Buffer.from(
        '{"timestamp": {"seconds": 1700000000, "microseconds": 500000}, "event": "STOP"}\r\n' +
          JSON.stringify({ return: { status: 'paused', running: false }, id: req.id }) +
          '\r\n{"timestamp": {"seconds": 1700000001, "microseconds": 0}, "event": "RESUME", "data": {}}\r\n',
      );
      let i = 0;
      const drip = () => {
        if (i < bytes.length) sock.write(bytes.subarray(i, ++i), () => setImmediate(drip));
      };
      drip();
    });
    const c = await QmpClient.connect(fake.path, { timeoutMs: 5000 });
    const events: QmpEvent[] = [];
    c.on('event', (e: QmpEvent) => events.push(e));
    const resumed = c.waitEvent('RESUME', { timeoutMs: 5000 });
    expect(await c.execute('query-status')).toEqual({ status: 'paused', running: false });
    await resumed;
    expect(events.map((e) => e.event)).toEqual(['STOP', 'RESUME']);
    expect(events[0].at).toBe(1700000000.5);
    expect(events[0].data).toEqual({});
    await c.close();
    await fake.close();
  });

  it('an error answer is a QmpError with the class and description; the connection stays usable', async () => {
    const fake = await fakeQemu(standard);
    const c = await QmpClient.connect(fake.path);
    const err = await failure(c.execute('no-such-command'));
    expect(err).toBeInstanceOf(QmpError);
    expect(err.code).toBe('QMP_ERROR');
    expect(err.qmpClass).toBe('CommandNotFound');
    expect(err.message).toContain('no-such-command');
    expect(await c.execute('echo', { x: 'y' })).toEqual({ x: 'y' });
    await c.close();
    await fake.close();
  });

  it('times out a command QEMU never answers, ignores its late answer, and keeps going', async () => {
    let late: { id?: string; sock: net.Socket } | undefined;
    const fake = await fakeQemu((req, sock) => {
      if (req.execute === 'hang') late = { id: req.id, sock };
      else standard(req, sock);
    });
    const c = await QmpClient.connect(fake.path, { timeoutMs: 2000 });
    const err = await failure(c.execute('hang', undefined, { timeoutMs: 100 }));
    expect(err).toBeInstanceOf(TidemarkError);
    expect(err.code).toBe('TIMEOUT');
    late!.sock.write(JSON.stringify({ return: 'late', id: late!.id }) + '\r\n');
    expect(await c.execute('echo', { after: true })).toEqual({ after: true });
    await c.close();
    await fake.close();
  });

  it('fails pending commands and event waits with CLOSED when QEMU goes away, and later calls at once', async () => {
    const fake = await fakeQemu((req, sock) => {
      if (req.execute === 'hang') setTimeout(() => sock.destroy(), 20);
      else standard(req, sock);
    });
    const c = await QmpClient.connect(fake.path);
    let closeReason: string | undefined;
    c.on('close', (r: string) => (closeReason = r));
    const ev = failure(c.waitEvent('SHUTDOWN', { timeoutMs: 5000 }));
    const err = await failure(c.execute('hang'));
    expect(err.code).toBe('CLOSED');
    expect((await ev).code).toBe('CLOSED');
    expect(closeReason).toBeDefined();
    expect(c.closed).toBe(true);
    expect((await failure(c.execute('echo'))).code).toBe('CLOSED');
    await fake.close();
  });

  it('refuses garbage and over-long messages with PROTOCOL_ERROR instead of buffering them', async () => {
    const fake = await fakeQemu((req, sock) => {
      if (req.execute === 'qmp_capabilities') return standard(req, sock);
      if (req.execute === 'garbage') sock.write('this is not json\r\n');
      else sock.write('{"return": "' + 'x'.repeat(4096)); // no end of line, ever
    });
    const c = await QmpClient.connect(fake.path, { maxLineBytes: 1024 });
    expect((await failure(c.execute('garbage'))).code).toBe('PROTOCOL_ERROR');
    const c2 = await QmpClient.connect(fake.path, { maxLineBytes: 1024 });
    expect((await failure(c2.execute('long'))).code).toBe('PROTOCOL_ERROR');
    await fake.close();
  });

  it('connecting: no greeting in time is TIMEOUT; nothing listening is CLOSED', async () => {
    const silent = await fakeQemu(() => undefined, { greeting: null });
    expect((await failure(QmpClient.connect(silent.path, { timeoutMs: 150 }))).code).toBe('TIMEOUT');
    await silent.close();
    const stale = path.join(dir, 'stale.sock');
    const s = net.createServer();
    await new Promise<void>((r) => s.listen(stale, r));
    await new Promise<void>((r) => s.close(() => r()));
    const e = await failure(QmpClient.connect(stale, { timeoutMs: 500 }));
    expect(['CLOSED', 'NOT_FOUND']).toContain(e.code);
  });
});

describe.skipIf(missingPeers('qemu-system-x86_64'))('QMP against a real QEMU (-machine none)', () => {
  let qemu: ChildProcess;
  let sock: string;
  beforeAll(async () => {
    sock = path.join(dir, 'real.qmp');
    qemu = spawn(
      'qemu-system-x86_64',
      ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${sock},server=on,wait=off`],
      {
        stdio: 'ignore',
      },
    );
    for (let i = 0; i < 100; i++) {
      const c = await QmpClient.connect(sock, { timeoutMs: 2000 }).catch(() => null);
      if (c) {
        await c.close();
        return;
      }
      await sleep(100);
    }
    throw new Error('QEMU did not open its QMP socket');
  });
  afterAll(() => {
    if (qemu.exitCode === null) qemu.kill('SIGKILL');
  });

  it('negotiates, answers queries, reports errors, delivers STOP/RESUME events, and can be adopted again', async () => {
    const c = await QmpClient.connect(sock);
    expect(c.version!.major).toBeGreaterThanOrEqual(7);
    const status = await c.execute<{ status: string; running: boolean }>('query-status');
    expect(typeof status.running).toBe('boolean');
    const err = await failure(c.execute('device_del', { id: 'nonexistent' }));
    expect(err).toBeInstanceOf(QmpError);
    expect(err.qmpClass).toBe('DeviceNotFound');
    const stopped = c.waitEvent('STOP', { timeoutMs: 5000 });
    await c.execute('stop');
    await stopped;
    expect((await c.execute<{ status: string }>('query-status')).status).toBe('paused');
    const resumed = c.waitEvent('RESUME', { timeoutMs: 5000 });
    await c.execute('cont');
    await resumed;
    await c.close();
    // Adoption: a new client on the same socket once the first has gone.
    const again = await QmpClient.connect(sock);
    expect((await again.execute<{ status: string }>('query-status')).status).toBe('running');
    const exited = new Promise<number | null>((r) => qemu.once('exit', (code) => r(code)));
    const closed = new Promise<string>((r) => again.once('close', r));
    const shutdown = again.waitEvent('SHUTDOWN', { timeoutMs: 5000 });
    await again.execute('quit');
    expect((await shutdown).data.reason).toBe('host-qmp-quit');
    await closed;
    expect(await exited).toBe(0);
  });
});
