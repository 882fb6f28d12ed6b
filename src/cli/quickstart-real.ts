/**
 * `tidemark quickstart` with real guests (the default when QEMU is installed): two Linux guests from the guest
 * image run the sqlite workload under QEMU launched by the host, on VHDX disks served over NBD. A full and an
 * incremental backup set are taken while they write, application-consistent through the real qemu-ga in each
 * guest (`app-required`: a guest that cannot be frozen fails the run). The latest point is restored: each disk
 * must pass `e2fsck -fn` and hold a `wl.db` (pulled out with debugfs) whose last row lies within what the guest's
 * console showed around the backup, and whose `pragma integrity_check` is ok (host sqlite3 when installed).
 * Then the point's first VM is restored as a new VM of the host, booted, and must go on counting from where the
 * backup left it, with `pragma integrity_check` ok inside the guest (guest-exec through its agent).
 */
import { execFile } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { HostClient } from '../api/client.js';
import { runBackupSet, type BackupSetSummary } from '../backup/backup-set.js';
import { restorePoint, restoreRegistered } from '../backup/restore.js';
import { startHost } from '../daemon/daemon.js';
import { TidemarkError } from '../errors.js';
import { GuestAgentClient } from '../guest/client.js';
import { HostLog } from '../host/log.js';
import { Repository } from '../repository/index.js';
import { formatSize } from '../util/size.js';
import { printBackupSummary } from './backup.js';
import { EXIT, printJson } from './output.js';
import { progressBars } from './progress.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
export const REAL_GUESTS = ['linux01', 'linux02'];
const COUNTER = /tidemark-wl boot=(\d+) n=(\d+)/g;
/** The sqlite3 the guest image carries (its workload's). */
const GUEST_SQLITE = '/usr/bin/sqlite3';

export interface RealQuickstartOptions {
  dir: string;
  store: string;
  repoPath: string;
  image: string;
  json: boolean;
  say(line: string): void;
}

interface DiskCheck {
  vm: string;
  slot: string;
  file: string;
  fsck: boolean;
  integrity: 'ok' | 'not checked (no sqlite3 on this host)' | string;
  lastRow: number | null;
  window: [number, number];
  ok: boolean;
}

