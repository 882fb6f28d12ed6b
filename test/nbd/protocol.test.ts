/**
 * The NBD codec: every message's encode/decode pair round-trips and sits at the byte offsets the
 * protocol fixes; decoders refuse bad magic and impossible lengths; the server's parser yields the
 * same messages whether bytes come whole or one at a time, and skips oversize payloads without
 * buffering them.
 */
import { describe, expect, it } from 'vitest';
import { BufferPool } from '../../src/nbd/buffers.js';
import { NbdProtocolError } from '../../src/nbd/errors.js';
import { ByteQueue, ClientParser, type ClientMessage } from '../../src/nbd/parser.js';
import * as P from '../../src/nbd/protocol.js';
import { rng, seedFrom } from '../helpers/random.js';
import { sleep } from '../helpers/async.js';

const SEED = seedFrom('TIDEMARK_NBD_SEED', 4242);
const TRIALS = Number(process.env.TIDEMARK_NBD_CASES ?? 50);

describe('handshake and options', () => {
  it('greeting: NBDMAGIC IHAVEOPT flags', () => {
    const b = P.encodeHandshake(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES);
    expect(b.toString('latin1', 0, 16)).toBe('NBDMAGICIHAVEOPT');
    expect(b.readUInt16BE(16)).toBe(3);
    expect(P.decodeHandshake(b)).toEqual({ flags: 3 });
    expect(() => P.decodeHandshake(Buffer.from('NBDMAGICXXXXXXXX\0\x03', 'latin1'))).toThrow(NbdProtocolError);
    expect(() => P.decodeHandshake(b.subarray(0, 17))).toThrow(/need 18/);
    expect(P.decodeClientFlags(P.encodeClientFlags(0x80000003))).toBe(0x80000003);
  });

  it('option header and data', () => {
    const b = P.encodeOption(P.OPT.GO, Buffer.from('abc'));
    expect(b.length).toBe(19);
    expect(b.toString('latin1', 0, 8)).toBe('IHAVEOPT');
    expect(P.decodeOptionHeader(b)).toEqual({ option: 7, length: 3 });
    const bad = Buffer.from(b);
    bad[0] ^= 1;
    expect(() => P.decodeOptionHeader(bad)).toThrow(/bad magic/);
  });

  it('INFO/GO request round trip and malformed ones', () => {
    const r = { name: 'disk-é', requests: [P.INFO.NAME, P.INFO.BLOCK_SIZE] };
    const b = P.encodeInfoRequest(r);
    expect(b.readUInt32BE(0)).toBe(Buffer.byteLength('disk-é'));
    expect(P.decodeInfoRequest(b)).toEqual(r);
    expect(P.decodeInfoRequest(P.encodeInfoRequest({ name: '', requests: [] }))).toEqual({ name: '', requests: [] });
    expect(() => P.decodeInfoRequest(b.subarray(0, b.length - 1))).toThrow(/do not fit/);
    const long = Buffer.from(b);
    long.writeUInt32BE(1000, 0);
    expect(() => P.decodeInfoRequest(long)).toThrow(/longer than the option/);
    expect(() => P.decodeInfoRequest(Buffer.alloc(3))).toThrow(NbdProtocolError);
    expect(() => P.decodeInfoRequest(P.encodeInfoRequest({ name: 'a\0b', requests: [] }))).toThrow(/UTF-8/);
  });

  it('meta context request round trip and malformed ones', () => {
    const r = { name: 'd', queries: ['base:allocation', 'qemu:dirty-bitmap:rct1:a:b:c', ''] };
    const b = P.encodeMetaContextRequest(r);
    expect(P.decodeMetaContextRequest(b)).toEqual(r);
    expect(() => P.decodeMetaContextRequest(Buffer.concat([b, Buffer.from([0])]))).toThrow(/trailing/);
    const many = Buffer.from(b);
    many.writeUInt32BE(0xffffffff, 5); // query count: cannot fit
    expect(() => P.decodeMetaContextRequest(many)).toThrow(/cannot fit/);
    expect(() => P.decodeMetaContextRequest(b.subarray(0, b.length - 2))).toThrow(NbdProtocolError);
  });

  it('option replies, server, meta context and info items', () => {
    const data = P.encodeServerReplyData('vm1-disk0', 'the boot disk');
    const rep = P.encodeOptionReply(P.OPT.LIST, P.REP.SERVER, data);
    expect(P.decodeOptionReplyHeader(rep)).toEqual({ option: 3, type: 2, length: data.length });
    expect(P.decodeServerReplyData(rep.subarray(20))).toEqual({ name: 'vm1-disk0', description: 'the boot disk' });
    expect(P.decodeMetaContextReplyData(P.encodeMetaContextReplyData(7, 'base:allocation'))).toEqual({
      id: 7,
      name: 'base:allocation',
    });
    const items: P.InfoItem[] = [
      { info: P.INFO.EXPORT, size: 2 ** 40 + 512, flags: 0x9ed },
      { info: P.INFO.NAME, name: 'x' },
      { info: P.INFO.DESCRIPTION, description: 'y z' },
      { info: P.INFO.BLOCK_SIZE, minimum: 512, preferred: 4096, maximum: 32 << 20 },
      { info: 99, unknown: Buffer.from([1, 2]) },
    ];
    for (const it of items) expect(P.decodeInfoReplyData(P.encodeInfoReplyData(it))).toEqual(it);
    expect(P.encodeInfoReplyData(items[0]).length).toBe(12);
    expect(P.encodeInfoReplyData(items[3]).length).toBe(14);
    expect(P.isErrorReply(P.REP.ERR_UNKNOWN)).toBe(true);
    expect(P.REP.ERR_UNKNOWN).toBe(2 ** 31 + 6);
    expect([P.OPT.LIST_META_CONTEXT, P.OPT.SET_META_CONTEXT]).toEqual([9, 10]);
  });

  it('export name reply with and without the 124 zero bytes', () => {
    expect(P.encodeExportNameReply(1 << 20, 3, true).length).toBe(10);
    const full = P.encodeExportNameReply(1 << 20, 3, false);
    expect(full.length).toBe(134);
    expect(full.subarray(10).every((x) => x === 0)).toBe(true);
    expect(P.decodeExportNameReply(full)).toEqual({ size: 1 << 20, flags: 3 });
  });
});

