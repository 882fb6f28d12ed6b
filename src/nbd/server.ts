/**
 * The NBD server: listeners (unix sockets created 0600, TCP on loopback by default), the registry of
 * exports, and the live connections. Exports come and go while it runs; several clients may use one
 * export at once (they share the device, so a flush on one connection covers writes acknowledged on
 * every other: CAN_MULTI_CONN holds). The server never closes devices: their owner does, after
 * `removeExport` or `close` resolved.
 *
 * Bounds (limits.ts, docs/cli.md "nbd serve"): a memory budget for all connections and one per
 * connection (budget.ts), timeouts for negotiation and for clients that stall, and a connection limit
 * at which a new client takes the place of a stalled, negotiating or idle connection (fairness.ts).
 * Idle connections are closed after the idle timeout only while the server is under pressure, so a
 * VM whose disk sits idle for hours stays attached. With `tls`, every client must upgrade with
 * NBD_OPT_STARTTLS and present a certificate the CA signed before anything else (FORCEDTLS).
 */
import { EventEmitter } from 'node:events';
import { unlink } from 'node:fs/promises';
import net from 'node:net';
import type { BlockDevice } from '../disk/device.js';
import { TidemarkError } from '../errors.js';
import { BufferPool } from './buffers.js';
import { MemoryBudget } from './budget.js';
import { NbdConnection, type ConnectionHost, type ExportEntry, type NbdEvent } from './connection.js';
import { chooseVictim, type Candidate, type VictimKind } from './fairness.js';
import { IDLE_PRESSURE, PRESSURE_STALL_MS, resolveLimits, SETTLED_MS, SWEEP_MS, type NbdLimits } from './limits.js';
import { listenTcp, listenUnix } from './listen.js';
import { commandName, MAX_STRING } from './protocol.js';
import type { TlsCredentials } from './tls.js';

export interface NbdServerOptions extends Partial<NbdLimits> {
  /** Require TLS with client certificates from every client (NBD_OPT_STARTTLS first). */
  tls?: TlsCredentials;
}

export interface NbdListenOptions {
  /** A unix socket path (at most 107 bytes), created mode 0600. */
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
  tls: boolean;
  requestsInFlight: number;
  /** Bytes of the memory budget it holds. */
  memory: number;
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

export interface NbdStats {
  connections: {
    active: number;
    total: number;
    /** Turned away at the connection limit: nobody could make room. */
    refused: number;
    /** Closed to make room for a new client, or idle under pressure. */
    evicted: number;
    /** Dropped for stalling (a payload or replies with no progress for the stall timeout). */
    stalled: number;
    protocolErrors: number;
  };
  /** Requests received, by command name (NBD_CMD_READ, ...). */
  requests: Record<string, number>;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  memory: {
    /** Reserved by connections (requests in flight, payloads, replies not yet written). */
    used: number;
    /** Free buffers the server's pool keeps for reuse (they count against the limit too). */
    pooled: number;
    limit: number;
  };
}

/** Events: 'connect', 'export', 'disconnect', 'protocolError' (each with the NbdEvent as argument). */
export class NbdServer extends EventEmitter {
  readonly limits: Readonly<NbdLimits>;
  readonly tls: TlsCredentials | undefined;
  private readonly registry = new Map<string, ExportEntry>();
  private readonly live = new Set<NbdConnection>();
  private readonly sockets: { server: net.Server; address: NbdAddress; unlinkOnClose?: string }[] = [];
  private readonly pool: BufferPool;
  private readonly budget: MemoryBudget;
  private nextId = 1;
  private closing: Promise<void> | undefined;
  private sweepTimer: NodeJS.Timeout | undefined;
  private readonly totals = {
    connections: 0,
    refused: 0,
    evicted: 0,
    stalled: 0,
    protocolErrors: 0,
    errors: 0,
    bytesRead: 0,
    bytesWritten: 0,
  };
  private readonly requestCounts = new Map<number, number>();
  private readonly host: ConnectionHost;

