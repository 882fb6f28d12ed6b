/**
 * The NBD server: listeners (unix sockets, TCP on loopback by default), the registry of exports, and
 * the live connections. Exports come and go while it runs; several clients may use one export at once
 * (they share the device, so a flush on one connection covers writes acknowledged on every other:
 * CAN_MULTI_CONN holds). The server never closes devices: their owner does, after `removeExport` or
 * `close` resolved.
 */
import { EventEmitter } from 'node:events';
import { lstat, unlink } from 'node:fs/promises';
import net from 'node:net';
import type { BlockDevice } from '../disk/device.js';
import { TidemarkError } from '../errors.js';
import { NbdConnection, type ConnectionHost, type ExportEntry, type NbdEvent } from './connection.js';
import { commandName, MAX_STRING } from './protocol.js';

export interface NbdServerOptions {
  /** Connections at once; more are refused (default 256). */
  maxConnections?: number;
  /** A client must finish negotiating within this time (default 10 s). */
  handshakeTimeoutMs?: number;
  /** How long a closing connection waits for its client to take the last replies (default 2 s). */
  closeTimeoutMs?: number;
  /** Bytes of reads and writes in flight over all connections (default 512 MiB). */
  maxBytesInFlight?: number;
}

export interface NbdListenOptions {
  /** A unix socket path (at most 107 bytes). */
  socket?: string;
  /** A TCP port (0: any free one). */
  port?: number;
  /** The TCP address to bind (default 127.0.0.1). */
  host?: string;
}

export type NbdAddress = { type: 'unix'; path: string } | { type: 'tcp'; host: string; port: number };

export interface ExportOptions {
  /** Refuse writes even when the device accepts them. */
  readOnly?: boolean;
  /** Shown to clients by NBD_OPT_LIST and NBD_INFO_DESCRIPTION. */
  description?: string;
}

export interface ExportInfo {
  name: string;
  size: number;
  readOnly: boolean;
  description: string;
  connections: number;
}

export interface ConnectionInfo {
  id: number;
  remote: string;
  export: string | undefined;
  state: NbdConnection['state'];
  requestsInFlight: number;
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export interface NbdStats {
  connections: { active: number; total: number; refused: number; protocolErrors: number };
  /** Requests received, by command name (NBD_CMD_READ, ...). */
  requests: Record<string, number>;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  bytesInFlight: number;
}

/** Events: 'connect', 'export', 'disconnect', 'protocolError' (each with the NbdEvent as argument). */
export class NbdServer extends EventEmitter {
  private readonly registry = new Map<string, ExportEntry>();
  private readonly live = new Set<NbdConnection>();
  private readonly sockets: { server: net.Server; address: NbdAddress; unlinkOnClose?: string }[] = [];
  private readonly waiting = new Set<NbdConnection>();
  private readonly opts: Required<NbdServerOptions>;
  private nextId = 1;
  private closing: Promise<void> | undefined;
  private bytesInFlight = 0;
  private readonly totals = { connections: 0, refused: 0, protocolErrors: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
  private readonly requestCounts = new Map<number, number>();
  private readonly host: ConnectionHost;

  constructor(opts: NbdServerOptions = {}) {
    super();
    this.opts = {
      maxConnections: opts.maxConnections ?? 256,
      handshakeTimeoutMs: opts.handshakeTimeoutMs ?? 10_000,
      closeTimeoutMs: opts.closeTimeoutMs ?? 2_000,
      maxBytesInFlight: opts.maxBytesInFlight ?? 512 * 1024 * 1024,
    };
    this.host = this.makeHost();
  }

  // ---------------------------------------------------------------------------------------------
  // Exports

  /** Adds an export; clients connecting from now on can use it. */
  addExport(name: string, device: BlockDevice, opts: ExportOptions = {}): void {
    if (this.closing) throw new TidemarkError('CLOSED', 'the NBD server is closed');
    if (name === '' || Buffer.byteLength(name) > MAX_STRING || name.includes('\0')) {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        `export name "${name}" must be 1 to ${MAX_STRING} bytes of text without NUL`,
      );
    }
    if (this.registry.has(name)) throw new TidemarkError('ALREADY_EXISTS', `an export named "${name}" already exists`);
    this.registry.set(name, {
      name,
      device,
      readOnly: !!opts.readOnly || device.readOnly,
      description: opts.description ?? '',
      connections: new Set(),
    });
  }

