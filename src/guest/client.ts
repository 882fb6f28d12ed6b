/**
 * Host side of the guest channel: a client of the QEMU guest agent (real `qemu-ga`, or `tidemark guest-agent`).
 *
 * One command at a time (answers carry no reliable correlation on old agents), every wait bounded by a deadline.
 * The stream is resynchronised before the first command and after any timeout or unreadable answer:
 * `0xFF` + `guest-sync-delimited` with a random id (the 0xFF flushes the agent's parser; the agent's 0xFF before
 * its answer flushes ours), discarding everything until the answer carrying that id; `guest-sync` when the agent
 * does not know the delimited form.
 */
import { randomInt } from 'node:crypto';
import { TidemarkError } from '../errors.js';
import { DELIMITER, LineDecoder, MAX_MESSAGE_BYTES, type LineEvent } from './framing.js';
import {
  COMMANDS,
  GuestAgentError,
  encodeRequest,
  errorFromAgent,
  isCommandUnavailable,
  parseResponse,
  type FreezeStatus,
} from './protocol.js';
import { openChannel, type Channel } from './transport.js';

export const DEFAULT_TIMEOUT_MS = 5_000;
/** Events buffered while a command waits; beyond this the agent is flooding and the oldest are dropped. */
const MAX_INBOX = 4096;

export interface GuestAgentClientOptions {
  /** bound on connecting and on each command (queueing, resynchronising and answering included); default 5000 */
  timeoutMs?: number;
  /** longest answer line kept; longer ones are skipped and count as garbage (default 16 MiB) */
  maxLineBytes?: number;
  /** diagnostic lines (resynchronisations, discarded data) */
  log?: (line: string) => void;
}

export interface CallOptions {
  timeoutMs?: number;
}

export interface GuestCommandInfo {
  name: string;
  enabled: boolean;
  successResponse: boolean;
}

export interface GuestInfo {
  version: string;
  supportedCommands: GuestCommandInfo[];
}

export interface ClientStats {
  /** resynchronisations performed (the first one included) */
  resyncs: number;
  /** times guest-sync-delimited was unknown and guest-sync was used */
  syncFallbacks: number;
  /** well-formed lines thrown away: stale answers, answers to other ids, output while idle */
  discardedLines: number;
  /** unreadable lines or over-long lines seen */
  garbageLines: number;
  timeouts: number;
}

type Answer = { kind: 'return'; value: unknown } | { kind: 'error'; error: { class: string; desc: string } };

export class GuestAgentClient {
  readonly stats: ClientStats = { resyncs: 0, syncFallbacks: 0, discardedLines: 0, garbageLines: 0, timeouts: 0 };
  private readonly decoder: LineDecoder;
  private readonly timeoutMs: number;
  private readonly log: (line: string) => void;
  private inbox: LineEvent[] = [];
  private wake: (() => void) | null = null;
  /** a command is reading: events go to the inbox (otherwise they are stale and dropped) */
  private active = false;
  private closedReason: string | null = null;
  private needsSync = true;
  private useDelimited = true;
  private seq = 0;
  private queue: Promise<void> = Promise.resolve();

  private constructor(
    private readonly channel: Channel,
    readonly address: string,
    opts: GuestAgentClientOptions,
  ) {
    this.timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.decoder = new LineDecoder(opts.maxLineBytes ?? MAX_MESSAGE_BYTES);
    this.log = opts.log ?? (() => {});
    channel.onData = (chunk) => this.receive(chunk);
    channel.onClose = (reason) => {
      this.closedReason = reason;
      this.wake?.();
    };
  }

