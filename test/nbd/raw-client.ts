/**
 * A deliberately low-level NBD client for the tests: it speaks the protocol through the codec in
 * src/nbd/protocol.ts byte by byte, so tests can send anything (garbage, partial frames, requests a
 * real client never would) and read exactly what the server answered.
 */
import { readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { ByteQueue } from '../../src/nbd/parser.js';
import {
  decodeChunkHeader,
  decodeChunkPayload,
  decodeHandshake,
  decodeOptionReplyHeader,
  decodeSimpleReply,
  encodeClientFlags,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  INFO,
  OPT,
  OPTION_REPLY_HEADER_LENGTH,
  REP,
  REPLY_FLAG_DONE,
  SIMPLE_REPLY_LENGTH,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_HEADER_LENGTH,
  type ChunkPayload,
  type RequestHeader,
} from '../../src/nbd/protocol.js';
import { sleep } from '../helpers/async.js';

export interface OptionReply {
  option: number;
  type: number;
  data: Buffer;
}

export type Reply =
  | { kind: 'simple'; handle: bigint; error: number; data?: Buffer }
  | { kind: 'chunk'; handle: bigint; flags: number; type: number; payload: ChunkPayload };

export class RawClient {
  private queue = new ByteQueue();
  private wake: (() => void) | undefined;
  private ended = false;
  readonly closed: Promise<void>;

  private readonly onData = (b: Buffer) => {
    this.queue.push(b);
    this.wake?.();
  };

  private constructor(public socket: net.Socket) {
    socket.on('data', this.onData);
    this.closed = new Promise((resolve) => {
      socket.on('close', () => {
        this.ended = true;
        this.wake?.();
        resolve();
      });
    });
    socket.on('error', () => undefined);
  }

  static connect(where: { path: string } | { port: number; host?: string; localAddress?: string }): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(where as net.NetConnectOpts);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  get isClosed(): boolean {
    return this.ended;
  }

  get buffered(): number {
    return this.queue.length;
  }

  write(b: Uint8Array): void {
    this.socket.write(b);
  }

  destroy(): void {
    this.socket.destroy();
  }

  /** Waits for exactly `n` bytes; rejects if the server closes first or `timeoutMs` passes. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.queue.length < n) {
      if (this.ended) throw new Error(`connection closed with ${this.queue.length} of ${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.queue.length})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
    }
    return Buffer.from(this.queue.take(n));
  }

  /** Resolves true if the server closes the connection within `timeoutMs`. */
  async closesWithin(timeoutMs: number): Promise<boolean> {
    return Promise.race([this.closed.then(() => true), sleep(timeoutMs).then(() => false)]);
  }

  // ---------------------------------------------------------------- negotiation

  /** Reads the server's greeting and sends client flags (fixed newstyle, no zeroes by default). */
  async handshake(clientFlags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES): Promise<number> {
    const { flags } = decodeHandshake(await this.read(18));
    this.write(encodeClientFlags(clientFlags));
    return flags;
  }

  async readOptionReply(): Promise<OptionReply> {
    const h = decodeOptionReplyHeader(await this.read(OPTION_REPLY_HEADER_LENGTH));
    return { option: h.option, type: h.type, data: h.length ? await this.read(h.length) : Buffer.alloc(0) };
  }

  /** Sends an option and reads replies up to the final one (ACK or an error). */
  async option(option: number, data?: Uint8Array): Promise<OptionReply[]> {
    this.write(encodeOption(option, data));
    return this.readOptionReplies();
  }

  /** Reads the replies to one option, up to the final one (ACK or an error). */
  async readOptionReplies(): Promise<OptionReply[]> {
    const out: OptionReply[] = [];
    for (;;) {
      const r = await this.readOptionReply();
      out.push(r);
      if (r.type !== REP.SERVER && r.type !== REP.INFO && r.type !== REP.META_CONTEXT) return out;
    }
  }

  /**
   * NBD_OPT_STARTTLS, then the TLS handshake with the credentials of directory `dir` (ca-cert.pem, and
   * client-cert.pem / client-key.pem when present). Throws unless the server ACKs.
   */
  async startTls(dir: string): Promise<void> {
    const [r] = await this.option(OPT.STARTTLS);
    if (r.type !== REP.ACK) throw new Error(`STARTTLS refused (${r.type}): ${r.data.toString()}`);
    await this.upgrade(dir);
  }

  /** Runs the client side of the TLS handshake on this socket (after the server's ACK). */
  async upgrade(dir: string): Promise<void> {
    const file = (name: string) => {
      try {
        return readFileSync(path.join(dir, name));
      } catch {
        return undefined;
      }
    };
    const plain = this.socket;
    plain.off('data', this.onData);
    const t = tls.connect({
      socket: plain,
      ca: file('ca-cert.pem'),
      cert: file('client-cert.pem'),
      key: file('client-key.pem'),
      servername: 'localhost',
    });
    t.on('error', () => undefined);
    await new Promise<void>((resolve, reject) => {
      t.once('secureConnect', () => resolve());
      t.once('close', () => reject(new Error('the connection closed during the TLS handshake')));
    });
    t.on('data', this.onData);
    this.socket = t;
  }

  async structuredReplies(): Promise<void> {
    const [r] = await this.option(OPT.STRUCTURED_REPLY);
    if (r.type !== REP.ACK) throw new Error(`structured replies refused: ${r.type}`);
  }

  async setMetaContext(name: string, queries: string[]): Promise<OptionReply[]> {
    return this.option(OPT.SET_META_CONTEXT, encodeMetaContextRequest({ name, queries }));
  }

  /** NBD_OPT_GO; throws unless it ends with ACK. */
  async go(name: string, requests: number[] = [INFO.BLOCK_SIZE]): Promise<OptionReply[]> {
    const replies = await this.option(OPT.GO, encodeInfoRequest({ name, requests }));
    const last = replies[replies.length - 1];
    if (last.type !== REP.ACK) throw new Error(`GO refused (${last.type}): ${last.data.toString()}`);
    return replies;
  }

  // ---------------------------------------------------------------- transmission

  request(h: Partial<RequestHeader> & { command: number; handle: bigint }, data?: Uint8Array): void {
    const length = h.length ?? data?.length ?? 0;
    this.write(encodeRequest({ flags: 0, offset: 0, ...h, length }, data));
  }

  /**
   * The next reply message: a simple reply (for reads, `readLength` says how many data bytes follow
   * a successful one) or one structured chunk.
   */
  async reply(readLength: (handle: bigint) => number = () => 0, timeoutMs = 5000): Promise<Reply> {
    const magic = (await this.peek(4, timeoutMs)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const r = decodeSimpleReply(await this.read(SIMPLE_REPLY_LENGTH, timeoutMs));
      const n = r.error === 0 ? readLength(r.handle) : 0;
      return { kind: 'simple', handle: r.handle, error: r.error, data: n ? await this.read(n, timeoutMs) : undefined };
    }
    const h = decodeChunkHeader(await this.read(STRUCTURED_HEADER_LENGTH, timeoutMs));
    const payload = decodeChunkPayload(h.type, h.length ? await this.read(h.length, timeoutMs) : Buffer.alloc(0));
    return { kind: 'chunk', handle: h.handle, flags: h.flags, type: h.type, payload };
  }

  /** Structured chunks up to and including the one flagged DONE (all for one handle, in order). */
  async structuredReply(timeoutMs = 5000): Promise<Extract<Reply, { kind: 'chunk' }>[]> {
    const out: Extract<Reply, { kind: 'chunk' }>[] = [];
    for (;;) {
      const r = await this.reply(undefined, timeoutMs);
      if (r.kind !== 'chunk') throw new Error('expected a structured chunk, got a simple reply');
      out.push(r);
      if (r.flags & REPLY_FLAG_DONE) return out;
    }
  }

  private async peek(n: number, timeoutMs: number): Promise<Buffer> {
    const b = await this.read(n, timeoutMs);
    // Put them back in front: rebuild the queue with these bytes first.
    const rest = this.queue.length ? this.queue.take(this.queue.length) : Buffer.alloc(0);
    this.queue.push(b);
    this.queue.push(Buffer.from(rest));
    return b;
  }
}

export { sleep };

/** Connects, negotiates structured replies (optionally), meta contexts, and GO. */
export async function openExport(
  where: { path: string } | { port: number; host?: string },
  name: string,
  opts: { structured?: boolean; contexts?: string[]; blockSize?: boolean } = {},
): Promise<{ client: RawClient; replies: OptionReply[] }> {
  const client = await RawClient.connect(where);
  await client.handshake();
  if (opts.structured ?? true) await client.structuredReplies();
  if (opts.contexts?.length) await client.setMetaContext(name, opts.contexts);
  const replies = await client.go(name, opts.blockSize === false ? [] : [INFO.BLOCK_SIZE]);
  return { client, replies };
}