  constructor(opts: NbdServerOptions = {}) {
    super();
    const { tls, ...limits } = opts;
    this.limits = Object.freeze(resolveLimits(limits));
    this.tls = tls;
    // The pool may keep as much as the budget allows: what it keeps counts against the budget.
    this.pool = new BufferPool({ maxRetained: Math.min(256 * 1024 * 1024, this.limits.maxMemory) });
    this.budget = new MemoryBudget(this.limits.maxMemory, this.pool);
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

  /** Starts listening on a unix socket (`socket`, mode 0600) or TCP (`port`, `host` default 127.0.0.1). */
  async listen(opts: NbdListenOptions): Promise<NbdAddress> {
    if (this.closing) throw new TidemarkError('CLOSED', 'the NBD server is closed');
    if ((opts.socket === undefined) === (opts.port === undefined)) {
      throw new TidemarkError('INVALID_ARGUMENT', 'listen on either a unix socket or a TCP port');
    }
    const server = net.createServer({ allowHalfOpen: true, pauseOnConnect: false }, (s) => this.accept(s));
    let address: NbdAddress;
    if (opts.socket !== undefined) {
      await listenUnix(server, opts.socket);
      address = { type: 'unix', path: opts.socket };
      this.sockets.push({ server, address, unlinkOnClose: opts.socket });
    } else {
      const host = opts.host ?? '127.0.0.1';
      if (!Number.isInteger(opts.port) || opts.port! < 0 || opts.port! > 65535) {
        throw new TidemarkError('INVALID_ARGUMENT', `TCP port ${opts.port} is not a port number (0-65535)`);
      }
      await listenTcp(server, host, opts.port!);
      address = { type: 'tcp', host, port: (server.address() as net.AddressInfo).port };
      this.sockets.push({ server, address });
    }
    this.startSweeping();
    return address;
  }

  /** The first listener's address. */
  address(): NbdAddress | undefined {
    return this.sockets[0]?.address;
  }

  addresses(): NbdAddress[] {
    return this.sockets.map((l) => l.address);
  }

  /** The NBD URI of an export (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`; `nbds` with TLS). */
  uri(name: string, address: NbdAddress | undefined = this.address()): string {
    if (!address) throw new TidemarkError('INVALID_ARGUMENT', 'the NBD server is not listening');
    return nbdUri(name, address, this.tls !== undefined);
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
        evicted: sum.evicted,
        stalled: sum.stalled,
        protocolErrors: sum.protocolErrors,
      },
      requests,
      errors: sum.errors,
      bytesRead: sum.bytesRead,
      bytesWritten: sum.bytesWritten,
      memory: { used: this.budget.used, pooled: this.pool.retainedBytes, limit: this.limits.maxMemory },
    };
  }

