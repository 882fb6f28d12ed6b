/**
 * TLS on the client's side and on the host's NBD: NbdClient starts TLS (NBD_OPT_STARTTLS, its certificate,
 * the server's checked against the CA and, on TCP, the host name) against Tidemark's server and against
 * qemu-nbd; a host started with an NBD TLS directory serves its VMs' disks only over TLS, its QEMU processes
 * connect with the client credentials of that directory, and a backup reads the snapshot over TLS (and is
 * refused up front, before any checkpoint, without credentials).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { TidemarkError } from '../../src/errors.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls, NbdServer, TlsCredentials } from '../../src/nbd/index.js';
import { Repository } from '../../src/repository/index.js';
import { missingPeers, requirePeers } from '../helpers/peers.js';
import { MemoryDevice } from './memory-device.js';
import { makeCredentials, type TestCredentials } from './tls-certs.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const withOpenssl = requirePeers('openssl');

let dir: string;
let creds: TestCredentials;
beforeAll(async () => {
  dir = await mkdtemp(path.join(os.tmpdir(), 'tidemark-client-tls-'));
  if (!withOpenssl.skip) creds = await makeCredentials(dir);
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

async function codeOf(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (err) {
    return err instanceof TidemarkError ? `${err.code}: ${err.message}` : `!${(err as Error).message}`;
  }
  return 'resolved';
}

describe.skipIf(withOpenssl.skip)('NbdClient with TLS against Tidemark’s server', () => {
  let server: NbdServer;
  let socket: string;
  let port: number;
  beforeAll(async () => {
    const disk = new MemoryDevice({ size: 8 * MiB });
    disk.fill(MiB, MiB, 0x5a);
    server = new NbdServer({ tls: await TlsCredentials.load(creds.server), handshakeTimeoutMs: 3000 });
    server.addExport('disk', disk);
    socket = path.join(dir, 'nbd.sock');
    await server.listen({ socket });
    const tcp = await server.listen({ port: 0, host: '127.0.0.1' });
    port = (tcp as { port: number }).port;
  });
  afterAll(async () => server?.close());

  it('reads and writes over a unix socket and over TCP (the certificate names 127.0.0.1)', async () => {
    const tls = await loadClientTls(creds.client);
    for (const target of [{ socket }, { host: '127.0.0.1', port }]) {
      const c = await NbdClient.connect({ ...target, exportName: 'disk', tls, structured: true });
      try {
        expect(c.size).toBe(8 * MiB);
        expect((await c.read(MiB, MiB)).every((b) => b === 0x5a)).toBe(true);
        await c.write(4 * MiB, Buffer.alloc(64 * 1024, 0x77));
        expect((await c.read(4 * MiB, 64 * 1024)).every((b) => b === 0x77)).toBe(true);
        // Large reads cross many TLS records: the reader reassembles them.
        const big = await c.read(0, 8 * MiB);
        expect(big.subarray(MiB, 2 * MiB).every((b) => b === 0x5a)).toBe(true);
      } finally {
        await c.close();
      }
    }
    expect(server.connections()).toEqual([]);
  });

  it('is refused, with a reason, without TLS, without a certificate, with a stranger’s, or for another name', async () => {
    expect(await codeOf(NbdClient.connect({ socket, exportName: 'disk' }))).toMatch(
      /^UNAUTHORIZED: the NBD server requires TLS/,
    );
    // A client certificate signed by another CA: the server ends the handshake.
    const stranger = await loadClientTls(creds.other);
    expect(await codeOf(NbdClient.connect({ socket, exportName: 'disk', tls: stranger }))).toMatch(/^UNAUTHORIZED: /);
    // The server's certificate does not name "example.org".
    const good = await loadClientTls(creds.client);
    expect(
      await codeOf(
        NbdClient.connect({ host: '127.0.0.1', port, exportName: 'disk', tls: { ...good, hostname: 'example.org' } }),
      ),
    ).toMatch(/^UNAUTHORIZED: NBD TLS handshake failed: .*example\.org/);
    // Credentials that do not parse: a typed error, not a throw from inside node:tls.
    expect(
      await codeOf(NbdClient.connect({ socket, exportName: 'disk', tls: { ...good, cert: Buffer.from('x') } })),
    ).toMatch(/^INVALID_ARGUMENT: NBD TLS credentials cannot be used/);
    // A directory without the client's certificate: one clear line before any connection.
    expect(await codeOf(loadClientTls(creds.nocert))).toMatch(
      /^NOT_FOUND: TLS credentials: cannot read .*client-cert\.pem/,
    );
  });
});

describe.skipIf(withOpenssl.skip || missingPeers('qemu-nbd', 'qemu-img'))('NbdClient with TLS against qemu-nbd', () => {
  let qemuNbd: ChildProcess | undefined;
  afterAll(() => void qemuNbd?.kill('SIGKILL'));

  it('reads what qemu-nbd serves under tls-creds with verify-peer', async () => {
    const img = path.join(dir, 'q.raw');
    const { run } = await import('../helpers/peers.js');
    await run('qemu-img', ['create', '-f', 'raw', img, '4M']);
    await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 1M 1M', img]);
    const sock = path.join(dir, 'qemu-nbd.sock');
    qemuNbd = spawn(
      'qemu-nbd',
      ['--object', `tls-creds-x509,id=t0,dir=${creds.server},endpoint=server,verify-peer=on`, '--tls-creds', 't0',
        '-k', sock, '-f', 'raw', '-x', 'q', '--persistent', img], // prettier-ignore
      { stdio: ['ignore', 'ignore', 'pipe'] },
    );
    let stderr = '';
    qemuNbd.stderr!.on('data', (d) => (stderr += d));
    const deadline = Date.now() + 10_000;
    let c: NbdClient | undefined;
    const tls = await loadClientTls(creds.client);
    while (!c) {
      try {
        c = await NbdClient.connect({ socket: sock, exportName: 'q', tls });
      } catch (err) {
        if (Date.now() > deadline) throw new Error(`qemu-nbd did not serve: ${(err as Error).message}; ${stderr}`);
        await sleep(100);
      }
    }
    try {
      expect(c.size).toBe(4 * MiB);
      expect((await c.read(MiB, MiB)).every((b) => b === 0x3c)).toBe(true);
      expect((await c.read(0, MiB)).every((b) => b === 0)).toBe(true);
    } finally {
      await c.close();
    }
    // A certificate another CA signed: qemu-nbd (verify-peer) ends the handshake.
    const stranger = await loadClientTls(creds.other);
    expect(await codeOf(NbdClient.connect({ socket: sock, exportName: 'q', tls: stranger }))).toMatch(
      /^UNAUTHORIZED: /,
    );
  });
});

describe.skipIf(withOpenssl.skip)('a host whose NBD requires TLS', () => {
  let running: RunningHost;
  let both: string;
  beforeAll(async () => {
    // One directory with both sides, as QEMU's tls-creds-x509 reads it: the server's files and the client's.
    both = path.join(dir, 'host-tls');
    await mkdir(both);
    for (const f of ['ca-cert.pem', 'server-cert.pem', 'server-key.pem'])
      await copyFile(path.join(creds.server, f), path.join(both, f));
    for (const f of ['client-cert.pem', 'client-key.pem'])
      await copyFile(path.join(creds.client, f), path.join(both, f));
    running = await startHost({
      store: path.join(dir, 'store'),
      nbd: { port: 0, host: '127.0.0.1', tlsDir: both },
      log: HostLog.silent(),
    });
  });
  afterAll(async () => running?.close());

  it('refuses to start without the client files its VMs need', async () => {
    expect(
      await codeOf(startHost({ store: path.join(dir, 'store2'), nbd: { socket: path.join(dir, 'x.sock'), tlsDir: creds.server }, log: HostLog.silent() })), // prettier-ignore
    ).toMatch(/^NOT_FOUND: TLS credentials: cannot read .*client-cert\.pem/);
  });

  it('a backup reads over TLS; without credentials it is refused before any checkpoint', async () => {
    const api = await HostClient.connect({ store: path.join(dir, 'store') });
    expect((await api.hostInfo()).nbdTls).toBe(true);
    await api.createVm({ name: 't', disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
    const vm = await api.startVm('t');
    const a = running.host.nbd.address() as { host: string; port: number };
    const tls = await loadClientTls(creds.client);
    const nbd = await NbdClient.connect({ host: a.host, port: a.port, exportName: vm.disks[0].export!, tls });
    await nbd.write(3 * MiB, Buffer.alloc(MiB, 0x42));
    await nbd.flush();
    await nbd.close();
    expect(await codeOf(NbdClient.connect({ host: a.host, port: a.port, exportName: vm.disks[0].export! }))).toMatch(
      /^UNAUTHORIZED: the NBD server requires TLS/,
    );

    const repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
    try {
      expect(await codeOf(runBackupSet({ host: api, repo, vms: ['t'], consistency: 'crash' }))).toMatch(
        /^UNAUTHORIZED: the host's NBD requires TLS: give --nbd-tls-dir/,
      );
      expect(await api.listCheckpoints('t')).toEqual([]);
      const s = await runBackupSet({ host: api, repo, vms: ['t'], consistency: 'crash', nbdTlsDir: creds.client });
      expect(s.errors).toEqual([]);
      const r = await restorePoint(repo, s.pointId!, { to: path.join(dir, 'restore'), format: 'raw' });
      const img = await readFile(r.disks[0].file);
      expect(img.subarray(3 * MiB, 4 * MiB).every((b) => b === 0x42)).toBe(true);
      expect(img.subarray(0, 3 * MiB).every((b) => b === 0)).toBe(true);
    } finally {
      await repo.close();
    }
    await api.stopVm('t');
  });

  it.skipIf(missingPeers('qemu-system-x86_64'))(
    'its VMs’ QEMU connects with the client credentials, over TLS',
    async () => {
      const api = await HostClient.connect({ store: path.join(dir, 'store') });
      await api.createVm({
        name: 'bios',
        generation: 1,
        boot: { kind: 'firmware' },
        memoryMiB: 32,
        accel: 'tcg',
        disks: [{ slot: 'ide0-0', size: 4 * MiB }],
      });
      const up = await api.startVm('bios');
      expect(up.qemu?.pid).toBeGreaterThan(0);
      try {
        // SeaBIOS reads the disk: QEMU's connection is up, and it is a TLS one.
        const deadline = Date.now() + 20_000;
        let conns = running.host.nbd.connections().filter((c) => c.export === up.disks[0].export);
        while (conns.length === 0 && Date.now() < deadline) {
          await sleep(100);
          conns = running.host.nbd.connections().filter((c) => c.export === up.disks[0].export);
        }
        expect(conns.length).toBeGreaterThan(0);
        expect(conns.every((c) => c.tls)).toBe(true);
      } finally {
        await api.stopVm('bios', true);
      }
    },
  );
});
