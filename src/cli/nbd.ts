/**
 * `tidemark nbd serve`: serve VHDX disks to NBD clients until SIGINT or SIGTERM. Safe by default: a
 * unix socket is created 0600, TCP binds loopback, and a non-loopback `--bind` without TLS warns.
 */
import path from 'node:path';
import { Command } from 'commander';
import { openVirtualDisk, type VirtualDisk } from '../disk/virtual-disk.js';
import { InvalidArgumentError } from '../errors.js';
import {
  DEFAULT_LIMITS,
  isLoopback,
  NbdServer,
  TlsCredentials,
  type NbdAddress,
  type NbdServerOptions,
} from '../nbd/index.js';
import { formatSize, parseSize } from '../util/size.js';
import { printJson, println } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

const DEFAULT_PORT = 10809;

interface ServeOptions {
  socket?: string;
  port?: string;
  bind?: string;
  readOnly?: boolean;
  allowDir?: string[];
  map?: string[];
  json?: boolean;
  tls?: string;
  tlsDir?: string;
  maxConnections?: string;
  memory?: string;
  connectionMemory?: string;
  handshakeTimeout?: string;
  stallTimeout?: string;
  idleTimeout?: string;
}

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

export function nbdCommand(run: Run): Command {
  const nbd = new Command('nbd').description('serve virtual disks over NBD (QEMU, qemu-io, nbdcopy, nbdinfo...)');
  nbd
    .command('serve')
    .description(
      'export each DISK as NAME (its file name without extension) until SIGINT/SIGTERM; prints one URI per export',
    )
    .argument('<disk...>')
    .option('--socket <path>', 'listen on this unix socket')
    .option('--port <n>', `listen on this TCP port (default ${DEFAULT_PORT} when there is no --socket)`)
    .option('--bind <addr>', 'the TCP address to listen on (default 127.0.0.1)')
    .option('--read-only', 'refuse writes')
    .option(
      '--allow-dir <dir>',
      "a directory parent disks may be opened from (repeatable; default: the disk's own directory)",
      collect,
    )
    .option('--map <prefix=dir>', 'map a Windows drive, volume or share to a directory (repeatable)', collect)
    .option(
      '--tls <mode>',
      'require: every client must start TLS and present a certificate signed by the CA; off (default: require with --tls-dir)',
    )
    .option(
      '--tls-dir <dir>',
      'TLS credentials: ca-cert.pem, server-cert.pem, server-key.pem (QEMU tls-creds-x509 layout)',
    )
    .option('--max-connections <n>', `connections at once (default ${DEFAULT_LIMITS.maxConnections})`)
    .option(
      '--memory <size>',
      `memory for all connections' requests and replies (default ${formatSize(DEFAULT_LIMITS.maxMemory)})`,
    )
    .option(
      '--connection-memory <size>',
      `memory of one connection (default ${formatSize(DEFAULT_LIMITS.maxConnectionMemory)})`,
    )
    .option(
      '--handshake-timeout <s>',
      `seconds to finish negotiating (default ${DEFAULT_LIMITS.handshakeTimeoutMs / 1000})`,
    )
    .option(
      '--stall-timeout <s>',
      `seconds a client may leave a write payload unfinished or its replies unread (default ${DEFAULT_LIMITS.stallTimeoutMs / 1000})`,
    )
    .option(
      '--idle-timeout <s>',
      `seconds idle after which a connection is closed when the server is near its connection limit; 0: never (default ${DEFAULT_LIMITS.idleTimeoutMs / 1000})`,
    )
    .option('--json', 'print the exports as JSON')
    .action((disks: string[], o: ServeOptions) => run(() => serve(disks, o)));
  return nbd;
}

function listenOptions(o: ServeOptions): { socket?: string; port?: number; host?: string } {
  if (o.socket !== undefined) {
    if (o.port !== undefined || o.bind !== undefined) {
      throw new InvalidArgumentError('--socket cannot be combined with --port or --bind');
    }
    return { socket: path.resolve(o.socket) };
  }
  let port = DEFAULT_PORT;
  if (o.port !== undefined) {
    port = Number(o.port);
    if (!/^\d+$/.test(o.port) || port > 65535) throw new InvalidArgumentError(`--port ${o.port} is not a TCP port`);
  }
  return { port, host: o.bind ?? '127.0.0.1' };
}

/** The server's limits and TLS from the options (loads the credentials). */
async function serverOptions(o: ServeOptions): Promise<NbdServerOptions> {
  const mode = o.tls ?? (o.tlsDir !== undefined ? 'require' : 'off');
  if (mode !== 'require' && mode !== 'off') throw new InvalidArgumentError(`--tls ${o.tls}: expected require or off`);
  if (mode === 'require' && o.tlsDir === undefined) {
    throw new InvalidArgumentError('--tls require needs --tls-dir DIR (ca-cert.pem, server-cert.pem, server-key.pem)');
  }
  if (mode === 'off' && o.tlsDir !== undefined)
    throw new InvalidArgumentError('--tls off cannot be combined with --tls-dir');
  const opts: NbdServerOptions = {};
  if (o.maxConnections !== undefined) opts.maxConnections = count(o.maxConnections, '--max-connections');
  if (o.memory !== undefined) opts.maxMemory = positiveSize(o.memory, '--memory');
  if (o.connectionMemory !== undefined)
    opts.maxConnectionMemory = positiveSize(o.connectionMemory, '--connection-memory');
  if (o.handshakeTimeout !== undefined) opts.handshakeTimeoutMs = seconds(o.handshakeTimeout, '--handshake-timeout');
  if (o.stallTimeout !== undefined) opts.stallTimeoutMs = seconds(o.stallTimeout, '--stall-timeout');
  if (o.idleTimeout !== undefined) opts.idleTimeoutMs = seconds(o.idleTimeout, '--idle-timeout', true);
  if (mode === 'require') opts.tls = await TlsCredentials.load(o.tlsDir!);
  return opts;
}

