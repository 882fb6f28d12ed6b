/**
 * The 2012 R2 flow over disk-only VMs (no QEMU process, so the hot-add to the guest is modelled: the overlay made
 * and served, nothing attached): one storage snapshot per VM or batch; restores byte-exact; the writer's GUID
 * names lined up with the `.avhdx` files the checkpoints made; a VM without a SCSI controller (generation 1, only
 * `ide0-0`) refused with the message, before anything is done to it. Real hot-add through QMP and the guest agent:
 * test/host/two-guests-2012r2.test.ts.
 *
 * Seed: TIDEMARK_FLOWS_SEED.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet, type BackupSetSummary } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { Repository } from '../../src/repository/index.js';
import { startDiskOnlyVms, type DiskOnlyVms } from '../helpers/disk-only-vms.js';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_FLOWS_SEED', 2012);
console.log(`2012r2 flow seed ${SEED} (TIDEMARK_FLOWS_SEED)`);
const random = rng(SEED);

const VMS: Record<string, number[]> = { vm1: [8, 4], vm2: [8], vm3: [6] };
const SLOTS = ['scsi0-0', 'scsi0-1'];

let dir: string;
let cleanup: () => Promise<void>;
let set: DiskOnlyVms;
let api: HostClient;
let repo: Repository;
let images: DiskOnlyVms['images'];

const peers = requirePeers('qemu-img', 'qemu-storage-daemon');

beforeAll(async () => {
  if (peers.skip) return;
  ({ dir, cleanup } = await tempDir('flow-2012r2'));
  set = await startDiskOnlyVms(dir, VMS, SLOTS);
  ({ api, repo, images } = set);
  // A generation 1 VM with only an IDE disk: no SCSI controller.
  await api.createVm({ name: 'gen1', generation: 1, disks: [{ slot: 'ide0-0', size: 4 * MiB }] });
  await seededWrites();
});

afterAll(async () => {
  await set?.close();
  await cleanup?.();
});

function seededWrites(): Promise<void> {
  return set.seededWrites(random);
}

async function backup(vms: string[], batch?: number): Promise<{ s: BackupSetSummary; log: string[] }> {
  const log: string[] = [];
  const s = await runBackupSet({
    host: api,
    repo,
    vms,
    flow: '2012r2',
    batch,
    consistency: 'crash',
    events: { log: (l) => log.push(l) },
  });
  return { s, log };
}

async function expectRestores(point: string): Promise<void> {
  const r = await restorePoint(repo, point, { to: path.join(dir, `restore-${point}`), format: 'raw' });
  expect(r.disks).toHaveLength(4);
  for (const d of r.disks) {
    const want = images.get(`${d.vm}/${d.slot}`)!.image;
    expect((await readFile(d.file)).equals(want), `${point} ${d.vm} ${d.slot} byte-exact`).toBe(true);
  }
}

describe.skipIf(peers.skip)(`the 2012 R2 flow (seed ${SEED})`, () => {
  it('a storage snapshot per VM, the hot-add modelled, GUID names lined up, restores byte-exact', async () => {
    const before = (await api.hostInfo()).snapshotsTaken;
    const { s, log } = await backup(Object.keys(VMS));
    expect(s.errors, log.join('\n')).toEqual([]);
    expect(s.ok).toBe(true);
    expect(s.flow).toBe('2012r2');
    expect(s.snapshots).toBe(3);
    expect((await api.hostInfo()).snapshotsTaken - before).toBe(3);
    expect(s.phases.autoRecoveryMs).toBeGreaterThan(0);
    for (const v of s.vms) {
      expect(v.autoRecoveryMs, v.name).toBeGreaterThan(0);
      expect(v.autoRecovery).toMatch(/modelled: the VM has no guest/);
      // The writer's metadata named each disk's .avhdx before it existed; lined up once the checkpoint made it.
      expect(v.guidNames).toHaveLength(VMS[v.name].length);
      for (const g of v.guidNames!) {
        expect(g.name).toMatch(/^[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}\.avhdx$/);
        expect(g.file, `${v.name} ${g.slot}`).toMatch(/\.avhdx$/);
      }
      expect(new Set(v.guidNames!.map((g) => g.file)).size).toBe(v.guidNames!.length);
      const named = log.findIndex((l) => l.startsWith(`${v.name}: writer metadata names`));
      const checkpointed = log.findIndex((l) => l.startsWith(`${v.name}: recovery checkpoint`));
      expect(named).toBeGreaterThanOrEqual(0);
      expect(named).toBeLessThan(checkpointed);
      // First backup: full; nothing recovered changed the disks.
      for (const d of v.disks) expect(d.fullReason).toBe('first backup');
    }
    await expectRestores(s.pointId!);

    await seededWrites();
    const batched = await backup(Object.keys(VMS), 2);
    expect(batched.s.errors, batched.log.join('\n')).toEqual([]);
    expect(batched.s.snapshots).toBe(2);
    // The recovery changed nothing: incrementals from the tracking ids.
    for (const v of batched.s.vms) for (const d of v.disks) expect(d.read, `${v.name} ${d.slot}`).toBe('incremental');
    await expectRestores(batched.s.pointId!);
  });

  it('refuses a VM without a SCSI controller, saying to add one, before anything is done to it', async () => {
    const before = (await api.hostInfo()).snapshotsTaken;
    const { s } = await backup(['gen1']);
    expect(s.ok).toBe(false);
    expect(s.pointId).toBeNull();
    expect(s.snapshots).toBe(0);
    const v = s.vms[0];
    expect(v.status).toBe('failed');
    expect(v.errorCode).toBe('CONFLICT');
    expect(v.error).toMatch(/gen1 has no SCSI controller: .* add a SCSI controller to the VM/);
    // It names the command that adds one (test/host/scsi-controllers.test.ts runs it, then the flow).
    expect(v.error).toContain('tidemark vm set gen1 --scsi-controllers 1');
    expect((await api.hostInfo()).snapshotsTaken).toBe(before);
    expect(await api.listCheckpoints('gen1')).toEqual([]);
    // The host's route refuses it too.
    await expect(api.hotPlug('gen1', { source: { socket: '/nonexistent', export: 'x' } })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/no SCSI controller/),
    });
  });
});
