/**
 * The API under abuse, against `tidemark host --api-port 0` in a child process (the compiled CLI in dist/):
 * 900 connections over TCP sending a header byte by byte must not exhaust the host's descriptors (they stay
 * under the connection cap) nor delay a well-behaved client beyond a second, and are all cut within seconds;
 * a stranger's slow body is answered 401 and cut at once; a FIFO and a path outside the store in
 * POST /v1/vms are refused with their codes and statuses; the host stays responsive, and SIGTERM stops it
 * within a few seconds while slow connections are open.
 *
 * TIDEMARK_API_ABUSE_CONNECTIONS sets the number of slow connections (default 900).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { DEFAULT_API_LIMITS } from '../../src/api/server.js';
import { HTTP_STATUS } from '../../src/api/status.js';
import { TidemarkError } from '../../src/errors.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const BIN = path.join(REPO_ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(REPO_ROOT, 'dist', 'cli', 'main.js');
const SLOW = Number(process.env.TIDEMARK_API_ABUSE_CONNECTIONS ?? 900);
/** Node checks header and request timeouts once a second; the rest is room for a loaded machine. */
const CUT_WITHIN_MS = DEFAULT_API_LIMITS.headersTimeoutMs + 1_000 + 3_000;

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let allowed: string;
let host: ChildProcess;
let hostErr = '';
let api: HostClient;
let port: number;
let token: string;

function descriptors(): number {
  return readdirSync(`/proc/${host.pid}/fd`).length;
}

beforeAll(async () => {
  if (!existsSync(MAIN)) throw new Error(`${MAIN} is missing: build the CLI first (\`npm run build\`)`);
  ({ dir, cleanup } = await tempDir('api-abuse'));
  store = path.join(dir, 'store');
  allowed = path.join(dir, 'allowed');
  await mkdir(allowed);
  host = spawn(process.execPath, [BIN, 'host', '--store', store, '--api-port', '0', '--allow-disk-dir', allowed], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  host.stderr!.on('data', (d) => (hostErr += d));
  for (let i = 0; ; i++) {
    try {
      const info = JSON.parse(await readFile(path.join(store, 'host.json'), 'utf8'));
      if (info.pid === host.pid) {
        port = Number(new URL(info.api).port);
        token = info.token;
        break;
      }
    } catch {
      // not yet
    }
    if (host.exitCode !== null || i > 1000) throw new Error(`host did not start: ${hostErr}`);
    await sleep(20);
  }
  api = await HostClient.connect({ store });
});
afterAll(async () => {
  if (host && host.exitCode === null && host.signalCode === null) host.kill('SIGKILL');
  await cleanup?.();
});

interface Slow {
  socket: net.Socket;
  openedAt: number;
  closedAt?: number;
}

/** `n` connections that send a request header one byte every `everyMs`, never finishing it. */
function slowConnections(n: number, everyMs = 250): { all: Slow[]; stop: () => void } {
  const header = `GET /v1/vms HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${'x'.repeat(200)}\r\n`;
  const all: Slow[] = [];
  for (let i = 0; i < n; i++) {
    const s: Slow = { socket: net.connect(port, '127.0.0.1'), openedAt: performance.now() };
    s.socket.on('error', () => undefined);
    s.socket.on('close', () => (s.closedAt = performance.now()));
    all.push(s);
  }
  let at = 0;
  const timer = setInterval(() => {
    const byte = header[at++ % header.length];
    for (const s of all) if (s.closedAt === undefined && s.socket.writable) s.socket.write(byte);
  }, everyMs);
  return {
    all,
    stop: () => {
      clearInterval(timer);
      for (const s of all) s.socket.destroy();
    },
  };
}

/** One raw exchange: what came back and when the host closed the connection. */
function exchange(send: (s: net.Socket) => void): Promise<{ text: string; closedAfterMs: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const s = net.connect(port, '127.0.0.1', () => send(s));
    let text = '';
    s.on('data', (d) => (text += d));
    s.on('error', () => undefined);
    s.on('close', () => resolve({ text, closedAfterMs: performance.now() - t0 }));
  });
}

