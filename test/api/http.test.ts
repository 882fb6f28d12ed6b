/**
 * HTTP semantics of the management API, against a real host (in this process) and a real ApiServer:
 * 401 without or with a wrong token (and a stranger's body is never read: the connection closes with the
 * answer), 404 for an unknown path, 405 with Allow for a known path with another method, 400 for schema
 * failures naming the field, 413 over the body limit, a slow authenticated body cut by the request timeout,
 * every ErrorCode answered with its status from the one map, a damaged disk answered 422, the unix socket
 * 0600 under umask 000, and a client that refuses answers outside the contract.
 */
import { readFile, stat, writeFile } from 'node:fs/promises';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { ROUTES } from '../../src/api/routes.js';
import { ApiServer, type Handlers } from '../../src/api/server.js';
import { HTTP_STATUS } from '../../src/api/status.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { TidemarkError, type ErrorCode } from '../../src/errors.js';
import { HostLog } from '../../src/host/log.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';

/** Compile-time: the status map has exactly the error codes as keys (a new code without a status fails here). */
type Equal<A, B> = (<T>() => T extends A ? 1 : 2) extends <T>() => T extends B ? 1 : 2 ? true : false;
const exhaustive: Equal<keyof typeof HTTP_STATUS, ErrorCode> = true;

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let socket: string;
let running: RunningHost;
let api: HostClient;
let token: string;
let umask: number;

const LIMITS = { headersTimeoutMs: 1_000, requestTimeoutMs: 1_500, keepAliveTimeoutMs: 1_000, bodyLimit: 64 * 1024 };

beforeAll(async () => {
  umask = process.umask(0o000);
  ({ dir, cleanup } = await tempDir('api-http'));
  store = path.join(dir, 'store');
  socket = path.join(store, 'api.sock');
  running = await startHost({ store, log: HostLog.silent(), apiLimits: LIMITS });
  api = await HostClient.connect({ store });
  token = running.token;
});
afterAll(async () => {
  process.umask(umask);
  await running?.close();
  await cleanup?.();
});

interface Raw {
  status: number;
  headers: http.IncomingHttpHeaders;
  json: { error?: { code: string; message: string; details?: Record<string, unknown> } };
}

function raw(method: string, url: string, opts: { body?: string; token?: string; sock?: string } = {}): Promise<Raw> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        socketPath: opts.sock ?? socket,
        path: url,
        method,
        headers: {
          ...(opts.token ? { authorization: `Bearer ${opts.token}` } : {}),
          ...(opts.body !== undefined ? { 'content-type': 'application/json' } : {}),
        },
      },
      (res) => {
        let text = '';
        res.on('data', (c) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode!, headers: res.headers, json: JSON.parse(text) }));
      },
    );
    req.on('error', reject);
    req.end(opts.body);
  });
}

/** Sends `head` on a raw connection and collects what comes back until the host closes it. */
function rawSocket(head: string): Promise<{ text: string; closedAfterMs: number }> {
  return new Promise((resolve, reject) => {
    const t0 = Date.now();
    const s = net.connect(socket);
    let text = '';
    s.on('data', (d) => (text += d));
    s.on('error', reject);
    s.on('close', () => resolve({ text, closedAfterMs: Date.now() - t0 }));
    s.write(head);
  });
}

