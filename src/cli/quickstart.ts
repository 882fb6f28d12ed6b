/**
 * `tidemark quickstart`: the whole product on embedded defaults, in one process. In a folder it names, it
 * makes a host store and a repository, creates three sample VMs with VHDX disks, starts the host with a
 * guest workload writing to every disk over NBD, runs a full backup set (2016 flow: one storage snapshot),
 * lets the guests write more, runs an incremental, restores the latest point and verifies every disk byte
 * for byte against what the guests had written at the checkpoint, then prints the summaries.
 * With `--real-guest`, a fourth VM is a real Linux guest (the guest image, under QEMU) whose sqlite workload
 * is backed up application-consistently through qemu-ga; its restored disk is checked with `e2fsck -fn`.
 */
import { execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { buildGuestImage } from '../guest-image/index.js';
import { createHash } from 'node:crypto';
import { mkdir, mkdtemp, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { HostClient } from '../api/client.js';
import { runBackupSet } from '../backup/backup-set.js';
import { restorePoint } from '../backup/restore.js';
import { TidemarkError } from '../errors.js';
import { startHost } from '../daemon/daemon.js';
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
    .option('--real-guest', 'also boot a real Linux guest (the guest image, under QEMU) and back it up')
    .option('--image <dir>', 'with --real-guest: the guest image to boot (default: build or reuse the cached one)')
    .action((dirArg: string | undefined, o: { json?: boolean; realGuest?: boolean; image?: string }) =>
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
        let realGuest: string | undefined;
        const api = await HostClient.connect({ store }).catch(async (err) => {
          await host.close();
          throw err;
        });
        try {
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
          if (o.realGuest) {
            realGuest = REAL_GUEST;
            await startRealGuest(api, o.image, say);
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
          const vms = [...SAMPLE_VMS.map((v) => v.name), ...(realGuest ? [realGuest] : [])];
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
            if (d.vm === realGuest) {
              checks.push(await checkRealGuestDisk(d.vm, d.slot, d.file));
              continue;
            }
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
              c.vm === realGuest
                ? `  ${c.vm} ${c.slot}: ${c.equal ? 'a clean ext4 file system (e2fsck -fn)' : 'FAILED e2fsck -fn'} (sha256 ${c.sha256.slice(0, 16)})`
                : `  ${c.vm} ${c.slot}: ${c.equal ? 'identical' : 'DIFFERENT'} to what the guest had written (sha256 ${c.sha256.slice(0, 16)})`,
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
          // The real guest shuts down cleanly (its QEMU would otherwise outlive the host, as designed).
          if (realGuest) await api.stopVm(realGuest).catch(() => api.stopVm(realGuest!, true).catch(() => undefined));
          for (const g of guests) await g.nbd.close().catch(() => undefined);
          await repo?.close();
          await host.close();
        }
      }),
    );
}

const REAL_GUEST = 'linux01';
const execFileP = promisify(execFile);

/** Boots the guest image with the sqlite workload on a new data disk and waits until it counts. */
async function startRealGuest(api: HostClient, image: string | undefined, say: (line: string) => void): Promise<void> {
  const built = await buildGuestImage({
    outDir: image ? path.resolve(image) : undefined,
    log: (line) => process.stderr.write(`guest-image: ${line}\n`),
  });
  await api.createVm({
    name: REAL_GUEST,
    image: built.dir,
    workload: 'sqlite',
    memoryMiB: 256,
    disks: [{ slot: 'scsi0-0', size: 256 * MiB }],
  });
  const t0 = performance.now();
  const v = await api.startVm(REAL_GUEST);
  say(
    `started ${REAL_GUEST}: a real Linux guest (QEMU pid ${v.qemu?.pid}, ${v.qemu?.accel}), data disk ${v.disks[0].nbdUri}`,
  );
  const deadline = Date.now() + 300_000;
  for (;;) {
    const text = (await api.readConsole(REAL_GUEST, 0, 1 << 20)).data;
    const counts = [...text.matchAll(/tidemark-wl boot=\d+ n=(\d+)/g)];
    if (counts.length >= 3) {
      say(
        `${REAL_GUEST} boots in ${((performance.now() - t0) / 1000).toFixed(1)} s; its sqlite workload counts (n=${counts.at(-1)![1]})`,
      );
      return;
    }
    if (Date.now() > deadline)
      throw new TidemarkError('TIMEOUT', `${REAL_GUEST} did not start its workload within 5 minutes`);
    await new Promise((r) => setTimeout(r, 500));
  }
}

/** The restored disk of the real guest: a clean ext4 file system (e2fsck -fn) holding the workload's database. */
async function checkRealGuestDisk(
  vm: string,
  slot: string,
  file: string,
): Promise<{ vm: string; slot: string; file: string; sha256: string; equal: boolean }> {
  const sha256 = createHash('sha256')
    .update(await readFile(file))
    .digest('hex');
  let clean = false;
  try {
    await execFileP('e2fsck', ['-fn', file]);
    const ls = await execFileP('debugfs', ['-R', 'ls -l /', file]);
    clean = /\bwl\.db\b/.test(ls.stdout);
  } catch {
    clean = false;
  }
  return { vm, slot, file, sha256, equal: clean };
}
