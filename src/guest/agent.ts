/**
 * The reference guest agent (`tidemark guest-agent`): the guest side of the channel, speaking the subset of the
 * QEMU guest-agent protocol that backup needs, in qemu-ga's wire shapes (answers, error classes and wording), so
 * that the host's client cannot tell it from the real one for these commands.
 *
 * It listens on a unix socket (the host connects, as QEMU's chardev does); one client at a time, a new one
 * replaces the old. Requests are handled strictly in order, as qemu-ga does. Unlike qemu-ga it thaws by itself
 * when no thaw arrives within the freeze timeout (a host that died must not leave the guest's writers stuck).
 */
import fs from 'node:fs';
import net from 'node:net';
import { TidemarkError, fromSystemError } from '../errors.js';
import { DELIMITER, JsonObjectSplitter, MAX_MESSAGE_BYTES, type SplitEvent } from './framing.js';
import { Freezer, FreezeError } from './freezer.js';
import {
  COMMANDS,
  agentErrors,
  encodeError,
  encodeReturn,
  type AgentErrorBody,
  type FreezeStatus,
} from './protocol.js';

export interface GuestAgentOptions {
  socketPath: string;
  hooksDir?: string;
  /** mount points frozen with util-linux fsfreeze, in order */
  mounts?: string[];
  /** false: run the hooks only (no fsfreeze) */
  fsfreeze?: boolean;
  /** the watchdog: thaw by itself this long after a freeze if no thaw came; default 60 s */
  freezeTimeoutMs?: number;
  /** bound on each hook and fsfreeze run; default 30 s */
  hookTimeoutMs?: number;
  /** what guest-info reports as the version */
  version?: string;
  log?: (line: string) => void;
  maxMessageBytes?: number;
}

/** Sockets paths longer than this do not fit in sockaddr_un. */
const MAX_SOCKET_PATH = 107;
/** Requests queued from one client before its socket is paused (a client spraying commands). */
const MAX_PENDING = 64;
/** Answers buffered toward a client that does not read, before its socket is paused. */
const MAX_UNSENT = 1024 * 1024;
/** The commands that stay enabled while frozen (qemu-ga's freeze allow-list, restricted to what we have). */
const ALLOWED_WHILE_FROZEN = new Set<string>([
  COMMANDS.ping,
  COMMANDS.info,
  COMMANDS.sync,
  COMMANDS.syncDelimited,
  COMMANDS.freezeStatus,
  COMMANDS.thaw,
]);
const ALL_COMMANDS: string[] = [
  COMMANDS.sync,
  COMMANDS.syncDelimited,
  COMMANDS.ping,
  COMMANDS.info,
  COMMANDS.freezeStatus,
  COMMANDS.freeze,
  COMMANDS.thaw,
];
const REQUEST_MEMBERS = new Set(['execute', 'arguments', 'id']);

type Reply = { ok: true; value: unknown; delimited?: boolean } | { ok: false; error: AgentErrorBody };

interface Connection {
  sock: net.Socket;
  splitter: JsonObjectSplitter;
  pending: number;
}

export class GuestAgent {
  private readonly freezer: Freezer;
  private readonly log: (line: string) => void;
  private readonly freezeTimeoutMs: number;
  private readonly version: string;
  private readonly maxMessageBytes: number;
  private state: FreezeStatus = 'thawed';
  private watchdog: NodeJS.Timeout | undefined;
  private freezeGeneration = 0;
  private current: Connection | null = null;
  private work: Promise<void> = Promise.resolve();
  private closing = false;

  private constructor(
    private readonly server: net.Server,
    readonly socketPath: string,
    opts: GuestAgentOptions,
  ) {
    this.log = opts.log ?? (() => {});
    this.freezeTimeoutMs = opts.freezeTimeoutMs ?? 60_000;
    this.version = opts.version ?? 'tidemark';
    this.maxMessageBytes = opts.maxMessageBytes ?? MAX_MESSAGE_BYTES;
    this.freezer = new Freezer({
      hooksDir: opts.hooksDir,
      mounts: opts.mounts,
      fsfreeze: opts.fsfreeze,
      stepTimeoutMs: opts.hookTimeoutMs,
      log: this.log,
    });
    server.on('connection', (sock) => this.accept(sock));
  }

