/**
 * Negotiation against a raw socket: every option the server supports answers as the protocol says,
 * unknown and malformed options get error replies and the session goes on, and misbehaving clients
 * (bad flags, bad magic, silence, oversize options) lose their own connection only.
 */
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import {
  decodeInfoReplyData,
  decodeMetaContextReplyData,
  decodeServerReplyData,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  INFO,
  MAX_OPTION_DATA,
  OPT,
  REP,
  TF,
  type InfoItem,
} from '../../src/nbd/protocol.js';
import { startServer, type RunningServer } from './fixture.js';
import { MemoryDevice } from './memory-device.js';
import { RawClient, type OptionReply } from './raw-client.js';

const MiB = 2 ** 20;
let srv: RunningServer;
let disk: MemoryDevice;
let ro: MemoryDevice;

beforeEach(async () => {
  disk = new MemoryDevice({ size: 8 * MiB, preferredBlockSize: 32 * MiB });
  disk.seal();
  disk.seal();
  ro = new MemoryDevice({ size: 3 * MiB, minimumBlockSize: 4096 });
  srv = await startServer(
    [
      { name: 'disk', device: disk, opts: { description: 'a writable disk' } },
      { name: 'ro', device: ro, opts: { readOnly: true } },
    ],
    { handshakeTimeoutMs: 500 },
  );
});
afterEach(() => srv.stop());

async function client(): Promise<RawClient> {
  const c = await RawClient.connect({ path: srv.socket });
  await c.handshake();
  return c;
}

const info = (replies: OptionReply[]): InfoItem[] =>
  replies.filter((r) => r.type === REP.INFO).map((r) => decodeInfoReplyData(r.data));
const text = (r: OptionReply) => r.data.toString('utf8');

