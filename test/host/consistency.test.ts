/**
 * Application consistency end to end: a VM whose guest runs `tidemark guest-agent` with a "database" freeze
 * hook. The database (writing through NBD) stores each record as two halves in two units, so a crash-consistent
 * cut can catch a record half written. On freeze the hook asks it to finish the record, flush and hold; on thaw
 * it goes on. Every production checkpoint's parent must hold only whole records. A guest that never answers
 * gives a crash-consistent standard checkpoint under "production-fallback", and a failure (no checkpoint left
 * behind) under "production-only". A host killed while a storage snapshot lives leaves the live files intact
 * and the diff area is removed when it starts again.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { chmod, mkdir, readdir, readFile, unlink, writeFile } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { NbdClient } from '../../src/nbd/client.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { qemuImgCheck, requirePeers, tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const UNIT = 64 * 1024;
const SLOTS = 48;

let dir: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
let api: HostClient;
let agent: ChildProcess | undefined;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('consistency'));
  running = await startHost({ store: path.join(dir, 'store'), log: HostLog.silent() });
  api = await HostClient.connect({ store: path.join(dir, 'store') });
});
afterAll(async () => {
  agent?.kill('SIGTERM');
  await running?.close();
  await cleanup?.();
});

function half(record: number, which: 0 | 1): Buffer {
  const b = Buffer.alloc(UNIT, (record * 2 + which) & 0xff);
  b.writeUInt32LE(record, 0);
  b.writeUInt32LE(which, 4);
  return b;
}

/** The "database": record i goes to slot i mod SLOTS as two halves; it holds still while the hook asks. */
function startDatabase(nbd: NbdClient, control: string) {
  let stop = false;
  let records = 0;
  const done = (async () => {
    for (let i = 1; !stop; i++) {
      if (existsSync(path.join(control, 'freeze-request'))) {
        await nbd.flush();
        await writeFile(path.join(control, 'frozen-ack'), '');
        while (existsSync(path.join(control, 'freeze-request')) && !stop) await sleep(2);
      }
      const slot = i % SLOTS;
      await nbd.write(slot * 2 * UNIT, half(i, 0));
      await sleep(1); // a crash-consistent cut may fall here
      await nbd.write((slot * 2 + 1) * UNIT, half(i, 1));
      records++;
    }
  })();
  return {
    get records() {
      return records;
    },
    stop: async () => {
      stop = true;
      await done;
    },
  };
}

/** Torn records in a disk image: slots whose halves belong to different records. */
function tornRecords(img: Buffer): number[] {
  const torn: number[] = [];
  for (let s = 0; s < SLOTS; s++) {
    const a = img.readUInt32LE(s * 2 * UNIT);
    const b = img.readUInt32LE((s * 2 + 1) * UNIT);
    if (a !== b) torn.push(s);
  }
  return torn;
}

async function readFrozen(file: string): Promise<Buffer> {
  const d = await VhdxFile.open(file, { allowedRoots: [path.join(dir, 'store')] });
  try {
    return await d.readAt(0, SLOTS * 2 * UNIT);
  } finally {
    await d.close();
  }
}