export async function realGuestQuickstart(o: RealQuickstartOptions): Promise<number> {
  const { say } = o;
  const started = performance.now();
  // Unix socket paths are limited to 107 bytes: keep the NBD socket short.
  const socketDir = await mkdtemp(path.join(os.tmpdir(), 'tm-'));
  const host = await startHost({
    store: o.store,
    nbd: { socket: path.join(socketDir, 'nbd.sock') },
    log: HostLog.silent(),
  });
  let repo: Repository | undefined;
  const running: string[] = [];
  const api = await HostClient.connect({ store: o.store }).catch(async (err) => {
    await host.close();
    throw err;
  });
  const counters = async (vm: string) =>
    [...(await api.readConsole(vm, 0, 1 << 22)).data.matchAll(COUNTER)].map((m) => ({
      boot: Number(m[1]),
      n: Number(m[2]),
    }));
  const last = async (vm: string) => (await counters(vm)).at(-1)?.n ?? 0;
  const waitFor = async (what: string, ms: number, fn: () => Promise<boolean>) => {
    const end = Date.now() + ms;
    while (!(await fn().catch(() => false))) {
      if (Date.now() > end) throw new TidemarkError('TIMEOUT', `${what} did not happen within ${ms / 1000} s`);
      await new Promise((r) => setTimeout(r, 300));
    }
  };
  try {
    if ((await api.listVms()).length > 0)
      throw new TidemarkError('ALREADY_EXISTS', `${o.dir} already holds a quickstart; give an empty folder`);
    for (const name of REAL_GUESTS) {
      await api.createVm({
        name,
        image: o.image,
        workload: 'sqlite',
        memoryMiB: 256,
        disks: [{ slot: 'scsi0-0', size: 128 * MiB }],
      });
    }
    const t0 = performance.now();
    for (const name of REAL_GUESTS) {
      const v = await api.startVm(name);
      running.push(name);
      say(
        `created and started ${name}: QEMU pid ${v.qemu?.pid} (${v.qemu?.accel}), data disk ${v.disks[0].slot} ${formatSize(v.disks[0].virtualSize)} at ${v.disks[0].nbdUri}`,
      );
    }
    for (const name of REAL_GUESTS)
      await waitFor(`${name}'s sqlite workload`, 300_000, async () => (await last(name)) >= 3);
    say(
      `the guests booted and their sqlite workloads count (${(await Promise.all(REAL_GUESTS.map(async (v) => `${v} n=${await last(v)}`))).join(', ')}) after ${((performance.now() - t0) / 1000).toFixed(1)} s`,
    );
    repo = await Repository.init(o.repoPath, {});
    say(`repository initialised (chunks of ${formatSize((await repo.info()).chunkSize)}, zstd)`);

    // Each backup set runs while the guests write; what each console showed before and after bounds its rows.
    const backup = async (label: string): Promise<{ s: BackupSetSummary; window: Map<string, [number, number]> }> => {
      const window = new Map<string, [number, number]>();
      for (const vm of REAL_GUESTS) window.set(vm, [await last(vm), 0]);
      const bars = progressBars(!o.json && process.stderr.isTTY === true);
      const s = await runBackupSet({
        host: api,
        repo: repo!,
        vms: REAL_GUESTS,
        consistency: 'app-required',
        events: { progress: (vm, slot, done, total) => bars.update(`${label} ${vm} ${slot}`, done, total) },
      }).finally(() => bars.stop());
      for (const vm of REAL_GUESTS) window.get(vm)![1] = await last(vm);
      if (!o.json) printBackupSummary(s);
      return { s, window };
    };
    const full = await backup('full');
    if (!full.s.ok) return EXIT.FAILED;
    const before = await Promise.all(REAL_GUESTS.map(last));
    await waitFor('more rows', 120_000, async () =>
      (await Promise.all(REAL_GUESTS.map(last))).every((n, i) => n >= before[i] + 5),
    );
    say(
      `the guests wrote more (${(await Promise.all(REAL_GUESTS.map(async (v) => `${v} n=${await last(v)}`))).join(', ')})`,
    );
    const incremental = await backup('incremental');
    if (!incremental.s.ok) return EXIT.FAILED;

    // Restore the latest point and check each disk as the guest's file system and database.
    const point = incremental.s.pointId!;
    const restored = await restorePoint(repo, point, { to: path.join(o.dir, 'restored'), format: 'raw' });
    say(`restored ${point} in ${(restored.durationMs / 1000).toFixed(1)} s:`);
    const hostSqlite = await execFileP('sqlite3', ['-version']).then(
      () => true,
      () => false,
    );
    const checks: DiskCheck[] = [];
    for (const d of restored.disks) {
      const c = await checkDisk(d.vm, d.slot, d.file, incremental.window.get(d.vm)!, hostSqlite);
      checks.push(c);
      say(
        `  ${c.vm} ${c.slot}: ${c.fsck ? 'a clean ext4 file system (e2fsck -fn)' : 'FAILED e2fsck -fn'}; wl.db integrity_check ${c.integrity}; last row n=${c.lastRow ?? '?'} (the console showed ${c.window[0]}..${c.window[1]} around the backup)${c.ok ? '' : ': FAILED'}`,
      );
    }

    // The point's first VM as a new VM of this host, booted: its workload goes on from the backup.
    const source = REAL_GUESTS[0];
    const name = `${source}-restored`;
    const reg = await restoreRegistered(repo, api, point, { vm: source, name, command: 'tidemark quickstart' });
    const tBoot = performance.now();
    await api.startVm(name);
    running.push(name);
    await waitFor(`${name}'s workload`, 300_000, async () => (await counters(name)).length >= 2);
    const first = (await counters(name))[0];
    const restoredRow = checks.find((c) => c.vm === source)?.lastRow ?? null;
    const continues = first.boot === 2 && (restoredRow === null || first.n === restoredRow + 1);
    const inside = await guestExec(api, name, GUEST_SQLITE, [
      '-cmd',
      '.timeout 10000',
      '/mnt/data/wl.db',
      'PRAGMA integrity_check;',
    ]).catch((err: Error) => `failed: ${err.message}`);
    const bootedOk = continues && inside.trim() === 'ok';
    say(
      `registered ${reg.registered.join(', ')} from ${point} and booted it in ${((performance.now() - tBoot) / 1000).toFixed(1)} s: boot ${first.boot} counts on from n=${first.n}${continues ? '' : ` (expected boot 2 from n=${(restoredRow ?? 0) + 1})`}; integrity_check inside the guest: ${inside.trim()}`,
    );

    const verified = checks.every((c) => c.ok) && bootedOk;
    if (o.json)
      printJson({
        dir: o.dir,
        guests: 'real',
        full: full.s,
        incremental: incremental.s,
        restore: restored,
        checks,
        registered: { name, firstCounter: first, integrityCheck: inside.trim(), ok: bootedOk },
        verified,
        durationMs: Math.round(performance.now() - started),
      });
    else
      say(
        verified
          ? `quickstart verified in ${((performance.now() - started) / 1000).toFixed(0)} s: application-consistent backups of real guests, every restored disk clean, the restored VM boots and goes on`
          : 'quickstart FAILED: see the lines above',
      );
    return verified ? EXIT.OK : EXIT.FAILED;
  } finally {
    // The guests shut down cleanly (their QEMU would otherwise outlive the host, as designed).
    await Promise.all(running.map((vm) => api.stopVm(vm).catch(() => api.stopVm(vm, true).catch(() => undefined))));
    await repo?.close();
    await host.close();
    await rm(socketDir, { recursive: true, force: true });
  }
}