async function post(url: string, body: unknown): Promise<{ status: number; code: string }> {
  const r = await fetch(`http://127.0.0.1:${port}${url}`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  return { status: r.status, code: ((await r.json()) as { error: { code: string } }).error.code };
}

describe('the API under abuse (tidemark host over TCP)', () => {
  it(`${SLOW} slow connections: descriptors stay under the cap, a client is served within a second, all cut within seconds`, async () => {
    await api.listVms();
    const before = descriptors();
    const flood = slowConnections(SLOW);
    try {
      const latencies: number[] = [];
      let maxDescriptors = 0;
      const t0 = performance.now();
      while (performance.now() - t0 < DEFAULT_API_LIMITS.headersTimeoutMs + 1_000) {
        maxDescriptors = Math.max(maxDescriptors, descriptors());
        const t = performance.now();
        await api.listVms();
        latencies.push(performance.now() - t);
        await sleep(300);
      }
      // Wait for the host to cut every slow connection (none completes its header).
      const deadline = performance.now() + CUT_WITHIN_MS;
      while (flood.all.some((s) => s.closedAt === undefined) && performance.now() < deadline) await sleep(100);
      const lifetimes = flood.all.map((s) => (s.closedAt ?? Infinity) - s.openedAt);
      const evicted = lifetimes.filter((ms) => ms < 1_000).length;
      console.log(
        `abuse: ${SLOW} slow connections; host descriptors ${before} before, at most ${maxDescriptors} during ` +
          `(cap ${DEFAULT_API_LIMITS.maxConnections}); client latency max ${Math.max(...latencies).toFixed(0)} ms, ` +
          `median ${latencies.sort((a, b) => a - b)[latencies.length >> 1].toFixed(0)} ms over ${latencies.length} calls; ` +
          `${evicted} evicted within 1 s, the rest cut after at most ${Math.max(...lifetimes).toFixed(0)} ms`,
      );
      expect(maxDescriptors).toBeLessThanOrEqual(before + DEFAULT_API_LIMITS.maxConnections + 16);
      expect(Math.max(...latencies)).toBeLessThan(1_000);
      expect(flood.all.filter((s) => s.closedAt === undefined).length, 'slow connections still open').toBe(0);
      expect(Math.max(...lifetimes)).toBeLessThan(CUT_WITHIN_MS);
      expect(descriptors()).toBeLessThanOrEqual(before + 8);
    } finally {
      flood.stop();
    }
  });

  it("a stranger's slow body is answered 401 and cut at once, whatever the token it tries", async () => {
    for (const auth of ['', 'Authorization: Bearer wrong\r\n', `Authorization: Bearer ${token}x\r\n`]) {
      const r = await exchange((s) => {
        s.write(
          `POST /v1/vms HTTP/1.1\r\nHost: x\r\n${auth}Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{`,
        );
        const t = setInterval(() => (s.writable ? s.write(' ') : clearInterval(t)), 100);
        s.on('close', () => clearInterval(t));
      });
      expect(r.text).toMatch(/^HTTP\/1\.1 401 /);
      expect(r.text).toContain('"code":"UNAUTHORIZED"');
      expect(r.closedAfterMs).toBeLessThan(2_000);
    }
  });

  it('a FIFO and a path outside the store in POST /v1/vms are refused with their codes', async () => {
    const fifo = path.join(allowed, 'disk.vhdx');
    const made = spawnSync('mkfifo', [fifo]);
    expect(made.status, made.stderr?.toString()).toBe(0);
    const outside = path.join(dir, 'outside.vhdx');
    await writeFile(outside, Buffer.alloc(1024 * 1024));
    const asFifo = await post('/v1/vms', { name: 'fifo', disks: [{ slot: 'scsi0-0', path: fifo }] });
    expect(asFifo).toEqual({ status: HTTP_STATUS.INVALID_ARGUMENT, code: 'INVALID_ARGUMENT' });
    const out = await post('/v1/vms', { name: 'out', disks: [{ slot: 'scsi0-0', path: outside }] });
    expect(out).toEqual({ status: HTTP_STATUS.PATH_NOT_ALLOWED, code: 'PATH_NOT_ALLOWED' });
    expect(out.status).toBe(403);
    const err = await api.createVm({ name: 'fifo', disks: [{ slot: 'scsi0-0', path: fifo }] }).catch((e) => e);
    expect(err).toBeInstanceOf(TidemarkError);
    expect((err as TidemarkError).message).toMatch(/is a FIFO/);
    expect((await api.listVms()).map((v) => v.name)).toEqual([]);
  });

  it('stays responsive, and stops on SIGTERM within a few seconds while slow connections are open', async () => {
    await api.createVm({ name: 'web', disks: [{ slot: 'scsi0-0', size: 8 * 1024 * 1024 }] });
    const flood = slowConnections(200);
    try {
      await sleep(500);
      expect(flood.all.filter((s) => s.closedAt === undefined).length).toBeGreaterThan(100);
      expect((await api.listVms()).map((v) => v.name)).toEqual(['web']);
      const exited = new Promise<{ code: number | null; ms: number }>((resolve) => {
        const t0 = performance.now();
        host.once('exit', (code) => resolve({ code, ms: performance.now() - t0 }));
      });
      const open = flood.all.filter((s) => s.closedAt === undefined).length;
      host.kill('SIGTERM');
      const { code, ms } = await exited;
      console.log(`abuse: SIGTERM with ${open} slow connections open: exit ${code} after ${ms.toFixed(0)} ms`);
      expect(code, hostErr).toBe(0);
      expect(ms).toBeLessThan(5_000);
      expect(existsSync(path.join(store, 'host.json'))).toBe(false);
    } finally {
      flood.stop();
    }
  });
});