function count(text: string, what: string): number {
  const n = Number(text);
  if (!/^\d+$/.test(text) || n < 1 || !Number.isSafeInteger(n)) {
    throw new InvalidArgumentError(`${what} ${text}: expected a whole number ≥ 1`);
  }
  return n;
}

function positiveSize(text: string, what: string): number {
  const n = parseSize(text, what);
  if (n < 1) throw new InvalidArgumentError(`${what} ${text}: expected a size above 0`);
  return n;
}

/** Seconds (decimals allowed) as whole milliseconds. */
function seconds(text: string, what: string, zeroAllowed = false): number {
  const ms = Math.round(Number(text) * 1000);
  if (!/^\d+(\.\d+)?$/.test(text) || !Number.isSafeInteger(ms) || ms < (zeroAllowed ? 0 : 1)) {
    throw new InvalidArgumentError(`${what} ${text}: expected a number of seconds${zeroAllowed ? '' : ' above 0'}`);
  }
  return ms;
}

function exportNames(disks: string[]): string[] {
  const names = disks.map((d) => path.parse(d).name);
  names.forEach((n, i) => {
    const j = names.indexOf(n);
    if (j !== i) throw new InvalidArgumentError(`${disks[j]} and ${disks[i]} would both be exported as "${n}"`);
  });
  return names;
}

function openOptions(o: ServeOptions, disk: string): { allowedRoots?: string[]; pathMap: Record<string, string> } {
  const pathMap: Record<string, string> = {};
  for (const m of o.map ?? []) {
    const eq = m.indexOf('=');
    if (eq <= 0) throw new InvalidArgumentError(`--map ${m}: expected PREFIX=DIR, e.g. D:=/mnt/d`);
    pathMap[m.slice(0, eq)] = path.resolve(m.slice(eq + 1));
  }
  const allowedRoots = o.allowDir
    ? [path.dirname(path.resolve(disk)), ...o.allowDir.map((d) => path.resolve(d))]
    : undefined;
  return { allowedRoots, pathMap };
}

/** Resolves on the first SIGINT or SIGTERM. */
function untilSignal(): { stopped: Promise<string>; dispose: () => void } {
  let dispose = () => {};
  const stopped = new Promise<string>((resolve) => {
    const on = (sig: string) => () => resolve(sig);
    const int = on('SIGINT');
    const term = on('SIGTERM');
    process.once('SIGINT', int);
    process.once('SIGTERM', term);
    dispose = () => {
      process.off('SIGINT', int);
      process.off('SIGTERM', term);
    };
  });
  return { stopped, dispose };
}

async function serve(disks: string[], o: ServeOptions): Promise<number> {
  const where = listenOptions(o);
  const names = exportNames(disks);
  const serverOpts = await serverOptions(o);
  if (where.host !== undefined && !isLoopback(where.host) && !serverOpts.tls) {
    process.stderr.write(
      `tidemark: warning: serving NBD without TLS on ${where.host}: anyone who can reach it can read and write these disks (use --tls-dir, or loopback, or a unix socket)\n`,
    );
  }
  const signal = untilSignal();
  const opened: VirtualDisk[] = [];
  const server = new NbdServer(serverOpts);
  try {
    for (const disk of disks) {
      opened.push(await openVirtualDisk(disk, { readOnly: !!o.readOnly, ...openOptions(o, disk) }));
    }
    opened.forEach((d, i) => server.addExport(names[i], d, { description: path.basename(disks[i]) }));
    const address: NbdAddress = await server.listen(where);
    const exports = opened.map((d, i) => ({
      name: names[i],
      uri: server.uri(names[i], address),
      path: path.resolve(disks[i]),
      size: d.size,
      readOnly: d.readOnly,
    }));
    if (o.json) printJson({ address, tls: serverOpts.tls !== undefined, exports });
    else for (const e of exports) println(`${e.name}\t${e.uri}`);
    // A damaged disk is served for reading only (its writes fail): say so once, not only per request.
    opened.forEach((d, i) => {
      for (const w of d.file.warnings.filter((x) => x.startsWith('damaged:')))
        process.stderr.write(`tidemark: warning: ${names[i]}: ${w}\n`);
    });
    process.stderr.write(`tidemark: serving ${exports.length} export(s); SIGINT or SIGTERM stops\n`);
    const sig = await signal.stopped;
    process.stderr.write(`tidemark: ${sig}: finishing requests in flight, flushing and closing the disks\n`);
  } finally {
    signal.dispose();
    // Stop accepting, let requests in flight finish, then make every disk durable and close it.
    await server.close();
    for (const d of opened) {
      await d.flush().catch(() => undefined);
      await d.close();
    }
  }
  return 0;
}
