/**
 * Every backup flow over the same disk-only VMs (their disks served by the host, written through NBD with
 * seeded data between runs): 2016 (ONE storage snapshot per run), per-vm and 2008r2 (one per VM or batch),
 * no-snapshot (none); each run's restore point restored byte-exact. One disk holds an ext4 file system whose
 * journal says it needs recovery: the 2008r2 flow recovers it on the host before reading (e2fsck -p on an
 * overlay over the snapshot), so its restore holds the file system replayed and clean, the others hold it as the
 * guest left it, byte for byte.
 *
 * Seed: TIDEMARK_FLOWS_SEED.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import type { BackupSetSummary, Flow } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { Repository } from '../../src/repository/index.js';
import { cleanRun, startDiskOnlyVms, type DiskOnlyVms } from '../helpers/disk-only-vms.js';
import { requirePeers, run, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_FLOWS_SEED', 1708);
console.log(`flows seed ${SEED} (TIDEMARK_FLOWS_SEED)`);
const random = rng(SEED);

/** name → disk sizes in MiB; `fs` holds the ext4 file system on its only disk. */
const VMS: Record<string, number[]> = { vm1: [8, 4], vm2: [8], vm3: [6], fs: [16] };
const SLOTS = ['scsi0-0', 'scsi0-1'];

let dir: string;
let cleanup: () => Promise<void>;
let set: DiskOnlyVms;
let api: HostClient;
let repo: Repository;
/** What each disk holds now (the guest's writes), by `vm/slot`. */
let images: DiskOnlyVms['images'];

const peers = requirePeers('qemu-img', 'qemu-storage-daemon', 'e2fsck', 'mkfs.ext4', 'debugfs');

beforeAll(async () => {
  if (peers.skip) return;
  ({ dir, cleanup } = await tempDir('flows'));
  set = await startDiskOnlyVms(dir, VMS, SLOTS);
  ({ api, repo, images } = set);
  // The fs VM's disk: an ext4 file system with a file, flagged as needing journal recovery (as a crash leaves it).
  const src = path.join(dir, 'fs-src');
  await mkdir(src);
  await writeFile(path.join(src, 'hello.txt'), `hello from seed ${SEED}\n`);
  const img = path.join(dir, 'fs.img');
  await run('truncate', ['-s', `${VMS.fs[0]}M`, img]);
  await run('mkfs.ext4', ['-q', '-F', '-d', src, img]);
  await run('debugfs', ['-w', '-R', 'feature needs_recovery', img]);
  await set.write('fs/scsi0-0', 0, await readFile(img));
  await seededWrites();
});

afterAll(async () => {
  await set?.close();
  await cleanup?.();
});

/** A few seeded writes on every disk-only disk (never the file system's). */
function seededWrites(): Promise<void> {
  return set.seededWrites(random, (key) => key.startsWith('fs/'));
}

async function backup(flow: Flow, batch?: number, command?: string): Promise<BackupSetSummary> {
  // No error and no warning: no tracking audit found anything, so a recovered disk never mixed with a tracked base.
  return cleanRun({ host: api, repo, vms: Object.keys(VMS), flow, batch, command });
}

const fsFeatures = async (file: string) => (await run('dumpe2fs', ['-h', file])).stdout;

/** Restores the point; every disk-only disk byte-exact; the file system's disk as `fsCheck` says. */
async function expectRestores(point: string, recovered: boolean): Promise<void> {
  const to = path.join(dir, `restore-${point}`);
  const r = await restorePoint(repo, point, { to, format: 'raw' });
  expect(r.disks).toHaveLength(5);
  for (const d of r.disks) {
    const want = images.get(`${d.vm}/${d.slot}`)!.image;
    const got = await readFile(d.file);
    if (d.vm !== 'fs' || !recovered) {
      expect(got.equals(want), `${point} ${d.vm} ${d.slot} byte-exact`).toBe(true);
      continue;
    }
    // Recovered on the host: the journal replayed (needs_recovery gone), clean, the file intact.
    expect(await fsFeatures(d.file)).not.toMatch(/needs_recovery/);
    expect((await run('e2fsck', ['-fn', d.file], { allowFail: true })).code).toBe(0);
    expect((await run('debugfs', ['-R', 'cat /hello.txt', d.file])).stdout).toBe(`hello from seed ${SEED}\n`);
  }
}

