/**
 * A small NBD client (fixed newstyle, NBD_OPT_GO, many requests in flight): what the project's own
 * workload generator and the backup reader speak to Tidemark's (or any) NBD server. With `structured`
 * (implied by `contexts`) it negotiates structured replies: reads then come back as data and hole chunks
 * (holes cost 12 bytes on the wire), and blockStatus() answers for the meta contexts asked for
 * (`base:allocation`, `qemu:dirty-bitmap:ID`), as pull-mode backup tools use them.
 */
import net from 'node:net';
import tls from 'node:tls';
import { TidemarkError } from '../errors.js';
import {
  CMD,
  CMD_FLAG,
  decodeChunkHeader,
  decodeChunkPayload,
  decodeHandshake,
  decodeInfoReplyData,
  decodeMetaContextReplyData,
  decodeOptionReplyHeader,
  decodeSimpleReply,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  HANDSHAKE_LENGTH,
  INFO,
  isErrorReply,
  OPT,
  OPTION_REPLY_HEADER_LENGTH,
  REP,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_HEADER_LENGTH,
  STRUCTURED_REPLY_MAGIC,
  TF,
} from './protocol.js';
import type { ClientTls } from './tls.js';

export interface NbdTarget {
  /** A unix socket path, or host+port. */
  socket?: string;
  host?: string;
  port?: number;
  exportName: string;
  /** Negotiate structured replies (hole chunks in reads). */
  structured?: boolean;
  /** Meta contexts to select for blockStatus(), e.g. `base:allocation`; implies `structured`. */
  contexts?: string[];
  /** Start TLS (NBD_OPT_STARTTLS) before anything else, with these credentials (see loadClientTls). */
  tls?: ClientTls;
}

/** One extent of a block-status answer: its length and the context's flags (STATE_HOLE/ZERO, STATE_DIRTY). */
export interface StatusExtent {
  offset: number;
  length: number;
  flags: number;
}

/** What a read into a caller's buffer found: bytes that came as holes (they were zero-filled). */
export interface ReadResult {
  holeBytes: number;
}

interface Pending {
  command: number;
  offset: number;
  length: number;
  resolve: (value: unknown) => void;
  reject: (err: Error) => void;
  /** READ: where the data goes. */
  dst?: Buffer;
  holeBytes: number;
  /** BLOCK_STATUS: the context asked for, and its extents. */
  contextId?: number;
  extents?: StatusExtent[];
  /** A structured reply's first error chunk: raised once the reply is done. */
  error?: Error;
}

/**
 * Reads exactly what it is asked for from a socket, however the bytes arrive. The socket reads into memory
 * this class chooses (net's `onread`): straight into the buffer of a read in progress (reply data lands
 * where the caller wants it, no copy), else into one reused scratch buffer whose bytes are copied out at
 * once. So receiving allocates nothing per read, which spared V8 its external-memory collections.
 */
class SocketReader {
  private readonly scratch = Buffer.allocUnsafe(64 * 1024);
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter:
    | { n: number; dst: Buffer | undefined; filled: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }
    | undefined;
  /** The socket's current buffer is the waiter's `dst` from `filled` on. */
  private direct = false;
  private error: Error | undefined;

  /** The `onread` option for net.connect that feeds this reader. */
  readonly onread = {
    buffer: (): Uint8Array => this.nextBuffer(),
    callback: (nread: number): boolean => {
      this.received(nread);
      return true;
    },
  };

  /**
   * Feeds the reader from `socket`'s 'data' events instead of `onread` (a TLS socket has no onread; the
   * chunks are its own, so they are queued without a copy). Returns a function that stops it.
   */
  feedFrom(socket: net.Socket): () => void {
    const onData = (chunk: Buffer) => this.push(chunk);
    socket.on('data', onData);
    return () => socket.off('data', onData);
  }

  private push(chunk: Buffer): void {
    const w = this.waiter;
    let at = 0;
    if (w?.dst && this.have === 0) {
      at = Math.min(chunk.length, w.n - w.filled);
      chunk.copy(w.dst, w.filled, 0, at);
      w.filled += at;
      this.settleInto(w);
    }
    if (at < chunk.length) {
      this.chunks.push(chunk.subarray(at));
      this.have += chunk.length - at;
      this.pump();
    }
  }

