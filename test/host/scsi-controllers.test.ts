/**
 * `vm set NAME --scsi-controllers N` (Add-VMScsiController / Remove-VMScsiController, issue 17): a generation 1 VM
 * with only an IDE disk has no SCSI controller, so the 2012 R2 flow refuses it and names the command that adds one;
 * the command is refused while the VM runs, works with it off, and the flow then backs the VM up (restore exact).
 * Lowering the count below a controller that holds a disk is refused naming the slot (unless the same request
 * detaches it); more than 4 is refused by the API's schema. The CLI once through bin/tidemark.js.
 *
 * Seed: TIDEMARK_SCSI_CONTROLLERS_SEED.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { runBackupSet } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { NbdClient } from '../../src/nbd/client.js';
import { startDiskOnlyVms, type DiskOnlyVms } from '../helpers/disk-only-vms.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { requirePeers, run, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_SCSI_CONTROLLERS_SEED', 777);
console.log(`scsi-controllers seed ${SEED} (TIDEMARK_SCSI_CONTROLLERS_SEED)`);
const random = rng(SEED);
const peers = requirePeers('qemu-img', 'qemu-storage-daemon');

let dir: string;
let cleanup: () => Promise<void>;
let set: DiskOnlyVms;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('scsi-controllers'));
  set = await startDiskOnlyVms(dir, {}, []);
});
afterAll(async () => {
  await set?.close();
  await cleanup?.();
});

const image = Buffer.alloc(4 * MiB);

/** Starts gen1 and writes a few seeded blocks to its IDE disk through NBD. */
async function startAndWrite(): Promise<void> {
  const vm = await set.api.startVm('gen1');
  const nbd = await NbdClient.connect({ socket: set.running.host.nbdSocket, exportName: vm.disks[0].export! });
  try {
    for (let i = 0; i < 8; i++) {
      const data = random.bytes((1 + random.int(8)) * 4096);
      const at = random.int((image.length - data.length) / 4096) * 4096;
      await nbd.write(at, data);
      data.copy(image, at);
    }
    await nbd.flush();
  } finally {
    await nbd.close();
  }
}

function backup2012r2() {
  const log: string[] = [];
  return runBackupSet({
    host: set.api,
    repo: set.repo,
    vms: ['gen1'],
    flow: '2012r2',
    consistency: 'crash',
    events: { log: (l) => log.push(l) },
  }).then((s) => ({ s, log }));
}

describe(`vm set --scsi-controllers (seed ${SEED})`, () => {
  it.skipIf(peers.skip)(
    'the 2012 R2 flow refuses a VM with no SCSI controller; one added, it backs it up',
    async () => {
      const vm = await set.api.createVm({ name: 'gen1', generation: 1, disks: [{ slot: 'ide0-0', size: 4 * MiB }] });
      expect(vm.scsiControllers).toBe(0);
      await startAndWrite();
      const refused = await backup2012r2();
      expect(refused.s.ok).toBe(false);
      expect(refused.s.vms[0].errorCode).toBe('CONFLICT');
      expect(refused.s.vms[0].error).toMatch(
        /gen1 has no SCSI controller: .* add a SCSI controller to the VM \(tidemark vm set gen1 --scsi-controllers 1, with the VM off\)/,
      );
      // Running: refused (the controllers are QEMU's at launch).
      await expect(set.api.modifyVm('gen1', { scsiControllers: 1 })).rejects.toMatchObject({
        code: 'CONFLICT',
        message: expect.stringMatching(/gen1 is Running: SCSI controllers are added and removed only with the VM off/),
      });
      // Naming the count it has is no change, running or not.
      expect((await set.api.modifyVm('gen1', { scsiControllers: 0 })).scsiControllers).toBe(0);
      await set.api.stopVm('gen1');
      expect((await set.api.modifyVm('gen1', { scsiControllers: 1 })).scsiControllers).toBe(1);
      expect((await set.api.showVm('gen1')).definition.scsiControllers).toBe(1);
      await startAndWrite();
      const { s, log } = await backup2012r2();
      expect(s.errors, log.join('\n')).toEqual([]);
      expect(s.ok).toBe(true);
      expect(s.snapshots).toBe(1);
      const r = await restorePoint(set.repo, s.pointId!, { to: path.join(dir, 'restore'), format: 'raw' });
      expect(r.disks).toHaveLength(1);
      expect((await readFile(r.disks[0].file)).equals(image), 'the restored IDE disk byte-exact').toBe(true);
      await set.api.stopVm('gen1');
    },
    120_000,
  );

  it('refuses lowering below a controller that holds a disk, naming the slot; 0–4 only', async () => {
    const vm = await set.api.createVm({
      name: 'wide',
      disks: [
        { slot: 'scsi0-0', size: MiB },
        { slot: 'scsi1-3', size: MiB },
      ],
    });
    expect(vm.scsiControllers).toBe(2);
    await expect(set.api.modifyVm('wide', { scsiControllers: 1 })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: 'wide has a disk at scsi1-3 on SCSI controller 1: detach it before lowering its SCSI controllers to 1',
    });
    await expect(set.api.modifyVm('wide', { scsiControllers: 0 })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/wide has a disk at scsi0-0 on SCSI controller 0/),
    });
    expect((await set.api.showVm('wide')).scsiControllers).toBe(2);
    await expect(set.api.modifyVm('wide', { scsiControllers: 5 })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
      message: expect.stringMatching(/scsiControllers/),
    });
    // An attach in the same request counts too; a detach in it frees the controller.
    await expect(
      set.api.modifyVm('wide', { scsiControllers: 3, attach: [{ slot: 'scsi3-0', size: MiB }] }),
    ).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/a disk at scsi3-0 on SCSI controller 3/),
    });
    const lowered = await set.api.modifyVm('wide', { scsiControllers: 1, detach: ['scsi1-3'] });
    expect(lowered.scsiControllers).toBe(1);
    expect(lowered.disks.map((d) => d.slot)).toEqual(['scsi0-0']);
    expect((await set.api.modifyVm('wide', { scsiControllers: 4 })).scsiControllers).toBe(4);
  });

  it('the CLI: vm set NAME --scsi-controllers N', async () => {
    await set.api.createVm({ name: 'cli', generation: 1, disks: [{ slot: 'ide0-0', size: MiB }] });
    const store = path.join(dir, 'store');
    const cli = (...args: string[]) =>
      run(process.execPath, [path.join(REPO_ROOT, 'bin', 'tidemark.js'), ...args, '--store', store], {
        allowFail: true,
      });
    const ok = await cli('vm', 'set', 'cli', '--scsi-controllers', '2');
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toBe('cli updated\n');
    expect((await set.api.showVm('cli')).scsiControllers).toBe(2);
    const bad = await cli('vm', 'set', 'cli', '--scsi-controllers', 'two');
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/--scsi-controllers/);
  });
});
