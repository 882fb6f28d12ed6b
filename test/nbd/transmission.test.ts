/**
 * The transmission phase against a raw socket and an in-memory device: every command with simple and
 * structured replies, the error value of every refusal, holes in reads, block status for both kinds of
 * context, concurrency and out-of-order replies, flow control against a client that does not read, and
 * shutdown (DISC, removeExport, close) that lets requests in flight finish.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { dataCost } from '../../src/nbd/budget.js';
import { MAX_REQUESTS_IN_FLIGHT, REPLY_ESTIMATE } from '../../src/nbd/connection.js';
import { DEFAULT_LIMITS } from '../../src/nbd/limits.js';
import {
  CMD,
  CMD_FLAG,
  MAX_PAYLOAD,
  NBD_ERR,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  STATE_DIRTY,
  STATE_HOLE,
  STATE_ZERO,
  type ChunkPayload,
} from '../../src/nbd/protocol.js';
import { rng, seedFrom } from '../helpers/random.js';
import { startServer, type RunningServer } from './fixture.js';
import { CLUSTER, MemoryDevice } from './memory-device.js';
import { openExport, RawClient, sleep, type Reply } from './raw-client.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_NBD_SEED', 1357);
let srv: RunningServer;
let disk: MemoryDevice;
let ro: MemoryDevice;
let handle = 1n;
const next = () => handle++;

beforeEach(async () => {
  disk = new MemoryDevice({ size: 16 * MiB, strictFastZero: true });
  ro = new MemoryDevice({ size: 1 * MiB });
  ro.fill(0, 4096, 0xee);
  srv = await startServer([
    { name: 'disk', device: disk },
    { name: 'ro', device: ro, opts: { readOnly: true } },
  ]);
});
afterEach(async () => {
  disk.releaseAll(); // a failed test must not leave the server waiting on held operations
  await srv.stop();
});

const where = () => ({ path: srv.socket });
type Chunk = Extract<Reply, { kind: 'chunk' }>;
const payloads = (chunks: Chunk[]) => chunks.map((c) => c.payload);

/** One request, one reply (simple: with `readLength` data bytes for reads). */
async function simple(c: RawClient, h: Parameters<RawClient['request']>[0], data?: Buffer) {
  c.request(h, data);
  return c.reply(() => (h.command === CMD.READ ? (h.length ?? 0) : 0));
}

async function structured(c: RawClient, h: Parameters<RawClient['request']>[0], data?: Buffer) {
  c.request(h, data);
  return c.structuredReply();
}

function errorOf(chunks: Chunk[]): number | undefined {
  const e = chunks.find((c) => c.type === REPLY_TYPE.ERROR);
  return e ? (e.payload as { error: number }).error : undefined;
}