describe('transmission', () => {
  it('request header at its fixed offsets, 64-bit offsets and handles', () => {
    const h = { flags: 1, command: P.CMD.WRITE, handle: 0xfedcba9876543210n, offset: 2 ** 40 + 4096, length: 3 };
    const b = P.encodeRequest(h, Buffer.from([7, 8, 9]));
    expect(b.length).toBe(31);
    expect(b.readUInt32BE(0)).toBe(0x25609513);
    expect(b.readUInt16BE(6)).toBe(1);
    expect(b.readBigUInt64BE(16)).toBe(BigInt(2 ** 40 + 4096));
    expect(P.decodeRequestHeader(b)).toEqual(h);
    const bad = Buffer.from(b);
    bad.writeUInt32BE(0xdeadbeef, 0);
    expect(() => P.decodeRequestHeader(bad)).toThrow(/bad magic 0xdeadbeef/);
    // An offset past 2^53 decodes to a number larger than any disk (refused by range checks).
    const huge = Buffer.from(b);
    huge.writeBigUInt64BE(0xffffffffffffffffn, 16);
    expect(P.decodeRequestHeader(huge).offset).toBeGreaterThan(Number.MAX_SAFE_INTEGER);
  });

  it('simple reply and every structured chunk type', () => {
    expect(P.decodeSimpleReply(P.encodeSimpleReply(22, 5n))).toEqual({ error: 22, handle: 5n });
    const handle = 0x0102030405060708n;
    const cases: [Buffer, P.ChunkPayload][] = [
      [P.encodeNoneChunk(handle), { type: P.REPLY_TYPE.NONE }],
      [
        Buffer.concat([P.encodeOffsetDataHeader(0, handle, 4096, 3), Buffer.from('abc')]),
        { type: P.REPLY_TYPE.OFFSET_DATA, offset: 4096, data: Buffer.from('abc') },
      ],
      [P.encodeOffsetHole(1, handle, 8192, 65536), { type: P.REPLY_TYPE.OFFSET_HOLE, offset: 8192, length: 65536 }],
      [
        P.encodeBlockStatusChunk(1, handle, 2, [
          { length: 512, flags: 3 },
          { length: 1024, flags: 0 },
        ]),
        {
          type: P.REPLY_TYPE.BLOCK_STATUS,
          contextId: 2,
          descriptors: [
            { length: 512, flags: 3 },
            { length: 1024, flags: 0 },
          ],
        },
      ],
      [
        P.encodeErrorChunk(1, handle, 5, 'disk on fire'),
        { type: P.REPLY_TYPE.ERROR, error: 5, message: 'disk on fire' },
      ],
      [
        P.encodeErrorOffsetChunk(1, handle, 5, 'bad sector', 1536),
        { type: P.REPLY_TYPE.ERROR_OFFSET, error: 5, message: 'bad sector', offset: 1536 },
      ],
    ];
    for (const [wire, payload] of cases) {
      const h = P.decodeChunkHeader(wire);
      expect(h.handle).toBe(handle);
      expect(h.length).toBe(wire.length - 20);
      expect(P.decodeChunkPayload(h.type, wire.subarray(20))).toEqual(payload);
    }
    expect(() => P.decodeChunkPayload(P.REPLY_TYPE.OFFSET_HOLE, Buffer.alloc(11))).toThrow(NbdProtocolError);
    expect(() => P.decodeChunkPayload(P.REPLY_TYPE.BLOCK_STATUS, Buffer.alloc(8))).toThrow(NbdProtocolError);
    // Error messages are cut at 4096 bytes on a character boundary.
    const long = P.encodeErrorChunk(1, 1n, 5, 'é'.repeat(3000));
    const msg = (P.decodeChunkPayload(P.REPLY_TYPE.ERROR, long.subarray(20)) as { message: string }).message;
    expect(Buffer.byteLength(msg)).toBeLessThanOrEqual(4096);
    expect(msg).toBe('é'.repeat(2048));
  });
});