  connections(): ConnectionInfo[] {
    return [...this.live].map((c) => ({
      id: c.id,
      remote: c.remote,
      export: c.exportName,
      state: c.state,
      tls: c.tls,
      requestsInFlight: c.requestsInFlight,
      memory: c.memory,
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
      clearInterval(this.sweepTimer);
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
    if (this.open().length >= this.limits.maxConnections && !this.makeRoom()) {
      this.totals.refused++;
      socket.destroy();
      return;
    }
    if (socket.remoteAddress !== undefined) socket.setNoDelay(true);
    const conn = new NbdConnection(socket, this.host, this.nextId++);
    this.live.add(conn);
    this.totals.connections++;
    conn.start();
  }

  /** Live connections that are not closing. */
  private open(): NbdConnection[] {
    return [...this.live].filter((c) => !c.closing);
  }

  /** At the connection limit: drops one connection that serves nobody (fairness.ts), if any. */
  private makeRoom(): boolean {
    const open = this.open();
    const victim = chooseVictim(this.candidates(open, 'room'), peerSizes(open));
    if (!victim) return false;
    this.totals.evicted++;
    victim.drop(`another client connected at the ${this.limits.maxConnections}-connection limit`);
    return true;
  }

  /**
   * Connections that may give way: to make room, any that serves nobody (stalled, or negotiating or
   * idle for SETTLED_MS); under idle pressure, those idle for the idle timeout.
   */
  private candidates(open: NbdConnection[], why: 'room' | 'idle', at = performance.now()): Candidate<NbdConnection>[] {
    const out: Candidate<NbdConnection>[] = [];
    for (const c of open) {
      const a = c.activity(at);
      const eligible =
        why === 'room'
          ? a.kind === 'stalled' || ((a.kind === 'idle' || a.kind === 'negotiating') && a.sinceMs >= SETTLED_MS)
          : a.kind === 'idle' && a.sinceMs >= this.limits.idleTimeoutMs;
      if (eligible) out.push({ item: c, peer: c.peer, kind: a.kind as VictimKind, id: c.id });
    }
    return out;
  }

  /**
   * Runs often while listening: drops clients that stalled for the stall timeout; while a client that
   * has not stalled waits for memory, drops the stalled connection holding the most (stalled for
   * PRESSURE_STALL_MS); under connection pressure, closes connections idle for longer than the idle
   * timeout (fairness.ts order), down to the pressure mark.
   */
  private sweep(): void {
    const at = performance.now();
    for (const c of this.live) {
      if (c.closing) continue;
      c.checkStall(at);
      if (c.closing) this.totals.stalled++;
    }
    this.relieveMemory(at);
    this.closeIdle(at);
  }

  private relieveMemory(at: number): void {
    const open = this.open();
    const starving = open.filter((c) => c.starvingFor(at) !== undefined);
    if (starving.length === 0) return;
    let victim: NbdConnection | undefined;
    for (const c of open) {
      if (starving.includes(c) || c.memory === 0 || c.stalledFor(at) < PRESSURE_STALL_MS) continue;
      if (!victim || c.memory > victim.memory) victim = c;
    }
    if (!victim) return;
    this.totals.stalled++;
    victim.drop(
      `made no progress for ${PRESSURE_STALL_MS} ms while holding ${victim.memory} bytes other clients were waiting for`,
    );
  }

  private closeIdle(at: number): void {
    if (this.limits.idleTimeoutMs === 0) return;
    const mark = Math.ceil(this.limits.maxConnections * IDLE_PRESSURE);
    const open = this.open();
    if (open.length < mark) return;
    const sizes = peerSizes(open);
    let candidates = this.candidates(open, 'idle', at);
    for (let count = open.length; count >= mark; count--) {
      const victim = chooseVictim(candidates, sizes);
      if (!victim) return;
      this.totals.evicted++;
      victim.drop(`idle for over ${this.limits.idleTimeoutMs / 1000} s while the server is near its connection limit`);
      candidates = candidates.filter((c) => c.item !== victim);
      sizes.set(victim.peer, sizes.get(victim.peer)! - 1);
    }
  }

  private startSweeping(): void {
    if (this.sweepTimer) return;
    this.sweepTimer = setInterval(() => this.sweep(), SWEEP_MS);
    this.sweepTimer.unref();
  }

  private makeHost(): ConnectionHost {
    return {
      limits: this.limits,
      budget: this.budget,
      tls: this.tls,
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
        for (const e of this.registry.values()) e.connections.delete(conn);
        this.totals.errors += conn.counters.errors;
        this.totals.bytesRead += conn.counters.bytesRead;
        this.totals.bytesWritten += conn.counters.bytesWritten;
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

function peerSizes(open: NbdConnection[]): Map<string, number> {
  const sizes = new Map<string, number>();
  for (const c of open) sizes.set(c.peer, (sizes.get(c.peer) ?? 0) + 1);
  return sizes;
}

/** The NBD URI of export `name` at `address` (`nbds…` when the server requires TLS). */
export function nbdUri(name: string, address: NbdAddress, tls = false): string {
  const path = encodeURIComponent(name);
  const s = tls ? 's' : '';
  if (address.type === 'unix') return `nbd${s}+unix:///${path}?socket=${encodeURI(address.path)}`;
  const host = address.host.includes(':') ? `[${address.host}]` : address.host;
  return `nbd${s}://${host}:${address.port}/${path}`;
}
