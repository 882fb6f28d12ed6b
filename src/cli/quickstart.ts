/**
 * `tidemark quickstart`: the whole product on embedded defaults, in one process, in a folder it names (a host
 * store and a repository). When QEMU (`qemu-system-x86_64`) is installed, the guests are real: Linux guests from
 * the guest image under QEMU, backed up application-consistently through qemu-ga while they write, restored,
 * checked (e2fsck, sqlite) and booted again (quickstart-real.ts). Otherwise, or with `--built-in`, it says so in
 * one line and runs the built-in workload: three sample VMs with VHDX disks, written over NBD by an in-process
 * guest workload, a full backup set (2016 flow: one storage snapshot), more writes, an incremental, a restore of
 * the latest point verified byte for byte against what the guests had written at the checkpoint.
 */
import { createHash } from 'node:crypto';
import { constants } from 'node:fs';
import { access, mkdir, mkdtemp, readFile } from 'node:fs/promises';
import { buildGuestImage } from '../guest-image/index.js';
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
import { realGuestQuickstart } from './quickstart-real.js';

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
    .description(
      'the whole product on embedded defaults: VMs (real Linux guests when QEMU is installed), full + incremental backup while they write, restore, verify',
    )
    .argument('[dir]', 'the folder to work in (default: a new temporary folder)')
    .option('--json', 'print the results as JSON')
    .option('--built-in', 'use the built-in workload over NBD even when QEMU is installed (no real guests)')
    .option('--real-guest', 'require real guests: fail instead of falling back to the built-in workload')
    .option('--image <dir>', 'the guest image to boot (default: build or reuse the cached one)')
    .action(
      (dirArg: string | undefined, o: { json?: boolean; builtIn?: boolean; realGuest?: boolean; image?: string }) =>
        run(async () => {
          if (o.builtIn && o.realGuest)
            throw new TidemarkError('INVALID_ARGUMENT', '--built-in and --real-guest exclude each other');
          const dir = dirArg ? path.resolve(dirArg) : await mkdtemp(path.join(os.tmpdir(), 'tidemark-quickstart-'));
          await mkdir(dir, { recursive: true });
          const say = (line: string) => (o.json ? undefined : println(line));
          const store = path.join(dir, 'store');
          const repoPath = path.join(dir, 'repository');
          say(`quickstart in ${dir}: host store ${store}, repository ${repoPath}`);
          if (o.builtIn) say('--built-in: the guests are the built-in workload over NBD, not real Linux guests');
          const image = o.builtIn ? undefined : await realGuestImage(o, say);
          if (image) return realGuestQuickstart({ dir, store, repoPath, image, json: !!o.json, say });
          // Unix socket paths are limited to 107 bytes: keep the NBD socket short.
          const socket = path.join(await mkdtemp(path.join(os.tmpdir(), 'tm-')), 'nbd.sock');
          const host = await startHost({ store, nbd: { socket }, log: HostLog.silent() });
          const guests: { vm: string; slot: string; nbd: NbdClient; w: Workload }[] = [];
          let repo: Repository | undefined;
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

/**
 * The guest image to boot real guests from, or undefined for the built-in workload (said in one line): QEMU is
 * not installed, or the image cannot be built here. With --real-guest either is an error instead.
 */
async function realGuestImage(
  o: { realGuest?: boolean; image?: string },
  say: (line: string) => void,
): Promise<string | undefined> {
  const why = (reason: string) => {
    if (o.realGuest) throw new TidemarkError('NOT_SUPPORTED', `--real-guest: ${reason}`);
    say(`${reason}: the guests are the built-in workload over NBD instead of real Linux guests`);
    return undefined;
  };
  if (!(await onPath('qemu-system-x86_64'))) return why('QEMU (qemu-system-x86_64) is not installed');
  try {
    const built = await buildGuestImage({
      outDir: o.image ? path.resolve(o.image) : undefined,
      log: (line) => process.stderr.write(`guest-image: ${line}\n`),
    });
    say(`QEMU found: the guests are real Linux guests from the guest image ${built.dir} (--built-in: without QEMU)`);
    return built.dir;
  } catch (err) {
    return why(`the guest image could not be built (${(err as Error).message})`);
  }
}

async function onPath(program: string): Promise<boolean> {
  for (const d of (process.env.PATH ?? '').split(path.delimiter).filter(Boolean)) {
    if (
      await access(path.join(d, program), constants.X_OK).then(
        () => true,
        () => false,
      )
    )
      return true;
  }
  return false;
}
