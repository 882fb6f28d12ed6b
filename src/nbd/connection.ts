/**
 * One client's connection: fixed-newstyle negotiation, then the transmission phase, in which requests
 * run concurrently against the export's device and replies go out as each finishes (so out of order).
 *
 * Every reply is written in one synchronous burst (header and data corked into one writev), so replies
 * never interleave on the socket. Flow control, so that no client can make the server hold unbounded
 * memory: a new request is taken from the parser only while this connection has fewer than
 * MAX_REQUESTS_IN_FLIGHT requests and MAX_BYTES_IN_FLIGHT bytes in flight, the server-wide byte budget
 * allows it, and fewer than MAX_QUEUED_REPLY_BYTES of replies wait in the socket for a slow reader; the
 * socket is paused otherwise, so TCP holds the client back.
 */
import type { Socket } from 'node:net';
import type { AllocationExtent, BlockDevice, DirtyExtent } from '../disk/device.js';
import { TidemarkError } from '../errors.js';
import { sharedPool } from './buffers.js';
import { nbdErrorFor, NbdProtocolError } from './errors.js';
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

/** Requests of one connection running at once (nbdcopy keeps 64 in flight, QEMU 16). */
export const MAX_REQUESTS_IN_FLIGHT = 128;
/** Bytes of reads and writes of one connection in flight (one request of any size is always admitted). */
export const MAX_BYTES_IN_FLIGHT = 64 * 1024 * 1024;
/** Reply bytes waiting in the socket for a slow reader before the connection stops taking requests. */
export const MAX_QUEUED_REPLY_BYTES = 32 * 1024 * 1024;
/** Contiguous reads arriving together are served by one device read of at most this many bytes. */
export const MAX_COALESCED_READ = 4 * 1024 * 1024;
/** Descriptors in one block-status chunk at most (the client asks again for the rest). */
export const MAX_DESCRIPTORS = 64 * 1024;

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
  /** Server-wide byte budget for requests in flight: true if `bytes` were reserved. */
  reserve(conn: NbdConnection, bytes: number): boolean;
  release(bytes: number): void;
  /** One request of this command arrived. */
  count(command: number): void;
  event(e: NbdEvent): void;
  readonly handshakeTimeoutMs: number;
  readonly closeTimeoutMs: number;
}

export type NbdEvent =
  | { type: 'connect'; id: number; remote: string }
  | { type: 'export'; id: number; export: string }
  | { type: 'disconnect'; id: number; reason: string }
  | { type: 'protocolError'; id: number; message: string };

interface MetaContext {
  id: number;
  name: string;
  /** undefined: base:allocation; otherwise the dirty bitmap's name. */
  bitmap?: string;
}

type Phase = 'negotiating' | 'transmission' | 'closing' | 'closed';

export class NbdConnection {
  readonly id: number;
  readonly remote: string;
  readonly counters: ConnectionCounters = { requests: 0, errors: 0, bytesRead: 0, bytesWritten: 0 };
  /** Resolves when the socket is closed and no request is running any more. */
  readonly closed: Promise<void>;

  private phase: Phase = 'negotiating';
  private parser = new ClientParser((n) => sharedPool.get(n));
  private exp: ExportEntry | undefined;
  private flags = 0;
  private structured = false;
  private noZeroes = false;
  private blockSizeAgreed = false;
  private contexts: MetaContext[] = [];
  private contextsFor: ExportEntry | undefined;
  private optionBusy = false;
  private inFlight = 0;
  private inFlightBytes = 0;
  private pumping = false;
  private minimumBlock = 1;
  /** Requests parsed while the server-wide byte budget was spent, in arrival order. */
  private pending: { h: RequestHeader; data: Buffer | undefined; cost: number }[] = [];
  /** Reads of contiguous ranges parsed in this pump, served together when it ends. */
  private batch: ReadBatch | undefined;
  private batchScheduled = false;
  /** Replies are corked until the event loop's poll phase is over, then go out in one writev. */
  private corked = false;
  private socketClosed = false;
  private closeReason = '';
  private handshakeTimer: NodeJS.Timeout | undefined;
  private closeTimer: NodeJS.Timeout | undefined;
  private resolveClosed!: () => void;