describe('handshake', () => {
  it('greets with fixed newstyle and no-zeroes; refuses unknown client flags', async () => {
    const c = await RawClient.connect({ path: srv.socket });
    expect(await c.handshake(FLAG_C_FIXED_NEWSTYLE | 0x100)).toBe(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    expect(await c.closesWithin(2000)).toBe(true);
    expect(srv.server.stats().connections.protocolErrors).toBe(1);
  });

  it('drops a client that does not finish negotiating in time, and only that one', async () => {
    const silent = await RawClient.connect({ path: srv.socket });
    const busy = await client();
    const [list] = await busy.option(OPT.LIST);
    expect(list.type).toBe(REP.SERVER);
    expect(await silent.closesWithin(3000)).toBe(true);
    expect(await busy.closesWithin(3000)).toBe(true); // it did not finish either: same rule
    const c = await client();
    await c.go('disk');
    expect(await c.closesWithin(1000)).toBe(false); // in transmission, no negotiation deadline
    c.destroy();
  });
});

describe('options', () => {
  it('NBD_OPT_LIST lists every export with its description', async () => {
    const c = await client();
    const replies = await c.option(OPT.LIST);
    expect(replies.map((r) => r.type)).toEqual([REP.SERVER, REP.SERVER, REP.ACK]);
    expect(replies.slice(0, 2).map((r) => decodeServerReplyData(r.data))).toEqual([
      { name: 'disk', description: 'a writable disk' },
      { name: 'ro', description: '' },
    ]);
    const [bad] = await c.option(OPT.LIST, Buffer.from('x'));
    expect(bad.type).toBe(REP.ERR_INVALID);
  });

  it('unknown options, STARTTLS and extended headers get errors and the session goes on', async () => {
    const c = await client();
    const [unknown] = await c.option(4242, Buffer.from('whatever'));
    expect(unknown).toMatchObject({ option: 4242, type: REP.ERR_UNSUP });
    const [tls] = await c.option(OPT.STARTTLS);
    expect(tls.type).toBe(REP.ERR_POLICY);
    expect(text(tls)).toMatch(/TLS/);
    const [ext] = await c.option(OPT.EXTENDED_HEADERS);
    expect(ext.type).toBe(REP.ERR_UNSUP);
    const [sr] = await c.option(OPT.STRUCTURED_REPLY);
    expect(sr.type).toBe(REP.ACK);
    const [again] = await c.option(OPT.STRUCTURED_REPLY);
    expect(again.type).toBe(REP.ERR_INVALID);
    await c.go('disk');
  });

  it('NBD_OPT_INFO: export size and flags, name, description and block sizes', async () => {
    const c = await client();
    const replies = await c.option(
      OPT.INFO,
      encodeInfoRequest({ name: 'disk', requests: [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE] }),
    );
    expect(replies.at(-1)!.type).toBe(REP.ACK);
    const items = info(replies);
    const flags = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.CAN_MULTI_CONN;
    expect(items).toContainEqual({
      info: INFO.EXPORT,
      size: 8 * MiB,
      flags: flags | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO,
    });
    expect(items).toContainEqual({ info: INFO.NAME, name: 'disk' });
    expect(items).toContainEqual({ info: INFO.DESCRIPTION, description: 'a writable disk' });
    // Preferred is capped at 1 MiB whatever the device prefers; maximum is 32 MiB.
    expect(items).toContainEqual({ info: INFO.BLOCK_SIZE, minimum: 512, preferred: MiB, maximum: 32 * MiB });

    const roItems = info(await c.option(OPT.INFO, encodeInfoRequest({ name: 'ro', requests: [] })));
    expect(roItems).toContainEqual({ info: INFO.EXPORT, size: 3 * MiB, flags: flags | TF.READ_ONLY });
    expect(roItems).toContainEqual({ info: INFO.BLOCK_SIZE, minimum: 4096, preferred: 65536, maximum: 32 * MiB });

    const [unknown] = await c.option(OPT.INFO, encodeInfoRequest({ name: 'nope', requests: [] }));
    expect(unknown.type).toBe(REP.ERR_UNKNOWN);
    expect(text(unknown)).toMatch(/no export named "nope"/);
    const [bad] = await c.option(OPT.GO, Buffer.from([0, 0, 0, 9, 1]));
    expect(bad.type).toBe(REP.ERR_INVALID);
    await c.go('disk'); // still possible after all that
  });

  it('the empty name is the default export only when there is exactly one', async () => {
    const c = await client();
    const [none] = await c.option(OPT.GO, encodeInfoRequest({ name: '', requests: [] }));
    expect(none.type).toBe(REP.ERR_UNKNOWN);
    expect(text(none)).toMatch(/no default export.*2 exports/);
    await srv.server.removeExport('ro');
    const replies = await c.go('');
    expect(info(replies)).toContainEqual(expect.objectContaining({ info: INFO.EXPORT, size: 8 * MiB }));
  });

  it('NBD_OPT_EXPORT_NAME: reply with or without the zero padding; unknown name ends the session', async () => {
    const a = await RawClient.connect({ path: srv.socket });
    await a.handshake(FLAG_C_FIXED_NEWSTYLE); // no NO_ZEROES
    a.write(encodeOption(OPT.EXPORT_NAME, Buffer.from('disk')));
    const reply = await a.read(134);
    expect(reply.readBigUInt64BE(0)).toBe(BigInt(8 * MiB));
    expect(reply.subarray(10).every((x) => x === 0)).toBe(true);

    const b = await client();
    b.write(encodeOption(OPT.EXPORT_NAME, Buffer.from('ro')));
    const short = await b.read(10);
    expect(short.readUInt16BE(8) & TF.READ_ONLY).toBe(TF.READ_ONLY);
    expect(await b.closesWithin(200)).toBe(false);

    const c = await client();
    c.write(encodeOption(OPT.EXPORT_NAME, Buffer.from('missing')));
    expect(await c.closesWithin(2000)).toBe(true);
    a.destroy();
    b.destroy();
  });

  it('NBD_OPT_ABORT is acknowledged and the connection closes', async () => {
    const c = await client();
    const [ack] = await c.option(OPT.ABORT);
    expect(ack.type).toBe(REP.ACK);
    expect(await c.closesWithin(2000)).toBe(true);
  });

  it('an option over 64 KiB is refused as too big, skipped, and the session goes on', async () => {
    const c = await client();
    const data = Buffer.alloc(4 * MAX_OPTION_DATA, 0x55);
    const msg = encodeOption(OPT.LIST, data);
    for (let at = 0; at < msg.length; at += 10_000) c.write(msg.subarray(at, at + 10_000));
    const too = await c.readOptionReply();
    expect(too.type).toBe(REP.ERR_TOO_BIG);
    const [list] = await c.option(OPT.LIST);
    expect(list.type).toBe(REP.SERVER);
  });

  it('an option with a bad magic drops that client; others are served', async () => {
    const bad = await client();
    const other = await client();
    bad.write(Buffer.from('IHAVEOPX\0\0\0\x03\0\0\0\0', 'latin1'));
    expect(await bad.closesWithin(2000)).toBe(true);
    await other.go('disk');
    expect(srv.server.stats().connections.protocolErrors).toBe(1);
    other.destroy();
  });
});

describe('meta contexts', () => {
  const list = async (c: RawClient, name: string, queries: string[]) =>
    (await c.option(OPT.LIST_META_CONTEXT, encodeMetaContextRequest({ name, queries })))
      .filter((r) => r.type === REP.META_CONTEXT)
      .map((r) => decodeMetaContextReplyData(r.data));

  it('need structured replies first', async () => {
    const c = await client();
    const [r] = await c.option(OPT.LIST_META_CONTEXT, encodeMetaContextRequest({ name: 'disk', queries: [] }));
    expect(r.type).toBe(REP.ERR_INVALID);
    const [s] = await c.setMetaContext('disk', ['base:allocation']);
    expect(s.type).toBe(REP.ERR_INVALID);
  });

  it('LIST: everything, namespaces as wildcards, exact names; ids are 0', async () => {
    const c = await client();
    await c.structuredReplies();
    const [a, b] = await disk.dirtyContexts();
    const bitmaps = [`qemu:dirty-bitmap:${a}`, `qemu:dirty-bitmap:${b}`];
    expect((await list(c, 'disk', [])).map((x) => x.name)).toEqual(['base:allocation', ...bitmaps]);
    expect((await list(c, 'disk', ['qemu:'])).map((x) => x.name)).toEqual(bitmaps);
    expect((await list(c, 'disk', ['qemu:dirty-bitmap:'])).map((x) => x.name)).toEqual(bitmaps);
    expect((await list(c, 'disk', ['base:'])).map((x) => x.name)).toEqual(['base:allocation']);
    expect(await list(c, 'disk', [bitmaps[1], 'qemu:dirty-bitmap:nope', 'x-other:thing'])).toEqual([
      { id: 0, name: bitmaps[1] },
    ]);
    expect((await list(c, 'ro', [])).map((x) => x.name)).toEqual(['base:allocation']);
    const [unknown] = await c.option(OPT.LIST_META_CONTEXT, encodeMetaContextRequest({ name: 'zz', queries: [] }));
    expect(unknown.type).toBe(REP.ERR_UNKNOWN);
  });

  it('SET: selects what exists with distinct ids, ignores unknown names and wildcards', async () => {
    const c = await client();
    await c.structuredReplies();
    const [, b] = await disk.dirtyContexts();
    const replies = await c.setMetaContext('disk', [
      'qemu:dirty-bitmap:nope',
      'qemu:',
      'base:',
      'base:allocation',
      `qemu:dirty-bitmap:${b}`,
      'base:allocation',
    ]);
    expect(replies.at(-1)!.type).toBe(REP.ACK);
    const selected = replies.filter((r) => r.type === REP.META_CONTEXT).map((r) => decodeMetaContextReplyData(r.data));
    expect(selected.map((x) => x.name)).toEqual(['base:allocation', `qemu:dirty-bitmap:${b}`]);
    expect(new Set(selected.map((x) => x.id)).size).toBe(2);
    expect(selected.every((x) => x.id !== 0)).toBe(true);
  });
});
