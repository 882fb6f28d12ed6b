/**
 * One client's connection: fixed-newstyle negotiation (with STARTTLS when the server requires TLS),
 * then the transmission phase, in which requests run concurrently against the export's device and
 * replies go out as each finishes (so out of order).
 *
 * Every reply is written in one synchronous burst (header and data corked into one writev), so replies
 * never interleave on the socket.
 *
 * Memory (budget.ts): every option and request reserves what it will cost before it is read or run
 * (a write's payload before its first byte is read, a read's buffer and reply before the device is
 * asked), from this connection's budget and the server's; what a reply holds is released when the
 * socket has written it. When a reservation is refused, or MAX_REQUESTS_IN_FLIGHT requests run, or an
 * option is being answered, the socket is paused, so TCP holds the client back: a client that does
 * not read its replies stops being read, in negotiation as in transmission.
 *
 * Time: negotiation has a deadline (TLS handshake included); a client that owes progress (the rest of
 * a write payload, or taking its replies) and makes none for the stall timeout is dropped. Idle
 * connections are the server's business (it closes them only under pressure).
 */
import type { Socket } from 'node:net';
import type { AllocationExtent, BlockDevice, DirtyExtent } from '../disk/device.js';
import { TidemarkError } from '../errors.js';
import { BUFFER_OVERHEAD, bufferCost, CHUNK, dataCost, MemoryAccount, type MemoryBudget } from './budget.js';
import { nbdErrorFor, NbdProtocolError } from './errors.js';
import {
  MAX_OPTIONS,
  MAX_REQUESTS_IN_FLIGHT,
  NEGOTIATION_MEMORY,
  PRESSURE_STALL_MS,
  STALLED_AFTER_MS,
  type NbdLimits,
} from './limits.js';
import { ClientParser, type ClientMessage } from './parser.js';
import {
  CMD,
  CMD_FLAG,
  commandName,
  CONTEXT_BASE_ALLOCATION,
  decodeInfoRequest,
  decodeMetaContextRequest,
  DIRTY_BITMAP_PREFIX,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeHandshake,
  encodeInfoReplyData,
  encodeMetaContextReplyData,
  encodeNoneChunk,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionReply,
  encodeServerReplyData,
  encodeSimpleReply,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO,
  MAX_OPTION_DATA,
  MAX_PAYLOAD,
  MAX_STRING,
  NBD_ERR,
  OPT,
  optionName,
  REP,
  REPLY_FLAG_DONE,
  STATE_DIRTY,
  STATE_HOLE,
  STATE_ZERO,
  TF,
  type RequestHeader,
  type StatusDescriptor,
} from './protocol.js';
import type { TlsCredentials } from './tls.js';

export { MAX_REQUESTS_IN_FLIGHT } from './limits.js';
/** Contiguous reads arriving together are served by one device read of at most this many bytes. */
export const MAX_COALESCED_READ = 4 * 1024 * 1024;
/** Descriptors in one block-status chunk at most (the client asks again for the rest). */
export const MAX_DESCRIPTORS = 64 * 1024;

/** Reserved for one reply's header buffers (a correction follows when it turns out bigger). */
export const REPLY_ESTIMATE = 2 * BUFFER_OVERHEAD + 64;
/** Reserved for the replies to one option (LIST of many exports: corrected when sent). */
const OPTION_ESTIMATE = 4 * BUFFER_OVERHEAD + 1024;
/** What one status descriptor costs while it is collected (a JS object) and sent (8 bytes). */
const DESCRIPTOR_COST = 80;

/** An export as the server registry holds it. */
export interface ExportEntry {
  readonly name: string;
  readonly device: BlockDevice;
  readonly readOnly: boolean;
  readonly description: string;
  readonly connections: Set<NbdConnection>;
}

export interface ConnectionCounters {
  requests: number;
  errors: number;
  bytesRead: number;
  bytesWritten: number;
}

/** What a connection needs from its server. */
export interface ConnectionHost {
  findExport(name: string): ExportEntry | undefined;
  listExports(): ExportEntry[];
  attach(conn: NbdConnection, exp: ExportEntry): void;
  detach(conn: NbdConnection): void;
  /** One request of this command arrived. */
  count(command: number): void;
  event(e: NbdEvent): void;
  readonly limits: NbdLimits;
  readonly budget: MemoryBudget;
  /** Set when the server requires TLS. */
  readonly tls: TlsCredentials | undefined;
}

export type NbdEvent =
  | { type: 'connect'; id: number; remote: string }
  | { type: 'export'; id: number; export: string }
  | { type: 'disconnect'; id: number; reason: string }
  | { type: 'protocolError'; id: number; message: string };

/** What a connection is doing, as the server's eviction and idle policies see it. */
export type Activity =
  /** For `sinceMs` (since it connected). */
  | { kind: 'negotiating'; sinceMs: number }
  | { kind: 'busy' }
  /** It owes progress (payload, taking replies) and made none for STALLED_AFTER_MS. */
  | { kind: 'stalled' }
  | { kind: 'idle'; sinceMs: number };

interface MetaContext {
  id: number;
  name: string;
  /** undefined: base:allocation; otherwise the dirty bitmap's name. */
  bitmap?: string;
}

type Phase = 'negotiating' | 'transmission' | 'closing' | 'closed';

interface SendOptions {
  /** Chunks to give back to the pool once written (the data slices sent are views of them). */
  chunks?: Buffer[];
  /** What was reserved for this reply; the difference to its real cost is charged or returned. */
  prepaid?: number;
  /** Called once the socket has written it. */
  onWritten?: () => void;
}

const now = () => performance.now();

type Listener = Parameters<Socket['off']>[1];

export class NbdConnection {
  readonly id: number;
  readonly remote: string;
  /** Who the client is for fairness: its IP address over TCP; every unix-socket client is one peer. */
  readonly peer: string;
  readonly counters: ConnectionCounters = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
  /** Resolves when the socket is closed and no request is running any more. */
  readonly closed: Promise<void>;