describe('ByteQueue and BufferPool', () => {
  it('takes ranges across chunks, copying only when they span', () => {
    const q = new ByteQueue();
    q.push(Buffer.from('hello '));
    q.push(Buffer.from('wor'));
    q.push(Buffer.from('ld'));
    expect(q.peek(3).toString()).toBe('hel');
    expect(q.take(8).toString()).toBe('hello wo');
    expect(q.length).toBe(3);
    expect(q.skip(10)).toBe(3);
    expect(q.length).toBe(0);
    expect(q.take(0).length).toBe(0);
  });

  it('pool hands out exact lengths and takes back only its own buffers', () => {
    const pool = new BufferPool(1 << 20);
    const a = pool.get(5000);
    expect(a.length).toBe(5000);
    pool.put(a);
    expect(pool.retainedBytes).toBe(8192);
    const b = pool.get(6000);
    expect(b.buffer).toBe(a.buffer); // reused
    pool.put(Buffer.alloc(8192)); // not from the pool: ignored
    expect(pool.retainedBytes).toBe(0);
    const big = [pool.get(512 << 10), pool.get(512 << 10), pool.get(512 << 10)];
    big.forEach((x) => pool.put(x));
    expect(pool.retainedBytes).toBe(1 << 20); // capped
  });

  it('pool shrinks to its idle size once no buffer was taken for a while', async () => {
    const pool = new BufferPool({ maxRetained: 4 << 20, idleRetained: 1 << 20, idleMs: 500 });
    const burst = [0, 1, 2, 3].map(() => pool.get(1 << 20));
    burst.forEach((x) => pool.put(x));
    expect(pool.retainedBytes).toBe(4 << 20); // kept while I/O runs
    await sleep(100);
    pool.put(pool.get(1 << 20)); // still busy: the trim waits
    await sleep(200);
    expect(pool.retainedBytes).toBe(4 << 20);
    await sleep(1000);
    expect(pool.retainedBytes).toBe(1 << 20);
    const again = pool.get(1 << 20);
    expect(pool.allocated).toBe(4); // the kept buffer is reused
    pool.put(again);
  });
});

function feed(parser: ClientParser, bytes: Buffer, pieces: number[]): ClientMessage[] {
  const out: ClientMessage[] = [];
  let at = 0;
  for (const n of pieces) {
    parser.push(bytes.subarray(at, at + n));
    at += n;
    for (let m = parser.next(); m; m = parser.next()) out.push(m);
  }
  return out;
}