describe('simple replies', () => {
  it('write, read back, flush, trim, write zeroes; FUA and flags reach the device', async () => {
    const { client: c } = await openExport(where(), 'disk', { structured: false });
    const data = rng(SEED).bytes(70_144);
    expect(
      await simple(c, { command: CMD.WRITE, handle: next(), offset: 1_000_448, flags: CMD_FLAG.FUA }, data),
    ).toMatchObject({ kind: 'simple', error: 0 });
    const r = await simple(c, { command: CMD.READ, handle: next(), offset: 1_000_448, length: 70_144 });
    expect(r.kind === 'simple' && r.data!.equals(data)).toBe(true);
    expect((await simple(c, { command: CMD.FLUSH, handle: next() })).kind).toBe('simple');
    await simple(c, { command: CMD.TRIM, handle: next(), offset: 0, length: 2 * MiB });
    await simple(c, {
      command: CMD.WRITE_ZEROES,
      handle: next(),
      offset: 4 * MiB,
      length: CLUSTER,
      flags: CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO,
    });
    expect(disk.log).toEqual([
      'write 1000448 70144 fua',
      'read 1000448 70144',
      'flush',
      'trim 0 2097152',
      `zero ${4 * MiB} ${CLUSTER} nohole fast`,
    ]);
    expect(disk.data.subarray(1_000_448, 1_070_592).every((x) => x === 0)).toBe(true); // trimmed
    const zeroRead = await simple(c, { command: CMD.READ, handle: next(), offset: 0, length: 0 });
    expect(zeroRead).toMatchObject({ kind: 'simple', error: 0 });
    c.destroy();
  });

  it('errors: the protocol error value for each refusal, and the connection stays usable', async () => {
    const { client: c } = await openExport(where(), 'disk', { structured: false });
    const { client: r } = await openExport(where(), 'ro', { structured: false });
    const size = 16 * MiB;
    const cases: [RawClient, Parameters<RawClient['request']>[0], number, Buffer?][] = [
      [c, { command: CMD.READ, handle: 1n, offset: size - 512, length: 1024 }, NBD_ERR.EINVAL],
      [c, { command: CMD.READ, handle: 2n, offset: 2 ** 60, length: 512 }, NBD_ERR.EINVAL],
      [c, { command: CMD.WRITE, handle: 3n, offset: size, length: 512 }, NBD_ERR.ENOSPC, Buffer.alloc(512)],
      [c, { command: CMD.WRITE_ZEROES, handle: 4n, offset: size - 512, length: 1024 }, NBD_ERR.ENOSPC],
      [c, { command: CMD.TRIM, handle: 5n, offset: size + 512, length: 0 }, NBD_ERR.EINVAL],
      [c, { command: 42, handle: 6n, offset: 0, length: 0 }, NBD_ERR.EINVAL],
      [c, { command: CMD.CACHE, handle: 7n, offset: 0, length: 512 }, NBD_ERR.EINVAL],
      [c, { command: CMD.READ, handle: 8n, offset: 0, length: 512, flags: CMD_FLAG.NO_HOLE }, NBD_ERR.EINVAL],
      [c, { command: CMD.READ, handle: 9n, offset: 0, length: 512, flags: CMD_FLAG.DF }, NBD_ERR.EINVAL],
      [c, { command: CMD.FLUSH, handle: 10n, flags: 0x8000 }, NBD_ERR.EINVAL],
      [c, { command: CMD.READ, handle: 11n, offset: 512, length: 1000 }, NBD_ERR.EINVAL], // not aligned
      [c, { command: CMD.WRITE, handle: 12n, offset: 100, length: 512 }, NBD_ERR.EINVAL, Buffer.alloc(512)],
      [c, { command: CMD.READ, handle: 13n, offset: 0, length: MAX_PAYLOAD + 512 }, NBD_ERR.EOVERFLOW],
      [c, { command: CMD.BLOCK_STATUS, handle: 14n, offset: 0, length: 512 }, NBD_ERR.EINVAL], // no context
      [
        c,
        { command: CMD.WRITE_ZEROES, handle: 15n, offset: 512, length: 512, flags: CMD_FLAG.FAST_ZERO },
        NBD_ERR.ENOTSUP,
      ],
      [r, { command: CMD.WRITE, handle: 16n, offset: 0, length: 512 }, NBD_ERR.EPERM, Buffer.alloc(512)],
      [r, { command: CMD.TRIM, handle: 17n, offset: 0, length: 512 }, NBD_ERR.EPERM],
      [r, { command: CMD.WRITE_ZEROES, handle: 18n, offset: 0, length: 512 }, NBD_ERR.EPERM],
    ];
    for (const [client, h, errno, data] of cases) {
      const reply = await simple(client, h, data);
      expect(reply, `handle ${h.handle}`).toMatchObject({ kind: 'simple', handle: h.handle, error: errno });
      expect(reply.kind === 'simple' && reply.data).toBeFalsy();
    }
    // Failures of the device itself: EIO, ENOSPC from a system error, EPERM from a read-only device.
    disk.failNext('read', new TidemarkError('IO_ERROR', 'sector unreadable'));
    expect(await simple(c, { command: CMD.READ, handle: 20n, offset: 0, length: 512 })).toMatchObject({
      error: NBD_ERR.EIO,
    });
    disk.failNext('write', Object.assign(new Error('disk full'), { code: 'ENOSPC' }));
    expect(
      await simple(c, { command: CMD.WRITE, handle: 21n, offset: 0, length: 512 }, Buffer.alloc(512)),
    ).toMatchObject({ error: NBD_ERR.ENOSPC });
    disk.failNext('flush', new TidemarkError('READ_ONLY', 'no'));
    expect(await simple(c, { command: CMD.FLUSH, handle: 22n })).toMatchObject({ error: NBD_ERR.EPERM });
    // Still in step: a good request works on both connections.
    expect(await simple(c, { command: CMD.READ, handle: 23n, offset: 0, length: 512 })).toMatchObject({ error: 0 });
    expect(await simple(r, { command: CMD.READ, handle: 24n, offset: 0, length: 4096 })).toMatchObject({ error: 0 });
    expect(srv.server.stats().errors).toBe(cases.length + 3);
    c.destroy();
    r.destroy();
  });

  it('without block-size agreement unaligned requests are served', async () => {
    const { client: c } = await openExport(where(), 'disk', { structured: false, blockSize: false });
    await simple(c, { command: CMD.WRITE, handle: next(), offset: 3, length: 5 }, Buffer.from('hello'));
    const r = await simple(c, { command: CMD.READ, handle: next(), offset: 1, length: 9 });
    expect(r.kind === 'simple' && r.data!.toString('latin1')).toBe('\0\0hello\0\0');
    c.destroy();
  });

  it('a write over 32 MiB is refused with EOVERFLOW after its payload is skipped', async () => {
    const { client: c } = await openExport(where(), 'disk', { structured: false });
    const n = MAX_PAYLOAD + 512;
    c.request({ command: CMD.WRITE, handle: 99n, offset: 0, length: n });
    for (let at = 0; at < n; at += 4 * MiB) c.write(Buffer.alloc(Math.min(4 * MiB, n - at), 1));
    expect(await c.reply(undefined, 20_000)).toMatchObject({ handle: 99n, error: NBD_ERR.EOVERFLOW });
    expect(await simple(c, { command: CMD.FLUSH, handle: 100n })).toMatchObject({ handle: 100n, error: 0 });
    expect(disk.log).toEqual(['flush']);
    c.destroy();
  });
});

