/**
 * A full read takes what to read from the storage snapshot, not from the live disk: a block the guest trims
 * after the checkpoint (the live disk no longer holds it) still holds the checkpoint's data in the snapshot,
 * and the restore point must have it.
 */
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;

/** Trims the live disk's first 32 MiB block as soon as the checkpoint became a reference point. */
class TrimAfterConvert extends HostClient {
  host!: RunningHost;
  override async convertToReferencePoint(...args: Parameters<HostClient['convertToReferencePoint']>) {
    const rp = await super.convertToReferencePoint(...args);
    await this.host.host.runningDisk('t', 'scsi0-0').trim(0, 32 * MiB);
    return rp;
  }
}

let dir: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('full-read'));
  running = await startHost({ store: path.join(dir, 'store'), log: HostLog.silent() });
});
afterAll(async () => {
  await running?.close();
  await cleanup?.();
});

describe('a full read', () => {
  it('reads what the snapshot holds, even where the guest trimmed the live disk since the checkpoint', async () => {
    const api = new TrimAfterConvert((await HostClient.connect({ store: path.join(dir, 'store') })).address);
    api.host = running;
    await api.createVm({ name: 't', disks: [{ slot: 'scsi0-0', size: 64 * MiB }] });
    const vm = await api.startVm('t');
    const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: vm.disks[0].export! });
    await nbd.write(MiB, Buffer.alloc(MiB, 0x11));
    await nbd.write(40 * MiB, Buffer.alloc(MiB, 0x22));
    await nbd.flush();
    const repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
    try {
      const s = await runBackupSet({ host: api, repo, vms: ['t'], consistency: 'crash' });
      expect(s.errors).toEqual([]);
      expect(s.vms[0].disks[0].read).toBe('full');
      // The live disk lost the block; the point must not.
      expect((await nbd.read(MiB, 4096)).every((b) => b === 0)).toBe(true);
      const r = await restorePoint(repo, s.pointId!, { to: path.join(dir, 'restore'), format: 'raw' });
      const img = await readFile(r.disks[0].file);
      expect(img.subarray(MiB, 2 * MiB).every((b) => b === 0x11)).toBe(true);
      expect(img.subarray(40 * MiB, 41 * MiB).every((b) => b === 0x22)).toBe(true);
      expect(img.subarray(0, MiB).every((b) => b === 0)).toBe(true);
    } finally {
      await nbd.close();
      await repo.close();
    }
  });
});