/** A restored raw disk: e2fsck -fn, then wl.db out of it (debugfs), its rows and integrity. */
async function checkDisk(
  vm: string,
  slot: string,
  file: string,
  window: [number, number],
  hostSqlite: boolean,
): Promise<DiskCheck> {
  const c: DiskCheck = { vm, slot, file, fsck: false, integrity: 'not read', lastRow: null, window, ok: false };
  c.fsck = await execFileP('e2fsck', ['-fn', file]).then(
    () => true,
    () => false,
  );
  const db = path.join(path.dirname(file), `${slot}.wl.db`);
  await mkdir(path.dirname(db), { recursive: true });
  await execFileP('debugfs', ['-R', `dump /wl.db ${db}`, file]).catch(() => undefined);
  const bytes = await readFile(db).catch(() => undefined);
  if (!bytes || bytes.length === 0) {
    c.integrity = 'wl.db missing';
    return c;
  }
  if (!hostSqlite) {
    c.integrity = 'not checked (no sqlite3 on this host)';
    c.ok = c.fsck;
    return c;
  }
  c.integrity = (await execFileP('sqlite3', [db, 'PRAGMA integrity_check;'])).stdout.trim();
  const rows = (await execFileP('sqlite3', [db, 'SELECT COUNT(*), MAX(n) FROM wl;'])).stdout.trim().split('|');
  c.lastRow = Number(rows[1]);
  // One row per step, and the last one between what the console showed before and after the run.
  c.ok =
    c.fsck &&
    c.integrity === 'ok' &&
    Number(rows[0]) === c.lastRow &&
    c.lastRow >= window[0] &&
    c.lastRow <= window[1] + 1;
  return c;
}

/** guest-exec through the VM's agent, waiting for the program: its stdout. */
async function guestExec(api: HostClient, vm: string, file: string, args: string[]): Promise<string> {
  const address = (await api.showVm(vm)).guest;
  if (!address) throw new TidemarkError('NOT_FOUND', `${vm} has no guest-agent channel`);
  const c = await GuestAgentClient.connect(address, { timeoutMs: 30_000 });
  try {
    const { pid } = (await c.execute('guest-exec', { path: file, arg: args, 'capture-output': true })) as {
      pid: number;
    };
    for (;;) {
      const st = (await c.execute('guest-exec-status', { pid }, { idempotent: true })) as {
        exited: boolean;
        'out-data'?: string;
      };
      if (st.exited) return Buffer.from(st['out-data'] ?? '', 'base64').toString();
      await new Promise((r) => setTimeout(r, 200));
    }
  } finally {
    await c.close();
  }
}