describe('application consistency through the guest agent', () => {
  it('production checkpoints of a running database hold only whole records', async () => {
    const control = path.join(dir, 'control');
    const hooks = path.join(dir, 'hooks');
    await mkdir(control, { recursive: true });
    await mkdir(hooks, { recursive: true });
    const hook = path.join(hooks, '10-database');
    await writeFile(
      hook,
      `#!/bin/sh
case "$1" in
  freeze) touch "${control}/freeze-request"; while [ ! -f "${control}/frozen-ack" ]; do sleep 0.005; done ;;
  thaw) rm -f "${control}/freeze-request" "${control}/frozen-ack" ;;
esac
`,
    );
    await chmod(hook, 0o755);
    const socket = path.join(dir, 'qga.sock');
    agent = spawn(
      process.execPath,
      [
        path.join(REPO_ROOT, 'bin', 'tidemark.js'),
        'guest-agent',
        '--socket',
        socket,
        '--hooks',
        hooks,
        '--no-fsfreeze',
      ],
      { stdio: 'ignore' },
    );
    for (let i = 0; i < 200 && !existsSync(socket); i++) await sleep(20);
    await api.createVm({ name: 'db', guest: `unix:${socket}`, disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
    const vm = await api.startVm('db');
    const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: vm.disks[0].export! });
    const db = startDatabase(nbd, control);
    for (let round = 0; round < 4; round++) {
      await sleep(40);
      const cp = await api.createCheckpoint('db', { type: 'production', name: `p${round}` });
      expect(cp.type).toBe('production');
      expect(cp.consistency, cp.consistencyNote ?? '').toBe('application');
      expect(cp.freezeWindowMs).toBeGreaterThan(0);
      const img = await readFrozen(path.resolve(dir, 'store', 'vms', 'db', cp.disks[0].file));
      expect(tornRecords(img), `round ${round}: torn records in the checkpoint`).toEqual([]);
      expect(img.readUInt32LE(0) + img.readUInt32LE(2 * UNIT)).toBeGreaterThan(0);
      await api.deleteCheckpoint('db', cp.id);
    }
    expect(db.records).toBeGreaterThan(10);
    await db.stop();
    await nbd.close();
    agent.kill('SIGTERM');
    agent = undefined;
  });

  it('a guest that never answers: crash-consistent fallback, or failure, as the policy says', async () => {
    const socket = path.join(dir, 'silent.sock');
    const silent = net.createServer((c) => c.on('data', () => undefined));
    await new Promise<void>((r) => silent.listen(socket, r));
    try {
      await api.createVm({ name: 'mute', guest: `unix:${socket}`, disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
      await api.startVm('mute');
      const cp = await api.createCheckpoint('mute', { type: 'production' });
      expect(cp.consistency).toBe('crash');
      expect(cp.type).toBe('standard');
      expect(cp.consistencyNote).toMatch(/answer|time|respond/i);
      await api.deleteCheckpoint('mute', cp.id);
      await api.modifyVm('mute', { checkpointPolicy: 'production-only' });
      await expect(api.createCheckpoint('mute', { type: 'production' })).rejects.toMatchObject({
        message: expect.stringMatching(/application consistency|freeze|answer/i),
      });
      expect(await api.listCheckpoints('mute')).toEqual([]);
      const files = await readdir(path.join(dir, 'store', 'vms', 'mute', 'disks'));
      expect(files.filter((f) => f.endsWith('.avhdx'))).toEqual([]);
      // A recovery checkpoint that requires application consistency fails the same way.
      await api.modifyVm('mute', { checkpointPolicy: 'production-fallback' });
      await expect(
        api.createCheckpoint('mute', { type: 'recovery', consistency: 'application', requireConsistency: true }),
      ).rejects.toBeDefined();
      expect(await api.listCheckpoints('mute')).toEqual([]);
      await api.stopVm('mute');
    } finally {
      silent.close();
    }
  });
});

describe.skipIf(requirePeers('qemu-img').skip)('a host killed while a storage snapshot lives', () => {
  it('leaves the live files intact and the diff area removed at the next start', async () => {
    const store = path.join(dir, 'killed');
    const start = () =>
      new Promise<ChildProcess>((resolve, reject) => {
        const child = spawn(process.execPath, [path.join(REPO_ROOT, 'bin', 'tidemark.js'), 'host', '--store', store], {
          stdio: 'ignore',
        });
        const wait = async () => {
          for (let i = 0; i < 300; i++) {
            try {
              if (JSON.parse(await readFile(path.join(store, 'host.json'), 'utf8')).pid === child.pid)
                return resolve(child);
            } catch {
              // not yet
            }
            await sleep(20);
          }
          reject(new Error('host did not start'));
        };
        void wait();
      });
    let host = await start();
    let client = await HostClient.connect({ store });
    await client.createVm({ name: 'v', disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
    const vm = await client.startVm('v');
    const nbd = await NbdClient.connect({ socket: path.join(store, 'nbd.sock'), exportName: vm.disks[0].export! });
    for (let i = 0; i < 16; i++) await nbd.write(i * MiB, Buffer.alloc(MiB, i + 1));
    await nbd.flush();
    const cp = await client.createCheckpoint('v', { type: 'recovery', consistency: 'crash' });
    const set = await client.createSnapshotSet({ vms: [{ name: 'v', checkpoint: cp.id }] });
    expect(set.storageSnapshots).toBe(1);
    // The merge rewrites the frozen file while the snapshot lives: the diff area fills.
    for (let i = 0; i < 16; i++) await nbd.write(i * MiB, Buffer.alloc(MiB, 0xa0 + i));
    await nbd.flush();
    await client.convertToReferencePoint('v', cp.id);
    expect((await readdir(path.join(store, 'snapshots'))).length).toBeGreaterThan(0);
    host.kill('SIGKILL');
    await new Promise((r) => host.once('exit', r));
    await nbd.close().catch(() => undefined);
    host = await start();
    client = await HostClient.connect({ store });
    expect(await readdir(path.join(store, 'snapshots'))).toEqual([]);
    const again = await client.showVm('v');
    const live = await NbdClient.connect({ socket: path.join(store, 'nbd.sock'), exportName: again.disks[0].export! });
    for (let i = 0; i < 16; i++) expect((await live.read(i * MiB, MiB)).every((b) => b === 0xa0 + i)).toBe(true);
    await live.close();
    await client.stopVm('v');
    expect((await qemuImgCheck(again.disks[0].head)).ok).toBe(true);
    host.kill('SIGTERM');
    await new Promise((r) => host.once('exit', r));
    await unlink(path.join(store, 'host.json')).catch(() => undefined);
  });
});