describe('structured replies', () => {
  it('reads send holes as OFFSET_HOLE chunks and data as OFFSET_DATA; DF gives one chunk', async () => {
    disk.fill(CLUSTER, CLUSTER, 0xab);
    disk.fill(3 * CLUSTER, 512, 0xcd);
    const { client: c } = await openExport(where(), 'disk');
    const chunks = await structured(c, { command: CMD.READ, handle: next(), offset: 512, length: 4 * CLUSTER });
    expect(chunks.map((x) => x.flags)).toEqual([0, 0, 0, 0, REPLY_FLAG_DONE]);
    const p = payloads(chunks) as Extract<ChunkPayload, { offset: number }>[];
    expect(p[0]).toEqual({ type: REPLY_TYPE.OFFSET_HOLE, offset: 512, length: CLUSTER - 512 });
    expect(p[1]).toMatchObject({ type: REPLY_TYPE.OFFSET_DATA, offset: CLUSTER });
    expect((p[1] as { data: Buffer }).data.equals(Buffer.alloc(CLUSTER, 0xab))).toBe(true);
    expect(p[2]).toEqual({ type: REPLY_TYPE.OFFSET_HOLE, offset: 2 * CLUSTER, length: CLUSTER });
    expect(p[3]).toMatchObject({ type: REPLY_TYPE.OFFSET_DATA, offset: 3 * CLUSTER });
    expect((p[3] as { data: Buffer }).data.length).toBe(CLUSTER);
    expect(p[4]).toEqual({ type: REPLY_TYPE.OFFSET_HOLE, offset: 4 * CLUSTER, length: 512 });

    const df = await structured(c, {
      command: CMD.READ,
      handle: next(),
      offset: 0,
      length: 2 * CLUSTER,
      flags: CMD_FLAG.DF,
    });
    expect(df).toHaveLength(1);
    expect(df[0]).toMatchObject({ flags: REPLY_FLAG_DONE, type: REPLY_TYPE.OFFSET_DATA });
    const buf = (df[0].payload as { data: Buffer }).data;
    expect(buf.subarray(0, CLUSTER).every((x) => x === 0) && buf.subarray(CLUSTER).every((x) => x === 0xab)).toBe(true);
    // Writes and flushes are acknowledged with one NONE chunk; errors with an ERROR chunk carrying a message.
    const ok = await structured(c, { command: CMD.FLUSH, handle: next() });
    expect(ok).toEqual([expect.objectContaining({ type: REPLY_TYPE.NONE, flags: REPLY_FLAG_DONE })]);
    const bad = await structured(c, { command: CMD.READ, handle: next(), offset: 16 * MiB, length: 512 });
    expect(bad[0].payload).toMatchObject({ error: NBD_ERR.EINVAL, message: expect.stringMatching(/past the end/) });
    disk.failNext('read', new TidemarkError('IO_ERROR', 'media error'));
    const failed = await structured(c, { command: CMD.READ, handle: next(), offset: CLUSTER, length: 512 });
    expect(failed).toHaveLength(1);
    expect(failed[0].payload).toEqual({ type: REPLY_TYPE.ERROR, error: NBD_ERR.EIO, message: 'media error' });
    c.destroy();
  });

  it('contiguous reads arriving together are served by one device read; a bad sector fails only its request', async () => {
    disk.fill(0, 16 * CLUSTER, 0x42);
    const { client: c } = await openExport(where(), 'disk');
    const { encodeRequest } = await import('../../src/nbd/protocol.js');
    const burst = (base: number, first: bigint) =>
      Buffer.concat(
        [0, 1, 2, 3].map((i) =>
          encodeRequest({
            flags: 0,
            command: CMD.READ,
            handle: first + BigInt(i),
            offset: base + i * CLUSTER,
            length: CLUSTER,
          }),
        ),
      );
    c.write(burst(0, 10n));
    const replies = [];
    for (let i = 0; i < 4; i++) replies.push(await c.structuredReply());
    expect(replies.map((r) => r[0].handle)).toEqual([10n, 11n, 12n, 13n]);
    for (const [i, r] of replies.entries()) {
      expect(r).toHaveLength(1);
      expect(r[0].payload).toMatchObject({ type: REPLY_TYPE.OFFSET_DATA, offset: i * CLUSTER });
      expect((r[0].payload as { data: Buffer }).data.equals(Buffer.alloc(CLUSTER, 0x42))).toBe(true);
    }
    expect(disk.log.filter((e) => e.startsWith('read'))).toEqual([`read 0 ${4 * CLUSTER}`]);

    disk.log.length = 0;
    disk.badRanges.push({ offset: 8 * CLUSTER + 4096, length: 512 });
    c.write(burst(6 * CLUSTER, 20n));
    const byHandle = new Map<bigint, Chunk[]>();
    for (let i = 0; i < 4; i++) {
      const r = await c.structuredReply();
      byHandle.set(r[0].handle, r);
    }
    expect(errorOf(byHandle.get(22n)!)).toBe(NBD_ERR.EIO);
    for (const h of [20n, 21n, 23n]) expect(byHandle.get(h)![0].type).toBe(REPLY_TYPE.OFFSET_DATA);
    expect(disk.log.filter((e) => e.startsWith('read'))).toEqual([
      `read ${6 * CLUSTER} ${4 * CLUSTER}`,
      ...[6, 7, 8, 9].map((k) => `read ${k * CLUSTER} ${CLUSTER}`),
    ]);
    c.destroy();
  });

  it('block status: base:allocation and a dirty bitmap, REQ_ONE, bounded by the request', async () => {
    const id = disk.seal();
    disk.fill(2 * CLUSTER, 2 * CLUSTER, 1);
    const { client: c } = await openExport(where(), 'disk', {
      contexts: ['base:allocation', `qemu:dirty-bitmap:${id}`],
    });
    await simple(c, { command: CMD.WRITE, handle: next(), offset: 5 * CLUSTER, length: 4096 }, Buffer.alloc(4096, 9));
    const chunks = await structured(c, {
      command: CMD.BLOCK_STATUS,
      handle: next(),
      offset: 4096,
      length: 8 * CLUSTER,
    });
    expect(chunks).toHaveLength(2);
    expect(chunks.map((x) => x.flags)).toEqual([0, REPLY_FLAG_DONE]);
    const [alloc, dirty] = payloads(chunks) as Extract<ChunkPayload, { contextId: number }>[];
    expect(alloc.contextId).not.toBe(dirty.contextId);
    const hz = STATE_HOLE | STATE_ZERO;
    expect(alloc.descriptors).toEqual([
      { length: 2 * CLUSTER - 4096, flags: hz },
      { length: 2 * CLUSTER, flags: 0 },
      { length: CLUSTER, flags: hz },
      { length: CLUSTER, flags: 0 },
      { length: 2 * CLUSTER + 4096, flags: hz },
    ]);
    expect(dirty.descriptors).toEqual([
      { length: 5 * CLUSTER - 4096, flags: 0 },
      { length: CLUSTER, flags: STATE_DIRTY },
      { length: 2 * CLUSTER + 4096, flags: 0 },
    ]);
    const one = await structured(c, {
      command: CMD.BLOCK_STATUS,
      handle: next(),
      offset: 0,
      length: 16 * MiB,
      flags: CMD_FLAG.REQ_ONE,
    });
    expect(one.map((x) => (x.payload as { descriptors: unknown[] }).descriptors)).toEqual([
      [{ length: 2 * CLUSTER, flags: hz }],
      [{ length: 5 * CLUSTER, flags: 0 }],
    ]);
    // A tracker that cannot vouch for its id: an error chunk, not a wrong answer.
    disk.failNext('dirtyStatus', new TidemarkError('MISSING_CHANGE_TRACKING_INFORMATION', 'id refused'));
    const refused = await structured(c, { command: CMD.BLOCK_STATUS, handle: next(), offset: 0, length: 4096 });
    expect(refused).toHaveLength(1);
    expect(refused[0].payload).toMatchObject({ error: NBD_ERR.EINVAL, message: 'id refused' });
    c.destroy();
  });

  it('a write split across many TCP segments byte by byte is still one write', async () => {
    const { client: c } = await openExport(where(), 'disk');
    const data = rng(SEED + 1).bytes(1536);
    const msg = Buffer.concat([
      Buffer.alloc(0),
      (await import('../../src/nbd/protocol.js')).encodeRequest(
        { flags: 0, command: CMD.WRITE, handle: 77n, offset: 8192, length: data.length },
        data,
      ),
    ]);
    for (const b of msg) {
      c.write(Buffer.from([b]));
      if (b % 7 === 0) await sleep(0);
    }
    expect((await c.structuredReply())[0]).toMatchObject({ handle: 77n, type: REPLY_TYPE.NONE });
    expect(disk.data.subarray(8192, 8192 + 1536).equals(data)).toBe(true);
    c.destroy();
  });
});

