/**
 * TLS (NBD_OPT_STARTTLS, FORCEDTLS, client certificates), with credentials made by openssl at test
 * time: first the protocol against a raw client (every option but STARTTLS and ABORT refused with
 * NBD_REP_ERR_TLS_REQD, plaintext injected after STARTTLS refused, certificates checked), then the real
 * peers: nbdinfo, nbdcopy (libnbd, `nbds+unix://...?tls-certificates=DIR`) and qemu-io / qemu-img
 * (`--object tls-creds-x509`), with and without a good client certificate.
 */
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdServer, TlsCredentials } from '../../src/nbd/index.js';
import {
  CMD,
  encodeClientFlags,
  encodeInfoRequest,
  encodeOption,
  FLAG_C_NO_ZEROES,
  INFO,
  MAX_OPTION_DATA,
  OPT,
  REP,
  REPLY_TYPE,
} from '../../src/nbd/protocol.js';
import { requirePeers, run } from '../helpers/peers.js';
import { MemoryDevice } from './memory-device.js';
import { RawClient } from './raw-client.js';
import { makeCredentials, type TestCredentials } from './tls-certs.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const withOpenssl = requirePeers('openssl');

let dir: string;
let creds: TestCredentials;
let server: NbdServer;
let socket: string;
let disk: MemoryDevice;

beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'tidemark-tls-'));
  if (withOpenssl.skip) return;
  creds = await makeCredentials(dir);
  disk = new MemoryDevice({ size: 8 * MiB });
  disk.fill(0, MiB, 0x3c);
  server = new NbdServer({ tls: await TlsCredentials.load(creds.server), handshakeTimeoutMs: 3000 });
  server.addExport('disk', disk, { description: 'secret' });
  socket = path.join(dir, 'nbd.sock');
  await server.listen({ socket });
});
afterAll(async () => {
  await server?.close();
  await rm(dir, { recursive: true, force: true });
});

async function client(): Promise<RawClient> {
  const c = await RawClient.connect({ path: socket });
  await c.handshake();
  return c;
}