  /**
   * Removes an export: new clients no longer find it; its connections finish the requests they have
   * in flight and are closed. Resolves once they are. The device stays open.
   */
  async removeExport(name: string): Promise<void> {
    const exp = this.registry.get(name);
    if (!exp) throw new TidemarkError('NOT_FOUND', `no export named "${name}"`);
    this.registry.delete(name);
    await Promise.all([...exp.connections].map((c) => c.shutdown(`export "${name}" removed`)));
  }

  exports(): ExportInfo[] {
    return [...this.registry.values()].map((e) => ({
      name: e.name,
      size: e.device.size,
      readOnly: e.readOnly,
      description: e.description,
      connections: e.connections.size,
    }));
  }

  // ---------------------------------------------------------------------------------------------
  // Listening

  /** Starts listening on a unix socket (`socket`) or TCP (`port`, `host` default 127.0.0.1). */
  async listen(opts: NbdListenOptions): Promise<NbdAddress> {
    if (this.closing) throw new TidemarkError('CLOSED', 'the NBD server is closed');
    if ((opts.socket === undefined) === (opts.port === undefined)) {
      throw new TidemarkError('INVALID_ARGUMENT', 'listen on either a unix socket or a TCP port');
    }
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: false }, (s) => this.accept(s));
    server.maxConnections = this.opts.maxConnections;
    server.on('drop', () => this.totals.refused++);
    if (opts.socket !== undefined) {
      const p = opts.socket;
      if (Buffer.byteLength(p) > 107) {
        throw new TidemarkError('INVALID_ARGUMENT', `unix socket path ${p} is longer than 107 bytes`);
      }
      await removeStaleSocket(p);
      await listenOn(server, { path: p }, `unix socket ${p}`);
      const address: NbdAddress = { type: 'unix', path: p };
      this.sockets.push({ server, address, unlinkOnClose: p });
      return address;
    }
    const host = opts.host ?? '127.0.0.1';
    if (!Number.isInteger(opts.port) || opts.port! < 0 || opts.port! > 65535) {
      throw new TidemarkError('INVALID_ARGUMENT', `TCP port ${opts.port} is not a port number (0-65535)`);
    }
    await listenOn(server, { host, port: opts.port }, `${host}:${opts.port}`);
    const a = server.address() as net.AddressInfo;
    const address: NbdAddress = { type: 'tcp', host, port: a.port };
    this.sockets.push({ server, address });
    return address;
  }

  /** The first listener's address. */
  address(): NbdAddress | undefined {
    return this.sockets[0]?.address;
  }

  addresses(): NbdAddress[] {
    return this.sockets.map((l) => l.address);
  }

  /** The NBD URI of an export (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`). */
  uri(name: string, address: NbdAddress | undefined = this.address()): string {
    if (!address) throw new TidemarkError('INVALID_ARGUMENT', 'the NBD server is not listening');
    return nbdUri(name, address);
  }

  // ---------------------------------------------------------------------------------------------
  // Statistics

  stats(): NbdStats {
    const sum = { ...this.totals };
    for (const c of this.live) {
      sum.errors += c.counters.errors;
      sum.bytesRead += c.counters.bytesRead;
      sum.bytesWritten += c.counters.bytesWritten;
    }
    const requests: Record<string, number> = {};
    for (const [cmd, n] of this.requestCounts) requests[commandName(cmd)] = n;
    return {
      connections: {
        active: this.live.size,
        total: sum.connections,
        refused: sum.refused,
        protocolErrors: sum.protocolErrors,
      },
      requests,
      errors: sum.errors,
      bytesRead: sum.bytesRead,
      bytesWritten: sum.bytesWritten,
      bytesInFlight: this.bytesInFlight,
    };
  }

  connections(): ConnectionInfo[] {
    return [...this.live].map((c) => ({
      id: c.id,
      remote: c.remote,
      export: c.exportName,
      state: c.state,
      requestsInFlight: c.requestsInFlight,
      ...c.counters,
    }));
  }

  // ---------------------------------------------------------------------------------------------
  // Closing

  /**
   * Stops listening, lets every connection finish its requests in flight, closes them. Devices stay
   * open. Safe to call more than once.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      // Stop accepting at once; the listeners report closed once their connections are gone.
      const stopped = this.sockets.map((l) => new Promise<void>((resolve) => l.server.close(() => resolve())));
      await Promise.all([...this.live].map((c) => c.shutdown()));
      await Promise.all(stopped);
      for (const l of this.sockets) if (l.unlinkOnClose) await unlink(l.unlinkOnClose).catch(() => undefined);
    })();
    return this.closing;
  }

  // ---------------------------------------------------------------------------------------------
  // Internals

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    if (socket.remoteAddress !== undefined) socket.setNoDelay(true);
    const conn = new NbdConnection(socket, this.host, this.nextId++);
    this.live.add(conn);
    this.totals.connections++;
    conn.start();
  }

  private makeHost(): ConnectionHost {
    return {
      handshakeTimeoutMs: this.opts.handshakeTimeoutMs,
      closeTimeoutMs: this.opts.closeTimeoutMs,
      findExport: (name) => {
        if (name !== '') return this.registry.get(name);
        return this.registry.size === 1 ? this.registry.values().next().value : undefined;
      },
      listExports: () => [...this.registry.values()],
      attach: (conn, exp) => {
        exp.connections.add(conn);
      },
      detach: (conn) => {
        this.live.delete(conn);
        this.waiting.delete(conn);
        for (const e of this.registry.values()) e.connections.delete(conn);
        this.totals.errors += conn.counters.errors;
        this.totals.bytesRead += conn.counters.bytesRead;
        this.totals.bytesWritten += conn.counters.bytesWritten;
      },
      reserve: (conn, bytes) => {
        // One request always fits when nothing else is in flight, whatever its size.
        if (this.bytesInFlight > 0 && this.bytesInFlight + bytes > this.opts.maxBytesInFlight) {
          this.waiting.add(conn);
          return false;
        }
        this.bytesInFlight += bytes;
        return true;
      },
      release: (bytes) => {
        this.bytesInFlight -= bytes;
        if (this.waiting.size > 0) {
          const wake = [...this.waiting];
          this.waiting.clear();
          for (const c of wake) c.wake();
        }
      },
      count: (command) => {
        this.requestCounts.set(command, (this.requestCounts.get(command) ?? 0) + 1);
      },
      event: (e: NbdEvent) => {
        if (e.type === 'protocolError') this.totals.protocolErrors++;
        this.emit(e.type, e);
      },
    };
  }
}

/** The NBD URI of export `name` at `address`. */
export function nbdUri(name: string, address: NbdAddress): string {
  const path = encodeURIComponent(name);
  if (address.type === 'unix') return `nbd+unix:///${path}?socket=${encodeURI(address.path)}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}/${path}`;
}

/** A socket file left by a server that died is removed; a live one or any other file is an error. */
async function removeStaleSocket(p: string): Promise<void> {
  let st;
  try {
    st = await lstat(p);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new TidemarkError('ALREADY_EXISTS', `${p} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect({ path: p });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new TidemarkError('BUSY', `another server is listening on ${p}`);
  await unlink(p);
}

function listenOn(server: net.Server, where: net.ListenOptions, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => {
      const code = err.code === 'EADDRINUSE' ? 'BUSY' : err.code === 'EACCES' ? 'PATH_NOT_ALLOWED' : 'IO_ERROR';
      reject(new TidemarkError(code, `cannot listen on ${what}: ${err.code ?? err.message}`, { errno: err.code }));
    };
    server.once('error', onError);
    server.listen(where, () => {
      server.off('error', onError);
      resolve();
    });
  });
}
