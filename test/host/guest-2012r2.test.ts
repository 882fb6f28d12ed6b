/**
 * The 2012 R2 flow's auto-recovery inside a real guest (TCG, one boot): the VM's second disk holds an ext4 file
 * system flagged as needing journal recovery (as a crash leaves it); a `--flow 2012r2` backup hot-adds each disk of
 * the snapshot (an overlay over it) to the guest's virtio-scsi controller through QMP, the guest's `e2fsck -p` runs
 * through the guest agent (guest-exec) and replays the journal, the disk is hot-removed, and the data phase reads
 * the recovered overlay in full. The restore holds the file system replayed and clean; the live disk is untouched;
 * no hot-added device is left in the VM.
 */
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { mkdtempSync, rmSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { buildGuestImage } from '../../src/guest-image/builder.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { sleep } from '../helpers/async.js';
import { missingPeers, run } from '../helpers/peers.js';

const PEERS = ['qemu-system-x86_64', 'qemu-img', 'qemu-storage-daemon', 'apt-get', 'dpkg-deb', 'xz', 'e2fsck'];
const skip = missingPeers(...PEERS, 'mkfs.ext4', 'debugfs', 'dumpe2fs');
const MiB = 2 ** 20;

describe.skipIf(skip)('the 2012 R2 flow in a real guest (TCG)', () => {
  let dir: string;
  let running: RunningHost;
  let api: HostClient;
  let repo: Repository;
  let image: Buffer;
  let imageDir: string;

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'tm-2012r2-'));
    imageDir = (await buildGuestImage({ log: (l) => console.log(`guest-image: ${l}`) })).dir;
    running = await startHost({
      store: path.join(dir, 'store'),
      log: HostLog.silent(),
      qemu: { accel: 'tcg', stop: { agentTimeoutMs: 90_000, acpiTimeoutMs: 5_000 } },
    });
    api = await HostClient.connect({ store: path.join(dir, 'store') });
    repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
  }, 900_000);

  afterAll(async () => {
    try {
      await api?.stopVm('g', true).catch(() => undefined);
      await repo?.close();
      await running?.close();
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);

  it('hot-adds each disk of the snapshot to the guest, which replays the journal; the restore is recovered', async () => {
    await api.createVm({
      name: 'g',
      image: imageDir,
      workload: 'none',
      memoryMiB: 256,
      disks: [
        { slot: 'scsi0-0', size: 64 * MiB },
        { slot: 'scsi0-1', size: 16 * MiB },
      ],
    });
    const t0 = performance.now();
    const vm = await api.startVm('g');
    // The second disk: ext4 with a file, flagged as needing journal recovery, written through the host's export.
    const src = path.join(dir, 'fs-src');
    await mkdir(src);
    await writeFile(path.join(src, 'hello.txt'), 'hello from the 2012 R2 test\n');
    const img = path.join(dir, 'fs.img');
    await run('truncate', ['-s', '16M', img]);
    await run('mkfs.ext4', ['-q', '-F', '-d', src, img]);
    await run('debugfs', ['-w', '-R', 'feature needs_recovery', img]);
    image = await readFile(img);
    const disk = vm.disks.find((d) => d.slot === 'scsi0-1')!;
    const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: disk.export! });
    try {
      await nbd.write(0, image);
      await nbd.flush();
    } finally {
      await nbd.close();
    }
    // The guest agent answers once the guest has booted (its data disk formatted and mounted).
    for (let i = 0; ; i++) {
      const c = await running.host
        .runtime('g')
        .guestAgent(2000)
        .catch(() => null);
      const ok = c
        ? await c.ping({ timeoutMs: 2000 }).then(
            () => true,
            () => false,
          )
        : false;
      await c?.close().catch(() => undefined);
      if (ok) break;
      if (i > 300) throw new Error('the guest agent never answered');
      await sleep(500);
    }
    console.log(`boot to agent: ${Math.round(performance.now() - t0)} ms`);

    const log: string[] = [];
    const t1 = performance.now();
    const s = await runBackupSet({
      host: api,
      repo,
      vms: ['g'],
      flow: '2012r2',
      events: { log: (l) => log.push(l) },
    });
    console.log(`2012r2 backup: ${Math.round(performance.now() - t1)} ms; ${s.vms[0].autoRecovery}`);
    expect(s.errors, log.join('\n')).toEqual([]);
    expect(s.ok).toBe(true);
    expect(s.snapshots).toBe(1);
    const v = s.vms[0];
    expect(v.autoRecovery).toMatch(
      /scsi0-1: hot-added to the guest on scsi0-\d+ \(serial TMHP\w+\), as \/dev\/sd\w+: e2fsck -p on \/dev\/sd\w+ in the guest: journal replayed/,
    );
    expect(v.autoRecovery).toMatch(/scsi0-1: hot-removed/);
    const fsDisk = v.disks.find((d) => d.slot === 'scsi0-1')!;
    expect(fsDisk.read).toBe('full');
    expect(fsDisk.fullReason).toMatch(/auto-recovery inside the VM changed \d+ bytes/);
    expect(fsDisk.rctId).toBeNull();
    expect(v.guidNames?.map((g) => g.slot)).toEqual(['scsi0-0', 'scsi0-1']);
    for (const g of v.guidNames!) expect(g.file).toMatch(/\.avhdx$/);

    // No hot-added device left in the VM.
    const peripherals = await running.host.runtime('g').qmpCommand<{ name: string }[]>('qom-list', {
      path: '/machine/peripheral',
    });
    expect(peripherals.filter((p) => p.name.startsWith('hotplug'))).toEqual([]);

    // The restore: the journal replayed, clean, the file intact.
    const r = await restorePoint(repo, s.pointId!, { to: path.join(dir, 'restore'), format: 'raw' });
    const restored = r.disks.find((d) => d.slot === 'scsi0-1')!.file;
    expect((await run('dumpe2fs', ['-h', restored])).stdout).not.toMatch(/needs_recovery/);
    expect((await run('e2fsck', ['-fn', restored], { allowFail: true })).code).toBe(0);
    expect((await run('debugfs', ['-R', 'cat /hello.txt', restored])).stdout).toBe('hello from the 2012 R2 test\n');
    // The recovery wrote into the overlay only: the live disk still needs recovery.
    const live = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: disk.export! });
    try {
      expect((await live.read(0, 16 * MiB)).equals(image)).toBe(true);
    } finally {
      await live.close();
    }
  }, 900_000);
});
