/**
 * A client of the QEMU Machine Protocol (docs/interop/qmp-spec) over a unix socket: the greeting, capability
 * negotiation (`qmp_capabilities`), commands with ids whose answers are matched to them, asynchronous events
 * delivered to listeners, a deadline on every wait, typed errors. The same call connects to a QEMU just
 * launched and adopts one a previous host process launched (QEMU serves one QMP client at a time per
 * socket: the earlier client must have gone).
 *
 * Wire: JSON objects, each followed by CRLF from QEMU. Answers are `{"return": ..., "id": ...}` or
 * `{"error": {"class", "desc"}, "id": ...}`; events are `{"event", "data", "timestamp"}`. Lines are bounded
 * (`maxLineBytes`): a longer one is a protocol error that ends the connection, never an unbounded buffer.
 * Lives beside the runtime in `src/host` because the VM runtime is its only user; it imports nothing of the host.
 */
import { EventEmitter } from 'node:events';
import net from 'node:net';
import { TidemarkError, fromSystemError, type ErrorCode, TidemarkErrorBase } from '../errors.js';

export const QMP_DEFAULT_TIMEOUT_MS = 10_000;
const MAX_LINE_BYTES = 16 * 1024 * 1024;

export interface QmpVersion {
  major: number;
  minor: number;
  micro: number;
  package: string;
}

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  /** seconds since the epoch, from QEMU's timestamp */
  at: number;
}

export interface QmpClientOptions {
  /** bound on connecting, the greeting, the negotiation, and (default) each command; default 10 s */
  timeoutMs?: number;
  maxLineBytes?: number;
}

/** An error answer from QEMU: `class` (GenericError, CommandNotFound, DeviceNotFound, ...) and `desc`. */
export class QmpError extends TidemarkErrorBase<'QMP_ERROR'> {
  readonly qmpClass: string;
  readonly qmpDesc: string;
  readonly command: string;

  constructor(command: string, qmpClass: string, qmpDesc: string) {
    super('QMP_ERROR', `QEMU refused ${command}: ${qmpDesc} (${qmpClass})`, { command, qmpClass, qmpDesc });
    this.name = 'QmpError';
    this.qmpClass = qmpClass;
    this.qmpDesc = qmpDesc;
    this.command = command;
  }
}

interface Pending {
  id: string;
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
  timer: NodeJS.Timeout;
}

/**
 * Events: `event` (QmpEvent) for every asynchronous event, and `close` (reason: string) once, when the
 * connection ends for any reason but `close()`.
 */
export class QmpClient extends EventEmitter {
  private buf: Buffer[] = [];
  private bufBytes = 0;
  private pending: Pending[] = [];
  private seq = 0;
  private closedReason: string | null = null;
  private onGreeting: ((v: QmpVersion) => void) | null = null;
  private readonly maxLineBytes: number;
  private readonly timeoutMs: number;
  version: QmpVersion | null = null;
  capabilities: string[] = [];

  private constructor(
    private readonly sock: net.Socket,
    readonly path: string,
    opts: QmpClientOptions,
  ) {
    super();
    this.timeoutMs = opts.timeoutMs ?? QMP_DEFAULT_TIMEOUT_MS;
    this.maxLineBytes = opts.maxLineBytes ?? MAX_LINE_BYTES;
    sock.on('data', (chunk: Buffer) => this.receive(chunk));
    let lastError: string | undefined;
    sock.on('error', (err) => {
      lastError = err.message;
    });
    sock.on('close', () => this.end(lastError ?? 'QEMU closed the QMP connection'));
  }