  private socket: Socket;
  private readonly listeners: { event: string; fn: Listener }[] = [];
  private phase: Phase = 'negotiating';
  private readonly account: MemoryAccount;
  private readonly budget: MemoryBudget;
  private parser = new ClientParser((h) => this.payloadFor(h));
  private exp: ExportEntry | undefined;
  private flags = 0;
  private structured = false;
  private noZeroes = false;
  private tlsActive = false;
  private blockSizeAgreed = false;
  private contexts: MetaContext[] = [];
  private contextsFor: ExportEntry | undefined;
  private optionBusy = false;
  /** Options this client may still send before entering transmission. */
  private optionsLeft = MAX_OPTIONS;
  private listed = false;
  /** Reserved for the option being answered; its replies use it up. */
  private optionCredit = 0;
  private inFlight = 0;
  private pumping = false;
  private minimumBlock = 1;
  /** A message parsed while its memory could not be reserved: it goes first once memory is released. */
  private waiting: ClientMessage | undefined;
  /** The last reservation refused (set by payloadFor, which the parser calls). */
  private memoryBlocked = false;
  /** Since when the connection has been waiting for memory that others hold (undefined: it is not). */
  private memoryWaitSince: number | undefined;
  /** Reserved by payloadFor for the write whose payload is arriving. */
  private writeCost = 0;
  /** While answering buffered requests at shutdown, writes are refused rather than received. */
  private refusingWrites = false;
  /** Reads of contiguous ranges parsed in this pump, served together when it ends. */
  private batch: ReadBatch | undefined;
  private batchScheduled = false;
  /** Replies are corked until the event loop's poll phase is over, then go out in one writev. */
  private corked = false;
  /** Replies handed to the socket and not yet written, and when the last one was. */
  private unsent = 0;
  private writeProgressAt = now();
  /** What the socket's handle had left to write when last looked at (see sampleWriteQueue). */
  private writeQueue = 0;
  /** When bytes last arrived, and when the connection last did anything at all. */
  private dataAt = now();
  private activityAt = now();
  private readonly connectedAt = now();
  private socketClosed = false;
  /** Once closed, the whole account was returned: late write callbacks return nothing more. */
  private accountClosed = false;
  private closeReason = '';
  private handshakeTimer: NodeJS.Timeout | undefined;
  private closeTimer: NodeJS.Timeout | undefined;
  private resolveClosed!: () => void;
  private readonly wakeFn = () => this.wake();

  constructor(
    socket: Socket,
    private readonly host: ConnectionHost,
    id: number,
  ) {
    this.id = id;
    this.socket = socket;
    this.budget = host.budget;
    this.account = new MemoryAccount(host.limits.maxConnectionMemory);
    const tcp = socket.remoteAddress !== undefined;
    this.remote = tcp ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix socket client';
    this.peer = tcp ? socket.remoteAddress!.replace(/^::ffff:/, '') : 'unix';
    this.closed = new Promise((resolve) => (this.resolveClosed = resolve));
  }

  get exportName(): string | undefined {
    return this.exp?.name;
  }

  get state(): Phase {
    return this.phase;
  }

  get requestsInFlight(): number {
    return this.inFlight;
  }

  /** Bytes of the server's memory budget this connection holds. */
  get memory(): number {
    return this.account.held;
  }

  get tls(): boolean {
    return this.tlsActive;
  }

  get closing(): boolean {
    return this.phase === 'closing' || this.phase === 'closed';
  }