describe('HTTP semantics', () => {
  it('the API socket is 0600 under umask 000', async () => {
    expect(process.umask()).toBe(0);
    expect((await stat(socket)).mode & 0o777).toBe(0o600);
  });

  it('401 without a token, with a wrong one, or with another scheme', async () => {
    for (const t of [undefined, 'not-the-token', `${token}x`]) {
      const r = await raw('GET', '/v1/vms', { token: t });
      expect(r.status).toBe(401);
      expect(r.json.error?.code).toBe('UNAUTHORIZED');
    }
    const basic = await new Promise<number>((resolve) =>
      http
        .request({ socketPath: socket, path: '/v1/vms', headers: { authorization: `Basic ${token}` } }, (res) => {
          res.resume();
          resolve(res.statusCode!);
        })
        .end(),
    );
    expect(basic).toBe(401);
    // Before routing: a stranger learns nothing about which paths exist.
    expect((await raw('GET', '/v1/nothing-here')).status).toBe(401);
  });

  it("a stranger's body is never read: 401 at once and the connection closed", async () => {
    const r = await rawSocket(
      'POST /v1/vms HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n{"na',
    );
    expect(r.text).toMatch(/^HTTP\/1\.1 401 /);
    expect(r.text).toMatch(/connection: close/i);
    expect(r.closedAfterMs).toBeLessThan(LIMITS.requestTimeoutMs);
  });

  it('404 for an unknown path, 405 with Allow for a known path with another method', async () => {
    for (const url of ['/v1/nothing-here', '/v1', '/v1/vms/web/nothing', '/v1/vms/web/checkpoints/a/b/c']) {
      const unknown = await raw('GET', url, { token });
      expect(unknown.status, url).toBe(404);
      expect(unknown.json.error?.code).toBe('NOT_FOUND');
    }
    const cases: [string, string, string][] = [
      ['PUT', '/v1/vms', 'GET, POST'],
      ['DELETE', '/v1/host', 'GET'],
      ['GET', '/v1/vms/web/start', 'POST'],
      ['POST', '/v1/vms/web', 'GET, PATCH, DELETE'],
      ['PATCH', '/v1/snapshot-sets/abc', 'DELETE'],
    ];
    for (const [method, url, allow] of cases) {
      const r = await raw(method, url, { token });
      expect(r.status, `${method} ${url}`).toBe(405);
      expect(r.headers.allow?.split(', ').sort(), `${method} ${url}`).toEqual(allow.split(', ').sort());
      expect(r.json.error?.code).toBe('NOT_SUPPORTED');
    }
    // An empty path parameter is no route's either: the router takes it for one, its schema refuses it.
    const empty = await raw('GET', '/v1/vms/', { token });
    expect(empty.status).toBe(400);
    expect(empty.json.error?.message).toMatch(/params at vm/);
    // A known path with its own method is no 405: a VM that does not exist is the host's 404.
    const missing = await raw('GET', '/v1/vms/nope', { token });
    expect(missing.status).toBe(404);
    expect(missing.json.error?.message).toMatch(/nope/);
  });

  it('400 for schema failures, naming the field (body, query) and listing the issues', async () => {
    const slot = await raw('POST', '/v1/vms', {
      token,
      body: JSON.stringify({ name: 'ok', disks: [{ slot: 'sata9-9', size: 1 }] }),
    });
    expect(slot.status).toBe(400);
    expect(slot.json.error?.code).toBe('INVALID_ARGUMENT');
    expect(slot.json.error?.message).toMatch(/body at disks\.0\.slot/);
    expect(slot.json.error?.details?.issues).toEqual([
      { field: 'disks.0.slot', message: expect.stringMatching(/slot/) },
    ]);
    const extra = await raw('POST', '/v1/vms', { token, body: JSON.stringify({ name: 'ok', bogus: 1 }) });
    expect(extra.status).toBe(400);
    expect(extra.json.error?.message).toMatch(/bogus/);
    const version = await raw('POST', '/v1/vms', { token, body: JSON.stringify({ name: 'ok', configVersion: '4.7' }) });
    expect(version.status).toBe(400);
    expect(version.json.error?.message).toMatch(/configVersion: a configuration version is one of 5\.0, 6\.2/);
    const query = await raw('GET', '/v1/jobs/x/wait?timeoutMs=soon', { token });
    expect(query.status).toBe(400);
    expect(query.json.error?.message).toMatch(/query at timeoutMs/);
    const notJson = await raw('POST', '/v1/vms', { token, body: '{"name": ' });
    expect(notJson.status).toBe(400);
    expect(notJson.json.error?.message).toMatch(/not JSON/);
    const proto = await raw('POST', '/v1/vms', { token, body: '{"name": "x", "__proto__": {"a": 1}}' });
    expect(proto.status).toBe(400);
    // A route whose body fields are all optional takes no body at all.
    expect((await raw('POST', '/v1/vms/nope/refpoints', { token })).status).toBe(202);
  });

  it('413 for a body over the limit', async () => {
    const big = JSON.stringify({ name: 'big', guest: 'x'.repeat(LIMITS.bodyLimit) });
    const r = await raw('POST', '/v1/vms', { token, body: big });
    expect(r.status).toBe(413);
    expect(r.json.error?.code).toBe('LIMIT_EXCEEDED');
  });

  it("a client's body that trickles is cut by the request timeout", async () => {
    const r = await new Promise<{ text: string; ms: number }>((resolve, reject) => {
      const t0 = Date.now();
      const s = net.connect(socket);
      let text = '';
      s.write(
        `POST /v1/vms HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n` +
          'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{',
      );
      const timer = setInterval(() => s.write(' '), 100);
      s.on('data', (d) => (text += d));
      s.on('error', reject);
      s.on('close', () => {
        clearInterval(timer);
        resolve({ text, ms: Date.now() - t0 });
      });
    });
    expect(r.text).toMatch(/^HTTP\/1\.1 408 /);
    // Node looks for timed-out requests once a second here: cut between the timeout and a few seconds later.
    expect(r.ms).toBeGreaterThanOrEqual(LIMITS.requestTimeoutMs - 100);
    expect(r.ms).toBeLessThan(LIMITS.requestTimeoutMs + 4_000);
  });

  it('a damaged disk named in POST /v1/vms is 422 VHDX_CORRUPT; the host stays usable', async () => {
    const bad = path.join(store, 'bad.vhdx');
    await writeFile(bad, Buffer.alloc(4 * 1024 * 1024, 0x5a));
    const r = await raw('POST', '/v1/vms', {
      token,
      body: JSON.stringify({ name: 'bad', disks: [{ slot: 'scsi0-0', path: 'bad.vhdx' }] }),
    });
    expect(r.json.error?.code).toBe('VHDX_CORRUPT');
    expect(r.status).toBe(422);
    expect((await api.listVms()).map((v) => v.name)).not.toContain('bad');
  });
});

