/**
 * A host in process with disk-only VMs (no QEMU: their disks served over NBD and written by the test), a
 * repository beside it, and what each disk holds now: the set-up the flow tests share. A VM named in `vhd` runs on
 * legacy dynamic VHD disks (made in the store and attached by path) instead of new VHDX ones.
 */
import path from 'node:path';
import { HostClient } from '../../src/api/client.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { expect } from 'vitest';
import { runBackupSet } from '../../src/backup/backup-set.js';
import type { BackupSetOptions, BackupSetSummary } from '../../src/backup/run-types.js';
import type { Rng } from './random.js';

const MiB = 2 ** 20;

export interface DiskOnlyVms {
  /** The host's store directory. */
  store: string;
  running: RunningHost;
  api: HostClient;
  repo: Repository;
  /** What each disk holds now (the writes made through `write`), by `vm/slot`. */
  images: Map<string, { nbd: NbdClient; image: Buffer }>;
  /** Writes through NBD (flushed) and into the image. */
  write(key: string, offset: number, data: Buffer): Promise<void>;
  /** A dozen seeded writes of 4–64 KiB on every disk `skip` does not name. */
  seededWrites(random: Rng, skip?: (key: string) => boolean): Promise<void>;
  close(): Promise<void>;
}

/**
 * `vms`: name → disk sizes in MiB, on `slots` in order; each VM created and started. `opts.vhd`: the VMs whose
 * disks are dynamic VHDs (`store/NAME-SLOT.vhd`, 512 KiB blocks) attached by path.
 */
export async function startDiskOnlyVms(
  dir: string,
  vms: Record<string, number[]>,
  slots: string[],
  opts: { vhd?: string[] } = {},
): Promise<DiskOnlyVms> {
  const store = path.join(dir, 'store');
  const running = await startHost({ store, log: HostLog.silent() });
  const api = await HostClient.connect({ store });
  const repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
  const images = new Map<string, { nbd: NbdClient; image: Buffer }>();
  for (const [name, sizes] of Object.entries(vms)) {
    if (opts.vhd?.includes(name)) {
      const disks = [];
      for (const [i, s] of sizes.entries()) {
        const file = path.join(store, `${name}-${slots[i]}.vhd`);
        await createVhd(file, { size: s * MiB, type: 'dynamic', blockSize: 512 * 1024 });
        disks.push({ slot: slots[i], path: file });
      }
      await api.createVm({ name, disks });
    } else {
      await api.createVm({ name, disks: sizes.map((s, i) => ({ slot: slots[i], size: s * MiB })) });
    }
    const vm = await api.startVm(name);
    for (const d of vm.disks) {
      const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: d.export! });
      images.set(`${name}/${d.slot}`, { nbd, image: Buffer.alloc(d.virtualSize) });
    }
  }
  const write = async (key: string, offset: number, data: Buffer) => {
    const g = images.get(key)!;
    await g.nbd.write(offset, data);
    await g.nbd.flush();
    data.copy(g.image, offset);
  };
  return {
    store,
    running,
    api,
    repo,
    images,
    write,
    async seededWrites(random, skip) {
      for (const [key, g] of images) {
        if (skip?.(key)) continue;
        for (let i = 0; i < 12; i++) {
          const len = (1 + random.int(16)) * 4096;
          const at = random.int((g.image.length - len) / 4096) * 4096;
          await write(key, at, random.bytes(len));
        }
      }
    },
    async close() {
      for (const g of images.values()) await g.nbd.close().catch(() => undefined);
      await repo.close();
      await running.close();
    },
  };
}

/**
 * One crash-consistent run of the set that must end clean: no error and no warning (a tracking audit that found
 * something is a warning), the run's log shown when it does not.
 */
export async function cleanRun(opts: Omit<BackupSetOptions, 'consistency' | 'events'>): Promise<BackupSetSummary> {
  const log: string[] = [];
  const s = await runBackupSet({ ...opts, consistency: 'crash', events: { log: (l) => log.push(l) } });
  expect(s.errors, log.join('\n')).toEqual([]);
  expect(s.warnings, log.join('\n')).toEqual([]);
  expect(s.ok).toBe(true);
  expect(s.flow).toBe(opts.flow ?? '2016');
  return s;
}