  start(): void {
    this.attachSocket(this.socket);
    this.handshakeTimer = setTimeout(
      () => this.beginClose(`negotiation not finished within ${this.host.limits.handshakeTimeoutMs} ms`, true),
      this.host.limits.handshakeTimeoutMs,
    );
    this.handshakeTimer.unref();
    this.host.event({ type: 'connect', id: this.id, remote: this.remote });
    this.send([encodeHandshake(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]);
  }

  /**
   * Stops taking requests, answers those already received with ESHUTDOWN, lets running ones finish and
   * closes. Resolves when closed.
   */
  shutdown(reason = 'server shutting down'): Promise<void> {
    if (this.phase === 'negotiating') {
      this.beginClose(reason, true);
    } else if (this.phase === 'transmission') {
      this.refuseBuffered();
      this.beginClose(reason);
    }
    return this.closed;
  }

  /** Drops the connection at once (to make room for another client, or because it stalled). */
  drop(reason: string): void {
    this.beginClose(reason, true);
  }

  /** Called when memory was released somewhere: a connection waiting for it tries again. */
  wake(): void {
    if (this.phase === 'negotiating' || this.phase === 'transmission') this.pump();
  }

  /** What the connection is doing (for the server's eviction and idle policies). */
  activity(at = now()): Activity {
    if (this.phase === 'negotiating') return { kind: 'negotiating', sinceMs: at - this.connectedAt };
    if (this.stalledFor(at) >= STALLED_AFTER_MS) return { kind: 'stalled' };
    if (this.inFlight > 0 || this.unsent > 0 || this.parser.receiving || this.waiting || this.memoryBlocked) {
      return { kind: 'busy' };
    }
    return { kind: 'idle', sinceMs: at - this.activityAt };
  }

  /** How long the connection has owed progress (a payload, taking its replies) without making any; 0 if it owes none. */
  stalledFor(at = now()): number {
    if (this.closing) return 0;
    this.sampleWriteQueue(at);
    let ms = 0;
    if (this.unsent > 0) ms = at - this.writeProgressAt;
    if (this.parser.receiving) ms = Math.max(ms, at - this.dataAt);
    return ms;
  }

  /**
   * Whether the connection waits for memory that other connections hold, through no fault of its own
   * (it has not stalled itself): for that long, in ms, or undefined.
   */
  starvingFor(at = now()): number | undefined {
    if (this.memoryWaitSince === undefined || this.closing) return undefined;
    return this.stalledFor(at) >= PRESSURE_STALL_MS ? undefined : at - this.memoryWaitSince;
  }

  /** Drops a client that owes progress and made none for the stall timeout (the server calls this often). */
  checkStall(at = now()): void {
    if (this.closing) return;
    this.sampleWriteQueue(at);
    const limit = this.host.limits.stallTimeoutMs;
    if (this.unsent > 0 && at - this.writeProgressAt >= limit) {
      this.beginClose(`the client took none of its replies for ${limit / 1000} s`, true);
      return;
    }
    const r = this.parser.receiving;
    if (r && at - this.dataAt >= limit) {
      this.beginClose(
        `the client sent nothing more of a ${r.header.length}-byte write payload (${r.received} bytes received) for ${limit / 1000} s`,
        true,
      );
    }
  }

  /**
   * Write callbacks come when a whole writev is done, which takes long for big replies on a slow link:
   * the handle's queue shrinking (libuv's count of bytes not yet taken by the kernel) is progress too.
   * Read where Node exposes it; without it, only whole writes count.
   */
  private sampleWriteQueue(at: number): void {
    const handle = (this.socket as unknown as { _handle?: { writeQueueSize?: unknown } })._handle;
    const q = handle?.writeQueueSize;
    if (typeof q !== 'number') return;
    if (q < this.writeQueue) this.writeProgressAt = at;
    this.writeQueue = q;
  }

  // ---------------------------------------------------------------------------------------------
  // The socket (replaced by its TLS socket after STARTTLS)

  private attachSocket(s: Socket): void {
    this.socket = s;
    const on = (event: string, fn: Listener) => {
      s.on(event, fn);
      this.listeners.push({ event, fn });
    };
    on('data', (chunk: Buffer) => {
      this.dataAt = now();
      this.parser.push(chunk);
      this.pump();
    });
    on('end', () => this.beginClose('client closed the connection'));
    on('error', (err: NodeJS.ErrnoException) => this.beginClose(`socket error: ${err.code ?? err.message}`, true));
    on('close', () => {
      this.socketClosed = true;
      if (!this.closing) this.beginClose('connection lost', true);
      this.maybeFinish();
    });
  }

  /** Stops listening to the plain socket's data before TLS takes it over ('close' still counts). */
  private detachSocket(): void {
    const keep = this.listeners.filter((l) => l.event === 'close');
    for (const { event, fn } of this.listeners.splice(0)) if (event !== 'close') this.socket.off(event, fn);
    this.listeners.push(...keep);
    // Errors of the plain socket now reach the TLS socket; this keeps a late one from being unhandled.
    this.socket.on('error', () => undefined);
  }

  // ---------------------------------------------------------------------------------------------
  // Reading, memory and flow control

  private reserve(bytes: number, limit?: number): boolean {
    return this.budget.tryReserve(this.account, bytes, limit);
  }

  private release(bytes: number): void {
    if (!this.accountClosed) this.budget.release(this.account, bytes);
  }

  private charge(bytes: number): void {
    if (!this.accountClosed) this.budget.charge(this.account, bytes);
  }

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    let blocked = false;
    let needMemory = false;
    try {
      while (this.phase === 'negotiating' || this.phase === 'transmission') {
        if (this.waiting) {
          if (!this.admit(this.waiting)) {
            blocked = needMemory = true;
            break;
          }
          this.waiting = undefined;
          continue;
        }
        if (this.phase === 'negotiating' && this.optionBusy) {
          blocked = true;
          break;
        }
        // A payload whose memory is reserved is always received; new requests wait for a free slot.
        if (this.phase === 'transmission' && this.inFlight >= MAX_REQUESTS_IN_FLIGHT && !this.parser.receiving) {
          blocked = true;
          break;
        }
        this.memoryBlocked = false;
        const msg = this.parser.next();
        if (!msg) {
          blocked = needMemory = this.memoryBlocked;
          break;
        }
        this.activityAt = now();
        if (!this.admit(msg)) {
          this.waiting = msg;
          blocked = needMemory = true;
          break;
        }
      }
    } catch (err) {
      const message = err instanceof Error ? err.message : String(err);
      this.host.event({ type: 'protocolError', id: this.id, message });
      this.beginClose(`protocol error: ${message}`, true);
    } finally {
      this.pumping = false;
      // Reads that arrive in other chunks of this poll phase may still join the batch.
      if (this.batch && !this.batchScheduled) {
        this.batchScheduled = true;
        setImmediate(() => {
          this.batchScheduled = false;
          this.flushBatch();
        });
      }
    }
    if (this.closing) return;
    // Waiting for its own replies to drain is its own business; waiting for others' memory is starving.
    if (needMemory && this.account.refusedBy === 'server') this.memoryWaitSince ??= now();
    else this.memoryWaitSince = undefined;
    if (blocked) {
      this.socket.pause();
      if (needMemory) this.budget.waitFor(this.wakeFn);
    } else {
      this.socket.resume();
    }
  }

  /** Takes one message if its memory can be reserved (false: it must wait). */
  private admit(msg: ClientMessage): boolean {
    if (this.phase === 'negotiating') {
      if (msg.type === 'clientFlags') {
        this.negotiate(msg);
        return true;
      }
      if (this.optionsLeft-- === 0) {
        throw new NbdProtocolError(`more than ${MAX_OPTIONS} options without entering transmission`);
      }
      if (!this.reserve(OPTION_ESTIMATE, NEGOTIATION_MEMORY)) {
        this.optionsLeft++; // not taken yet
        return false;
      }
      this.optionCredit = OPTION_ESTIMATE;
      try {
        this.negotiate(msg);
      } finally {
        if (!this.optionBusy) this.returnCredit();
      }
      return true;
    }
    return this.request(msg);
  }

  /** The part of an option's reservation its replies did not use. */
  private returnCredit(): void {
    const left = this.optionCredit;
    this.optionCredit = 0;
    this.release(left);
  }

  /**
   * Writes one reply and charges what it costs (its buffers, as the socket holds them) until the socket
   * has written it. Pooled buffers go back to the pool then.
   */
  private send(buffers: Buffer[], o: SendOptions = {}): void {
    const s = this.socket;
    let prepaid = o.prepaid;
    if (prepaid === undefined) {
      prepaid = this.optionCredit;
      this.optionCredit = 0;
    }
    let cost = 0;
    for (const b of buffers) cost += bufferCost(b.length);
    // The data slices were counted at their length: a chunk holds CHUNK bytes whatever it carries.
    for (const c of o.chunks ?? []) cost += CHUNK - c.length;
    this.charge(cost - prepaid);
    const done = () => {
      if (o.chunks) this.budget.giveBack(o.chunks);
      this.release(cost);
      o.onWritten?.();
    };
    if (s.destroyed || !s.writable) {
      done();
      return;
    }
    if (!this.corked) {
      this.corked = true;
      s.cork();
      setImmediate(() => {
        this.corked = false;
        s.uncork();
      });
    }
    if (this.unsent++ === 0) this.writeProgressAt = now();
    const written = () => {
      this.unsent--;
      this.writeProgressAt = this.activityAt = now();
      done();
    };
    for (let i = 0; i < buffers.length; i++) s.write(buffers[i], i === buffers.length - 1 ? written : undefined);
  }

  // ---------------------------------------------------------------------------------------------
  // Negotiation