  attach(socket: net.Socket): void {
    const fail = (cause: Error) => {
      const e =
        cause instanceof TidemarkError
          ? cause
          : new TidemarkError('IO_ERROR', `NBD connection failed: ${cause.message}`);
      this.error ??= e;
      if (this.waiter) {
        const w = this.waiter;
        this.waiter = undefined;
        w.reject(this.error);
      }
    };
    socket.on('error', fail);
    socket.on('close', () => fail(new TidemarkError('CLOSED', 'the NBD server closed the connection')));
  }

  /** The next `n` bytes (a view of what arrived when it came in one piece). */
  read(n: number): Promise<Buffer> {
    return this.wait(n, undefined);
  }

  /** The next `dst.length` bytes, into `dst`. */
  readInto(dst: Buffer): Promise<Buffer> {
    return this.wait(dst.length, dst);
  }

  private wait(n: number, dst: Buffer | undefined): Promise<Buffer> {
    if (this.error && this.have < n) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.waiter = { n, dst, filled: 0, resolve, reject };
      this.pump();
    });
  }

  /** Where the socket's next read goes: the rest of a waiting `dst` when nothing is queued before it. */
  private nextBuffer(): Uint8Array {
    const w = this.waiter;
    this.direct = w?.dst !== undefined && this.have === 0 && w.filled < w.n;
    return this.direct ? w!.dst!.subarray(w!.filled) : this.scratch;
  }

  private received(nread: number): void {
    const w = this.waiter;
    if (this.direct && w?.dst) {
      w.filled += nread;
      this.settleInto(w);
      return;
    }
    let at = 0;
    if (w?.dst && this.have === 0) {
      at = Math.min(nread, w.n - w.filled);
      this.scratch.copy(w.dst, w.filled, 0, at);
      w.filled += at;
      this.settleInto(w);
    }
    if (at < nread) {
      const rest = Buffer.allocUnsafe(nread - at);
      this.scratch.copy(rest, 0, at, nread);
      this.chunks.push(rest);
      this.have += rest.length;
      this.pump();
    }
  }

  private settleInto(w: NonNullable<SocketReader['waiter']>): void {
    if (w.filled < w.n || this.waiter !== w) return;
    this.waiter = undefined;
    w.resolve(w.dst!);
  }

  private pump(): void {
    const w = this.waiter;
    if (!w) return;
    if (w.dst) {
      while (this.have > 0 && w.filled < w.n) {
        const c = this.chunks[0];
        const take = Math.min(c.length, w.n - w.filled);
        c.copy(w.dst, w.filled, 0, take);
        w.filled += take;
        this.have -= take;
        if (take === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(take);
      }
      this.settleInto(w);
      return;
    }
    if (this.have < w.n) return;
    this.waiter = undefined;
    const first = this.chunks[0];
    if (first.length >= w.n) {
      const out = first.subarray(0, w.n);
      if (first.length === w.n) this.chunks.shift();
      else this.chunks[0] = first.subarray(w.n);
      this.have -= w.n;
      w.resolve(out);
      return;
    }
    const out = Buffer.allocUnsafe(w.n);
    let at = 0;
    while (at < w.n) {
      const c = this.chunks[0];
      const take = Math.min(c.length, w.n - at);
      c.copy(out, at, 0, take);
      at += take;
      if (take === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(take);
    }
    this.have -= w.n;
    w.resolve(out);
  }
}

export class NbdClient {
  private handles = 0n;
  private pending = new Map<bigint, Pending>();
  private closed = false;
  private inFlight = new Set<Promise<unknown>>();

  private constructor(
    private socket: net.Socket,
    private reader: SocketReader,
    readonly size: number,
    readonly flags: number,
    /** Structured replies were negotiated. */
    readonly structured: boolean,
    /** The meta contexts the server selected, by name. */
    private readonly contextIds: Map<string, number>,
  ) {
    void this.replyLoop();
  }

  static async connect(target: NbdTarget): Promise<NbdClient> {
    const reader = new SocketReader();
    // With TLS the reader takes 'data' events (the TLS socket has no onread), plain ones until STARTTLS.
    const onread = target.tls ? undefined : reader.onread;
    let socket: net.Socket = target.socket
      ? net.connect({ path: target.socket, onread })
      : net.connect({ port: target.port ?? 10809, host: target.host ?? '127.0.0.1', onread });
    const unfeedPlain = target.tls ? reader.feedFrom(socket) : undefined;
    let tlsStarted = false;
    reader.attach(socket);
    socket.setNoDelay(true);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (e) => reject(new TidemarkError('IO_ERROR', `cannot connect to NBD server: ${e.message}`)));
    });
    /** Sends an option and collects its replies up to the final ACK (or throws on an error reply). */
    const option = async (opt: number, data?: Buffer): Promise<{ type: number; data: Buffer }[]> => {
      socket.write(encodeOption(opt, data));
      const replies: { type: number; data: Buffer }[] = [];
      for (;;) {
        const h = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_LENGTH));
        const body = h.length ? Buffer.from(await reader.read(h.length)) : Buffer.alloc(0);
        if (isErrorReply(h.type)) {
          const why = body.toString('utf8') || `error ${h.type >>> 0}`;
          if (h.type === REP.ERR_TLS_REQD)
            throw new TidemarkError('UNAUTHORIZED', `the NBD server requires TLS: give client credentials (${why})`);
          throw new TidemarkError(
            opt === OPT.GO ? 'NOT_FOUND' : 'NOT_SUPPORTED',
            opt === OPT.GO
              ? `NBD server refused export "${target.exportName}": ${why}`
              : `NBD server refused option ${opt}: ${why}`,
          );
        }
        if (h.type === REP.ACK) return replies;
        replies.push({ type: h.type, data: body });
      }
    };
    try {
      const greeting = decodeHandshake(await reader.read(HANDSHAKE_LENGTH));
      socket.write(encodeClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
      if (target.tls) {
        if (!(greeting.flags & FLAG_FIXED_NEWSTYLE))
          throw new TidemarkError('NOT_SUPPORTED', 'the NBD server does not speak fixed newstyle, which TLS needs');
        await option(OPT.STARTTLS);
        unfeedPlain!();
        // On TCP the server's certificate must name the host dialled (as libnbd and QEMU check it).
        const hostname = target.tls.hostname ?? (target.socket ? undefined : (target.host ?? '127.0.0.1'));
        socket = await startTls(socket, { ...target.tls, hostname });
        tlsStarted = true;
        reader.feedFrom(socket);
        reader.attach(socket);
      }
      const contexts = target.contexts ?? [];
      const structured = target.structured === true || contexts.length > 0;
      const contextIds = new Map<string, number>();
      if (structured) await option(OPT.STRUCTURED_REPLY);
      if (contexts.length > 0) {
        const replies = await option(
          OPT.SET_META_CONTEXT,
          encodeMetaContextRequest({ name: target.exportName, queries: contexts }),
        );
        for (const r of replies) {
          if (r.type !== REP.META_CONTEXT) continue;
          const c = decodeMetaContextReplyData(r.data);
          contextIds.set(c.name, c.id);
        }
      }
      let size = -1;
      let flags = 0;
      for (const r of await option(
        OPT.GO,
        encodeInfoRequest({ name: target.exportName, requests: [INFO.BLOCK_SIZE] }),
      )) {
        if (r.type !== REP.INFO) continue;
        const item = decodeInfoReplyData(r.data);
        if (item.info === INFO.EXPORT && 'size' in item) {
          size = item.size;
          flags = item.flags;
        }
      }
      if (size < 0) throw new TidemarkError('PROTOCOL_ERROR', 'NBD server sent no export information');
      return new NbdClient(socket, reader, size, flags, structured, contextIds);
    } catch (err) {
      socket.destroy();
      // TLS 1.3 finishes the handshake before the server judges our certificate: its refusal is a reset.
      if (tlsStarted && err instanceof TidemarkError && (err.code === 'CLOSED' || err.code === 'IO_ERROR')) {
        throw new TidemarkError(
          'UNAUTHORIZED',
          `the NBD server ended the connection once TLS started: it refused this client's certificate (${err.message})`,
        );
      }
      throw err;
    }
  }

  get readOnly(): boolean {
    return (this.flags & TF.READ_ONLY) !== 0;
  }

  /** True when the server selected meta context `name` (see NbdTarget.contexts). */
  hasContext(name: string): boolean {
    return this.contextIds.has(name);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    const dst = Buffer.allocUnsafe(length);
    await this.readInto(dst, offset);
    return dst;
  }

  /** Reads `dst.length` bytes at `offset` into `dst`; says how many came as holes (zero-filled here). */
  readInto(dst: Buffer, offset: number): Promise<ReadResult> {
    return this.request(CMD.READ, 0, offset, dst.length, undefined, { dst }) as Promise<ReadResult>;
  }

  /**
   * Block status of [offset, offset+length) in meta context `context`: extents from `offset` on, in
   * order. The server may answer for less than asked (never nothing): ask again from where it ended.
   */
  blockStatus(offset: number, length: number, context: string): Promise<StatusExtent[]> {
    const contextId = this.contextIds.get(context);
    if (contextId === undefined) {
      return Promise.reject(
        new TidemarkError('NOT_SUPPORTED', `the NBD server did not select meta context "${context}"`),
      );
    }
    return this.request(CMD.BLOCK_STATUS, 0, offset, length, undefined, { contextId }) as Promise<StatusExtent[]>;
  }

  async write(offset: number, data: Uint8Array, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(CMD.WRITE, opts.fua ? CMD_FLAG.FUA : 0, offset, data.length, data);
  }

  async flush(): Promise<void> {
    await this.request(CMD.FLUSH, 0, 0, 0, undefined);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.request(CMD.TRIM, 0, offset, length, undefined);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.request(CMD.WRITE_ZEROES, 0, offset, length, undefined);
  }

  /** Sends NBD_CMD_DISC and closes. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await Promise.allSettled(this.inFlight);
    if (this.socket.destroyed || this.socket.closed) return;
    this.socket.end(encodeRequest({ flags: 0, command: CMD.DISC, handle: this.handles++, offset: 0, length: 0 }));
    await new Promise<void>((resolve) => {
      this.socket.once('close', () => resolve());
      setTimeout(() => (this.socket.destroy(), resolve()), 2000).unref();
    });
  }

  private request(
    command: number,
    flags: number,
    offset: number,
    length: number,
    data: Uint8Array | undefined,
    extra: { dst?: Buffer; contextId?: number } = {},
  ): Promise<unknown> {
    if (this.closed) return Promise.reject(new TidemarkError('CLOSED', 'NBD connection is closed'));
    const handle = this.handles++;
    const promise = new Promise<unknown>((resolve, reject) => {
      this.pending.set(handle, { command, offset, length, resolve, reject, holeBytes: 0, ...extra });
      const header = encodeRequest({ flags, command, handle, offset, length });
      if (data) {
        this.socket.cork();
        this.socket.write(header);
        this.socket.write(data);
        this.socket.uncork();
      } else this.socket.write(header);
    });
    this.inFlight.add(promise);
    const forget = () => this.inFlight.delete(promise);
    promise.then(forget, forget);
    return promise;
  }

  private take(handle: bigint): Pending {
    const p = this.pending.get(handle);
    if (!p) throw new TidemarkError('PROTOCOL_ERROR', `NBD reply for unknown handle ${handle}`);
    return p;
  }

  private settle(handle: bigint, p: Pending): void {
    this.pending.delete(handle);
    if (p.error) p.reject(p.error);
    else if (p.command === CMD.READ) p.resolve({ holeBytes: p.holeBytes } satisfies ReadResult);
    else if (p.command === CMD.BLOCK_STATUS) {
      if (!p.extents?.length) p.reject(new TidemarkError('PROTOCOL_ERROR', 'NBD block status reply without extents'));
      else p.resolve(p.extents);
    } else p.resolve(undefined);
  }

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.reader.read(4)).readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) {
          const head = Buffer.alloc(SIMPLE_REPLY_LENGTH);
          head.writeUInt32BE(magic, 0);
          (await this.reader.read(SIMPLE_REPLY_LENGTH - 4)).copy(head, 4);
          const r = decodeSimpleReply(head);
          const p = this.take(r.handle);
          if (r.error !== 0) {
            p.error = new TidemarkError('IO_ERROR', `NBD server answered error ${r.error}`, { errno: r.error });
          } else if (p.command === CMD.READ && p.dst) await this.reader.readInto(p.dst);
          this.settle(r.handle, p);
        } else if (magic === STRUCTURED_REPLY_MAGIC && this.structured) {
          const head = Buffer.alloc(STRUCTURED_HEADER_LENGTH);
          head.writeUInt32BE(magic, 0);
          (await this.reader.read(STRUCTURED_HEADER_LENGTH - 4)).copy(head, 4);
          const h = decodeChunkHeader(head);
          const p = this.take(h.handle);
          await this.chunk(p, h.type, h.length);
          if (h.flags & REPLY_FLAG_DONE) this.settle(h.handle, p);
        } else {
          throw new TidemarkError('PROTOCOL_ERROR', `NBD reply with bad magic 0x${magic.toString(16)}`);
        }
      }
    } catch (err) {
      for (const p of this.pending.values()) p.reject(err as Error);
      this.pending.clear();
      this.socket.destroy();
    }
  }

  /** Takes one structured chunk's payload for request `p`. */
  private async chunk(p: Pending, type: number, length: number): Promise<void> {
    const bad = (why: string) => new TidemarkError('PROTOCOL_ERROR', `NBD structured reply: ${why}`);
    if (type === REPLY_TYPE.OFFSET_DATA) {
      if (p.command !== CMD.READ || !p.dst || length < 8) throw bad('a data chunk where none belongs');
      const at = Number((await this.reader.read(8)).readBigUInt64BE(0)) - p.offset;
      const n = length - 8;
      if (at < 0 || at + n > p.length) throw bad(`data at ${at + p.offset}+${n} outside the read`);
      await this.reader.readInto(p.dst.subarray(at, at + n));
      return;
    }
    if (length > 1024 * 1024 + 64) throw bad(`a ${length}-byte chunk of type ${type}`);
    const body = length ? await this.reader.read(length) : Buffer.alloc(0);
    const c = decodeChunkPayload(type, body);
    if ('unknown' in c) {
      if (type & 0x8000) p.error ??= new TidemarkError('IO_ERROR', `NBD server answered error chunk ${type}`);
      return;
    }
    if ('error' in c) {
      p.error ??= new TidemarkError('IO_ERROR', `NBD server answered error ${c.error}: ${c.message}`, {
        errno: c.error,
      });
    } else if ('descriptors' in c) {
      if (p.command !== CMD.BLOCK_STATUS) throw bad('block status where none belongs');
      if (c.contextId !== p.contextId) return;
      let at = p.offset;
      p.extents = [];
      for (const d of c.descriptors) {
        if (d.length === 0) continue;
        p.extents.push({ offset: at, length: d.length, flags: d.flags });
        at += d.length;
      }
    } else if ('length' in c) {
      if (p.command !== CMD.READ || !p.dst) throw bad('a hole chunk where none belongs');
      const at = c.offset - p.offset;
      if (at < 0 || at + c.length > p.length) throw bad(`hole at ${c.offset}+${c.length} outside the read`);
      p.dst.fill(0, at, at + c.length);
      p.holeBytes += c.length;
    } else if (c.type !== REPLY_TYPE.NONE) throw bad(`unexpected chunk type ${c.type}`);
  }
}

/**
 * The client side of STARTTLS on `plain` (nothing else may read it from now on): the server must present a
 * certificate the CA signed (and, on TCP, for `hostname`), and gets ours.
 */
function startTls(plain: net.Socket, creds: ClientTls): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    let t: tls.TLSSocket;
    try {
      t = tls.connect({
        socket: plain,
        ca: creds.ca,
        cert: creds.cert,
        key: creds.key,
        minVersion: 'TLSv1.2',
        rejectUnauthorized: true,
        ...(creds.hostname !== undefined
          ? { servername: net.isIP(creds.hostname) ? undefined : creds.hostname, host: creds.hostname }
          : { checkServerIdentity: () => undefined }),
      });
    } catch (err) {
      // Credentials that do not parse (loadClientTls checks them; a hand-made ClientTls may not be).
      return reject(
        new TidemarkError('INVALID_ARGUMENT', `NBD TLS credentials cannot be used: ${(err as Error).message}`),
      );
    }
    const fail = (e: Error) => reject(new TidemarkError('UNAUTHORIZED', `NBD TLS handshake failed: ${e.message}`));
    t.once('error', fail);
    t.once('secureConnect', () => {
      t.off('error', fail);
      t.setNoDelay(true);
      resolve(t);
    });
  });
}