describe('the status map', () => {
  it('maps every ErrorCode of src/errors.ts to a 4xx or 5xx', async () => {
    expect(exhaustive).toBe(true);
    const src = await readFile(path.join(REPO_ROOT, 'src', 'errors.ts'), 'utf8');
    const union = /export type ErrorCode =([^;]+);/.exec(src)![1];
    const codes = [...union.matchAll(/'([A-Z_]+)'/g)].map((m) => m[1]).sort();
    expect(codes.length).toBeGreaterThan(20);
    expect(Object.keys(HTTP_STATUS).sort()).toEqual(codes);
    for (const [code, status] of Object.entries(HTTP_STATUS)) {
      expect(status >= 400 && status <= 599, code).toBe(true);
    }
    expect(HTTP_STATUS.VHDX_CORRUPT).toBe(422);
    expect(HTTP_STATUS.INTERNAL).toBe(500);
  });

  it('a server answers each code with its status, and the client gives back the code, message and details', async () => {
    let throwing: unknown;
    const handlers = new Proxy({} as Handlers, {
      get: () => async () => {
        throw throwing;
      },
    });
    const sock = path.join(dir, 'codes.sock');
    const server = new ApiServer(handlers, { token: 't', socket: sock });
    await server.listen();
    const client = new HostClient({ endpoint: `unix:${sock}`, token: 't' });
    try {
      for (const [code, status] of Object.entries(HTTP_STATUS) as [ErrorCode, number][]) {
        throwing = new TidemarkError(code, `a ${code}`, { n: 1 });
        const r = await raw('GET', '/v1/host', { token: 't', sock });
        expect(r.status, code).toBe(status);
        expect(r.json.error).toEqual({ code, message: `a ${code}`, details: { n: 1 } });
        const err = await client.hostInfo().catch((e: unknown) => e);
        expect(err).toBeInstanceOf(TidemarkError);
        expect((err as TidemarkError).code).toBe(code);
        expect((err as TidemarkError).details).toEqual({ n: 1 });
      }
      throwing = new RangeError('a bug');
      const bug = await raw('GET', '/v1/host', { token: 't', sock });
      expect(bug.status).toBe(500);
      expect(bug.json.error?.code).toBe('INTERNAL');
      expect(bug.json.error?.message).toMatch(/a bug/);
    } finally {
      await server.close();
    }
  });

  it("an answer outside the route's schema is the server's 500 INTERNAL, never sent as is", async () => {
    const handlers = new Proxy({} as Handlers, { get: () => async () => ({ store: 42 }) });
    const sock = path.join(dir, 'shape.sock');
    const server = new ApiServer(handlers, { token: 't', socket: sock });
    await server.listen();
    try {
      const r = await raw('GET', '/v1/host', { token: 't', sock });
      expect(r.status).toBe(500);
      expect(r.json.error?.code).toBe('INTERNAL');
      expect(r.json.error?.message).toMatch(/does not match the API schema/);
    } finally {
      await server.close();
    }
  });
});

