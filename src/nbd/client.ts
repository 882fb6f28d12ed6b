/**
 * A small NBD client (fixed newstyle, NBD_OPT_GO, simple replies, many requests in flight): what the
 * project's own workload generator and the backup reader speak to Tidemark's (or any) NBD server.
 */
import net from 'node:net';
import { TidemarkError } from '../errors.js';
import {
  CMD,
  CMD_FLAG,
  decodeHandshake,
  decodeInfoReplyData,
  decodeOptionReplyHeader,
  decodeSimpleReply,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOption,
  encodeRequest,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  HANDSHAKE_LENGTH,
  INFO,
  isErrorReply,
  OPT,
  OPTION_REPLY_HEADER_LENGTH,
  REP,
  SIMPLE_REPLY_LENGTH,
  TF,
} from './protocol.js';

export interface NbdTarget {
  /** A unix socket path, or host+port. */
  socket?: string;
  host?: string;
  port?: number;
  exportName: string;
}

interface Pending {
  resolve: (data: Buffer | undefined) => void;
  reject: (err: Error) => void;
  readLength: number;
}

/** Reads exactly what it is asked for from a socket, however the bytes arrive. */
class SocketReader {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | undefined;
  private error: Error | undefined;

  constructor(socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.have += d.length;
      this.pump();
    });
    const fail = (e: Error) => {
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

  read(n: number): Promise<Buffer> {
    if (this.error && this.have < n) return Promise.reject(this.error);
    return new Promise((resolve, reject) => {
      this.waiter = { n, resolve, reject };
      this.pump();
    });
  }

  private pump(): void {
    const w = this.waiter;
    if (!w || this.have < w.n) return;
    this.waiter = undefined;
    const all = this.chunks.length === 1 ? this.chunks[0] : Buffer.concat(this.chunks);
    const out = all.subarray(0, w.n);
    const rest = all.subarray(w.n);
    this.chunks = rest.length ? [rest] : [];
    this.have = rest.length;
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
  ) {
    void this.replyLoop();
  }

  static async connect(target: NbdTarget): Promise<NbdClient> {
    const socket = target.socket
      ? net.connect(target.socket)
      : net.connect(target.port ?? 10809, target.host ?? '127.0.0.1');
    socket.setNoDelay(true);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', resolve);
      socket.once('error', (e) => reject(new TidemarkError('IO_ERROR', `cannot connect to NBD server: ${e.message}`)));
    });
    const reader = new SocketReader(socket);
    try {
      const hs = decodeHandshake(await reader.read(HANDSHAKE_LENGTH));
      void hs;
      socket.write(encodeClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
      socket.write(encodeOption(OPT.GO, encodeInfoRequest({ name: target.exportName, requests: [INFO.BLOCK_SIZE] })));
      let size = -1;
      let flags = 0;
      for (;;) {
        const h = decodeOptionReplyHeader(await reader.read(OPTION_REPLY_HEADER_LENGTH));
        const data = h.length ? await reader.read(h.length) : Buffer.alloc(0);
        if (isErrorReply(h.type)) {
          throw new TidemarkError(
            'NOT_FOUND',
            `NBD server refused export "${target.exportName}": ${data.toString('utf8') || `error ${h.type}`}`,
          );
        }
        if (h.type === REP.INFO) {
          const item = decodeInfoReplyData(data);
          if (item.info === INFO.EXPORT && 'size' in item) {
            size = item.size;
            flags = item.flags;
          }
        } else if (h.type === REP.ACK) break;
      }
      if (size < 0) throw new TidemarkError('PROTOCOL_ERROR', 'NBD server sent no export information');
      return new NbdClient(socket, reader, size, flags);
    } catch (err) {
      socket.destroy();
      throw err;
    }
  }

  get readOnly(): boolean {
    return (this.flags & TF.READ_ONLY) !== 0;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(CMD.READ, 0, offset, length, undefined, length) as Promise<Buffer>;
  }

  async write(offset: number, data: Uint8Array, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(CMD.WRITE, opts.fua ? CMD_FLAG.FUA : 0, offset, data.length, data, 0);
  }

  async flush(): Promise<void> {
    await this.request(CMD.FLUSH, 0, 0, 0, undefined, 0);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.request(CMD.TRIM, 0, offset, length, undefined, 0);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    await this.request(CMD.WRITE_ZEROES, 0, offset, length, undefined, 0);
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
    readLength: number,
  ): Promise<Buffer | undefined> {
    if (this.closed) return Promise.reject(new TidemarkError('CLOSED', 'NBD connection is closed'));
    const handle = this.handles++;
    const promise = new Promise<Buffer | undefined>((resolve, reject) => {
      this.pending.set(handle, { resolve, reject, readLength });
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

  private async replyLoop(): Promise<void> {
    try {
      for (;;) {
        const r = decodeSimpleReply(await this.reader.read(SIMPLE_REPLY_LENGTH));
        const p = this.pending.get(r.handle);
        if (!p) throw new TidemarkError('PROTOCOL_ERROR', `NBD reply for unknown handle ${r.handle}`);
        this.pending.delete(r.handle);
        if (r.error !== 0) {
          p.reject(new TidemarkError('IO_ERROR', `NBD server answered error ${r.error}`, { errno: r.error }));
          continue;
        }
        p.resolve(p.readLength ? await this.reader.read(p.readLength) : undefined);
      }
    } catch (err) {
      for (const p of this.pending.values()) p.reject(err as Error);
      this.pending.clear();
      this.socket.destroy();
    }
  }
}
