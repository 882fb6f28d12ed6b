/**
 * `tidemark quickstart`: the whole product on embedded defaults, in one process. In a folder it names, it
 * makes a host store and a repository, creates three sample VMs with VHDX disks, starts the host with a
 * guest workload writing to every disk over NBD, runs a full backup set (2016 flow: one storage snapshot),
 * lets the guests write more, runs an incremental, restores the latest point and verifies every disk byte
 * for byte against what the guests had written at the checkpoint, then prints the summaries.
 */
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { HostClient } from '../api/client.js';
import { runBackupSet } from '../backup/backup-set.js';
import { restorePoint } from '../backup/restore.js';
import { TidemarkError } from '../errors.js';
import { startHost } from '../host/daemon.js';
import { HostLog } from '../host/log.js';
import { NbdClient } from '../nbd/client.js';
import { Repository } from '../repository/index.js';
import { formatSize } from '../util/size.js';
import { Workload } from '../workload/generator.js';
import { printBackupSummary } from './backup.js';
import { EXIT, printJson, println } from './output.js';
import { progressBars } from './progress.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

const MiB = 2 ** 20;
const SAMPLE_VMS: { name: string; disks: { slot: string; size: number }[] }[] = [
  { name: 'web01', disks: [{ slot: 'scsi0-0', size: 256 * MiB }] },
  {
    name: 'db01',
    disks: [
      { slot: 'scsi0-0', size: 256 * MiB },
      { slot: 'scsi0-1', size: 128 * MiB },
    ],
  },
  { name: 'app01', disks: [{ slot: 'ide0-0', size: 128 * MiB }] },
];

export function quickstartCommand(run: Run): Command {
  return new Command('quickstart')
    .description('the whole product on embedded defaults: VMs, live guests, full + incremental backup, restore, verify')
    .argument('[dir]', 'the folder to work in (default: a new temporary folder)')
    .option('--json', 'print the results as JSON')
    .action((dirArg: string | undefined, o: { json?: boolean }) =>
      run(async () => {
        const dir = dirArg ? path.resolve(dirArg) : await mkdtemp(path.join(os.tmpdir(), 'tidemark-quickstart-'));
        await mkdir(dir, { recursive: true });
        const say = (line: string) => (o.json ? undefined : println(line));
        const store = path.join(dir, 'store');
        const repoPath = path.join(dir, 'repository');
        say(`quickstart in ${dir}: host store ${store}, repository ${repoPath}`);
        // Unix socket paths are limited to 107 bytes: keep the NBD socket short.
        const socket = path.join(await mkdtemp(path.join(os.tmpdir(), 'tm-')), 'nbd.sock');
        const host = await startHost({ store, nbd: { socket }, log: HostLog.silent() });
        const guests: { vm: string; slot: string; nbd: NbdClient; w: Workload }[] = [];
        let repo: Repository | undefined;
        try {
          const api = await HostClient.connect({ store });
          let seed = 1;
          for (const vm of SAMPLE_VMS) {
            if ((await api.listVms()).some((v) => v.name === vm.name)) {
              throw new TidemarkError('ALREADY_EXISTS', `${dir} already holds a quickstart; give an empty folder`);
            }
            await api.createVm({ name: vm.name, disks: vm.disks });
            const started = await api.startVm(vm.name);
            for (const d of started.disks) {
              const nbd = await NbdClient.connect({ socket, exportName: d.export! });
              const w = new Workload(nbd, { seed: seed++, concurrency: 2, flushEvery: 16 });
              guests.push({ vm: vm.name, slot: d.slot, nbd, w });
            }
            say(
              `created and started ${vm.name}: ${started.disks.map((d) => `${d.slot} ${formatSize(d.virtualSize)} (nbd export ${d.export})`).join(', ')}`,
            );
          }
          repo = await Repository.init(repoPath, {});
          say(`repository initialised (chunks of ${formatSize((await repo.info()).chunkSize)}, zstd)`);

          // The guests write; then a full backup set. Each guest is paused at its checkpoint so its
          // expected content is exact (the test suite also checks backups under writes that never stop).
          const write = async (n: number) => {
            for (const g of guests) await g.w.run(n);
          };
          await write(600);
          say(`guests wrote ${formatSize(guests.reduce((s, g) => s + g.w.bytesWritten, 0))} through NBD`);
          const bars = progressBars(!o.json && process.stderr.isTTY === true);
          const vms = SAMPLE_VMS.map((v) => v.name);
          const full = await runBackupSet({
            host: api,
            repo,
            vms,
            events: { progress: (vm, slot, done, total) => bars.update(`full ${vm} ${slot}`, done, total) },
          }).finally(() => bars.stop());
          if (!o.json) printBackupSummary(full);
          await write(150);
          say(`guests wrote ${formatSize(150 * 64 * 1024 * guests.length)} more`);
          const bars2 = progressBars(!o.json && process.stderr.isTTY === true);
          const incremental = await runBackupSet({
            host: api,
            repo,
            vms,
            events: { progress: (vm, slot, done, total) => bars2.update(`incremental ${vm} ${slot}`, done, total) },
          }).finally(() => bars2.stop());
          if (!o.json) printBackupSummary(incremental);
          if (!full.ok || !incremental.ok) return EXIT.FAILED;

          // Restore the latest point and verify every disk byte for byte.
          const expected = guests.map((g) => g.w.expectedImage());
          const restored = await restorePoint(repo, incremental.pointId!, {
            to: path.join(dir, 'restored'),
            format: 'raw',
          });
          const checks: { vm: string; slot: string; file: string; sha256: string; equal: boolean }[] = [];
          for (const d of restored.disks) {
            const i = guests.findIndex((g) => g.vm === d.vm && g.slot === d.slot);
            const img = await readFile(d.file);
            const want = Buffer.alloc(d.virtualSize);
            expected[i].copy(want);
            const sha = createHash('sha256').update(img).digest('hex');
            checks.push({ vm: d.vm, slot: d.slot, file: d.file, sha256: sha, equal: img.equals(want) });
          }
          const allEqual = checks.every((c) => c.equal);
          say(`restored ${incremental.pointId} in ${(restored.durationMs / 1000).toFixed(1)} s:`);
          for (const c of checks)
            say(
              `  ${c.vm} ${c.slot}: ${c.equal ? 'identical' : 'DIFFERENT'} to what the guest had written (sha256 ${c.sha256.slice(0, 16)})`,
            );
          if (o.json) printJson({ dir, full, incremental, restore: restored, checks, verified: allEqual });
          else
            say(
              allEqual
                ? "quickstart verified: every restored disk equals the guest's disk at the checkpoint"
                : 'quickstart FAILED: a restored disk differs',
            );
          return allEqual ? EXIT.OK : EXIT.FAILED;
        } finally {
          for (const g of guests) await g.nbd.close().catch(() => undefined);
          await repo?.close();
          await host.close();
        }
      }),
    );
}