describe('the connection cap', () => {
  it("evicts the oldest stranger's connection for a newcomer, and refuses one when every connection is a client's", async () => {
    const handlers = new Proxy({} as Handlers, {
      get: () => async () => {
        throw new TidemarkError('NOT_FOUND', 'nothing here');
      },
    });
    const sock = path.join(dir, 'cap.sock');
    const server = new ApiServer(handlers, {
      token: 't',
      socket: sock,
      limits: { maxConnections: 3, keepAliveTimeoutMs: 30_000, headersTimeoutMs: 30_000, requestTimeoutMs: 30_000 },
    });
    await server.listen();
    const open = (): Promise<{ s: net.Socket; closed: Promise<void> }> =>
      new Promise((resolve) => {
        const s = net.connect(sock, () => resolve({ s, closed }));
        const closed = new Promise<void>((r) => s.once('close', () => r()));
        s.on('error', () => undefined);
      });
    const isOpen = async (c: { closed: Promise<void> }) =>
      Promise.race([c.closed.then(() => false), new Promise<boolean>((r) => setTimeout(() => r(true), 300))]);
    /** One authenticated request on the connection, answered, the connection kept alive. */
    const authenticate = (c: { s: net.Socket }) =>
      new Promise<void>((resolve) => {
        c.s.once('data', () => resolve());
        c.s.write('GET /v1/host HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n');
      });
    try {
      const a = await open();
      const stranger = await open();
      const b = await open();
      await authenticate(a);
      await authenticate(b);
      stranger.s.write('GET /v1/ho'); // a header begun, never finished: no request of it has authenticated
      const c = await open(); // at the cap: the stranger goes
      expect(await isOpen(stranger)).toBe(false);
      expect(await isOpen(a)).toBe(true);
      expect(await isOpen(c)).toBe(true);
      await authenticate(c);
      const d = await open(); // every connection is a client's: the newcomer is closed at once
      expect(await isOpen(d)).toBe(false);
      expect([await isOpen(a), await isOpen(b), await isOpen(c)]).toEqual([true, true, true]);
      for (const x of [a, b, c]) x.s.destroy();
    } finally {
      await server.close();
    }
  });
});

describe('the client checks what it is answered', () => {
  let plainServers = 0;
  /** A plain HTTP server answering every request with `status` and `body`. */
  async function answering(status: number, body: string): Promise<{ client: HostClient; close: () => Promise<void> }> {
    const sock = path.join(dir, `plain-${++plainServers}.sock`);
    const s = http.createServer((req, res) => {
      req.resume();
      req.on('end', () => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(body);
      });
    });
    await new Promise<void>((resolve) => s.listen(sock, resolve));
    return {
      client: new HostClient({ endpoint: `unix:${sock}`, token: 't' }),
      close: () => new Promise((resolve) => s.close(() => resolve())),
    };
  }

  it('an answer of the wrong shape, a wrong status, or an error without its body is PROTOCOL_ERROR', async () => {
    const cases: [number, string, (c: HostClient) => Promise<unknown>, RegExp][] = [
      [200, JSON.stringify([{ name: 'web' }]), (c) => c.listVms(), /GET \/v1\/vms does not match the API at 0\.id/],
      [
        200,
        JSON.stringify({ released: 'x' }),
        (c) => c.startVm('web'),
        /answered 200 to POST \/v1\/vms\/:vm\/start, not 202/,
      ],
      [500, '{"oops":1}', (c) => c.listVms(), /answered 500 to GET \/v1\/vms without an error body/],
      [200, 'not json', (c) => c.hostInfo(), /not JSON/],
    ];
    for (const [status, body, call, message] of cases) {
      const { client, close } = await answering(status, body);
      try {
        const err = await call(client).catch((e: unknown) => e);
        expect(err).toBeInstanceOf(TidemarkError);
        expect((err as TidemarkError).code, String(err)).toBe('PROTOCOL_ERROR');
        expect((err as TidemarkError).message).toMatch(message);
      } finally {
        await close();
      }
    }
  });

  it("a job's result is checked against its route's answer", async () => {
    const job = {
      id: 'j',
      type: 'start',
      target: 'web',
      state: 'Completed',
      createdAt: 'now',
      startedAt: 'now',
      endedAt: 'now',
      progress: 1,
      result: { name: 'web' },
      error: null,
    };
    const sock = path.join(dir, 'job.sock');
    const s = http.createServer((req, res) => {
      res.writeHead(req.method === 'POST' ? 202 : 200, { 'content-type': 'application/json' });
      res.end(JSON.stringify(job));
    });
    await new Promise<void>((resolve) => s.listen(sock, resolve));
    try {
      const err = await new HostClient({ endpoint: `unix:${sock}`, token: 't' }).startVm('web').catch((e) => e);
      expect((err as TidemarkError).code).toBe('PROTOCOL_ERROR');
      expect((err as TidemarkError).message).toMatch(/the result of job j \(POST \/v1\/vms\/:vm\/start\)/);
    } finally {
      await new Promise((resolve) => s.close(resolve));
    }
  });

  it('every route of the table has a named client method', () => {
    const methods = Object.getOwnPropertyNames(HostClient.prototype);
    for (const name of Object.keys(ROUTES)) expect(methods, name).toContain(name);
  });
});
