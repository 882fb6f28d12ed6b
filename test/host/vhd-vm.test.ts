/**
 * VMs on legacy VHD disks, end to end (issue 17), with the host in process: a disk-only VM whose disk is a dynamic
 * VHD is written through NBD; a checkpoint makes an `.avhd` (a VHD differencing disk) child, the chain reads what
 * was written, the frozen base checks clean (Tidemark's VHD check, and QEMU's `vpc` driver reads the cut); backups
 * read it in full every time, the reason naming "VHD disk", each restore is byte-exact and no `.avhd` is left after
 * a run; a checkpoint is applied and deleted (offline merge) on it. A VHDX VM backed up in the same runs stays
 * incremental; a configuration 5.0 VM's disk is read in full naming its version.
 *
 * Seed: TIDEMARK_VHD_VM_SEED.
 */
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet, type BackupSetSummary } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { VHD_TRACKING_UNAVAILABLE } from '../../src/disk/vhd-disk.js';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { missingPeers, run, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { expectSame, qemuVpc, readWholeVhd } from '../vhd/helpers.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_VHD_VM_SEED', 1717);
console.log(`vhd-vm seed ${SEED} (TIDEMARK_VHD_VM_SEED)`);
const random = rng(SEED);
const SLOT = 'scsi0-0';
const SIZE = 8 * MiB;

let dir: string;
let store: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
let api: HostClient;
let repo: Repository;
/** What each VM's disk holds now, and its NBD connection while it runs. */
const disks = new Map<string, { nbd: NbdClient | null; image: Buffer }>();

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('vhd-vm'));
  store = path.join(dir, 'store');
  running = await startHost({ store, log: HostLog.silent() });
  api = await HostClient.connect({ store });
  repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
});

afterAll(async () => {
  for (const d of disks.values()) await d.nbd?.close().catch(() => undefined);
  await repo?.close();
  await running?.close();
  await cleanup?.();
});

async function start(vm: string): Promise<void> {
  const s = await api.startVm(vm);
  const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: s.disks[0].export! });
  const d = disks.get(vm);
  if (d) d.nbd = nbd;
  else disks.set(vm, { nbd, image: Buffer.alloc(s.disks[0].virtualSize) });
}

async function stop(vm: string): Promise<void> {
  const d = disks.get(vm)!;
  await d.nbd?.close();
  d.nbd = null;
  await api.stopVm(vm);
}

/** A few seeded writes on the VM's disk, through NBD; `image` follows. */
async function writes(vm: string, n = 12): Promise<void> {
  const d = disks.get(vm)!;
  for (let i = 0; i < n; i++) {
    const len = (1 + random.int(16)) * 4096;
    const at = random.int((d.image.length - len) / 4096) * 4096;
    const data = random.bytes(len);
    await d.nbd!.write(at, data);
    data.copy(d.image, at);
  }
  await d.nbd!.flush();
}

async function readAll(vm: string): Promise<Buffer> {
  const d = disks.get(vm)!;
  return d.nbd!.read(0, d.image.length);
}

const diskFiles = async (vm: string) => (await readdir(path.join(store, 'vms', vm, 'disks'))).sort();

async function backup(): Promise<BackupSetSummary> {
  const log: string[] = [];
  const s = await runBackupSet({
    host: api,
    repo,
    vms: ['legacy', 'modern', 'old'],
    flow: '2016',
    consistency: 'crash',
    events: { log: (l) => log.push(l) },
  });
  expect(s.errors, log.join('\n')).toEqual([]);
  expect(s.warnings, log.join('\n')).toEqual([]);
  expect(s.ok).toBe(true);
  return s;
}

async function expectRestore(point: string): Promise<void> {
  const r = await restorePoint(repo, point, { to: path.join(dir, `restore-${point}`), format: 'raw' });
  expect(r.disks.map((d) => d.vm).sort()).toEqual(['legacy', 'modern', 'old']);
  for (const d of r.disks) expectSame(await readFile(d.file), disks.get(d.vm)!.image, `${point} ${d.vm} byte-exact`);
}

