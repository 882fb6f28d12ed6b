/**
 * The API client and kept-alive connections: a connection the host closes while the client reuses it (the
 * host's idle timeout and the client's next call crossing; seen as `cannot reach the host: write EPIPE` after a
 * long data phase) costs nothing: the request, which the host never read, goes again on a new connection. A
 * connection that fails otherwise, or twice, is still an error.
 */
import http from 'node:http';
import type { Socket } from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { tempDir } from '../helpers/peers.js';

let dir: string;
let cleanup: () => Promise<void>;
let server: http.Server;
let socketPath: string;
/** What the server does with the n-th request it reads on a connection (1-based): answer, or drop the connection. */
let policy: (nth: number) => 'answer' | 'drop' = () => 'answer';
let connections = 0;
let answered = 0;
let requests = 0;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('client-reuse'));
  socketPath = path.join(dir, 'api.sock');
  const seen = new WeakMap<Socket, number>();
  server = http.createServer((req, res) => {
    requests++;
    const n = (seen.get(req.socket) ?? 0) + 1;
    seen.set(req.socket, n);
    req.resume();
    req.on('end', () => {
      if (policy(n) === 'drop') {
        req.socket.destroy(); // as a host closing an idle connection the request crossed
        return;
      }
      answered++;
      res.setHeader('content-type', 'application/json');
      // Answers the routes these tests call, in their schemas' shapes (the client checks them).
      const id = /^\/v1\/leases\/([^/?]+)/.exec(req.url ?? '')?.[1];
      res.end(JSON.stringify(req.method === 'DELETE' && id ? { released: decodeURIComponent(id) } : []));
    });
  });
  server.on('connection', () => connections++);
  await new Promise<void>((resolve) => server.listen(socketPath, resolve));
});
afterAll(async () => {
  await new Promise((resolve) => server.close(resolve));
  server.closeAllConnections();
  await cleanup?.();
});

describe('API client over kept-alive connections', () => {
  it('a reused connection dropped under a request: the request goes again on a new one', async () => {
    const client = new HostClient({ endpoint: `unix:${socketPath}`, token: 't' });
    policy = (n) => (n === 2 ? 'drop' : 'answer');
    const c0 = connections;
    const a0 = answered;
    const r0 = requests;
    expect(await client.listLeases()).toEqual([]);
    // The second request reuses the connection, which drops it: answered on a new connection.
    expect(await client.releaseLease('x')).toEqual({ released: 'x' });
    expect(requests - r0).toBe(3); // the second one reached the server on the reused connection, and was dropped
    expect(connections - c0).toBe(2);
    expect(answered - a0).toBe(2);
  });

  it('a new connection dropped, or a retry dropped too: the error stays', async () => {
    const client = new HostClient({ endpoint: `unix:${socketPath}`, token: 't' });
    policy = () => 'drop';
    await expect(client.listLeases()).rejects.toMatchObject({ code: 'IO_ERROR' });
    policy = (n) => (n === 1 ? 'answer' : 'drop');
    await client.listLeases();
    const c0 = connections;
    policy = () => 'drop';
    // Reused and dropped, then retried on a new connection and dropped again: one retry only.
    await expect(client.listLeases()).rejects.toMatchObject({ code: 'IO_ERROR' });
    expect(connections - c0).toBe(1);
  });
});