  /** Validates the options, takes over a stale socket file, and listens. */
  static async listen(opts: GuestAgentOptions): Promise<GuestAgent> {
    const p = opts.socketPath;
    if (!p) throw new TidemarkError('INVALID_ARGUMENT', 'no socket path given (--socket PATH)');
    if (Buffer.byteLength(p) > MAX_SOCKET_PATH) {
      throw new TidemarkError('INVALID_ARGUMENT', `socket path ${p} is longer than ${MAX_SOCKET_PATH} bytes`, {
        path: p,
      });
    }
    const timeout = opts.freezeTimeoutMs ?? 60_000;
    if (!(timeout > 0)) throw new TidemarkError('INVALID_ARGUMENT', `freeze timeout must be positive, got ${timeout}`);
    if (opts.fsfreeze !== false && (opts.mounts ?? []).length === 0) {
      throw new TidemarkError(
        'INVALID_ARGUMENT',
        'name the file systems to freeze with --mount PATH (repeatable), or pass --no-fsfreeze to run the hooks only',
      );
    }
    for (const m of opts.mounts ?? []) {
      if (!m.startsWith('/')) throw new TidemarkError('INVALID_ARGUMENT', `mount point ${m} is not an absolute path`);
    }
    if (opts.hooksDir !== undefined) {
      const st = await fs.promises.stat(opts.hooksDir).catch((err) => {
        throw fromSystemError(err, 'open the hook directory', opts.hooksDir!);
      });
      if (!st.isDirectory())
        throw new TidemarkError('INVALID_ARGUMENT', `${opts.hooksDir} is not a directory`, { path: opts.hooksDir });
    }
    await takeOverSocketPath(p);
    const server = net.createServer();
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => reject(fromSystemError(err, 'listen on', p)));
      server.listen(p, () => {
        server.removeAllListeners('error');
        resolve();
      });
    });
    server.on('error', (err) => opts.log?.(`listening socket error: ${err.message}`));
    const agent = new GuestAgent(server, p, opts);
    agent.log(`listening on ${p}`);
    return agent;
  }

  get status(): FreezeStatus {
    return this.state;
  }

  /** Stops listening, drops the client, waits for the request in progress, and thaws if frozen. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const closed = new Promise<void>((resolve) => this.server.close(() => resolve()));
    this.current?.sock.destroy();
    this.current = null;
    await this.work;
    if (this.state === 'frozen') {
      this.log('shutting down while frozen: thawing first');
      await this.thaw();
    }
    await closed;
    await fs.promises.rm(this.socketPath, { force: true });
  }

  // ---------------------------------------------------------------------------------------------------------------

  private accept(sock: net.Socket): void {
    if (this.closing) {
      sock.destroy();
      return;
    }
    if (this.current) {
      this.log('a new client connected: it replaces the previous one');
      this.current.sock.destroy();
    }
    const conn: Connection = { sock, splitter: new JsonObjectSplitter(this.maxMessageBytes), pending: 0 };
    this.current = conn;
    sock.on('data', (chunk: Buffer) => {
      for (const ev of conn.splitter.push(chunk)) {
        conn.pending++;
        this.work = this.work.then(() => this.handle(conn, ev)).catch((err) => this.log(`internal error: ${err}`));
      }
      this.flow(conn);
    });
    sock.on('drain', () => this.flow(conn));
    sock.on('error', () => {}); // a client that vanishes is normal; 'close' follows
    sock.on('close', () => {
      if (this.current === conn) this.current = null;
    });
  }

  /** Backpressure: stop reading from a client that sends faster than we answer or reads slower than we write. */
  private flow(conn: Connection): void {
    if (conn.sock.destroyed) return;
    if (conn.pending > MAX_PENDING || conn.sock.writableLength > MAX_UNSENT) conn.sock.pause();
    else conn.sock.resume();
  }

  private async handle(conn: Connection, ev: SplitEvent): Promise<void> {
    conn.pending--;
    let reply: Reply;
    let id: unknown;
    if (ev.kind === 'value') {
      const req = parseRequest(ev.text);
      id = req.id;
      reply = 'error' in req ? { ok: false, error: req.error } : await this.dispatch(req.execute, req.args);
    } else if (ev.kind === 'garbage') {
      reply = { ok: false, error: garbageError(ev.text) };
    } else if (ev.kind === 'overflow') {
      reply = { ok: false, error: agentErrors.generic(`JSON parse error, ${ev.reason}`) };
    } else {
      // 0xFF flushed the parser; qemu-ga also answers it with this error, which clients resyncing discard.
      reply = { ok: false, error: agentErrors.generic("JSON parse error, stray '\uFFFD'") };
    }
    // A replaced or departed client gets nothing; its request still ran (as with qemu-ga).
    if (this.current !== conn || conn.sock.destroyed) return;
    const body = reply.ok ? encodeReturn(reply.value, id) : encodeError(reply.error, id);
    conn.sock.write(reply.ok && reply.delimited ? Buffer.concat([Buffer.from([DELIMITER]), body]) : body);
    this.flow(conn);
  }

  private async dispatch(execute: string, args: Record<string, unknown> | undefined): Promise<Reply> {
    if (!ALL_COMMANDS.includes(execute)) return { ok: false, error: agentErrors.notFound(execute) };
    if (this.state === 'frozen' && !ALLOWED_WHILE_FROZEN.has(execute)) {
      return { ok: false, error: agentErrors.disabled(execute, 'the agent is in frozen state') };
    }
    switch (execute) {
      case COMMANDS.sync:
      case COMMANDS.syncDelimited: {
        const bad = checkArgs(args, ['id']);
        if (bad) return { ok: false, error: bad };
        if (args?.id === undefined) return { ok: false, error: agentErrors.generic("Parameter 'id' is missing") };
        if (!Number.isInteger(args.id)) {
          return { ok: false, error: agentErrors.generic("Invalid parameter type for 'id', expected: integer") };
        }
        return { ok: true, value: args.id, delimited: execute === COMMANDS.syncDelimited };
      }
    }
    const bad = checkArgs(args, []);
    if (bad) return { ok: false, error: bad };
    switch (execute) {
      case COMMANDS.ping:
        return { ok: true, value: {} };
      case COMMANDS.info:
        return {
          ok: true,
          value: {
            version: this.version,
            supported_commands: ALL_COMMANDS.map((name) => ({
              enabled: this.state !== 'frozen' || ALLOWED_WHILE_FROZEN.has(name),
              name,
              'success-response': true,
            })),
          },
        };
      case COMMANDS.freezeStatus:
        return { ok: true, value: this.state };
      case COMMANDS.freeze:
        return this.freeze();
      default: {
        const r = await this.thaw();
        return r.problems.length === 0
          ? { ok: true, value: r.thawed }
          : { ok: false, error: agentErrors.generic(`thawed, with errors: ${r.problems.join('; ')}`) };
      }
    }
  }

  private async freeze(): Promise<Reply> {
    try {
      const count = await this.freezer.freeze();
      this.state = 'frozen';
      const generation = ++this.freezeGeneration;
      this.watchdog = setTimeout(() => {
        // Through the queue, so the watchdog's thaw never interleaves with a command.
        this.work = this.work.then(async () => {
          if (this.state !== 'frozen' || this.freezeGeneration !== generation) return;
          this.log(`watchdog: no thaw within ${this.freezeTimeoutMs} ms of the freeze; thawing by itself`);
          await this.thaw();
        });
      }, this.freezeTimeoutMs);
      this.log(`frozen (${count} file systems)`);
      return { ok: true, value: count };
    } catch (err) {
      const msg = err instanceof FreezeError ? err.message : `freeze failed: ${(err as Error).message}`;
      this.log(msg);
      return { ok: false, error: agentErrors.generic(msg) };
    }
  }

  private async thaw(): Promise<{ thawed: number; problems: string[] }> {
    clearTimeout(this.watchdog);
    this.watchdog = undefined;
    if (this.state !== 'frozen') return { thawed: 0, problems: [] };
    const r = await this.freezer.thaw();
    // Thawed whatever the problems: every step was tried, and nothing is left to retry against.
    this.state = 'thawed';
    this.log(`thawed (${r.thawed} file systems${r.problems.length ? `; problems: ${r.problems.join('; ')}` : ''})`);
    return r;
  }
}