  constructor(
    private readonly socket: Socket,
    private readonly host: ConnectionHost,
    id: number,
  ) {
    this.id = id;
    this.remote =
      socket.remoteAddress !== undefined ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix socket client';
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

  start(): void {
    const s = this.socket;
    s.on('data', (chunk: Buffer) => {
      this.parser.push(chunk);
      this.pump();
    });
    s.on('end', () => this.beginClose('client closed the connection'));
    s.on('error', (err: NodeJS.ErrnoException) => this.beginClose(`socket error: ${err.code ?? err.message}`, true));
    s.on('close', () => {
      this.socketClosed = true;
      if (this.phase !== 'closing' && this.phase !== 'closed') this.beginClose('connection lost', true);
      this.maybeFinish();
    });
    s.on('drain', () => this.pump());
    this.handshakeTimer = setTimeout(
      () => this.beginClose(`negotiation not finished within ${this.host.handshakeTimeoutMs} ms`, true),
      this.host.handshakeTimeoutMs,
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

  /** Called by the server when its byte budget frees up. */
  wake(): void {
    if (this.phase === 'transmission') this.pump();
  }

  // ---------------------------------------------------------------------------------------------
  // Reading and flow control

  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    let blocked = false;
    try {
      while (this.phase === 'negotiating' || this.phase === 'transmission') {
        if (this.phase === 'negotiating') {
          if (this.optionBusy) {
            blocked = true;
            break;
          }
          const msg = this.parser.next();
          if (!msg) break;
          this.negotiate(msg);
        } else {
          if (this.pending.length > 0 && !this.retryPending()) {
            blocked = true;
            break;
          }
          if (this.atCapacity()) {
            blocked = true;
            break;
          }
          const msg = this.parser.next();
          if (!msg) break;
          this.request(msg);
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
    if (this.phase === 'closing' || this.phase === 'closed') return;
    if (blocked) this.socket.pause();
    else this.socket.resume();
  }

  private atCapacity(): boolean {
    if (this.inFlight >= MAX_REQUESTS_IN_FLIGHT) return true;
    if (this.inFlight > 0 && this.inFlightBytes >= MAX_BYTES_IN_FLIGHT) return true;
    return this.socket.writableLength >= MAX_QUEUED_REPLY_BYTES;
  }

  /** Writes one reply; `pooled` buffers go back to the pool once the socket is done with them. */
  private send(buffers: Buffer[], pooled?: Buffer[]): void {
    const s = this.socket;
    const done = pooled?.length ? () => pooled.forEach((b) => sharedPool.put(b)) : undefined;
    if (s.destroyed || !s.writable) {
      done?.();
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
    for (let i = 0; i < buffers.length; i++) s.write(buffers[i], i === buffers.length - 1 ? done : undefined);
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
        return;
      }
      case 'oversizeOption': {
        if (msg.option === OPT.EXPORT_NAME) throw new NbdProtocolError(`export name of ${msg.length} bytes`);
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
            this.pump();
          },
          (err: unknown) => {
            this.optionBusy = false;
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

  private optionReply(option: number, type: number, message?: string): void {
    this.send([encodeOptionReply(option, type, message ? Buffer.from(message, 'utf8') : undefined)]);
  }

  private async option(option: number, data: Buffer): Promise<void> {
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
        const replies = this.host
          .listExports()
          .map((e) => encodeOptionReply(option, REP.SERVER, encodeServerReplyData(e.name, e.description)));
        this.send([...replies, encodeOptionReply(option, REP.ACK)]);
        return;
      }
      case OPT.STARTTLS:
        return this.optionReply(option, REP.ERR_POLICY, 'TLS is not offered by this server');
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

  private request(msg: ClientMessage): void {
    if (msg.type !== 'request' && msg.type !== 'oversizeRequest') {
      throw new NbdProtocolError(`unexpected ${msg.type} during transmission`);
    }
    const h = msg.header;
    this.host.count(h.command);
    if (msg.type === 'oversizeRequest') {
      this.counters.requests++;
      this.counters.errors++;
      this.replyError(h, NBD_ERR.EOVERFLOW, `a write of ${h.length} bytes is over the ${MAX_PAYLOAD}-byte maximum`);
      return;
    }
    if (h.command === CMD.DISC) {
      this.beginClose('client disconnected');
      return;
    }
    this.counters.requests++;
    const refusal = this.validate(h);
    if (refusal) {
      this.counters.errors++;
      this.replyError(h, refusal.errno, refusal.message);
      return;
    }
    const cost = h.command === CMD.READ || h.command === CMD.WRITE ? h.length : 0;
    if (cost > 0 && !this.host.reserve(this, cost)) {
      // The server-wide budget is spent: this request waits, and so does everything after it.
      this.pending.push({ h, data: msg.data, cost });
      return;
    }
    this.run(h, msg.data, cost);
  }

  /** Starts requests held for the server-wide budget; true when none is left waiting. */
  private retryPending(): boolean {
    while (this.pending.length > 0) {
      const p = this.pending[0];
      if (!this.host.reserve(this, p.cost)) return false;
      this.pending.shift();
      this.run(p.h, p.data, p.cost);
    }
    return true;
  }

  private run(h: RequestHeader, data: Buffer | undefined, cost: number): void {
    if (h.command === CMD.READ && h.length > 0) return this.addToBatch(h, cost);
    this.inFlight++;
    this.inFlightBytes += cost;
    this.execute(h, data)
      .catch((err: unknown) => {
        const { errno, message } = nbdErrorFor(err);
        this.counters.errors++;
        this.replyError(h, errno, message);
      })
      .finally(() => {
        if (data) sharedPool.put(data);
        this.inFlight--;
        this.inFlightBytes -= cost;
        if (cost > 0) this.host.release(cost);
        if (this.phase === 'transmission') this.pump();
        else this.maybeFinish();
      });
  }

  private addToBatch(h: RequestHeader, cost: number): void {
    this.inFlight++;
    this.inFlightBytes += cost;
    const df = (h.flags & CMD_FLAG.DF) !== 0;
    const b = this.batch;
    if (b && b.end === h.offset && b.df === df && b.end - b.start + h.length <= MAX_COALESCED_READ) {
      b.reqs.push(h);
      b.end += h.length;
      b.cost += cost;
      return;
    }
    this.flushBatch();
    this.batch = { reqs: [h], start: h.offset, end: h.offset + h.length, df, cost };
  }

  /** Starts the pending read batch; if it fails as a whole, its reads are retried one by one. */
  private flushBatch(): void {
    const b = this.batch;
    if (!b) return;
    this.batch = undefined;
    const dev = this.exp!.device;
    const fail = (h: RequestHeader, err: unknown) => {
      const { errno, message } = nbdErrorFor(err);
      this.counters.errors++;
      this.replyError(h, errno, message);
    };
    const single = (h: RequestHeader) =>
      this.readBatch(dev, { reqs: [h], start: h.offset, end: h.offset + h.length, df: b.df, cost: 0 });
    this.readBatch(dev, b)
      .catch(async (err: unknown) => {
        if (b.reqs.length === 1) return fail(b.reqs[0], err);
        await Promise.all(b.reqs.map((h) => single(h).catch((e: unknown) => fail(h, e))));
      })
      .finally(() => {
        this.inFlight -= b.reqs.length;
        this.inFlightBytes -= b.cost;
        if (b.cost > 0) this.host.release(b.cost);
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

  private async execute(h: RequestHeader, data: Buffer | undefined): Promise<void> {
    const dev = this.exp!.device;
    const fua = (h.flags & CMD_FLAG.FUA) !== 0;
    switch (h.command) {
      case CMD.READ: // length 0 (others are batched)
        return this.send([this.structured ? encodeNoneChunk(h.handle) : encodeSimpleReply(0, h.handle)]);
      case CMD.WRITE:
        await dev.write(h.offset, data!, { fua });
        this.counters.bytesWritten += h.length;
        return this.replyOk(h);
      case CMD.FLUSH:
        await dev.flush();
        return this.replyOk(h);
      case CMD.TRIM:
        if (h.length > 0) await dev.trim(h.offset, h.length, { fua });
        return this.replyOk(h);
      case CMD.WRITE_ZEROES:
        if (h.length > 0) {
          await dev.writeZeroes(h.offset, h.length, {
            fua,
            noHole: (h.flags & CMD_FLAG.NO_HOLE) !== 0,
            fast: (h.flags & CMD_FLAG.FAST_ZERO) !== 0,
          });
        }
        return this.replyOk(h);
      case CMD.BLOCK_STATUS:
        return this.blockStatus(dev, h);
    }
  }

  /**
   * Serves a batch of contiguous reads with one device read per data run. With structured replies,
   * ranges that read as zeros go out as OFFSET_HOLE chunks (12 bytes instead of their zeros) unless the
   * client asked for one chunk (DF). Nothing is sent unless every read succeeded.
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
    let at = b.start;
    const pieces = runs.map((r) => {
      const piece = {
        at,
        end: at + r.length,
        zero: (r.flags & STATE_ZERO) !== 0,
        data: undefined as Buffer | undefined,
      };
      at += r.length;
      return piece;
    });
    const reads = await Promise.allSettled(
      pieces.map(async (p) => {
        if (!holes || !p.zero) p.data = await readData(dev, p.at, p.end - p.at);
      }),
    );
    const pooled = pieces.flatMap((p) => (p.data ? [p.data] : []));
    const failed = reads.find((r) => r.status === 'rejected');
    if (failed) {
      pooled.forEach((x) => sharedPool.put(x));
      throw (failed as PromiseRejectedResult).reason;
    }
    const out: Buffer[] = [];
    for (const h of b.reqs) {
      const from = h.offset;
      const to = h.offset + h.length;
      const parts = pieces.filter((p) => p.at < to && p.end > from);
      if (!this.structured) out.push(encodeSimpleReply(0, h.handle));
      parts.forEach((p, i) => {
        const s0 = Math.max(p.at, from);
        const s1 = Math.min(p.end, to);
        const flags = i === parts.length - 1 ? REPLY_FLAG_DONE : 0;
        const data = p.data?.subarray(s0 - p.at, s1 - p.at);
        if (!this.structured) out.push(data!);
        else if (data) out.push(encodeOffsetDataHeader(flags, h.handle, s0, s1 - s0), data);
        else out.push(encodeOffsetHole(flags, h.handle, s0, s1 - s0));
      });
    }
    this.counters.bytesRead += length;
    this.send(out, pooled);
  }

  private async blockStatus(dev: BlockDevice, h: RequestHeader): Promise<void> {
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
    this.send(
      replies.map((r, i) =>
        encodeBlockStatusChunk(i === replies.length - 1 ? REPLY_FLAG_DONE : 0, h.handle, r.id, r.descriptors),
      ),
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

  private replyOk(h: RequestHeader): void {
    this.send([this.structured ? encodeNoneChunk(h.handle) : encodeSimpleReply(0, h.handle)]);
  }

  private replyError(h: RequestHeader, errno: number, message: string): void {
    this.send([
      this.structured
        ? encodeErrorChunk(REPLY_FLAG_DONE, h.handle, errno, message)
        : encodeSimpleReply(errno, h.handle),
    ]);
  }

  /** At shutdown: answers every request already received in full with ESHUTDOWN. */
  private refuseBuffered(): void {
    try {
      for (let msg = this.parser.next(); msg; msg = this.parser.next()) {
        if ((msg.type === 'request' || msg.type === 'oversizeRequest') && msg.header.command !== CMD.DISC) {
          this.replyError(msg.header, NBD_ERR.ESHUTDOWN, 'the server is shutting down');
        }
      }
    } catch {
      // garbage after the last good request: the connection closes anyway
    }
    for (const p of this.pending.splice(0)) this.replyError(p.h, NBD_ERR.ESHUTDOWN, 'the server is shutting down');
  }

  // ---------------------------------------------------------------------------------------------
  // Closing

  /** Stops reading; once no request runs, ends the socket (at once when `hard`). */
  private beginClose(reason: string, hard = false): void {
    if (this.phase === 'closing' || this.phase === 'closed') {
      if (hard && !this.socket.destroyed) this.socket.destroy();
      return;
    }
    this.phase = 'closing';
    this.closeReason = reason;
    clearTimeout(this.handshakeTimer);
    this.socket.pause();
    // Requests still waiting for the server's byte budget never started: answer them (nothing was reserved).
    for (const p of this.pending.splice(0)) {
      if (!hard) this.replyError(p.h, NBD_ERR.ESHUTDOWN, `the connection is closing (${reason})`);
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
        this.closeTimer = setTimeout(() => this.socket.destroy(), this.host.closeTimeoutMs);
        this.closeTimer.unref();
      }
      return;
    }
    this.phase = 'closed';
    clearTimeout(this.closeTimer);
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
  /** Bytes reserved from the server's budget for them. */
  cost: number;
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

/** Reads into a pooled buffer when the device can (VirtualDisk.readInto), else takes the device's own. */
async function readData(dev: BlockDevice, offset: number, length: number): Promise<Buffer> {
  const into = (dev as { readInto?: (dst: Uint8Array, offset: number) => Promise<void> }).readInto;
  if (typeof into !== 'function') return dev.read(offset, length);
  const buf = sharedPool.get(length);
  try {
    await into.call(dev, buf, offset);
  } catch (err) {
    sharedPool.put(buf);
    throw err;
  }
  return buf;
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