  /**
   * Opens the channel (`unix:/path`, a socket path, or a character device such as QEMU's pty chardev).
   * Nothing is sent yet: the first command resynchronises first.
   */
  static async connect(address: string, opts: GuestAgentClientOptions = {}): Promise<GuestAgentClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    if (!(timeoutMs > 0)) throw new TidemarkError('INVALID_ARGUMENT', `timeout must be positive, got ${timeoutMs}`);
    const channel = await openChannel(address, timeoutMs);
    return new GuestAgentClient(channel, address, opts);
  }

  get closed(): boolean {
    return this.closedReason !== null;
  }

  async close(): Promise<void> {
    if (this.closedReason === null) this.closedReason = 'closed by the client';
    this.wake?.();
    await this.channel.close();
  }

  /** Resynchronises now (also proves the agent answers). */
  sync(opts: CallOptions = {}): Promise<void> {
    return this.serial(opts, 'guest-sync', async (deadline, timeoutMs) => {
      this.needsSync = true;
      await this.resync(deadline, timeoutMs);
    });
  }

  async ping(opts: CallOptions = {}): Promise<void> {
    await this.execute(COMMANDS.ping, undefined, { ...opts, idempotent: true });
  }

  async info(opts: CallOptions = {}): Promise<GuestInfo> {
    const v = await this.execute(COMMANDS.info, undefined, { ...opts, idempotent: true });
    const o = v as { version?: unknown; supported_commands?: unknown };
    if (typeof o !== 'object' || o === null || typeof o.version !== 'string' || !Array.isArray(o.supported_commands))
      throw this.badAnswer(COMMANDS.info, v);
    const supportedCommands: GuestCommandInfo[] = [];
    for (const c of o.supported_commands as Array<Record<string, unknown>>) {
      if (typeof c !== 'object' || c === null || typeof c.name !== 'string') throw this.badAnswer(COMMANDS.info, v);
      supportedCommands.push({
        name: c.name,
        enabled: c.enabled !== false,
        successResponse: c['success-response'] !== false,
      });
    }
    return { version: o.version, supportedCommands };
  }

  async fsfreezeStatus(opts: CallOptions = {}): Promise<FreezeStatus> {
    const v = await this.execute(COMMANDS.freezeStatus, undefined, { ...opts, idempotent: true });
    if (v !== 'frozen' && v !== 'thawed') throw this.badAnswer(COMMANDS.freezeStatus, v);
    return v;
  }

  /** Freezes the guest's file systems (running its hooks first); returns how many were frozen. Not retried. */
  async fsfreezeFreeze(opts: CallOptions = {}): Promise<number> {
    const v = await this.execute(COMMANDS.freeze, undefined, { ...opts, idempotent: false });
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw this.badAnswer(COMMANDS.freeze, v);
    return v as number;
  }

  /** Thaws; returns how many file systems were thawed (0 when nothing was frozen). Safe to repeat. */
  async fsfreezeThaw(opts: CallOptions = {}): Promise<number> {
    const v = await this.execute(COMMANDS.thaw, undefined, { ...opts, idempotent: true });
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw this.badAnswer(COMMANDS.thaw, v);
    return v as number;
  }

  /**
   * Any command; resolves with its `return` value. `idempotent` allows one resend after an unreadable answer
   * (the command may have run once already).
   */
  execute(
    command: string,
    args?: Record<string, unknown>,
    opts: CallOptions & { idempotent?: boolean } = {},
  ): Promise<unknown> {
    return this.serial(opts, command, async (deadline, timeoutMs) => {
      for (let attempt = 0; ; attempt++) {
        if (this.needsSync) await this.resync(deadline, timeoutMs);
        const id = `tidemark-${++this.seq}`;
        this.send(encodeRequest(command, args, id));
        const answer = await this.awaitAnswer(command, id, deadline, timeoutMs);
        if (answer.kind === 'garbage') {
          this.needsSync = true;
          if (opts.idempotent && attempt === 0) {
            this.log(`unreadable answer to ${command} (${answer.reason}): resynchronising and sending it again`);
            continue;
          }
          throw new GuestAgentError(
            'PROTOCOL_ERROR',
            attempt === 0
              ? `unreadable answer from the guest agent on ${this.channel.description} to ${command} (${answer.reason}); not resent, as it may have run`
              : `unreadable answer from the guest agent on ${this.channel.description} to ${command} (${answer.reason}), even after resynchronising`,
            { command },
          );
        }
        if (answer.kind === 'error') throw errorFromAgent(command, answer.error);
        return answer.value;
      }
    });
  }

  // ---------------------------------------------------------------------------------------------------------------

  private receive(chunk: Buffer): void {
    for (const ev of this.decoder.push(chunk)) {
      if (!this.active) {
        // Nobody asked: a late answer to a timed-out command, or noise. The next command resynchronises if needed.
        if (ev.kind === 'line') this.stats.discardedLines++;
        else if (ev.kind === 'overflow') this.stats.garbageLines++;
        continue;
      }
      if (this.inbox.length >= MAX_INBOX) {
        this.inbox.shift();
        this.stats.discardedLines++;
      }
      this.inbox.push(ev);
    }
    this.wake?.();
  }

  private send(data: Buffer): void {
    if (this.closedReason !== null) throw this.closedError();
    this.channel.write(data);
  }

  private closedError(): GuestAgentError {
    return new GuestAgentError(
      'CLOSED',
      `the guest channel ${this.channel.description} is closed: ${this.closedReason}`,
    );
  }

  private badAnswer(command: string, v: unknown): GuestAgentError {
    const shown = JSON.stringify(v) ?? String(v);
    return new GuestAgentError(
      'PROTOCOL_ERROR',
      `the guest agent answered ${command} with ${shown.length > 200 ? shown.slice(0, 200) + '…' : shown}, which is not what the protocol defines`,
      { command },
    );
  }

  /**
   * Runs `fn` after the commands queued before it, within one deadline that starts now. Any failure other than
   * the agent's own error answer leaves the stream in an unknown state: the next command resynchronises.
   */
  private serial<T>(
    opts: CallOptions,
    command: string,
    fn: (deadline: number, timeoutMs: number) => Promise<T>,
  ): Promise<T> {
    const timeoutMs = opts.timeoutMs ?? this.timeoutMs;
    const deadline = Date.now() + timeoutMs;
    const previous = this.queue;
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    this.queue = previous.then(() => mine);
    return (async () => {
      try {
        if (!(timeoutMs > 0)) throw new TidemarkError('INVALID_ARGUMENT', `timeout must be positive, got ${timeoutMs}`);
        await this.waitTurn(previous, deadline, command, timeoutMs);
        if (this.closedReason !== null) throw this.closedError();
        this.active = true;
        this.inbox = [];
        try {
          return await fn(deadline, timeoutMs);
        } catch (err) {
          if (!(err instanceof GuestAgentError && err.agentClass !== undefined)) this.needsSync = true;
          if (err instanceof TidemarkError && err.code === 'TIMEOUT') this.stats.timeouts++;
          throw err;
        } finally {
          this.active = false;
          this.stats.discardedLines += this.inbox.filter((e) => e.kind === 'line').length;
          this.inbox = [];
        }
      } finally {
        release();
      }
    })();
  }

  private async waitTurn(previous: Promise<void>, deadline: number, command: string, timeoutMs: number) {
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<'late'>((resolve) => {
      timer = setTimeout(() => resolve('late'), Math.max(0, deadline - Date.now()));
    });
    try {
      if ((await Promise.race([previous.then(() => 'ok' as const), late])) === 'late') {
        throw new GuestAgentError(
          'TIMEOUT',
          `${command} waited ${timeoutMs} ms for an earlier command on ${this.channel.description} and was not sent`,
          { command },
        );
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** The next event, 'timeout' at the deadline, or CLOSED. */
  private async next(deadline: number): Promise<LineEvent | 'timeout'> {
    while (true) {
      const ev = this.inbox.shift();
      if (ev) return ev;
      if (this.closedReason !== null) throw this.closedError();
      const left = deadline - Date.now();
      if (left <= 0) return 'timeout';
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.wake = null;
    }
  }

  private async awaitAnswer(
    command: string,
    id: string,
    deadline: number,
    timeoutMs: number,
  ): Promise<Answer | { kind: 'garbage'; reason: string }> {
    while (true) {
      const ev = await this.next(deadline);
      if (ev === 'timeout') {
        throw new GuestAgentError(
          'TIMEOUT',
          `no answer from the guest agent on ${this.channel.description} to ${command} within ${timeoutMs} ms`,
          { command },
        );
      }
      if (ev.kind === 'delimiter') continue; // a stray 0xFF: the decoder already dropped the partial line
      if (ev.kind === 'overflow') {
        this.stats.garbageLines++;
        return { kind: 'garbage', reason: `a line longer than ${this.decoder.maxBytes} bytes` };
      }
      const r = parseResponse(ev.text);
      if (r.kind === 'garbage') {
        this.stats.garbageLines++;
        return { kind: 'garbage', reason: r.reason };
      }
      // Agents echo our id; an answer with another id is stale (a command that timed out earlier).
      if (r.id !== undefined && r.id !== id) {
        this.stats.discardedLines++;
        continue;
      }
      return r.kind === 'return' ? { kind: 'return', value: r.value } : { kind: 'error', error: r.error };
    }
  }

  private async resync(deadline: number, timeoutMs: number): Promise<void> {
    this.stats.resyncs++;
    this.decoder.reset();
    this.stats.discardedLines += this.inbox.filter((e) => e.kind === 'line').length;
    this.inbox = [];
    let garbage = 0;
    let lastGarbage = '';
    let delimited = this.useDelimited;
    send: while (true) {
      // Safe integers only: ids travel through JSON numbers on both sides.
      const syncId = randomInt(1, 2 ** 47);
      const command = delimited ? COMMANDS.syncDelimited : COMMANDS.sync;
      this.send(Buffer.concat([Buffer.from([DELIMITER]), encodeRequest(command, { id: syncId })]));
      while (true) {
        const ev = await this.next(deadline);
        if (ev === 'timeout') {
          if (garbage > 0) {
            throw new GuestAgentError(
              'PROTOCOL_ERROR',
              `the guest channel ${this.channel.description} stays unreadable: ${garbage} garbage line(s) (last: ${lastGarbage}) and no answer to ${command} within ${timeoutMs} ms`,
              { command },
            );
          }
          throw new GuestAgentError(
            'TIMEOUT',
            `no answer from a guest agent on ${this.channel.description} to ${command} within ${timeoutMs} ms (is the agent running in the guest?)`,
            { command },
          );
        }
        if (ev.kind === 'delimiter') continue;
        if (ev.kind === 'overflow') {
          garbage++;
          lastGarbage = `a line over ${this.decoder.maxBytes} bytes`;
          this.stats.garbageLines++;
          continue;
        }
        const r = parseResponse(ev.text);
        if (r.kind === 'garbage') {
          garbage++;
          lastGarbage = r.reason;
          this.stats.garbageLines++;
          continue;
        }
        if (r.kind === 'return' && r.value === syncId) {
          this.needsSync = false;
          if (this.useDelimited !== delimited) this.useDelimited = delimited;
          return;
        }
        if (r.kind === 'error' && isCommandUnavailable(r.error)) {
          if (delimited && r.error.desc.includes(COMMANDS.syncDelimited)) {
            this.log(`the agent on ${this.channel.description} has no guest-sync-delimited: using guest-sync`);
            this.stats.syncFallbacks++;
            delimited = false;
            continue send;
          }
          if (!delimited && /\bguest-sync\b(?!-)/.test(r.error.desc)) {
            throw new GuestAgentError(
              'PROTOCOL_ERROR',
              `the agent on ${this.channel.description} has neither guest-sync-delimited nor guest-sync: ${r.error.desc}`,
              { command, agentClass: r.error.class, agentDesc: r.error.desc },
            );
          }
        }
        // Anything else is stale: answers to earlier commands, the agent's complaint about our 0xFF byte.
        this.stats.discardedLines++;
      }
    }
  }
}