  /** Connects, reads the greeting and leaves capability negotiation: ready for commands and events. */
  static async connect(socketPath: string, opts: QmpClientOptions = {}): Promise<QmpClient> {
    const timeoutMs = opts.timeoutMs ?? QMP_DEFAULT_TIMEOUT_MS;
    const sock = await new Promise<net.Socket>((resolve, reject) => {
      const s = net.createConnection({ path: socketPath });
      const timer = setTimeout(() => {
        s.destroy();
        reject(new TidemarkError('TIMEOUT', `no QMP connection to ${socketPath} within ${timeoutMs} ms`));
      }, timeoutMs);
      s.once('connect', () => {
        clearTimeout(timer);
        resolve(s);
      });
      s.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        s.destroy();
        reject(
          err.code === 'ECONNREFUSED'
            ? new TidemarkError('CLOSED', `nothing listens on the QMP socket ${socketPath} (connection refused)`)
            : fromSystemError(err, 'connect to the QMP socket', socketPath),
        );
      });
    });
    const c = new QmpClient(sock, socketPath, opts);
    try {
      c.version = await c.greeting(timeoutMs);
      await c.execute('qmp_capabilities');
      return c;
    } catch (err) {
      c.destroy();
      throw err;
    }
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }

  /**
   * Runs a command; resolves with its `return` value. QMP_ERROR for an error answer, TIMEOUT when no answer
   * comes in time (a late answer is then ignored), CLOSED when the connection ends first.
   */
  execute<T = unknown>(command: string, args?: Record<string, unknown>, opts: { timeoutMs?: number } = {}): Promise<T> {
    if (this.closedReason !== null) return Promise.reject(this.closedError(command));
    const id = `tidemark-${++this.seq}`;
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    return new Promise<T>((resolve, reject) => {
      const p: Pending = {
        id,
        command,
        resolve: resolve as (v: unknown) => void,
        reject,
        timer: setTimeout(() => {
          this.pending = this.pending.filter((x) => x !== p);
          reject(new TidemarkError('TIMEOUT', `QEMU did not answer ${command} within ${timeoutMs} ms (${this.path})`));
        }, timeoutMs),
      };
      this.pending.push(p);
      this.sock.write(
        JSON.stringify(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) +
          '\n',
      );
    });
  }

  /**
   * The next event named `name` (and matching `match`), within `timeoutMs`. Register before causing the
   * event: `const ev = qmp.waitEvent('DEVICE_DELETED', ...); await qmp.execute('device_del', ...); await ev`.
   */
  waitEvent(
    name: string,
    opts: { timeoutMs?: number; match?: (data: Record<string, unknown>) => boolean } = {},
  ): Promise<QmpEvent> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.off('event', onEvent);
        this.off('close', onClose);
      };
      const onEvent = (ev: QmpEvent) => {
        if (ev.event !== name || (opts.match && !opts.match(ev.data))) return;
        done();
        resolve(ev);
      };
      const onClose = (reason: string) => {
        done();
        reject(new TidemarkError('CLOSED', `the QMP connection ended while waiting for ${name}: ${reason}`));
      };
      const timer = setTimeout(() => {
        done();
        reject(new TidemarkError('TIMEOUT', `no ${name} event from QEMU within ${timeoutMs} ms`));
      }, timeoutMs);
      if (this.closedReason !== null) return onClose(this.closedReason);
      this.on('event', onEvent);
      this.on('close', onClose);
    });
  }

  /** Ends the connection (QEMU keeps running); pending commands fail with CLOSED. */
  async close(): Promise<void> {
    if (this.closedReason !== null) return;
    this.closedReason = 'closed by the client';
    this.failPending();
    await new Promise<void>((resolve) => {
      this.sock.once('close', () => resolve());
      this.sock.end();
      setTimeout(() => {
        this.sock.destroy();
        resolve();
      }, 1000).unref();
    });
  }

  private destroy(): void {
    if (this.closedReason === null) this.closedReason = 'closed by the client';
    this.failPending();
    this.sock.destroy();
  }

  private greeting(timeoutMs: number): Promise<QmpVersion> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.onGreeting = null;
        reject(new TidemarkError('TIMEOUT', `no QMP greeting on ${this.path} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.once('close', (reason: string) => {
        clearTimeout(timer);
        reject(new TidemarkError('CLOSED', `the QMP connection ${this.path} ended before the greeting: ${reason}`));
      });
      this.onGreeting = (v) => {
        clearTimeout(timer);
        resolve(v);
      };
    });
  }

  private receive(chunk: Buffer): void {
    let start = 0;
    for (let i = chunk.indexOf(0x0a); i >= 0; i = chunk.indexOf(0x0a, start)) {
      this.buf.push(chunk.subarray(start, i));
      const line = Buffer.concat(this.buf).toString('utf8').trim();
      this.buf = [];
      this.bufBytes = 0;
      start = i + 1;
      if (line.length > 0) this.handleLine(line);
      if (this.closedReason !== null) return;
    }
    if (start < chunk.length) {
      this.bufBytes += chunk.length - start;
      if (this.bufBytes > this.maxLineBytes) {
        this.protocolFailure(`a QMP message longer than ${this.maxLineBytes} bytes`);
        return;
      }
      this.buf.push(chunk.subarray(start));
    }
  }

  private handleLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line);
    } catch {
      this.protocolFailure(`unreadable QMP message: ${line.slice(0, 200)}`);
      return;
    }
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      this.protocolFailure(`a QMP message that is not an object: ${line.slice(0, 200)}`);
      return;
    }
    if ('QMP' in msg) {
      const q = msg.QMP as { version?: { qemu?: Record<string, number>; package?: string }; capabilities?: string[] };
      const v = q?.version?.qemu ?? {};
      this.capabilities = Array.isArray(q?.capabilities) ? q.capabilities : [];
      const version = {
        major: v.major ?? 0,
        minor: v.minor ?? 0,
        micro: v.micro ?? 0,
        package: q?.version?.package ?? '',
      };
      this.onGreeting?.(version);
      this.onGreeting = null;
      return;
    }
    if (typeof msg.event === 'string') {
      const ts = msg.timestamp as { seconds?: number; microseconds?: number } | undefined;
      const ev: QmpEvent = {
        event: msg.event,
        data: (msg.data as Record<string, unknown>) ?? {},
        at: (ts?.seconds ?? 0) + (ts?.microseconds ?? 0) / 1e6,
      };
      this.emit('event', ev);
      return;
    }
    if ('return' in msg || 'error' in msg) {
      // Answers carry our id; one without (QEMU could not parse the request) belongs to the oldest command.
      const idx = msg.id === undefined ? 0 : this.pending.findIndex((p) => p.id === msg.id);
      const p = idx >= 0 ? this.pending[idx] : undefined;
      if (!p) return; // the answer to a command that timed out
      this.pending.splice(idx, 1);
      clearTimeout(p.timer);
      if ('error' in msg) {
        const e = (msg.error ?? {}) as { class?: string; desc?: string };
        p.reject(new QmpError(p.command, e.class ?? 'GenericError', e.desc ?? 'no description'));
      } else {
        p.resolve(msg.return);
      }
      return;
    }
    this.protocolFailure(`a QMP message that is neither an answer nor an event: ${line.slice(0, 200)}`);
  }

  private protocolFailure(reason: string): void {
    this.end(reason, 'PROTOCOL_ERROR');
    this.sock.destroy();
  }

  private end(reason: string, code: ErrorCode = 'CLOSED'): void {
    if (this.closedReason !== null) return;
    this.closedReason = reason;
    this.failPending(code);
    this.emit('close', reason);
  }

  private failPending(code: ErrorCode = 'CLOSED'): void {
    const list = this.pending;
    this.pending = [];
    for (const p of list) {
      clearTimeout(p.timer);
      p.reject(
        code === 'CLOSED'
          ? this.closedError(p.command)
          : new TidemarkError(code, `QMP ${this.path}: ${this.closedReason} (while waiting for ${p.command})`),
      );
    }
  }

  private closedError(command: string): TidemarkError {
    return new TidemarkError(
      'CLOSED',
      `the QMP connection ${this.path} is closed (${this.closedReason}); ${command} not sent or not answered`,
    );
  }
}