  private negotiate(msg: ClientMessage): void {
    switch (msg.type) {
      case 'clientFlags': {
        if (msg.flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) {
          throw new NbdProtocolError(`unknown client flags 0x${msg.flags.toString(16)}`);
        }
        this.noZeroes = (msg.flags & FLAG_C_NO_ZEROES) !== 0;
        // TLS needs fixed newstyle (the protocol): such a client can never meet this server's policy.
        if (this.host.tls && !(msg.flags & FLAG_C_FIXED_NEWSTYLE)) {
          throw new NbdProtocolError('this server requires TLS, which needs fixed newstyle negotiation');
        }
        return;
      }
      case 'oversizeOption': {
        if (msg.option === OPT.EXPORT_NAME) throw new NbdProtocolError(`export name of ${msg.length} bytes`);
        if (this.tlsRequired()) return this.refuseWithoutTls(msg.option);
        this.optionReply(
          msg.option,
          REP.ERR_TOO_BIG,
          `${optionName(msg.option)} data of ${msg.length} bytes is over the ${MAX_OPTION_DATA}-byte limit`,
        );
        return;
      }
      case 'option': {
        this.optionBusy = true;
        this.option(msg.option, msg.data).then(
          () => {
            this.optionBusy = false;
            this.returnCredit();
            this.pump();
          },
          (err: unknown) => {
            this.optionBusy = false;
            this.returnCredit();
            const message = err instanceof Error ? err.message : String(err);
            if (err instanceof NbdProtocolError) this.host.event({ type: 'protocolError', id: this.id, message });
            this.beginClose(`negotiation failed: ${message}`, true);
          },
        );
        return;
      }
      default:
        throw new NbdProtocolError(`unexpected ${msg.type} during negotiation`);
    }
  }

  private tlsRequired(): boolean {
    return this.host.tls !== undefined && !this.tlsActive;
  }