describe(`VMs on legacy VHD disks (seed ${SEED})`, () => {
  it('a VM is created on a dynamic VHD: no change tracking, and why', async () => {
    const base = path.join(store, 'legacy-base.vhd');
    await createVhd(base, { size: SIZE, type: 'dynamic', blockSize: 512 * 1024 });
    const vm = await api.createVm({ name: 'legacy', disks: [{ slot: SLOT, path: base }] });
    expect(vm.disks[0].tracking).toBe('none');
    expect(vm.disks[0].trackingReason).toBe(VHD_TRACKING_UNAVAILABLE);
    expect(vm.disks[0].virtualSize).toBe(SIZE);
    const modern = await api.createVm({ name: 'modern', disks: [{ slot: SLOT, size: SIZE }] });
    expect(modern.disks[0].tracking).toBe('enabled');
    expect(modern.disks[0].trackingReason).toBeNull();
    // A configuration 5.0 VM (VHDX, no RCT before 6.2): also full every time, for its own reason.
    const old = await api.createVm({ name: 'old', configVersion: '5.0', disks: [{ slot: SLOT, size: SIZE }] });
    expect(old.disks[0].tracking).toBe('none');
    expect(old.disks[0].trackingReason).toBeNull();
    await start('legacy');
    await start('modern');
    await start('old');
    // Running, the open disk says the same.
    const shown = await api.showVm('legacy');
    expect(shown.disks[0].tracking).toBe('none');
    expect(shown.disks[0].trackingReason).toBe(VHD_TRACKING_UNAVAILABLE);
    await writes('legacy');
    await writes('modern');
    await writes('old');
    expectSame(await readAll('legacy'), disks.get('legacy')!.image, 'the VHD disk through NBD');
  });

  it('a checkpoint makes an .avhd child; the chain reads right; the frozen base checks clean', async () => {
    const frozen = Buffer.from(disks.get('legacy')!.image);
    const cp = await api.createCheckpoint('legacy', { name: 'before', type: 'standard' });
    const vm = await api.showVm('legacy');
    expect(vm.disks[0].head).toMatch(/\.avhd$/);
    expect(vm.disks[0].base).toBe(path.join(store, 'legacy-base.vhd'));
    expect((await diskFiles('legacy')).filter((f) => f.endsWith('.avhd'))).toHaveLength(1);
    await writes('legacy');
    expectSame(await readAll('legacy'), disks.get('legacy')!.image, 'the chain through NBD');
    // The base is the checkpoint's point: its own check, and QEMU's vpc driver, read exactly the cut.
    const base = vm.disks[0].base;
    const report = await checkVhd(base);
    expect(report.errors, base).toEqual([]);
    expectSame(await readWholeVhd(base), frozen, 'the base read alone');
    if (!missingPeers('qemu-img')) {
      const raw = path.join(dir, 'base.qemu.raw');
      await run('qemu-img', ['convert', '-U', '--image-opts', qemuVpc(base), '-O', 'raw', raw]);
      expectSame(await readFile(raw), frozen, 'qemu-img -f vpc, the base');
    }
    // The child checks clean too (its parent found by its locators).
    const child = await checkVhd(vm.disks[0].head, { allowedRoots: [store] });
    expect(child.errors, vm.disks[0].head).toEqual([]);
    // Deleted while running: merged back online, the .avhd gone, the base holds everything.
    await api.deleteCheckpoint('legacy', cp.id);
    const after = await api.showVm('legacy');
    expect(after.disks[0].head).toBe(base);
    expect((await diskFiles('legacy')).filter((f) => f.endsWith('.avhd'))).toEqual([]);
    expectSame(await readAll('legacy'), disks.get('legacy')!.image, 'after the online merge');
  }, 120_000);

  it('backups read the VHD disk in full every time, with the reason; restores exact; no .avhd left', async () => {
    const first = await backup();
    const legacy1 = first.vms.find((v) => v.name === 'legacy')!;
    expect(legacy1.disks[0].read).toBe('full');
    expect(legacy1.disks[0].fullReason).toMatch(/^VHD disk/);
    expect(legacy1.disks[0].rctId).toBeNull();
    expect((await diskFiles('legacy')).filter((f) => f.endsWith('.avhd'))).toEqual([]);
    expect((await api.showVm('legacy')).disks[0].head).toMatch(/legacy-base\.vhd$/);
    await expectRestore(first.pointId!);

    await writes('legacy');
    await writes('modern');
    await writes('old');
    const second = await backup();
    const legacy2 = second.vms.find((v) => v.name === 'legacy')!;
    expect(legacy2.disks[0].read).toBe('full');
    expect(legacy2.disks[0].fullReason).toBe(VHD_TRACKING_UNAVAILABLE);
    // Nothing regressed for VHDX: the second backup of the VHDX VM is incremental.
    const modern2 = second.vms.find((v) => v.name === 'modern')!;
    expect(modern2.disks[0].read, `${modern2.disks[0].fullReason}`).toBe('incremental');
    expect(modern2.disks[0].rctId).not.toBeNull();
    expect((await diskFiles('legacy')).filter((f) => f.endsWith('.avhd'))).toEqual([]);
    expect((await diskFiles('modern')).filter((f) => f.endsWith('.avhdx'))).toEqual([]);
    for (const s of [first, second]) {
      const old = s.vms.find((v) => v.name === 'old')!.disks[0];
      expect(old.read).toBe('full');
      expect(old.fullReason).toMatch(/configuration version 5\.0/);
    }
    expect((await diskFiles('old')).filter((f) => f.endsWith('.avhdx'))).toEqual([]);
    await expectRestore(second.pointId!);
    const report = await checkVhd(path.join(store, 'legacy-base.vhd'), { allowedRoots: [store] });
    expect(report.errors).toEqual([]);
  }, 300_000);

  it('a checkpoint of the VHD VM is applied and deleted (offline merge)', async () => {
    await stop('legacy');
    const cp = await api.createCheckpoint('legacy', { name: 'off' });
    const atCheckpoint = Buffer.from(disks.get('legacy')!.image);
    await start('legacy');
    await writes('legacy');
    await stop('legacy');
    await api.applyCheckpoint('legacy', cp.id);
    const applied = await api.showVm('legacy');
    expect(applied.disks[0].head).toMatch(/\.avhd$/);
    // The discarded present is gone: one .avhd, the child of the checkpoint's files.
    expect((await diskFiles('legacy')).filter((f) => f.endsWith('.avhd'))).toHaveLength(1);
    disks.get('legacy')!.image = Buffer.from(atCheckpoint);
    await start('legacy');
    expectSame(await readAll('legacy'), atCheckpoint, 'the applied checkpoint');
    await writes('legacy');
    await stop('legacy');
    // Off: the child is merged into the base by the VHD engine.
    await api.deleteCheckpoint('legacy', cp.id);
    const after = await api.showVm('legacy');
    expect(after.disks[0].head).toMatch(/legacy-base\.vhd$/);
    expect((await diskFiles('legacy')).filter((f) => f.endsWith('.avhd'))).toEqual([]);
    expectSame(await readWholeVhd(after.disks[0].head), disks.get('legacy')!.image, 'the base after the merge');
    expect((await checkVhd(after.disks[0].head)).errors).toEqual([]);
    await start('legacy');
    expectSame(await readAll('legacy'), disks.get('legacy')!.image, 'running again on the base');
  }, 120_000);
});
