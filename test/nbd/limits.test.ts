/**
 * The server's bounds, one mechanism at a time, in process against a raw socket: option replies are
 * back-pressured, a write's payload is reserved before it is read (and skipped when refused), reply
 * memory is held until the socket wrote it, the budget's reserve keeps light clients served, stalls
 * time out, the connection limit makes room fairly, idle connections go only under pressure, and
 * unix sockets are 0600 whatever the umask.
 */
import { statSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { dataCost } from '../../src/nbd/budget.js';
import { REPLY_ESTIMATE } from '../../src/nbd/connection.js';
import { chooseVictim, type Candidate } from '../../src/nbd/fairness.js';
import { NbdServer, type NbdServerOptions } from '../../src/nbd/index.js';
import { MAX_OPTIONS, NEGOTIATION_MEMORY } from '../../src/nbd/limits.js';
import {
  CMD,
  encodeInfoRequest,
  encodeOption,
  encodeRequest,
  INFO,
  MAX_PAYLOAD,
  MAX_STRING,
  NBD_ERR,
  OPT,
  REP,
  REPLY_TYPE,
} from '../../src/nbd/protocol.js';
import { startServer, type RunningServer } from './fixture.js';
import { MemoryDevice } from './memory-device.js';
import { openExport, RawClient, sleep } from './raw-client.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let srv: RunningServer | undefined;
let disk: MemoryDevice;
const clients: RawClient[] = [];

async function serve(opts: NbdServerOptions, size = 64 * MiB): Promise<RunningServer> {
  disk = new MemoryDevice({ size });
  disk.fill(0, size, 0x5a); // data, not holes: hole replies would cost nothing
  srv = await startServer(
    [
      { name: 'disk', device: disk },
      { name: 'ro', device: disk, opts: { readOnly: true } },
    ],
    opts,
  );
  return srv;
}

async function open(name = 'disk'): Promise<RawClient> {
  const { client } = await openExport({ path: srv!.socket }, name);
  clients.push(client);
  return client;
}

/** Polls until `cond` holds (or fails after `ms`). */
async function until(cond: () => boolean, ms = 5000, what = 'condition'): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

afterEach(async () => {
  for (const c of clients.splice(0)) c.destroy();
  disk?.releaseAll();
  await srv?.stop();
  srv = undefined;
});

describe('memory', () => {
  it('a client that does not read its option replies stops being read once 64 KiB of them wait', async () => {
    await serve({});
    // Big replies: 100 exports with 4 KiB names and descriptions make a LIST answer of ~820 KB,
    // more than the kernel's socket buffers hold.
    const names = Array.from({ length: 100 }, (_, i) => `${i}`.padStart(MAX_STRING, 'n'));
    for (const name of names) srv!.server.addExport(name, disk, { description: 'd'.repeat(MAX_STRING) });
    const c = await RawClient.connect({ path: srv!.socket });
    clients.push(c);
    await c.handshake();
    c.socket.pause();
    c.write(encodeOption(OPT.LIST));
    await sleep(200);
    const held = srv!.server.connections()[0].memory;
    expect(held).toBeGreaterThan(NEGOTIATION_MEMORY); // the one answer that is always sent, partly unwritten
    // Further options are not read, so not answered: the memory held does not grow.
    const info = encodeOption(OPT.INFO, encodeInfoRequest({ name: names[7], requests: [INFO.NAME, INFO.DESCRIPTION] }));
    const n = 20;
    c.write(Buffer.concat(Array<Buffer>(n).fill(info)));
    await sleep(300);
    expect(srv!.server.connections()[0]).toMatchObject({ state: 'negotiating', memory: held });
    expect(srv!.server.stats().memory.used).toBe(held);
    // Reading again: every option is answered, in order, and the session goes on.
    c.socket.resume();
    expect((await c.readOptionReplies()).length).toBe(names.length + 3); // disk, ro, the 100, ACK
    for (let i = 0; i < n; i++) {
      const replies = await c.readOptionReplies();
      expect(replies.map((r) => r.type)).toEqual([REP.INFO, REP.INFO, REP.INFO, REP.INFO, REP.ACK]);
    }
    await c.go('disk');
    await until(() => srv!.server.stats().memory.used === 0, 1000, 'memory back');
  });

  it(`more than ${MAX_OPTIONS} options (and ${MAX_OPTIONS} per export after LIST) lose the connection`, async () => {
    await serve({});
    const info = encodeOption(OPT.INFO, encodeInfoRequest({ name: 'disk', requests: [] }));
    const plain = await RawClient.connect({ path: srv!.socket });
    clients.push(plain);
    await plain.handshake();
    for (let i = 0; i < MAX_OPTIONS; i++)
      expect((await plain.option(OPT.INFO, info.subarray(16))).at(-1)!.type).toBe(REP.ACK);
    plain.write(info);
    expect(await plain.closesWithin(2000)).toBe(true);
    // After LIST (two exports here), 2 × MAX_OPTIONS more are allowed.
    const lister = await RawClient.connect({ path: srv!.socket });
    clients.push(lister);
    await lister.handshake();
    await lister.option(OPT.LIST);
    await lister.option(OPT.LIST); // a second LIST gives nothing more
    for (let i = 0; i < 3 * MAX_OPTIONS - 3; i++) await lister.option(OPT.INFO, info.subarray(16));
    await lister.go('disk'); // the last one allowed
    lister.request({ command: CMD.FLUSH, handle: 1n });
    expect(await lister.reply()).toMatchObject({ kind: 'simple', handle: 1n, error: 0 });
    expect(lister.isClosed).toBe(false);
  });

  it("a write's payload is reserved before it is read: a second big write waits, a light client is served", async () => {
    // 6 MiB: a 3 MiB write takes 3 chunks (3 MiB and a little); a second one cannot fit beside it.
    await serve({ maxMemory: 6 * MiB, maxConnectionMemory: 4 * MiB });
    const a = await open();
    const b = await open();
    const len = 3 * MiB;
    const cost = dataCost(len) + REPLY_ESTIMATE;
    const payload = (byte: number) => Buffer.alloc(len, byte);
    const req = (handle: bigint, offset: number, byte: number) =>
      encodeRequest({ flags: 0, command: CMD.WRITE, handle, offset, length: len }, payload(byte));
    const wa = req(1n, 0, 0xa1);
    const wb = req(2n, 8 * MiB, 0xb2);
    a.write(wa.subarray(0, 28 + MiB)); // header and 1 MiB of payload: the rest never comes (for now)
    await until(() => srv!.server.stats().memory.used === cost, 2000, "a's reservation");
    b.write(wb.subarray(0, 28 + MiB));
    await sleep(200);
    expect(srv!.server.connections().map((c) => c.memory)).toEqual([cost, 0]);
    expect(srv!.server.stats().memory.used).toBe(cost); // b's payload is not being read
    // A light client reads through the reserve meanwhile.
    const light = await open();
    light.request({ command: CMD.READ, handle: 9n, offset: 0, length: 32 * KiB });
    const r = await light.structuredReply(2000);
    expect(r[0].type).toBe(REPLY_TYPE.OFFSET_DATA);
    // a completes: its write runs, its memory returns, and b's payload is read in turn.
    a.write(wa.subarray(28 + MiB));
    expect((await a.structuredReply())[0]).toMatchObject({ handle: 1n, type: REPLY_TYPE.NONE });
    b.write(wb.subarray(28 + MiB));
    expect((await b.structuredReply())[0]).toMatchObject({ handle: 2n, type: REPLY_TYPE.NONE });
    expect(disk.data.subarray(0, len).every((x) => x === 0xa1)).toBe(true);
    expect(disk.data.subarray(8 * MiB, 8 * MiB + len).every((x) => x === 0xb2)).toBe(true);
    await until(() => srv!.server.stats().memory.used === 0, 2000, 'all memory back');
  });

  it('a request that will be refused reserves only its error reply, whatever its length', async () => {
    await serve({ maxMemory: 4 * MiB });
    const busy = await open();
    const release = disk.holdWhere((e) => e.startsWith('read'));
    busy.request({ command: CMD.READ, handle: 1n, offset: 0, length: 2 * MiB });
    await disk.untilRunning(1);
    const c = await open();
    c.request({ command: CMD.READ, handle: 2n, offset: 0, length: 0xffffffff });
    expect((await c.structuredReply(2000))[0].payload).toMatchObject({ error: NBD_ERR.EOVERFLOW });
    release();
    expect((await busy.structuredReply())[0].type).toBe(REPLY_TYPE.OFFSET_DATA);
  });

  it('a refused write is skipped as it arrives, never buffered', async () => {
    await serve({});
    const c = await open('ro');
    const msg = encodeRequest(
      { flags: 0, command: CMD.WRITE, handle: 7n, offset: 0, length: MAX_PAYLOAD },
      Buffer.alloc(MAX_PAYLOAD, 1),
    );
    let peak = 0;
    const sample = setInterval(() => (peak = Math.max(peak, srv!.server.stats().memory.used)), 5);
    c.write(msg);
    const r = await c.structuredReply(10_000);
    clearInterval(sample);
    expect(r[0].payload).toMatchObject({ error: NBD_ERR.EPERM });
    expect(peak).toBeLessThan(64 * KiB);
  });

  it("a reply's memory is held until the socket has written it, not when it is queued", async () => {
    await serve({});
    const c = await open();
    c.socket.pause();
    // Not contiguous: four device reads (contiguous ones would be served by one).
    for (let i = 0; i < 4; i++) c.request({ command: CMD.READ, handle: BigInt(i), offset: 2 * i * MiB, length: MiB });
    await until(() => disk.log.filter((e) => e.startsWith('read')).length === 4, 2000, 'the reads');
    await sleep(200);
    // The reads are done, but ~4 MiB of replies cannot all fit in the kernel's socket buffers.
    expect(srv!.server.stats().memory.used).toBeGreaterThan(MiB);
    c.socket.resume();
    for (let i = 0; i < 4; i++) await c.structuredReply();
    await until(() => srv!.server.stats().memory.used === 0, 2000, 'memory back once written');
  });
});

describe('stalls', () => {
  it('a write payload that stops arriving is dropped after the stall timeout, its memory returned', async () => {
    await serve({ stallTimeoutMs: 300 });
    const c = await open();
    const msg = encodeRequest({ flags: 0, command: CMD.WRITE, handle: 1n, offset: 0, length: MiB }, Buffer.alloc(MiB));
    c.write(msg.subarray(0, 28 + 1000));
    await until(() => srv!.server.stats().memory.used > MiB, 1000, 'the reservation');
    const t0 = Date.now();
    expect(await c.closesWithin(2000)).toBe(true);
    expect(Date.now() - t0).toBeGreaterThanOrEqual(200);
    await until(() => srv!.server.connections().length === 0, 1000, 'the connection gone');
    expect(srv!.server.stats().connections.stalled).toBe(1);
    expect(srv!.server.stats().memory.used).toBe(0);
    expect(disk.log.filter((e) => e.startsWith('write'))).toEqual([]);
  });

  it('a client that takes none of its replies is dropped after the stall timeout; a slow one is not', async () => {
    await serve({ stallTimeoutMs: 400 });
    const stuck = await open();
    const slow = await open();
    stuck.socket.pause();
    slow.socket.pause();
    for (let i = 0; i < 16; i++) {
      stuck.request({ command: CMD.READ, handle: BigInt(i), offset: i * MiB, length: MiB });
      slow.request({ command: CMD.READ, handle: BigInt(i), offset: i * MiB, length: MiB });
    }
    // The slow one takes a little every 100 ms: progress, however slow, is not a stall.
    const drip = setInterval(() => {
      for (let k = 0; k < 4; k++) slow.socket.read(64 * KiB);
    }, 100);
    try {
      // (A paused client socket sees no close until it reads: watch the server's side.)
      await until(() => srv!.server.stats().connections.stalled === 1, 3000, 'the stuck client dropped');
      await sleep(600);
      expect(srv!.server.connections()).toHaveLength(1); // the slow one
    } finally {
      clearInterval(drip);
    }
    slow.socket.resume();
    expect(srv!.server.stats().connections.stalled).toBe(1);
  });
});

describe('the connection limit', () => {
  it('a new client takes the place of the youngest idle connection; busy ones are never dropped', async () => {
    await serve({ maxConnections: 4 });
    const first = [await open(), await open(), await open(), await open()];
    await sleep(150); // a connection gives way only once it has been idle a moment (SETTLED_MS)
    const fifth = await open();
    fifth.request({ command: CMD.READ, handle: 1n, offset: 0, length: 4096 });
    expect((await fifth.structuredReply())[0].type).toBe(REPLY_TYPE.OFFSET_DATA);
    expect(await first[3].closesWithin(1000)).toBe(true);
    expect(first.slice(0, 3).map((c) => c.isClosed)).toEqual([false, false, false]);
    expect(srv!.server.stats().connections.evicted).toBe(1);
    // Now every connection has a request running: nobody can make room, the newcomer is refused.
    disk.holdAll();
    for (const c of [...first.slice(0, 3), fifth]) c.request({ command: CMD.FLUSH, handle: 2n });
    await disk.untilRunning(4);
    const refused = await RawClient.connect({ path: srv!.socket });
    clients.push(refused);
    expect(await refused.closesWithin(1000)).toBe(true);
    expect(srv!.server.stats().connections.refused).toBe(1);
    disk.releaseAll();
  });

  it('the peer holding the most connections gives way first (TCP peers by address)', async () => {
    disk = new MemoryDevice({ size: MiB });
    const server = new NbdServer({ maxConnections: 4 });
    server.addExport('disk', disk);
    const addr = await server.listen({ port: 0, host: '127.0.0.1' });
    if (addr.type !== 'tcp') throw new Error('tcp expected');
    try {
      const from = async (localAddress: string) => {
        const c = await RawClient.connect({ port: addr.port, host: '127.0.0.1', localAddress });
        clients.push(c);
        await c.handshake();
        await c.go('disk');
        return c;
      };
      const b = [await from('127.0.0.2'), await from('127.0.0.2'), await from('127.0.0.2')];
      const a = await from('127.0.0.1'); // the youngest, but its peer holds one connection only
      await sleep(150);
      await from('127.0.0.1');
      expect(await b[2].closesWithin(1000)).toBe(true);
      expect([a.isClosed, b[0].isClosed, b[1].isClosed]).toEqual([false, false, false]);
    } finally {
      await server.close();
    }
  });

  it('victims: largest peer, then stalled, negotiating, idle, then the youngest', () => {
    const c = (item: string, peer: string, kind: Candidate<string>['kind'], id: number) => ({ item, peer, kind, id });
    const sizes = new Map([
      ['a', 3],
      ['b', 2],
    ]);
    expect(chooseVictim([c('b-stalled', 'b', 'stalled', 9), c('a-idle', 'a', 'idle', 1)], sizes)).toBe('a-idle');
    expect(
      chooseVictim([c('idle', 'a', 'idle', 9), c('neg', 'a', 'negotiating', 2), c('st', 'a', 'stalled', 1)], sizes),
    ).toBe('st');
    expect(chooseVictim([c('old', 'a', 'idle', 1), c('young', 'a', 'idle', 7), c('mid', 'a', 'idle', 4)], sizes)).toBe(
      'young',
    );
    expect(chooseVictim([], sizes)).toBeUndefined();
  });

  it('idle connections are closed after the idle timeout only under pressure, youngest first', async () => {
    await serve({ maxConnections: 4, idleTimeoutMs: 300 }); // pressure from 3 connections
    const a = await open();
    const b = await open();
    await sleep(800);
    expect([a.isClosed, b.isClosed]).toEqual([false, false]); // 2 < 3: no pressure, kept however long
    // 3 connections: pressure. Of those idle past the timeout (a and b), the youngest goes; then 2 < 3.
    const c = await open();
    expect(await b.closesWithin(2000)).toBe(true);
    await sleep(800);
    expect([a.isClosed, c.isClosed]).toEqual([false, false]);
    expect(srv!.server.stats().connections.evicted).toBe(1);
  });
});

describe('unix sockets', () => {
  it('are created 0600 whatever the umask, also when the path leaves no room for the private directory', async () => {
    const dir = await mkdtemp(path.join(os.tmpdir(), 'tm-'));
    const long = path.join(dir, 'x'.repeat(Math.max(1, 100 - dir.length)));
    await mkdir(long);
    const old = process.umask(0);
    const servers: NbdServer[] = [];
    try {
      for (const p of [path.join(dir, 'nbd.sock'), path.join(long, 's')]) {
        const s = new NbdServer();
        servers.push(s);
        await s.listen({ socket: p });
        expect(statSync(p).mode & 0o777, p).toBe(0o600);
        expect(statSync(p).isSocket()).toBe(true);
      }
      // A second server on a live socket is refused; the live one keeps it.
      await expect(new NbdServer().listen({ socket: path.join(dir, 'nbd.sock') })).rejects.toMatchObject({
        code: 'BUSY',
      });
      const c = await RawClient.connect({ path: path.join(dir, 'nbd.sock') });
      await c.handshake();
      c.destroy();
    } finally {
      process.umask(old);
      for (const s of servers) await s.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