  /** FORCEDTLS: before STARTTLS, every option but ABORT is answered NBD_REP_ERR_TLS_REQD. */
  private refuseWithoutTls(option: number): void {
    this.optionReply(option, REP.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first');
  }

  private optionReply(option: number, type: number, message?: string): void {
    this.send([encodeOptionReply(option, type, message ? Buffer.from(message, 'utf8') : undefined)]);
  }

  private async option(option: number, data: Buffer): Promise<void> {
    if (this.tlsRequired() && option !== OPT.STARTTLS && option !== OPT.ABORT) {
      // EXPORT_NAME cannot answer an error: the session ends.
      if (option === OPT.EXPORT_NAME) throw new TidemarkError('UNAUTHORIZED', 'client chose an export without TLS');
      return this.refuseWithoutTls(option);
    }
    switch (option) {
      case OPT.EXPORT_NAME: {
        const name = data.toString('utf8');
        const exp = data.length <= MAX_STRING ? this.host.findExport(name) : undefined;
        // This option cannot answer an error: the session ends.
        if (!exp) throw new TidemarkError('NOT_FOUND', `client asked for unknown export "${name}"`);
        this.enterTransmission(exp);
        this.send([encodeExportNameReply(exp.device.size, this.flags, this.noZeroes)]);
        return;
      }
      case OPT.ABORT:
        this.optionReply(option, REP.ACK);
        this.beginClose('client aborted the negotiation');
        return;
      case OPT.LIST: {
        if (data.length > 0) return this.optionReply(option, REP.ERR_INVALID, 'NBD_OPT_LIST takes no data');
        const exports = this.host.listExports();
        // Once: a client may then ask about each export.
        if (!this.listed) this.optionsLeft += MAX_OPTIONS * exports.length;
        this.listed = true;
        const replies = exports.map((e) =>
          encodeOptionReply(option, REP.SERVER, encodeServerReplyData(e.name, e.description)),
        );
        this.send([...replies, encodeOptionReply(option, REP.ACK)]);
        return;
      }
      case OPT.STARTTLS:
        return this.startTls(data);
      case OPT.INFO:
      case OPT.GO:
        return this.info(option, data);
      case OPT.STRUCTURED_REPLY:
        if (data.length > 0) return this.optionReply(option, REP.ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        if (this.structured) return this.optionReply(option, REP.ERR_INVALID, 'structured replies already negotiated');
        this.structured = true;
        return this.optionReply(option, REP.ACK);
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.metaContext(option, data);
      default:
        return this.optionReply(option, REP.ERR_UNSUP, `${optionName(option)} is not supported`);
    }
  }

  /** NBD_OPT_STARTTLS: ACK in the clear, then the TLS handshake on the same socket; no way back. */
  private async startTls(data: Buffer): Promise<void> {
    const option = OPT.STARTTLS;
    const tls = this.host.tls;
    if (!tls) return this.optionReply(option, REP.ERR_POLICY, 'TLS is not offered by this server');
    if (this.tlsActive) return this.optionReply(option, REP.ERR_INVALID, 'TLS is already active');
    if (data.length > 0) return this.optionReply(option, REP.ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    // A client must wait for the ACK: bytes already sent would be plaintext injected into the TLS session.
    if (this.parser.buffered > 0) throw new NbdProtocolError('data sent after NBD_OPT_STARTTLS before its reply');
    await new Promise<void>((resolve) => this.send([encodeOptionReply(option, REP.ACK)], { onWritten: resolve }));
    if (this.closing) return;
    const plain = this.socket;
    this.detachSocket();
    const secure = await tls.upgrade(plain, this.host.limits.handshakeTimeoutMs);
    if (this.closing) {
      secure.destroy();
      return;
    }
    this.tlsActive = true;
    this.attachSocket(secure);
  }

  private lookup(option: number, name: string): ExportEntry | undefined {
    const exp = this.host.findExport(name);
    if (exp) return exp;
    const names = this.host.listExports().map((e) => e.name);
    const message =
      name === ''
        ? `no default export: this server has ${names.length} exports, name one (${names.join(', ')})`
        : `no export named "${name}"`;
    this.optionReply(option, REP.ERR_UNKNOWN, message);
    return undefined;
  }
  private async info(option: number, data: Buffer): Promise<void> {
    let req;
    try {
      req = decodeInfoRequest(data);
    } catch (err) {
      return this.optionReply(option, REP.ERR_INVALID, (err as Error).message);
    }
    const exp = this.lookup(option, req.name);
    if (!exp) return;
    const flags = this.transmissionFlags(exp);
    const { minimum, preferred, maximum } = blockSizes(exp.device);
    const out = [
      encodeOptionReply(option, REP.INFO, encodeInfoReplyData({ info: INFO.EXPORT, size: exp.device.size, flags })),
    ];
    if (req.requests.includes(INFO.NAME)) {
      out.push(encodeOptionReply(option, REP.INFO, encodeInfoReplyData({ info: INFO.NAME, name: exp.name })));
    }
    if (req.requests.includes(INFO.DESCRIPTION) && exp.description) {
      out.push(
        encodeOptionReply(
          option,
          REP.INFO,
          encodeInfoReplyData({ info: INFO.DESCRIPTION, description: exp.description }),
        ),
      );
    }
    // Sent whether asked or not (allowed); enforced only for clients that asked.
    out.push(
      encodeOptionReply(option, REP.INFO, encodeInfoReplyData({ info: INFO.BLOCK_SIZE, minimum, preferred, maximum })),
    );
    out.push(encodeOptionReply(option, REP.ACK));
    if (option === OPT.GO) {
      this.blockSizeAgreed = req.requests.includes(INFO.BLOCK_SIZE);
      this.enterTransmission(exp);
    }
    this.send(out);
  }

  private async metaContext(option: number, data: Buffer): Promise<void> {
    if (!this.structured) {
      return this.optionReply(option, REP.ERR_INVALID, 'negotiate structured replies before meta contexts');
    }
    let req;
    try {
      req = decodeMetaContextRequest(data);
    } catch (err) {
      return this.optionReply(option, REP.ERR_INVALID, (err as Error).message);
    }
    const exp = this.lookup(option, req.name);
    if (!exp) return;
    const bitmaps = await exp.device.dirtyContexts();
    const all = [CONTEXT_BASE_ALLOCATION, ...bitmaps.map((b) => DIRTY_BITMAP_PREFIX + b)];
    if (option === OPT.LIST_META_CONTEXT) {
      const names = new Set<string>();
      for (const q of req.queries.length === 0 ? [''] : req.queries) {
        for (const n of matchContexts(q, all, true)) names.add(n);
      }
      const replies = [...names].map((n) =>
        encodeOptionReply(option, REP.META_CONTEXT, encodeMetaContextReplyData(0, n)),
      );
      this.send([...replies, encodeOptionReply(option, REP.ACK)]);
      return;
    }
    // SET replaces the selection; names not offered are ignored (as qemu-nbd does), wildcards select nothing.
    const selected: MetaContext[] = [];
    for (const q of req.queries) {
      for (const n of matchContexts(q, all, false)) {
        if (selected.some((c) => c.name === n)) continue;
        selected.push({
          id: selected.length + 1,
          name: n,
          bitmap: n === CONTEXT_BASE_ALLOCATION ? undefined : n.slice(DIRTY_BITMAP_PREFIX.length),
        });
      }
    }
    this.contexts = selected;
    this.contextsFor = exp;
    const replies = selected.map((c) =>
      encodeOptionReply(option, REP.META_CONTEXT, encodeMetaContextReplyData(c.id, c.name)),
    );
    this.send([...replies, encodeOptionReply(option, REP.ACK)]);
  }

  private transmissionFlags(exp: ExportEntry): number {
    let f = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.CAN_MULTI_CONN;
    if (exp.readOnly) f |= TF.READ_ONLY;
    else f |= TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO;
    if (this.structured) f |= TF.SEND_DF;
    return f;
  }

  private enterTransmission(exp: ExportEntry): void {
    this.exp = exp;
    this.flags = this.transmissionFlags(exp);
    // Contexts chosen for another export do not carry over (the client must not use them).
    if (this.contextsFor !== exp) this.contexts = [];
    this.minimumBlock = blockSizes(exp.device).minimum;
    this.phase = 'transmission';
    this.parser.phase = 'transmission';
    clearTimeout(this.handshakeTimer);
    this.host.attach(this, exp);
    this.host.event({ type: 'export', id: this.id, export: exp.name });
  }

  // ---------------------------------------------------------------------------------------------
  // Transmission

  /** What a request reserves before it is read or run: its reply, and the data a read or write holds. */
  private costOf(h: RequestHeader): number {
    switch (h.command) {
      case CMD.READ:
      case CMD.WRITE:
        return REPLY_ESTIMATE + dataCost(h.length);
      case CMD.BLOCK_STATUS: {
        const descriptors = Math.min(MAX_DESCRIPTORS, Math.ceil(h.length / 512) + 1);
        return REPLY_ESTIMATE + Math.max(1, this.contexts.length) * (BUFFER_OVERHEAD + descriptors * DESCRIPTOR_COST);
      }
      default:
        return REPLY_ESTIMATE;
    }
  }

  /** The parser asks where a write's payload goes: refused (null), not now (undefined), or a reserved buffer. */
  private payloadFor(h: RequestHeader): Buffer[] | null | undefined {
    if (this.refusingWrites || this.validate(h)) return null;
    const cost = this.costOf(h);
    if (!this.reserve(cost)) {
      this.memoryBlocked = true;
      return undefined;
    }
    this.writeCost = cost;
    this.dataAt = now(); // the stall clock of the payload starts when the server starts reading it
    return this.budget.takeChunks(h.length);
  }

  /** Takes one message of the transmission phase, if its memory can be reserved. */
  private request(msg: ClientMessage): boolean {
    if (msg.type !== 'request' && msg.type !== 'oversizeRequest' && msg.type !== 'refusedWrite') {
      throw new NbdProtocolError(`unexpected ${msg.type} during transmission`);
    }
    const h = msg.header;
    if (msg.type === 'request' && h.command === CMD.WRITE && h.length > 0) {
      // Its memory was reserved before its payload was read (payloadFor): the reply's share is what
      // remains beside the payload buffer.
      const replyCost = this.writeCost - dataCost(h.length);
      this.writeCost = 0;
      this.host.count(h.command);
      this.counters.requests++;
      this.run(h, msg.data, replyCost);
      return true;
    }
    if (h.command === CMD.DISC && msg.type === 'request') {
      this.host.count(h.command);
      this.beginClose('client disconnected');
      return true;
    }
    // Refused requests reserve only their error reply (a read of 4 GiB is refused, not waited for).
    // A refused write was refused by validate() before its payload was skipped: the same answer again.
    const refusal =
      msg.type === 'oversizeRequest'
        ? { errno: NBD_ERR.EOVERFLOW, message: `a write of ${h.length} bytes is over the ${MAX_PAYLOAD}-byte maximum` }
        : (this.validate(h) ??
          (msg.type === 'refusedWrite' ? { errno: NBD_ERR.EINVAL, message: 'the write was refused' } : undefined));
    const cost = refusal ? REPLY_ESTIMATE : this.costOf(h);
    if (!this.reserve(cost)) return false;
    this.host.count(h.command);
    this.counters.requests++;
    if (refusal) {
      this.counters.errors++;
      this.replyError(h, refusal.errno, refusal.message, cost);
      return true;
    }
    this.run(h, msg.type === 'request' ? msg.data : undefined, cost);
    return true;
  }

  /** Runs a request; `cost` was reserved for its reply (and for a read, its data); a write's payload is paid apart. */
  private run(h: RequestHeader, data: Buffer[] | undefined, cost: number): void {
    if (h.command === CMD.READ && h.length > 0) return this.addToBatch(h, cost);
    this.inFlight++;
    // A write's payload chunks are returned once the device has them.
    const payloadCost = data && data.length > 0 ? dataCost(h.length) : 0;
    const prepaid = cost;
    this.execute(h, data)
      .then(
        (reply) => this.send(reply, { prepaid }),
        (err: unknown) => {
          const { errno, message } = nbdErrorFor(err);
          this.counters.errors++;
          this.replyError(h, errno, message, prepaid);
        },
      )
      .finally(() => {
        if (payloadCost > 0) {
          this.budget.giveBack(data!);
          this.release(payloadCost);
        }
        this.inFlight--;
        this.activityAt = now();
        if (this.phase === 'transmission') this.pump();
        else this.maybeFinish();
      });
  }

  private addToBatch(h: RequestHeader, cost: number): void {
    this.inFlight++;
    const df = (h.flags & CMD_FLAG.DF) !== 0;
    const b = this.batch;
    if (b && b.end === h.offset && b.df === df && b.end - b.start + h.length <= MAX_COALESCED_READ) {
      b.reqs.push(h);
      b.costs.push(cost);
      b.end += h.length;
      return;
    }
    this.flushBatch();
    this.batch = { reqs: [h], costs: [cost], start: h.offset, end: h.offset + h.length, df };
  }

  /** Starts the pending read batch; if it fails as a whole, its reads are retried one by one. */
  private flushBatch(): void {
    const b = this.batch;
    if (!b) return;
    this.batch = undefined;
    const dev = this.exp!.device;
    const fail = (h: RequestHeader, cost: number, err: unknown) => {
      const { errno, message } = nbdErrorFor(err);
      this.counters.errors++;
      this.replyError(h, errno, message, cost);
    };
    const single = (h: RequestHeader, cost: number) =>
      this.readBatch(dev, { reqs: [h], costs: [cost], start: h.offset, end: h.offset + h.length, df: b.df });
    this.readBatch(dev, b)
      .catch(async (err: unknown) => {
        if (b.reqs.length === 1) return fail(b.reqs[0], b.costs[0], err);
        await Promise.all(b.reqs.map((h, i) => single(h, b.costs[i]).catch((e: unknown) => fail(h, b.costs[i], e))));
      })
      .finally(() => {
        this.inFlight -= b.reqs.length;
        this.activityAt = now();
        if (this.phase === 'transmission') this.pump();
        else this.maybeFinish();
      });
  }
  private validate(h: RequestHeader): { errno: number; message: string } | undefined {
    const exp = this.exp!;
    const size = exp.device.size;
    const name = commandName(h.command);
    let allowed: number = CMD_FLAG.FUA;
    switch (h.command) {
      case CMD.READ:
        if (this.structured) allowed |= CMD_FLAG.DF;
        break;
      case CMD.WRITE_ZEROES:
        allowed |= CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO;
        break;
      case CMD.BLOCK_STATUS:
        allowed |= CMD_FLAG.REQ_ONE;
        break;
      case CMD.WRITE:
      case CMD.FLUSH:
      case CMD.TRIM:
        break;
      default:
        return { errno: NBD_ERR.EINVAL, message: `unknown command ${h.command}` };
    }
    if (h.flags & ~allowed) {
      return { errno: NBD_ERR.EINVAL, message: `flags 0x${h.flags.toString(16)} are not valid for ${name}` };
    }
    const writes = h.command === CMD.WRITE || h.command === CMD.TRIM || h.command === CMD.WRITE_ZEROES;
    if (writes && exp.readOnly) return { errno: NBD_ERR.EPERM, message: `export "${exp.name}" is read-only` };
    if (h.command === CMD.FLUSH) return undefined;
    if (h.command === CMD.READ && h.length > MAX_PAYLOAD) {
      return {
        errno: NBD_ERR.EOVERFLOW,
        message: `a read of ${h.length} bytes is over the ${MAX_PAYLOAD}-byte maximum`,
      };
    }
    if (h.offset > size || h.length > size - h.offset) {
      // The protocol asks for ENOSPC on writes past the end, EINVAL otherwise.
      const errno = h.command === CMD.WRITE || h.command === CMD.WRITE_ZEROES ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL;
      return { errno, message: `${name} of [${h.offset}, +${h.length}) is past the end of the ${size}-byte export` };
    }
    if (h.command === CMD.BLOCK_STATUS) {
      if (this.contexts.length === 0) {
        return { errno: NBD_ERR.EINVAL, message: 'NBD_CMD_BLOCK_STATUS without a selected meta context' };
      }
      if (h.length === 0) return { errno: NBD_ERR.EINVAL, message: 'NBD_CMD_BLOCK_STATUS of length 0' };
      return undefined;
    }
    if (this.blockSizeAgreed) {
      const min = this.minimumBlock;
      if (h.offset % min !== 0 || h.length % min !== 0) {
        return {
          errno: NBD_ERR.EINVAL,
          message: `${name} of [${h.offset}, +${h.length}) is not aligned to the ${min}-byte minimum block size`,
        };
      }
    }
    return undefined;
  }

  /** Runs one request (reads of length > 0 go through readBatch) and returns its reply. */
  private async execute(h: RequestHeader, data: Buffer[] | undefined): Promise<Buffer[]> {
    const dev = this.exp!.device;
    const fua = (h.flags & CMD_FLAG.FUA) !== 0;
    switch (h.command) {
      case CMD.READ: // length 0 (others are batched)
        return this.okReply(h);
      case CMD.WRITE:
        if (data!.length === 1) await dev.write(h.offset, data![0], { fua });
        else await writeChunks(dev, h.offset, data!, fua);
        this.counters.bytesWritten += h.length;
        return this.okReply(h);
      case CMD.FLUSH:
        await dev.flush();
        return this.okReply(h);
      case CMD.TRIM:
        if (h.length > 0) await dev.trim(h.offset, h.length, { fua });
        return this.okReply(h);
      case CMD.WRITE_ZEROES:
        if (h.length > 0) {
          await dev.writeZeroes(h.offset, h.length, {
            fua,
            noHole: (h.flags & CMD_FLAG.NO_HOLE) !== 0,
            fast: (h.flags & CMD_FLAG.FAST_ZERO) !== 0,
          });
        }
        return this.okReply(h);
      case CMD.BLOCK_STATUS:
        return this.blockStatus(dev, h);
      default:
        throw new TidemarkError('INVALID_ARGUMENT', `unknown command ${h.command}`);
    }
  }

  /**
   * Serves a batch of contiguous reads: the data runs are read into chunks laid end to end (a run may
   * go on from one chunk into the next), one device read per chunk-sized piece. With structured
   * replies, ranges that read as zeros go out as OFFSET_HOLE chunks (12 bytes instead of their zeros)
   * unless the client asked for one chunk (DF). Nothing is sent unless every read succeeded.
   */
  private async readBatch(dev: BlockDevice, b: ReadBatch): Promise<void> {
    const holes = this.structured && !b.df;
    const length = b.end - b.start;
    const runs: StatusDescriptor[] = holes
      ? await this.collect((o, n) => allocationQuery(dev, o, n), b.start, length, false, Infinity).catch(() => [
          { length, flags: 0 },
        ])
      : [{ length, flags: 0 }];
    // Whatever the status did not cover is read as data: every byte asked for must be answered.
    const covered = runs.reduce((n, r) => n + r.length, 0);
    if (covered < length) runs.push({ length: length - covered, flags: 0 });
    // Where each run is on the disk and, for data, where its bytes are in the chunks.
    let at = b.start;
    let dataBytes = 0;
    const segments = runs.map((r) => {
      const zero = holes && (r.flags & STATE_ZERO) !== 0;
      const seg = { at, end: at + r.length, data: zero ? -1 : dataBytes };
      at += r.length;
      if (!zero) dataBytes += r.length;
      return seg;
    });
    const chunks = this.budget.takeChunks(dataBytes);
    const reads: Promise<void>[] = [];
    for (const seg of segments) {
      if (seg.data < 0) continue;
      for (const [i, from, to] of chunkRanges(seg.data, seg.data + seg.end - seg.at)) {
        reads.push(readPiece(dev, chunks[i].subarray(from, to), seg.at + i * CHUNK + from - seg.data));
      }
    }
    const failed = (await Promise.allSettled(reads)).find((r) => r.status === 'rejected');
    if (failed) {
      this.budget.giveBack(chunks);
      throw (failed as PromiseRejectedResult).reason;
    }
    const slices = (from: number, to: number) => chunkRanges(from, to).map(([i, f, t]) => chunks[i].subarray(f, t));
    const out: Buffer[] = [];
    for (const h of b.reqs) {
      const from = h.offset;
      const to = h.offset + h.length;
      const parts = segments.filter((p) => p.at < to && p.end > from);
      if (!this.structured) out.push(encodeSimpleReply(0, h.handle));
      parts.forEach((p, i) => {
        const s0 = Math.max(p.at, from);
        const s1 = Math.min(p.end, to);
        const flags = i === parts.length - 1 ? REPLY_FLAG_DONE : 0;
        if (p.data < 0) {
          out.push(encodeOffsetHole(flags, h.handle, s0, s1 - s0));
          return;
        }
        if (this.structured) out.push(encodeOffsetDataHeader(flags, h.handle, s0, s1 - s0));
        out.push(...slices(p.data + s0 - p.at, p.data + s1 - p.at));
      });
    }
    this.counters.bytesRead += length;
    this.send(out, { chunks, prepaid: b.costs.reduce((n, c) => n + c, 0) });
  }

  private async blockStatus(dev: BlockDevice, h: RequestHeader): Promise<Buffer[]> {
    const reqOne = (h.flags & CMD_FLAG.REQ_ONE) !== 0;
    const replies = await Promise.all(
      this.contexts.map(async (c) => {
        const query =
          c.bitmap === undefined
            ? (o: number, n: number) => allocationQuery(dev, o, n)
            : (o: number, n: number) => dirtyQuery(dev, c.bitmap!, o, n);
        return { id: c.id, descriptors: await this.collect(query, h.offset, h.length, reqOne, MAX_DESCRIPTORS) };
      }),
    );
    return replies.map((r, i) =>
      encodeBlockStatusChunk(i === replies.length - 1 ? REPLY_FLAG_DONE : 0, h.handle, r.id, r.descriptors),
    );
  }

  /**
   * Status descriptors for [offset, offset+length) from a device query that answers contiguous extents
   * covering at least the first byte asked; equal neighbours are merged.
   */
  private async collect(
    query: (offset: number, length: number) => Promise<{ offset: number; length: number; flags: number }[]>,
    offset: number,
    length: number,
    reqOne: boolean,
    maxDescriptors: number,
  ): Promise<StatusDescriptor[]> {
    const out: StatusDescriptor[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end && out.length < maxDescriptors) {
      const before = pos;
      for (const e of await query(pos, end - pos)) {
        if (e.offset > pos) break; // a gap: the device broke its contract; report what is known
        const to = Math.min(e.offset + e.length, end);
        if (to <= pos) continue;
        const last = out[out.length - 1];
        if (last && last.flags === e.flags) last.length += to - pos;
        else if (out.length < maxDescriptors) out.push({ length: to - pos, flags: e.flags });
        else break;
        pos = to;
      }
      if (pos === before || reqOne) break;
    }
    if (out.length === 0) {
      throw new TidemarkError('IO_ERROR', `the device reported no status at offset ${offset}`);
    }
    if (reqOne) out.length = 1;
    return out;
  }

  private okReply(h: RequestHeader): Buffer[] {
    return [this.structured ? encodeNoneChunk(h.handle) : encodeSimpleReply(0, h.handle)];
  }

  private replyError(h: RequestHeader, errno: number, message: string, prepaid = 0): void {
    this.send(
      [
        this.structured
          ? encodeErrorChunk(REPLY_FLAG_DONE, h.handle, errno, message)
          : encodeSimpleReply(errno, h.handle),
      ],
      { prepaid },
    );
  }

  /** At shutdown: answers every request already received in full with ESHUTDOWN. */
  private refuseBuffered(): void {
    const refuse = (h: RequestHeader) => this.replyError(h, NBD_ERR.ESHUTDOWN, 'the server is shutting down');
    const w = this.waiting;
    this.waiting = undefined;
    if (w && w.type !== 'clientFlags' && 'header' in w && w.header.command !== CMD.DISC) refuse(w.header);
    this.refusingWrites = true;
    try {
      for (let msg = this.parser.next(); msg; msg = this.parser.next()) {
        if (msg.type === 'request' && msg.header.command === CMD.WRITE && msg.data && msg.data.length > 0) {
          // A payload that was being received when the shutdown came: its reservation goes back.
          this.release(this.writeCost);
          this.budget.giveBack(msg.data);
          this.writeCost = 0;
        }
        if ('header' in msg && msg.header.command !== CMD.DISC) refuse(msg.header);
      }
    } catch {
      // garbage after the last good request: the connection closes anyway
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Closing

  /** Stops reading; once no request runs, ends the socket (at once when `hard`). */
  private beginClose(reason: string, hard = false): void {
    if (this.closing) {
      if (hard && !this.socket.destroyed) this.socket.destroy();
      return;
    }
    this.phase = 'closing';
    this.closeReason = reason;
    clearTimeout(this.handshakeTimer);
    this.socket.pause();
    // A request still waiting for memory never started: answer it (nothing was reserved).
    const w = this.waiting;
    this.waiting = undefined;
    if (!hard && w && (w.type === 'request' || w.type === 'oversizeRequest' || w.type === 'refusedWrite')) {
      if (w.header.command !== CMD.DISC) {
        this.replyError(w.header, NBD_ERR.ESHUTDOWN, `the connection is closing (${reason})`);
      }
    }
    if (hard) this.socket.destroy();
    this.maybeFinish();
  }

  private maybeFinish(): void {
    if (this.phase !== 'closing' || this.inFlight > 0) return;
    if (!this.socketClosed) {
      if (!this.closeTimer && !this.socket.destroyed) {
        this.socket.end();
        // A client that does not read its last replies does not hold the close up for ever.
        this.closeTimer = setTimeout(() => this.socket.destroy(), this.host.limits.closeTimeoutMs);
        this.closeTimer.unref();
      }
      return;
    }
    this.phase = 'closed';
    clearTimeout(this.closeTimer);
    // Whatever is still held (replies the socket never wrote, a half-received payload) is returned now.
    const partial = this.parser.abandonPayload();
    if (partial) this.budget.giveBack(partial);
    this.budget.release(this.account, this.account.held);
    this.accountClosed = true;
    this.host.detach(this);
    this.host.event({ type: 'disconnect', id: this.id, reason: this.closeReason });
    this.resolveClosed();
  }
}

/**
 * The largest preferred block size advertised: 1 MiB, the smallest VHDX block size, so an aligned
 * request of that size never spans two blocks. Clients size their requests by it (nbdcopy sends
 * requests of the preferred size and finds zeros at that granularity): 1 MiB requests cost the server
 * markedly less CPU than 256 KiB ones, while 2 MiB ones made nbdcopy write a half-empty disk's zeros
 * as data instead of NBD_CMD_WRITE_ZEROES.
 */
export const MAX_PREFERRED = 1024 * 1024;

/** Contiguous reads served together: [start, end) covers every request, in order. */
interface ReadBatch {
  reqs: RequestHeader[];
  start: number;
  end: number;
  df: boolean;
  /** What each request reserved from the memory budget. */
  costs: number[];
}

/** The block sizes advertised for a device: its sector, its preferred unit (≤ MAX_PREFERRED), MAX_PAYLOAD. */
export function blockSizes(dev: BlockDevice): { minimum: number; preferred: number; maximum: number } {
  const pow2 = (n: number) => n > 0 && Number.isInteger(n) && (n & (n - 1)) === 0;
  const minimum = pow2(dev.minimumBlockSize) && dev.minimumBlockSize <= 65536 ? dev.minimumBlockSize : 1;
  let preferred = Math.max(minimum, 512);
  while (preferred * 2 <= Math.min(dev.preferredBlockSize, MAX_PREFERRED)) preferred *= 2;
  return { minimum, preferred, maximum: MAX_PAYLOAD };
}

/** Context names a query matches. LIST: the namespace wildcards `base:`, `qemu:`, `qemu:dirty-bitmap:` and ''. */
export function matchContexts(query: string, available: string[], list: boolean): string[] {
  if (list && (query === '' || query === 'qemu:' || query === DIRTY_BITMAP_PREFIX || query === 'base:')) {
    if (query === '') return available;
    if (query === 'base:') return available.filter((n) => n.startsWith('base:'));
    return available.filter((n) => n.startsWith(query));
  }
  return available.includes(query) ? [query] : [];
}

/** [chunk index, from, to) within each chunk for bytes [from, to) of data laid end to end in chunks. */
function chunkRanges(from: number, to: number): [number, number, number][] {
  const out: [number, number, number][] = [];
  for (let at = from; at < to;) {
    const i = Math.floor(at / CHUNK);
    const end = Math.min(to, (i + 1) * CHUNK);
    out.push([i, at - i * CHUNK, end - i * CHUNK]);
    at = end;
  }
  return out;
}

/** Reads into `dst` (a chunk's slice) when the device can (VirtualDisk.readInto), else copies its own buffer. */
async function readPiece(dev: BlockDevice, dst: Buffer, offset: number): Promise<void> {
  if (dev.readInto) return dev.readInto(dst, offset);
  (await dev.read(offset, dst.length)).copy(dst);
}

/**
 * Writes a payload held in several chunks: one device write per chunk, all at once; FUA then flushes
 * once. Every write has ended (landed or failed) before this settles: the chunks go back to the pool after.
 */
async function writeChunks(dev: BlockDevice, offset: number, data: Buffer[], fua: boolean): Promise<void> {
  let at = offset;
  const writes = data.map((piece) => {
    const w = dev.write(at, piece);
    at += piece.length;
    return w;
  });
  const failed = (await Promise.allSettled(writes)).find((r) => r.status === 'rejected');
  if (failed) throw (failed as PromiseRejectedResult).reason;
  if (fua) await dev.flush();
}

async function allocationQuery(dev: BlockDevice, offset: number, length: number) {
  const extents: AllocationExtent[] = await dev.blockStatus(offset, length);
  return extents.map((e) => ({
    offset: e.offset,
    length: e.length,
    flags: (e.hole ? STATE_HOLE : 0) | (e.zero ? STATE_ZERO : 0),
  }));
}

async function dirtyQuery(dev: BlockDevice, name: string, offset: number, length: number) {
  const extents: DirtyExtent[] = await dev.dirtyStatus(name, offset, length);
  return extents.map((e) => ({ offset: e.offset, length: e.length, flags: e.dirty ? STATE_DIRTY : 0 }));
}