/** A socket file left by an agent that died is replaced; a live agent or another kind of file is not. */
async function takeOverSocketPath(p: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = await fs.promises.lstat(p);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    throw new TidemarkError('ALREADY_EXISTS', `${p} exists and is not a socket: choose another --socket path`, {
      path: p,
    });
  }
  const live = await new Promise<boolean>((resolve) => {
    const s = net.createConnection({ path: p });
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new TidemarkError('BUSY', `another agent is listening on ${p}`, { path: p });
  await fs.promises.rm(p, { force: true });
}

function isPlainObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

type Request =
  { execute: string; args: Record<string, unknown> | undefined; id: unknown } | { error: AgentErrorBody; id: unknown };

/** Checks a request the way QEMU's dispatcher does, with its messages. */
export function parseRequest(text: string): Request {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (err) {
    return { error: agentErrors.generic(`JSON parse error, ${(err as Error).message}`), id: undefined };
  }
  if (!isPlainObject(v)) return { error: agentErrors.generic('QMP input must be a JSON object'), id: undefined };
  const id = v.id;
  for (const key of Object.keys(v)) {
    if (!REQUEST_MEMBERS.has(key)) return { error: agentErrors.generic(`QMP input member '${key}' is unexpected`), id };
  }
  if (!('execute' in v)) return { error: agentErrors.generic("QMP input lacks member 'execute'"), id };
  if (typeof v.execute !== 'string')
    return { error: agentErrors.generic("QMP input member 'execute' must be a string"), id };
  if ('arguments' in v && !isPlainObject(v.arguments))
    return { error: agentErrors.generic("QMP input member 'arguments' must be an object"), id };
  return { execute: v.execute, args: v.arguments as Record<string, unknown> | undefined, id };
}

function checkArgs(args: Record<string, unknown> | undefined, allowed: string[]): AgentErrorBody | undefined {
  for (const key of Object.keys(args ?? {})) {
    if (!allowed.includes(key)) return agentErrors.generic(`Parameter '${key}' is unexpected`);
  }
  return undefined;
}

function garbageError(text: string): AgentErrorBody {
  let scalar = false;
  try {
    JSON.parse(text);
    scalar = true;
  } catch {
    // not JSON at all
  }
  if (scalar) return agentErrors.generic('QMP input must be a JSON object');
  const shown = text.length > 64 ? `${text.slice(0, 64)}…` : text;
  return agentErrors.generic(`JSON parse error, invalid keyword '${shown}'`);
}
