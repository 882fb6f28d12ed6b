/** Shared pieces of the guest-channel tests: a byte-injecting proxy, raw exchanges, hook scripts, qemu-ga. */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { sleep } from '../helpers/async.js';

export const QEMU_GA = '/usr/sbin/qemu-ga';

export { sleep };

/** Polls `cond` every 10 ms until true, failing after `ms`. */
export async function waitFor(cond: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(10);
  }
}

/**
 * A unix-socket proxy between a client and an agent that can slip raw bytes into either direction, as a noisy
 * or restarted channel would. One upstream connection per client connection.
 */
export class InjectingProxy {
  private pairs: Array<{ down: net.Socket; up: net.Socket }> = [];
  /** set to drop everything the agent sends (an agent that went quiet) */
  muteAgent = false;

  private constructor(
    private readonly server: net.Server,
    readonly path: string,
  ) {}

  static async start(listenPath: string, agentPath: string): Promise<InjectingProxy> {
    const server = net.createServer();
    const proxy = new InjectingProxy(server, listenPath);
    server.on('connection', (down) => {
      const up = net.createConnection({ path: agentPath });
      proxy.pairs.push({ down, up });
      down.on('data', (d) => up.write(d));
      up.on('data', (d) => {
        if (!proxy.muteAgent) down.write(d);
      });
      down.on('close', () => up.destroy());
      up.on('close', () => down.destroy());
      down.on('error', () => {});
      up.on('error', () => {});
    });
    await new Promise<void>((resolve) => server.listen(listenPath, resolve));
    return proxy;
  }

  private last(): { down: net.Socket; up: net.Socket } {
    const p = this.pairs.at(-1);
    if (!p) throw new Error('no client connected to the proxy');
    return p;
  }

  /** Bytes the client will read as if the agent had sent them. */
  toClient(bytes: Buffer | string): void {
    this.last().down.write(bytes);
  }

  /** Bytes the agent will read as if the client had sent them. */
  toAgent(bytes: Buffer | string): void {
    this.last().up.write(bytes);
  }

  async close(): Promise<void> {
    for (const p of this.pairs) {
      p.down.destroy();
      p.up.destroy();
    }
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}

/**
 * Sends raw bytes on a fresh connection and collects what comes back until `quietMs` pass without data: the
 * parsed answer lines (a leading 0xFF shown as the `delimited` flag).
 */
export async function rawExchange(
  socketPath: string,
  bytes: Buffer | string,
  quietMs = 150,
): Promise<Array<{ delimited: boolean; msg: unknown }>> {
  const sock = net.createConnection({ path: socketPath });
  await new Promise<void>((resolve, reject) => {
    sock.once('connect', resolve);
    sock.once('error', reject);
  });
  const chunks: Buffer[] = [];
  let last = Date.now();
  sock.on('data', (d) => {
    chunks.push(d);
    last = Date.now();
  });
  sock.write(bytes);
  const start = Date.now();
  while (Date.now() - last < quietMs || (chunks.length === 0 && Date.now() - start < 2000)) await sleep(10);
  sock.destroy();
  const text = Buffer.concat(chunks);
  const out: Array<{ delimited: boolean; msg: unknown }> = [];
  let delimited = false;
  let line: number[] = [];
  for (const b of text) {
    if (b === 0xff) {
      delimited = true;
      line = [];
    } else if (b === 0x0a) {
      const s = Buffer.from(line).toString('utf8').trim();
      if (s) out.push({ delimited, msg: JSON.parse(s) });
      delimited = false;
      line = [];
    } else {
      line.push(b);
    }
  }
  return out;
}

/** A hook script that appends "<name> <arg>" to `log`, then exits with `exit` (or sleeps first). */
export function writeHook(
  dir: string,
  name: string,
  log: string,
  opts: { exit?: number; exitOn?: 'freeze' | 'thaw'; sleepSeconds?: number } = {},
): string {
  mkdirSync(dir, { recursive: true });
  const file = path.join(dir, name);
  const when = opts.exitOn ? `[ "$1" = "${opts.exitOn}" ] && ` : '';
  writeFileSync(
    file,
    [
      '#!/bin/sh',
      `echo "${name} $1" >> "${log}"`,
      opts.sleepSeconds ? `${when}sleep ${opts.sleepSeconds}` : '',
      opts.exit ? `${when}{ echo "${name} says no" >&2; exit ${opts.exit}; }` : '',
      'exit 0',
      '',
    ].join('\n'),
  );
  chmodSync(file, 0o755);
  return file;
}

/** Starts the real qemu-ga on a unix socket with freezing blocked (safe on a host); resolves once it listens. */
export async function startQemuGa(dir: string): Promise<{ socket: string; proc: ChildProcess; stop(): Promise<void> }> {
  const socket = path.join(dir, 'qga.sock');
  const state = path.join(dir, 'qga-state');
  mkdirSync(state, { recursive: true });
  const proc = spawn(
    QEMU_GA,
    [
      '-m',
      'unix-listen',
      '-p',
      socket,
      '-t',
      state,
      '-f',
      path.join(dir, 'qga.pid'),
      '-b',
      'guest-fsfreeze-freeze,guest-fsfreeze-freeze-list,guest-fsfreeze-thaw',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let stderr = '';
  proc.stderr!.on('data', (d) => (stderr += d));
  await waitFor(() => existsSync(socket) || proc.exitCode !== null, 5000, 'qemu-ga to listen');
  if (proc.exitCode !== null) throw new Error(`qemu-ga exited ${proc.exitCode}: ${stderr}`);
  return {
    socket,
    proc,
    stop: async () => {
      if (proc.exitCode !== null) return;
      const gone = new Promise((resolve) => proc.once('exit', resolve));
      proc.kill('SIGTERM');
      await gone;
    },
  };
}

/** A socket file with nobody listening (what an agent killed with SIGKILL leaves); Node always unlinks its own. */
export function staleSocket(p: string): string {
  const r = spawnSync('python3', ['-c', 'import socket,sys; socket.socket(socket.AF_UNIX).bind(sys.argv[1])', p]);
  if (r.status !== 0) throw new Error(`could not make a stale socket: ${r.stderr}`);
  return p;
}