describe('concurrency', () => {
  it('requests run concurrently and replies come back out of order', async () => {
    const { client: c } = await openExport(where(), 'disk');
    const release = disk.holdWhere((e) => e === 'read 0 4096');
    c.request({ command: CMD.READ, handle: 1n, offset: 0, length: 4096 });
    c.request({ command: CMD.WRITE, handle: 2n, offset: MiB, length: 512 }, Buffer.alloc(512, 3));
    c.request({ command: CMD.FLUSH, handle: 3n });
    const first = await c.structuredReply();
    const second = await c.structuredReply();
    expect([first[0].handle, second[0].handle]).toEqual([2n, 3n]);
    release();
    const third = await c.structuredReply();
    expect(third[0].handle).toBe(1n);
    c.destroy();
  });

  it(`no more than ${MAX_REQUESTS_IN_FLIGHT} requests of one client run at once`, async () => {
    const { client: c } = await openExport(where(), 'disk');
    disk.holdAll();
    for (let i = 0; i < 300; i++) c.request({ command: CMD.FLUSH, handle: BigInt(i) });
    await disk.untilRunning(MAX_REQUESTS_IN_FLIGHT);
    await sleep(100);
    expect(disk.running).toBe(MAX_REQUESTS_IN_FLIGHT);
    disk.releaseAll();
    const seen = new Set<bigint>();
    for (let i = 0; i < 300; i++) seen.add((await c.reply()).handle);
    expect(seen.size).toBe(300);
    expect(disk.maxRunning).toBe(MAX_REQUESTS_IN_FLIGHT);
    c.destroy();
  });

  it("the server-wide memory budget holds a second client's reads until the first ones finish", async () => {
    const tight = await startServer([{ name: 'disk', device: disk }], { maxMemory: MiB });
    try {
      disk.fill(0, 4 * MiB, 7);
      const { client: a } = await openExport({ path: tight.socket }, 'disk');
      const { client: b } = await openExport({ path: tight.socket }, 'disk');
      const release = disk.holdWhere((e) => e.startsWith('read'));
      a.request({ command: CMD.READ, handle: 1n, offset: 0, length: MiB });
      await disk.untilRunning(1);
      b.request({ command: CMD.READ, handle: 2n, offset: 2 * MiB, length: MiB });
      b.request({ command: CMD.FLUSH, handle: 3n }); // behind the waiting read, in order
      await sleep(100);
      expect(disk.running).toBe(1);
      expect(tight.server.stats().memory.used).toBe(dataCost(MiB) + REPLY_ESTIMATE);
      release();
      expect((await a.structuredReply())[0]).toMatchObject({ handle: 1n, type: REPLY_TYPE.OFFSET_DATA });
      const rb = [await b.structuredReply(), await b.structuredReply()].map((r) => r[0].handle).sort();
      expect(rb).toEqual([2n, 3n]);
      expect(tight.server.stats().memory.used).toBe(0);
      a.destroy();
      b.destroy();
    } finally {
      await tight.stop();
    }
  });

  it('a client that does not read its replies holds bounded server memory, then gets them all', async () => {
    const big = new MemoryDevice({ size: 64 * MiB });
    big.fill(0, 64 * MiB, 0x5a); // data, not holes: hole replies would cost nothing
    srv.server.addExport('big', big);
    const { client: c } = await openExport(where(), 'big');
    c.socket.pause(); // a slow reader: TCP fills up, then the server must stop taking requests
    const n = 120;
    const len = 4 * MiB;
    for (let i = 0; i < n; i++)
      c.request({ command: CMD.READ, handle: BigInt(i), offset: (i % 16) * len, length: len });
    await sleep(600);
    // Requests executed: the bytes the device read (each read is served in 1 MiB chunks), in requests.
    const readBytes = big.log.filter((e) => e.startsWith('read')).reduce((n, e) => n + Number(e.split(' ')[2]), 0);
    const executed = readBytes / len;
    // In flight or queued in the socket (the connection's memory budget) + what the kernel's socket buffers hold.
    const bound = DEFAULT_LIMITS.maxConnectionMemory / len + 16;
    expect(executed).toBeGreaterThan(0);
    expect(executed).toBeLessThanOrEqual(bound);
    c.socket.resume();
    const handles = new Set<bigint>();
    for (let i = 0; i < n; i++) {
      const chunks = await c.structuredReply(20_000);
      handles.add(chunks[0].handle);
    }
    expect(handles.size).toBe(n);
    c.destroy();
  });
});