describe('ClientParser', () => {
  const stream = Buffer.concat([
    P.encodeClientFlags(3),
    P.encodeOption(P.OPT.STRUCTURED_REPLY),
    P.encodeOption(P.OPT.GO, P.encodeInfoRequest({ name: 'd', requests: [3] })),
  ]);
  const requests = Buffer.concat([
    P.encodeRequest({ flags: 0, command: P.CMD.READ, handle: 1n, offset: 0, length: 4096 }),
    P.encodeRequest({ flags: 1, command: P.CMD.WRITE, handle: 2n, offset: 512, length: 1000 }, Buffer.alloc(1000, 7)),
    P.encodeRequest({ flags: 0, command: P.CMD.DISC, handle: 3n, offset: 0, length: 0 }),
  ]);

  function parseAll(pieces: (total: number) => number[]): ClientMessage[] {
    const p = new ClientParser();
    const negotiation = feed(p, stream, pieces(stream.length));
    p.phase = 'transmission';
    return [...negotiation, ...feed(p, requests, pieces(requests.length))];
  }

  it(`yields the same messages whole, byte by byte, and in random pieces (seed ${SEED})`, () => {
    const whole = parseAll((n) => [n]);
    expect(whole.map((m) => m.type)).toEqual(['clientFlags', 'option', 'option', 'request', 'request', 'request']);
    const write = whole[4] as Extract<ClientMessage, { type: 'request' }>;
    expect(write.header).toMatchObject({ command: 1, flags: 1, handle: 2n, offset: 512, length: 1000 });
    expect(Buffer.concat(write.data!).equals(Buffer.alloc(1000, 7))).toBe(true);
    expect(parseAll((n) => Array(n).fill(1))).toEqual(whole);
    const r = rng(SEED);
    for (let trial = 0; trial < TRIALS; trial++) {
      const cut = (n: number) => {
        const out: number[] = [];
        for (let left = n; left > 0;) {
          const k = Math.min(left, 1 + r.int(40));
          out.push(k);
          left -= k;
        }
        return out;
      };
      expect(parseAll(cut), `seed ${SEED} trial ${trial}`).toEqual(whole);
    }
  });

  it('holds back a write until its whole payload arrived', () => {
    const p = new ClientParser();
    p.phase = 'transmission';
    const req = P.encodeRequest({ flags: 0, command: 1, handle: 9n, offset: 0, length: 100 }, Buffer.alloc(100, 1));
    p.push(req.subarray(0, 60));
    expect(p.next()).toBeUndefined();
    expect(p.buffered).toBe(60);
    p.push(req.subarray(60));
    expect(p.next()).toMatchObject({ type: 'request', header: { handle: 9n } });
  });

  it('skips an oversize option or write as it streams in, then continues in step', () => {
    const p = new ClientParser();
    p.phase = 'options';
    const header = P.encodeOption(77).subarray(0, 16);
    header.writeUInt32BE(10 * P.MAX_OPTION_DATA, 12);
    p.push(header);
    expect(p.next()).toEqual({ type: 'oversizeOption', option: 77, length: 10 * P.MAX_OPTION_DATA });
    for (let i = 0; i < 10; i++) {
      p.push(Buffer.alloc(P.MAX_OPTION_DATA));
      expect(p.next()).toBeUndefined();
      expect(p.buffered).toBe(0); // nothing kept
    }
    p.push(P.encodeOption(P.OPT.LIST));
    expect(p.next()).toMatchObject({ type: 'option', option: P.OPT.LIST });

    p.phase = 'transmission';
    const big = P.encodeRequest({ flags: 0, command: 1, handle: 4n, offset: 0, length: P.MAX_PAYLOAD + 1 });
    p.push(big);
    expect(p.next()).toMatchObject({ type: 'oversizeRequest', header: { handle: 4n } });
    expect(p.skipping).toBe(P.MAX_PAYLOAD + 1);
    p.push(Buffer.alloc(P.MAX_PAYLOAD + 1));
    p.push(P.encodeRequest({ flags: 0, command: P.CMD.FLUSH, handle: 5n, offset: 0, length: 0 }));
    expect(p.next()).toMatchObject({ type: 'request', header: { command: P.CMD.FLUSH, handle: 5n } });
  });

  it('throws a protocol error on a bad request magic', () => {
    const p = new ClientParser();
    p.phase = 'transmission';
    p.push(Buffer.alloc(28, 0x41));
    expect(() => p.next()).toThrow(NbdProtocolError);
  });
});
