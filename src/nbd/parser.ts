/**
 * The server's reader of a client's byte stream: bytes arrive in arbitrary pieces (`push`), whole
 * messages come out (`next`) only when the connection is ready for them, so a client that sends faster
 * than the server works is held back by TCP instead of by memory. Payloads too big to accept (options
 * over MAX_OPTION_DATA, writes over MAX_PAYLOAD) are skipped as they arrive, never buffered, and reported
 * so the connection can answer with an error and stay in step with the client.
 *
 * A write's payload goes into buffers the connection hands over when the request's header has
 * arrived (`payloadFor`), before any of its bytes are read: the connection reserves the memory first,
 * or refuses the write (its payload is then skipped as it arrives), or says "not now" (the header
 * stays unread until `next` is called again). Received pieces are copied into those buffers at once,
 * so a half-sent payload holds exactly the memory that was reserved for it.
 */
import { NbdProtocolError } from './errors.js';
import {
  decodeClientFlags,
  decodeOptionHeader,
  decodeRequestHeader,
  CMD,
  IHAVEOPT,
  MAX_OPTION_DATA,
  MAX_PAYLOAD,
  OPTION_HEADER_LENGTH,
  REQUEST_HEADER_LENGTH,
  REQUEST_MAGIC,
  type RequestHeader,
} from './protocol.js';

export type ClientMessage =
  | { type: 'clientFlags'; flags: number }
  | { type: 'option'; option: number; data: Buffer }
  /** An option whose data was over MAX_OPTION_DATA: skipped. */
  | { type: 'oversizeOption'; option: number; length: number }
  /** A request; a write's payload comes as the buffers `payloadFor` gave, filled in order. */
  | { type: 'request'; header: RequestHeader; data?: Buffer[] }
  /** A write whose payload was over MAX_PAYLOAD: skipped. */
  | { type: 'oversizeRequest'; header: RequestHeader }
  /** A write the connection refused (`payloadFor` answered null): its payload was skipped. */
  | { type: 'refusedWrite'; header: RequestHeader };

/**
 * Where a write's payload goes: buffers of `header.length` bytes in all, filled in order; null to
 * refuse the write (its payload is skipped), or undefined for "not now" (the header is left unread).
 */
export type PayloadFor = (header: RequestHeader) => Buffer[] | null | undefined;

export type ParserPhase = 'clientFlags' | 'options' | 'transmission';

const EMPTY = Buffer.alloc(0);

/** A FIFO of received chunks that hands out byte ranges, copying only when a range spans chunks. */
export class ByteQueue {
  private chunks: Buffer[] = [];
  private first = 0;
  private head = 0;
  private total = 0;

  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The first `n` bytes (n ≤ length) without consuming them. */
  peek(n: number): Buffer {
    if (n === 0) return EMPTY;
    const c = this.chunks[this.first];
    if (c.length - this.head >= n) return c.subarray(this.head, this.head + n);
    return this.gather(n, false);
  }

  /** Removes and returns the first `n` bytes (n ≤ length); `alloc` makes the buffer when they span chunks. */
  take(n: number, alloc: (n: number) => Buffer = Buffer.allocUnsafe): Buffer {
    if (n === 0) return EMPTY;
    const c = this.chunks[this.first];
    if (c.length - this.head >= n) {
      const out = c.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    return this.gather(n, true, alloc);
  }

  /** Moves up to `dst.length - at` bytes into `dst` from offset `at`; returns how many. */
  copyInto(dst: Buffer, at: number): number {
    const n = Math.min(dst.length - at, this.total);
    let done = 0;
    while (done < n) {
      const c = this.chunks[this.first];
      const k = Math.min(c.length - this.head, n - done);
      c.copy(dst, at + done, this.head, this.head + k);
      done += k;
      this.advance(k);
    }
    return n;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const k = Math.min(n, this.total);
    this.advance(k);
    return k;
  }

  private gather(n: number, consume: boolean, alloc: (n: number) => Buffer = Buffer.allocUnsafe): Buffer {
    const out = alloc(n);
    let at = 0;
    let i = this.first;
    let h = this.head;
    while (at < n) {
      const c = this.chunks[i];
      const k = Math.min(c.length - h, n - at);
      c.copy(out, at, h, h + k);
      at += k;
      i++;
      h = 0;
    }
    if (consume) this.advance(n);
    return out;
  }

  private advance(n: number): void {
    this.total -= n;
    while (n > 0) {
      const c = this.chunks[this.first];
      const k = Math.min(c.length - this.head, n);
      this.head += k;
      n -= k;
      if (this.head === c.length) {
        this.first++;
        this.head = 0;
      }
    }
    if (this.first > 64 || this.first === this.chunks.length) {
      this.chunks = this.chunks.slice(this.first);
      this.first = 0;
    }
  }
}

export class ClientParser {
  /** What the next bytes are; the connection moves it on to 'transmission' when the export is chosen. */
  phase: ParserPhase = 'clientFlags';
  private queue = new ByteQueue();
  private discard = 0;
  /** The write whose payload is being skipped because the connection refused it. */
  private refused: RequestHeader | undefined;
  /** The write whose payload is arriving, its buffers, which one is being filled and how much in all. */
  private payload: { header: RequestHeader; data: Buffer[]; index: number; at: number; filled: number } | undefined;