describe.skipIf(peers.skip)(`backup flows (seed ${SEED})`, () => {
  it('2016: one storage snapshot for the whole set, restores byte-exact', async () => {
    const s = await backup('2016');
    expect(s.snapshots).toBe(1);
    for (const v of s.vms) expect(v.autoRecoveryMs).toBeNull();
    await expectRestores(s.pointId!, false);
    // The snapshot held the file system as the guest left it: still needing recovery.
    const r = await restorePoint(repo, s.pointId!, { to: path.join(dir, 'fs-2016'), vm: 'fs', format: 'raw' });
    expect(await fsFeatures(r.disks[0].file)).toMatch(/needs_recovery/);
  });

  it('per-vm: one storage snapshot per VM, or per batch; restores byte-exact', async () => {
    await seededWrites();
    const one = await backup('per-vm');
    expect(one.snapshots).toBe(4);
    await expectRestores(one.pointId!, false);
    await seededWrites();
    const two = await backup('per-vm', 3);
    expect(two.snapshots).toBe(2);
    await expectRestores(two.pointId!, false);
  });

  it('2008r2: a storage snapshot per VM or batch, every disk recovered on the host, restores exact', async () => {
    await seededWrites();
    const before = (await api.hostInfo()).snapshotsTaken;
    const s = await backup('2008r2');
    expect(s.snapshots).toBe(4);
    expect((await api.hostInfo()).snapshotsTaken - before).toBe(4);
    expect(s.phases.autoRecoveryMs).toBeGreaterThan(0);
    for (const v of s.vms) {
      expect(v.autoRecoveryMs, v.name).toBeGreaterThan(0);
      if (v.name === 'fs') {
        expect(v.autoRecovery).toMatch(/ext file system \(disk\): e2fsck -p journal replayed, clean/);
        // What the recovery wrote is no tracked state: read in full, recorded without a tracking id.
        expect(v.disks[0].read).toBe('full');
        expect(v.disks[0].fullReason).toMatch(/auto-recovery on the host changed \d+ bytes/);
        expect(v.disks[0].rctId).toBeNull();
      } else {
        expect(v.autoRecovery).toMatch(/no file system on the disk: nothing to replay/);
        for (const d of v.disks) expect(d.read, `${v.name} ${d.slot}: ${d.fullReason}`).toBe('incremental');
      }
    }
    await expectRestores(s.pointId!, true);
    // The recovery wrote into the overlay only: the live disk still needs recovery (the guest's business).
    const live = await images.get('fs/scsi0-0')!.nbd.read(0, VMS.fs[0] * MiB);
    expect(live.equals(images.get('fs/scsi0-0')!.image)).toBe(true);

    await seededWrites();
    const batched = await backup('2008r2', 2);
    expect(batched.snapshots).toBe(2);
    await expectRestores(batched.pointId!, true);
  });

  it('no-snapshot: no storage snapshot, restores byte-exact', async () => {
    await seededWrites();
    const s = await backup('no-snapshot');
    expect(s.snapshots).toBe(0);
    // After a point that holds a recovered disk, that disk is read in full again.
    const fs = s.vms.find((v) => v.name === 'fs')!.disks[0];
    expect(fs.fullReason).toMatch(/no change-tracking id/);
    await expectRestores(s.pointId!, false);
  });

  it('a run whose command line is longer than the host keeps for a lease holder still runs (hundreds of VMs)', async () => {
    await seededWrites();
    const s = await backup('2016', undefined, `tidemark backup ${'vm '.repeat(400)}`);
    await expectRestores(s.pointId!, false);
  });
});