describe('disconnects and shutdown', () => {
  it('DISC: requests in flight finish and get their replies, then the server closes', async () => {
    const { client: c } = await openExport(where(), 'disk');
    const release = disk.holdWhere((e) => e.startsWith('write'));
    c.request({ command: CMD.WRITE, handle: 5n, offset: 0, length: 512 }, Buffer.alloc(512, 1));
    c.request({ command: CMD.DISC, handle: 6n });
    await disk.untilRunning(1);
    expect(await c.closesWithin(200)).toBe(false);
    release();
    expect((await c.structuredReply())[0]).toMatchObject({ handle: 5n, type: REPLY_TYPE.NONE });
    expect(await c.closesWithin(2000)).toBe(true);
    expect(disk.data[0]).toBe(1);
  });

  it('a client that vanishes mid-payload leaves no partial write; others are unaffected', async () => {
    const { client: gone } = await openExport(where(), 'disk');
    const { client: other } = await openExport(where(), 'disk');
    const msg = (await import('../../src/nbd/protocol.js')).encodeRequest(
      { flags: 0, command: CMD.WRITE, handle: 1n, offset: 0, length: MiB },
      Buffer.alloc(MiB, 0xff),
    );
    gone.write(msg.subarray(0, 300_000));
    await sleep(50);
    gone.destroy();
    await sleep(50);
    expect(disk.log).toEqual([]);
    expect(disk.data.subarray(0, MiB).every((x) => x === 0)).toBe(true);
    expect((await structured(other, { command: CMD.FLUSH, handle: 2n }))[0].type).toBe(REPLY_TYPE.NONE);
    expect(srv.server.connections()).toHaveLength(1);
    other.destroy();
  });

  it('garbage in transmission drops that client only', async () => {
    const { client: bad } = await openExport(where(), 'disk');
    const { client: good } = await openExport(where(), 'disk');
    bad.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
    expect(await bad.closesWithin(2000)).toBe(true);
    const r = await structured(good, { command: CMD.READ, handle: 1n, offset: 0, length: 512 });
    expect(r.at(-1)!.flags & REPLY_FLAG_DONE).toBe(REPLY_FLAG_DONE);
    good.destroy();
  });

  it('removeExport: new clients cannot find it, connections finish in-flight requests, device stays open', async () => {
    const { client: c } = await openExport(where(), 'disk');
    const release = disk.holdWhere((e) => e.startsWith('write'));
    c.request({ command: CMD.WRITE, handle: 1n, offset: 0, length: 512 }, Buffer.alloc(512, 2));
    await disk.untilRunning(1);
    let removed = false;
    const removing = srv.server.removeExport('disk').then(() => (removed = true));
    await sleep(50);
    expect(removed).toBe(false);
    await expect(openExport(where(), 'disk')).rejects.toThrow(/GO refused/);
    expect(srv.server.exports().map((e) => e.name)).toEqual(['ro']);
    release();
    expect((await c.structuredReply())[0]).toMatchObject({ handle: 1n, type: REPLY_TYPE.NONE });
    await removing;
    expect(await c.closesWithin(2000)).toBe(true);
    expect(disk.data[0]).toBe(2);
    await disk.read(0, 512); // not closed
    await expect(srv.server.removeExport('disk')).rejects.toThrow(/no export named/);
  });

  it('close: stops accepting, answers queued requests with ESHUTDOWN, finishes running ones', async () => {
    const { client: c } = await openExport(where(), 'disk');
    disk.holdAll();
    const n = MAX_REQUESTS_IN_FLIGHT + 2;
    for (let i = 0; i < n; i++) c.request({ command: CMD.FLUSH, handle: BigInt(i) });
    await disk.untilRunning(MAX_REQUESTS_IN_FLIGHT);
    await sleep(50);
    const closing = srv.server.close();
    await sleep(50);
    await expect(RawClient.connect(where())).rejects.toThrow();
    const refused = [await c.structuredReply(), await c.structuredReply()];
    expect(refused.map((r) => errorOf(r))).toEqual([NBD_ERR.ESHUTDOWN, NBD_ERR.ESHUTDOWN]);
    expect(refused.map((r) => r[0].handle)).toEqual([BigInt(n - 2), BigInt(n - 1)]);
    disk.releaseAll();
    await closing;
    for (let i = 0; i < MAX_REQUESTS_IN_FLIGHT; i++) {
      expect((await c.structuredReply())[0]).toMatchObject({ handle: BigInt(i), type: REPLY_TYPE.NONE });
    }
    expect(await c.closesWithin(2000)).toBe(true);
  });
});