describe.skipIf(withOpenssl.skip)('STARTTLS against a raw client', () => {
  it('before TLS every option but STARTTLS and ABORT gets NBD_REP_ERR_TLS_REQD', async () => {
    const c = await client();
    const info = encodeInfoRequest({ name: 'disk', requests: [INFO.DESCRIPTION] });
    for (const [option, data] of [
      [OPT.LIST, undefined],
      [OPT.INFO, info],
      [OPT.GO, info],
      [OPT.STRUCTURED_REPLY, undefined],
      [99, undefined],
    ] as const) {
      const replies = await c.option(option, data);
      expect(replies.map((r) => r.type)).toEqual([REP.ERR_TLS_REQD]);
      expect(replies[0].data.toString()).toMatch(/requires TLS/);
    }
    // An oversize option too (its data is skipped, not buffered).
    const big = encodeOption(77, Buffer.alloc(MAX_OPTION_DATA + 1));
    c.write(big);
    expect((await c.readOptionReplies()).map((r) => r.type)).toEqual([REP.ERR_TLS_REQD]);
    expect((await c.option(OPT.STARTTLS, Buffer.from('x'))).map((r) => r.type)).toEqual([REP.ERR_INVALID]);
    // Now the upgrade: the same session goes on over TLS, and nothing is refused any more.
    await c.startTls(creds.client);
    expect((await c.option(OPT.STARTTLS)).map((r) => r.type)).toEqual([REP.ERR_INVALID]);
    expect(server.connections()[0]).toMatchObject({ tls: true, state: 'negotiating' });
    const list = await c.option(OPT.LIST);
    expect(list.map((r) => r.type)).toEqual([REP.SERVER, REP.ACK]);
    await c.structuredReplies();
    await c.go('disk');
    c.request({ command: CMD.READ, handle: 1n, offset: 0, length: 4096 });
    const r = await c.structuredReply();
    expect(r[0].type).toBe(REPLY_TYPE.OFFSET_DATA);
    expect((r[0].payload as { data: Buffer }).data.every((x) => x === 0x3c)).toBe(true);
    c.destroy();
  });

  it('EXPORT_NAME before TLS, and a client without fixed newstyle, lose the connection', async () => {
    const c = await client();
    c.write(encodeOption(OPT.EXPORT_NAME, Buffer.from('disk')));
    expect(await c.closesWithin(2000)).toBe(true);
    const old = await RawClient.connect({ path: socket });
    await old.read(18);
    old.write(encodeClientFlags(FLAG_C_NO_ZEROES));
    expect(await old.closesWithin(2000)).toBe(true);
  });

  it('bytes sent after STARTTLS before its ACK (plaintext injection) drop the connection', async () => {
    const c = await client();
    c.write(Buffer.concat([encodeOption(OPT.STARTTLS), encodeOption(OPT.STRUCTURED_REPLY)]));
    expect(await c.closesWithin(2000)).toBe(true);
  });

  it('a client without a certificate, or with one another CA signed, is refused', async () => {
    for (const d of [creds.nocert, creds.other]) {
      const c = await client();
      // TLS 1.3: the client may finish its side before the server has checked its certificate.
      await c.startTls(d).catch(() => undefined);
      expect(await c.closesWithin(2000), d).toBe(true);
    }
    for (let i = 0; i < 100 && server.connections().length > 0; i++) await sleep(10);
    expect(server.connections()).toEqual([]);
  });

  it('credentials that are missing or do not match say which and why', async () => {
    await expect(TlsCredentials.load(path.join(dir, 'none'))).rejects.toMatchObject({ code: 'NOT_FOUND' });
    const mixed = path.join(dir, 'mixed');
    await makeCredentials(mixed);
    // The server certificate with the key of another: refused when loading, not at the first client.
    await writeFile(
      path.join(mixed, 'server', 'server-key.pem'),
      await readFile(path.join(creds.client, 'client-key.pem')),
    );
    await expect(TlsCredentials.load(path.join(mixed, 'server'))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
  });
});

const peers = requirePeers('openssl', 'nbdinfo', 'nbdcopy', 'qemu-io', 'qemu-img');

describe.skipIf(peers.skip)('TLS with the real peers', () => {
  const uri = (certDir: string) => `nbds+unix:///disk?socket=${socket}&tls-certificates=${certDir}`;
  /** qemu's image options for the export (a unix socket has no host name: tls-hostname names the cert's). */
  const qemu = (certDir: string) => [
    '--object',
    `tls-creds-x509,id=tls0,endpoint=client,dir=${certDir}`,
    '--image-opts',
    `driver=nbd,server.type=unix,server.path=${socket},export=disk,tls-creds=tls0,tls-hostname=localhost`,
  ];

  it('nbdinfo and nbdcopy with a client certificate read the export; without one they are refused', async () => {
    const info = JSON.parse((await run('nbdinfo', ['--json', uri(creds.client)])).stdout);
    expect(info).toMatchObject({ TLS: true, exports: [{ 'export-name': 'disk', 'export-size': 8 * MiB }] });
    const out = path.join(dir, 'copy.raw');
    await run('nbdcopy', [uri(creds.client), out]);
    const copied = await readFile(out);
    expect(copied.equals(disk.data)).toBe(true);
    for (const d of [creds.nocert, creds.other]) {
      const r = await run('nbdinfo', [uri(d)], { allowFail: true });
      expect(r.code, d).not.toBe(0);
    }
    const plain = await run('nbdinfo', [`nbd+unix:///disk?socket=${socket}`], { allowFail: true });
    expect(plain.code).not.toBe(0);
  });

  it('qemu-io writes and reads back over TLS; qemu-img reads; refused without a good certificate', async () => {
    const io = await run('qemu-io', [
      ...qemu(creds.client),
      '-c',
      'write -P 0xd7 2M 128K',
      '-c',
      'read -P 0xd7 2M 128K',
    ]);
    expect(io.stdout).toMatch(/wrote 131072\/131072/);
    expect(io.stdout).not.toMatch(/fail/i);
    expect(disk.data.subarray(2 * MiB, 2 * MiB + 128 * 1024).every((x) => x === 0xd7)).toBe(true);
    const img = await run('qemu-img', ['info', '--output=json', ...qemu(creds.client)]);
    expect(JSON.parse(img.stdout)['virtual-size']).toBe(8 * MiB);
    for (const d of [creds.nocert, creds.other]) {
      const r = await run('qemu-io', [...qemu(d), '-c', 'read 0 4k'], { allowFail: true });
      expect(`${r.code} ${r.stderr}`, d).toMatch(/^[1-9]/);
    }
  });
});