  /** `payloadFor` gives the buffers of each write's payload (by default, one new one). */
  constructor(private readonly payloadFor: PayloadFor = (h) => [Buffer.allocUnsafe(h.length)]) {}

  push(chunk: Buffer): void {
    this.queue.push(chunk);
  }

  /** Bytes received and not yet handed out (including a partly received write and its header). */
  get buffered(): number {
    return this.queue.length + (this.payload ? REQUEST_HEADER_LENGTH + this.payload.filled : 0);
  }

  /** The write whose payload is arriving: its header and the bytes received so far. */
  get receiving(): { header: RequestHeader; received: number } | undefined {
    return this.payload && { header: this.payload.header, received: this.payload.filled };
  }

  /** Gives up the buffers of a write whose payload will never arrive (the connection closes). */
  abandonPayload(): Buffer[] | undefined {
    const data = this.payload?.data;
    this.payload = undefined;
    return data;
  }

  /** Bytes of an oversize payload still to be skipped. */
  get skipping(): number {
    return this.discard;
  }

  /** The next whole message, or undefined until more bytes arrive. Throws NbdProtocolError on bad magic. */
  next(): ClientMessage | undefined {
    if (this.discard > 0) {
      this.discard -= this.queue.skip(this.discard);
      if (this.discard > 0) return undefined;
    }
    if (this.refused) {
      const header = this.refused;
      this.refused = undefined;
      return { type: 'refusedWrite', header };
    }
    const q = this.queue;
    if (this.payload) {
      const p = this.payload;
      while (p.index < p.data.length && q.length > 0) {
        const n = q.copyInto(p.data[p.index], p.at);
        p.at += n;
        p.filled += n;
        if (p.at === p.data[p.index].length) {
          p.index++;
          p.at = 0;
        }
      }
      if (p.filled < p.header.length) return undefined;
      this.payload = undefined;
      return { type: 'request', header: p.header, data: p.data };
    }
    switch (this.phase) {
      case 'clientFlags': {
        if (q.length < 4) return undefined;
        const flags = decodeClientFlags(q.take(4));
        this.phase = 'options';
        return { type: 'clientFlags', flags };
      }
      case 'options': {
        if (q.length < OPTION_HEADER_LENGTH) {
          // The magic is checked as soon as it is there: garbage shorter than a header is refused too.
          if (q.length >= 8 && q.peek(8).readBigUInt64BE(0) !== IHAVEOPT) {
            throw new NbdProtocolError('option header: bad magic (expected IHAVEOPT)');
          }
          return undefined;
        }
        const { option, length } = decodeOptionHeader(q.peek(OPTION_HEADER_LENGTH));
        if (length > MAX_OPTION_DATA) {
          q.skip(OPTION_HEADER_LENGTH);
          this.discard = length - q.skip(length);
          return { type: 'oversizeOption', option, length };
        }
        if (q.length < OPTION_HEADER_LENGTH + length) return undefined;
        q.skip(OPTION_HEADER_LENGTH);
        return { type: 'option', option, data: q.take(length) };
      }
      case 'transmission': {
        if (q.length < REQUEST_HEADER_LENGTH) {
          if (q.length >= 4 && q.peek(4).readUInt32BE(0) !== REQUEST_MAGIC) {
            throw new NbdProtocolError(`request: bad magic 0x${q.peek(4).toString('hex')}`);
          }
          return undefined;
        }
        const header = decodeRequestHeader(q.peek(REQUEST_HEADER_LENGTH));
        if (header.command !== CMD.WRITE) {
          q.skip(REQUEST_HEADER_LENGTH);
          return { type: 'request', header };
        }
        if (header.length > MAX_PAYLOAD) {
          q.skip(REQUEST_HEADER_LENGTH);
          this.discard = header.length - q.skip(header.length);
          return { type: 'oversizeRequest', header };
        }
        if (header.length === 0) {
          q.skip(REQUEST_HEADER_LENGTH);
          return { type: 'request', header, data: [] };
        }
        const data = this.payloadFor(header);
        if (data === undefined) return undefined;
        q.skip(REQUEST_HEADER_LENGTH);
        if (data === null) {
          this.refused = header;
          this.discard = header.length;
        } else {
          if (data.reduce((n, b) => n + b.length, 0) !== header.length) {
            throw new RangeError('payload buffers of the wrong length');
          }
          this.payload = { header, data, index: 0, at: 0, filled: 0 };
        }
        return this.next();
      }
    }
  }
}
