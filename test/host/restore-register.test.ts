/**
 * `restore --register` is all or nothing: a taken or invalid name is refused before one byte is written; a
 * failure in the middle of a restore leaves no VM, no folder in the store, no import and no file under `--to`;
 * a successful one writes the disks straight into the new VM's folder in the store (private files), or
 * through `--to` and then moved in, and the VM it registers reads exactly the backed-up disks. An import
 * whose restore process ended is reclaimed, by the next reservation and by a host restart.
 */
import { spawnSync } from 'node:child_process';
import { mkdir, readdir, stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet } from '../../src/backup/backup-set.js';
import { restoreRegistered } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_REGISTER_SEED', 99);
console.log(`restore --register seed ${SEED} (TIDEMARK_REGISTER_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let running: RunningHost;
let api: HostClient;
let repo: Repository;
let point: string;
const images = new Map<string, Buffer>();

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('register'));
  store = path.join(dir, 'store');
  running = await startHost({ store, log: HostLog.silent() });
  api = await HostClient.connect({ store });
  repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
  await api.createVm({
    name: 'web',
    configVersion: '8.0',
    checkpointPolicy: 'standard-only',
    memoryMiB: 384,
    cpus: 2,
    scsiControllers: 2,
    disks: [
      { slot: 'scsi0-0', size: 8 * MiB },
      { slot: 'scsi0-1', size: 12 * MiB },
    ],
  });
  const vm = await api.startVm('web');
  const r = rng(SEED);
  for (const d of vm.disks) {
    const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: d.export! });
    const image = Buffer.alloc(d.virtualSize);
    for (let i = 0; i < 40; i++) {
      const at = r.int(d.virtualSize / 65536) * 65536;
      const data = r.bytes(65536);
      await nbd.write(at, data);
      data.copy(image, at);
    }
    await nbd.flush();
    await nbd.close();
    images.set(d.slot, image);
  }
  const s = await runBackupSet({ host: api, repo, vms: ['web'], consistency: 'crash' });
  expect(s.ok).toBe(true);
  point = s.pointId!;
});
afterAll(async () => {
  await repo?.close();
  await running?.close();
  await cleanup?.();
});

async function vmFolders(): Promise<string[]> {
  return (await readdir(path.join(store, 'vms'))).sort();
}

async function listing(d: string): Promise<string[]> {
  return readdir(d, { recursive: true }).catch(() => [] as string[]);
}

/** Reads a registered VM's disks back through the host's NBD exports. */
async function expectDisks(name: string): Promise<void> {
  const vm = await api.startVm(name);
  try {
    for (const d of vm.disks) {
      const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: d.export! });
      const got = await nbd.read(0, d.virtualSize);
      await nbd.close();
      expect(got.equals(images.get(d.slot)!), `${name} ${d.slot}`).toBe(true);
    }
  } finally {
    await api.stopVm(name);
  }
}

function deadPid(): number {
  const out = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  return Number(out.stdout);
}

describe('restore --register', () => {
  it('refuses a taken or invalid name before writing anything', async () => {
    const before = await vmFolders();
    const to = path.join(dir, 'to-taken');
    let progressed = 0;
    const onProgress = () => void progressed++;
    const taken = await restoreRegistered(repo, api, point, { name: 'web', to, onProgress }).catch((e) => e);
    expect(taken.code).toBe('ALREADY_EXISTS');
    expect(taken.message).toMatch(/a VM named web exists/);
    const bad = await restoreRegistered(repo, api, point, { name: '../evil', onProgress }).catch((e) => e);
    expect(bad.code).toBe('INVALID_ARGUMENT');
    expect(progressed).toBe(0);
    expect(await vmFolders()).toEqual(before);
    expect(await listing(to)).toEqual([]);
    expect(await api.listImports()).toEqual([]);
    // A folder nobody registered also holds the name.
    await mkdir(path.join(store, 'vms', 'squatter'));
    await expect(restoreRegistered(repo, api, point, { name: 'squatter' })).rejects.toMatchObject({
      code: 'ALREADY_EXISTS',
    });
    expect(await listing(path.join(store, 'vms', 'squatter'))).toEqual([]);
  });

  for (const viaTo of [false, true]) {
    it(`a failure in the middle of the restore leaves nothing behind${viaTo ? ' (with --to)' : ''}`, async () => {
      const before = await vmFolders();
      const to = path.join(dir, `to-fail-${viaTo}`);
      const files = new Set<string>();
      let seenInStore = false;
      const failure = await restoreRegistered(repo, api, point, {
        name: `broken-${viaTo}`,
        to: viaTo ? to : undefined,
        parallel: 2,
        onProgress: (file, done) => {
          files.add(file);
          seenInStore ||= file.startsWith(store);
          // The second disk fails once part of it is written.
          if (file.endsWith('scsi0-1.vhdx') && done >= 2 * MiB) throw new Error('injected failure');
        },
      }).catch((e) => e);
      expect(failure.message).toMatch(/injected failure/);
      expect([...files].map((f) => path.basename(f)).sort()).toEqual(['scsi0-0.vhdx', 'scsi0-1.vhdx']);
      expect(seenInStore).toBe(!viaTo);
      expect(await vmFolders()).toEqual(before);
      expect(await api.listImports()).toEqual([]);
      await expect(api.showVm(`broken-${viaTo}`)).rejects.toMatchObject({ code: 'NOT_FOUND' });
      expect(await listing(to)).toEqual([]);
    });
  }

  it('writes the disks into the new VM folder in the store, private, and registers a VM that reads them', async () => {
    const written: string[] = [];
    const s = await restoreRegistered(repo, api, point, {
      name: 'web-copy',
      onProgress: (file) => void (written.includes(file) || written.push(file)),
    });
    expect(s.registered).toEqual(['web-copy']);
    const disks = path.join(store, 'vms', 'web-copy', 'disks');
    // Written there directly: every file the restore wrote is in the VM's folder.
    expect(written.sort()).toEqual([path.join(disks, 'scsi0-0.vhdx'), path.join(disks, 'scsi0-1.vhdx')]);
    expect(s.disks.map((d) => d.file).sort()).toEqual(written);
    for (const f of await readdir(disks)) expect((await stat(path.join(disks, f))).mode & 0o777, f).toBe(0o600);
    expect((await stat(path.join(store, 'vms', 'web-copy'))).mode & 0o777).toBe(0o700);
    const vm = await api.showVm('web-copy');
    // The backed-up definition's settings come along, what QEMU runs too (not its guest channel).
    expect(vm).toMatchObject({ configVersion: '8.0', checkpointPolicy: 'standard-only', guest: null });
    expect(vm).toMatchObject({ memoryMiB: 384, cpus: 2, scsiControllers: 2, boot: null });
    expect(vm.disks.map((d) => d.tracking)).toEqual(['enabled', 'enabled']);
    expect(vm.definition.pending).toBeNull();
    expect(await listing(path.join(store, 'vms', 'web-copy'))).not.toContain('import.json');
    await expectDisks('web-copy');
  });

  it('with --to, restores there first and moves the disks into the store', async () => {
    const to = path.join(dir, 'to-ok');
    const s = await restoreRegistered(repo, api, point, { to });
    expect(s.registered).toEqual(['web-restored']);
    expect((await listing(to)).sort()).toEqual(['web', path.join('web', 'vm.json')]);
    const disks = path.join(store, 'vms', 'web-restored', 'disks');
    expect(s.disks.map((d) => d.file).sort()).toEqual([
      path.join(disks, 'scsi0-0.vhdx'),
      path.join(disks, 'scsi0-1.vhdx'),
    ]);
    await expectDisks('web-restored');
  });

  it("an import whose restore ended is reclaimed: by the next reservation, and by the host's next start", async () => {
    const owner = { pid: deadPid(), hostname: os.hostname(), command: 'tidemark restore X --register' };
    const left = await api.reserveImport({ name: 'orphan', owner });
    expect((await stat(left.disksDir)).isDirectory()).toBe(true);
    // A live restore's reservation holds the name.
    const live = await api.reserveImport({
      name: 'in-progress',
      owner: { pid: process.pid, hostname: os.hostname(), command: 'test' },
    });
    await expect(
      api.reserveImport({ name: 'in-progress', owner: { ...owner, pid: process.pid } }),
    ).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    await expect(api.createVm({ name: 'in-progress' })).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    // The ended one's is taken over.
    const again = await api.reserveImport({ name: 'orphan', owner: { ...owner, pid: process.pid } });
    expect(again.createdAt).not.toBe(left.createdAt);
    await api.cancelImport('orphan');
    expect(await vmFolders()).not.toContain('orphan');
    // A stopped host finds the marker: an ended restore's folder goes, a live one's stays reserved.
    await api.reserveImport({ name: 'orphan2', owner });
    await running.close();
    running = await startHost({ store, log: HostLog.silent() });
    api = await HostClient.connect({ store });
    expect(await vmFolders()).not.toContain('orphan2');
    expect((await api.listImports()).map((i) => i.name)).toEqual([live.name]);
    await api.cancelImport(live.name);
    expect(await vmFolders()).not.toContain(live.name);
  });
});
