/**
 * Two real guests on one host, end to end (TCG): the guest image booted twice under QEMU launched by a host
 * that runs as a child process (`tidemark host`, so it can be killed with SIGKILL), one guest with the sqlite
 * workload, one with the shell workload and a writer started through guest-exec that appends numbered lines.
 * Three backup sets with `consistency: 'app-required'` while they write (real qemu-ga freezes); a production
 * and a standard checkpoint (with memory) taken between them, the production one deleted while the guest runs
 * (an online merge); the host SIGKILLed under the running guests and started again (QEMU adopted, the guests'
 * NBD clients reconnect: no I/O error in dmesg) and a fourth backup with a full tracking audit (exact); every
 * restore point restored and checked (e2fsck -fn clean; wl.db pulled out with debugfs passes sqlite's
 * integrity_check; the last record of each workload within what the console showed around the backup); a
 * restored VM registered, booted, its workload continuing; the standard checkpoint applied and resumed.
 * Figures are printed: boot to agent ping, freeze window and I/O pause per backup, the longest gap a workload
 * saw during a backup (console counter lines, polled every 100 ms), standard checkpoint save/apply, RSS.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import type { VmSummary } from '../../src/api/schemas.js';
import { runBackupSet, type BackupSetSummary } from '../../src/backup/backup-set.js';
import { restorePoint, restoreRegistered } from '../../src/backup/restore.js';
import { GuestAgentClient } from '../../src/guest/client.js';
import { buildGuestImage } from '../../src/guest-image/builder.js';
import { Repository } from '../../src/repository/index.js';
import { missingPeers, run, tempDir } from '../helpers/peers.js';

const PEERS = ['qemu-system-x86_64', 'qemu-img', 'apt-get', 'dpkg-deb', 'xz', 'e2fsck', 'debugfs', 'sqlite3'];
const skip = missingPeers(...PEERS);
const BIN = path.resolve('bin/tidemark.js');
const SQL = 'gsql';
const SH = 'gsh';
/** The shell guest's writer: one numbered line appended per step, the number then printed on the console. */
const WRITER =
  'mkdir -p /mnt/data/sh; i=0; [ -e /mnt/data/sh/log ] && i=$(tail -n 1 /mnt/data/sh/log | cut -d" " -f2); ' +
  'while :; do i=$((i+1)); echo "line $i" >> /mnt/data/sh/log; echo "tidemark-sh n=$i" > /dev/console; sleep 0.3; done';
const COUNTER: Record<string, RegExp> = {
  [SQL]: /tidemark-wl boot=(?<boot>\d+) n=(?<n>\d+)/g,
  [SH]: /tidemark-sh n=(?<n>\d+)/g,
};

interface Point {
  id: string;
  /** per VM: the counter the console showed before the run started, and after it ended */
  window: Record<string, [number, number]>;
}

describe.skipIf(skip)(
  'two real guests on one host: backups while they write, checkpoints, host killed, restores (TCG)',
  () => {
    let dir: string;
    let cleanup: () => Promise<void>;
    let store: string;
    let image: string;
    let host: ChildProcess | undefined;
    let hostErr = '';
    let api: HostClient;
    let repo: Repository;
    const points: Point[] = [];
    const figures: Record<string, unknown> = {};
    let standardCp: string | undefined;

    async function startHostProcess(): Promise<void> {
      hostErr = '';
      const child = spawn(
        process.execPath,
        [BIN, 'host', '--store', store, '--accel', 'tcg', '--reconnect-delay', '60'],
        {
          stdio: ['ignore', 'ignore', 'pipe'],
        },
      );
      child.stderr!.on('data', (d) => (hostErr += d));
      host = child;
      for (let i = 0; ; i++) {
        try {
          if (JSON.parse(await readFile(path.join(store, 'host.json'), 'utf8')).pid === child.pid) break;
        } catch {
          // not yet
        }
        if (child.exitCode !== null || i > 1500) throw new Error(`host did not start: ${hostErr}`);
        await new Promise((r) => setTimeout(r, 20));
      }
      api = await HostClient.connect({ store });
    }

    beforeAll(async () => {
      ({ dir, cleanup } = await tempDir('two-guests'));
      store = path.join(dir, 'store');
      image = (await buildGuestImage({ log: (l) => console.log(`guest-image: ${l}`) })).dir;
      await startHostProcess();
      repo = await Repository.init(path.join(dir, 'repo'), {});
    }, 600_000);

    afterAll(async () => {
      try {
        if (host && host.exitCode === null) {
          for (const v of await api.listVms().catch(() => [] as VmSummary[]))
            if (v.qemu?.pid) await api.stopVm(v.name, true).catch(() => undefined);
          const gone = new Promise((r) => host!.once('exit', r));
          host.kill('SIGTERM');
          await gone;
        }
        await repo?.close();
      } finally {
        console.log(`two guests, figures: ${JSON.stringify(figures, null, 1)}`);
        if (process.env.TIDEMARK_KEEP_VM_TEST) console.log(`kept ${dir}`);
        else await cleanup?.();
      }
    }, 180_000);

    const consolePath = async (vm: string) => (await api.showVm(vm)).qemu!.console;
    const consoles = new Map<string, string>();
    async function counters(vm: string, after = 0): Promise<{ boot: number; n: number }[]> {
      if (!consoles.has(vm)) consoles.set(vm, await consolePath(vm));
      const text = (await readFile(consoles.get(vm)!)).subarray(after).toString();
      return [...text.matchAll(new RegExp(COUNTER[vm.replace(/-r$/, '')] ?? COUNTER[SQL]))].map((m) => ({
        boot: Number(m.groups!.boot ?? 0),
        n: Number(m.groups!.n),
      }));
    }
    const last = async (vm: string) => (await counters(vm)).at(-1)?.n ?? 0;
    async function waitFor<T>(what: string, ms: number, fn: () => Promise<T | undefined | false>): Promise<T> {
      const end = Date.now() + ms;
      for (;;) {
        const v = await fn().catch(() => undefined);
        if (v) return v;
        if (Date.now() > end) throw new Error(`timed out waiting for ${what}; host stderr: ${hostErr.slice(-1500)}`);
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    async function agent(vm: string): Promise<GuestAgentClient> {
      const v = await api.showVm(vm);
      return GuestAgentClient.connect(v.guest!, { timeoutMs: 10_000 });
    }
    /** guest-exec: with `wait`, its stdout once it ends; without, it runs on in the guest. */
    async function exec(vm: string, file: string, args: string[], wait = true): Promise<string> {
      const c = await agent(vm);
      try {
        const { pid } = (await c.execute('guest-exec', { path: file, arg: args, 'capture-output': wait })) as {
          pid: number;
        };
        if (!wait) return '';
        for (;;) {
          const st = (await c.execute('guest-exec-status', { pid }, { idempotent: true })) as {
            exited: boolean;
            'out-data'?: string;
          };
          if (st.exited) return Buffer.from(st['out-data'] ?? '', 'base64').toString();
          await new Promise((r) => setTimeout(r, 100));
        }
      } finally {
        await c.close();
      }
    }
    async function ping(vm: string): Promise<void> {
      await waitFor(`${vm}'s guest agent`, 240_000, async () => {
        const c = await agent(vm);
        try {
          await c.ping({ timeoutMs: 3000 });
          return true;
        } finally {
          await c.close();
        }
      });
    }
    async function expectNoIoError(vm: string): Promise<void> {
      const dmesg = await exec(vm, '/bin/dmesg', []);
      expect(dmesg, vm).not.toMatch(/I\/O error|blk_update_request|Buffer I\/O|EXT4-fs error|EXT4-fs warning/i);
    }
    const rss = (pid: number) => {
      const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
      return m ? `${Math.round(Number(m[1]) / 1024)} MiB` : '?';
    };

    /**
     * A backup set of both guests while they write: the counters each console showed before and after it, and
     * the longest time between two counter lines while it ran (the consoles polled every 100 ms).
     */
    async function backup(
      label: string,
      extra: Partial<Parameters<typeof runBackupSet>[0]> = {},
    ): Promise<BackupSetSummary> {
      const vms = [SQL, SH];
      const window: Point['window'] = {};
      const seen = new Map<string, { n: number; at: number }>();
      const gaps: Record<string, number> = {};
      for (const vm of vms) {
        const n = await last(vm);
        window[vm] = [n, n];
        seen.set(vm, { n, at: performance.now() });
        gaps[vm] = 0;
      }
      let polling = true;
      const poll = (async () => {
        while (polling) {
          for (const vm of vms) {
            const n = await last(vm);
            const now = performance.now();
            const s = seen.get(vm)!;
            if (n !== s.n) {
              gaps[vm] = Math.max(gaps[vm], now - s.at);
              seen.set(vm, { n, at: now });
            }
          }
          await new Promise((r) => setTimeout(r, 100));
        }
      })();
      const s = await runBackupSet({ host: api, repo, vms, consistency: 'app-required', ...extra }).finally(
        async () => {
          polling = false;
          await poll;
        },
      );
      // Both workloads go on after the run; the gap still open at its end counts too.
      for (const vm of vms) {
        const s0 = seen.get(vm)!;
        await waitFor(`${vm} counting after ${label}`, 60_000, async () => (await last(vm)) > s0.n);
        gaps[vm] = Math.max(gaps[vm], performance.now() - s0.at);
        window[vm][1] = await last(vm);
      }
      expect(s.errors).toEqual([]);
      expect(s.ok).toBe(true);
      for (const v of s.vms) {
        expect(v.status, `${label} ${v.name}: ${v.error}`).toBe('ok');
        expect(v.consistency, `${label} ${v.name}: ${v.consistencyNote}`).toBe('application');
      }
      // The shell guest has nothing to park: its freeze never waits out the fsfreeze hook's 10 s.
      expect(s.vms.find((v) => v.name === SH)!.freezeWindowMs).toBeLessThan(8000);
      points.push({ id: s.pointId!, window });
      figures[label] = Object.fromEntries(
        s.vms.map((v) => [
          v.name,
          {
            freezeWindowMs: v.freezeWindowMs === null ? null : Math.round(v.freezeWindowMs),
            ioPauseMs: v.ioPauseMs === null ? null : Math.round(v.ioPauseMs),
            longestWorkloadGapMs: Math.round(gaps[v.name]),
            read: v.disks.map((d) => `${d.read} ${d.bytesRead}`).join(', '),
          },
        ]),
      );
      figures[`${label}.durationMs`] = Math.round(s.durationMs);
      return s;
    }

    it('boots both guests; the agents answer; both workloads write', async () => {
      for (const [name, workload] of [
        [SQL, 'sqlite'],
        [SH, 'shell'],
      ] as const) {
        await api.createVm({ name, image, workload, memoryMiB: 256, disks: [{ slot: 'scsi0-0', size: '64M' }] });
      }
      const t0 = performance.now();
      await Promise.all([api.startVm(SQL), api.startVm(SH)]);
      const boot: Record<string, number> = {};
      await Promise.all(
        [SQL, SH].map(async (vm) => {
          await ping(vm);
          boot[vm] = Math.round(performance.now() - t0);
        }),
      );
      figures.bootToAgentPingMs = boot;
      await exec(SH, '/bin/busybox', ['sh', '-c', WRITER], false);
      await waitFor('both counting', 120_000, async () => (await last(SQL)) >= 3 && (await last(SH)) >= 3);
      const rssNow: Record<string, string> = {};
      for (const vm of [SQL, SH]) rssNow[`qemu ${vm}`] = rss((await api.showVm(vm)).qemu!.pid!);
      rssNow.host = rss(host!.pid!);
      figures.rss = rssNow;
    }, 360_000);

    it('three app-required backup sets while they write; a production and a standard checkpoint; an online merge', async () => {
      const first = await backup('backup1');
      expect(first.vms.flatMap((v) => v.disks.map((d) => d.read))).toEqual(['full', 'full']);

      // A production checkpoint of one, a standard one (with its memory) of the other.
      const prod = await api.createCheckpoint(SQL, { type: 'production' });
      expect(prod.consistency).toBe('application');
      let t = performance.now();
      const std = await api.createCheckpoint(SH, { type: 'standard', name: 'with memory' });
      figures.standardCheckpointSaveMs = Math.round(performance.now() - t);
      expect(std.memoryState).toMatch(/^disks\/memory_[0-9a-f]{8}\.vmrs$/);
      standardCp = std.id;

      const second = await backup('backup2');
      expect(second.vms.flatMap((v) => v.disks.map((d) => d.read))).toEqual(['incremental', 'incremental']);

      // Deleting the production checkpoint while the guest writes: merged online.
      const before = await last(SQL);
      t = performance.now();
      await api.deleteCheckpoint(SQL, prod.id);
      figures.onlineMergeMs = Math.round(performance.now() - t);
      expect((await api.showVm(SQL)).disks[0].head).toMatch(/\.vhdx$/);
      await waitFor('the sqlite counter after the merge', 60_000, async () => (await last(SQL)) >= before + 2);

      const third = await backup('backup3');
      expect(third.vms.flatMap((v) => v.disks.map((d) => d.read))).toEqual(['incremental', 'incremental']);
      expect(third.warnings).toEqual([]);
      for (const vm of [SQL, SH]) await expectNoIoError(vm);
    }, 300_000);

    it('the host killed with SIGKILL under running guests and started again: no guest I/O error, the next backup exact', async () => {
      const pids = await Promise.all([SQL, SH].map(async (vm) => (await api.showVm(vm)).qemu!.pid));
      const before = { [SQL]: await last(SQL), [SH]: await last(SH) };
      const gone = new Promise((r) => host!.once('exit', r));
      host!.kill('SIGKILL');
      await gone;
      await new Promise((r) => setTimeout(r, 3000)); // the guests' disk I/O waits (reconnect-delay)
      const t = performance.now();
      await startHostProcess();
      figures.hostRestartMs = Math.round(performance.now() - t);
      for (const [i, vm] of [SQL, SH].entries()) {
        const v = await api.showVm(vm);
        expect(v.state).toBe('Running');
        expect(v.qemu?.pid).toBe(pids[i]); // adopted, not restarted
      }
      await waitFor(
        'both counting under the new host',
        120_000,
        async () => (await last(SQL)) >= before[SQL] + 3 && (await last(SH)) >= before[SH] + 3,
      );
      for (const vm of [SQL, SH]) await expectNoIoError(vm);
      // Exact: every chunk tracking calls unchanged is read again and compared with the previous point.
      const s = await backup('backup4', { audit: { kind: 'full' } });
      expect(s.warnings).toEqual([]);
      for (const d of s.vms.flatMap((v) => v.disks)) {
        expect(d.read).toBe('incremental');
        expect(d.audit?.mismatches).toBe(0);
      }
    }, 300_000);

    it('every point restores: e2fsck -fn clean, sqlite integrity ok, the last record within the console window', async () => {
      const report: string[] = [];
      for (const p of points) {
        const to = path.join(dir, 'restored', p.id);
        await mkdir(to, { recursive: true });
        const r = await restorePoint(repo, p.id, { to, format: 'raw' });
        expect(r.disks.map((d) => d.vm).sort()).toEqual([SH, SQL]);
        for (const d of r.disks) {
          const fsck = await run('e2fsck', ['-fn', d.file], { allowFail: true });
          expect(fsck.code, `${p.id} ${d.vm}: ${fsck.stdout}${fsck.stderr}`).toBe(0);
          const [lo, hi] = p.window[d.vm];
          let n: number;
          if (d.vm === SQL) {
            const db = path.join(to, `${d.vm}.wl.db`);
            await run('debugfs', ['-R', `dump /wl.db ${db}`, d.file]);
            expect(existsSync(db)).toBe(true);
            expect((await run('sqlite3', [db, 'PRAGMA integrity_check;'])).stdout.trim()).toBe('ok');
            const rows = (await run('sqlite3', [db, 'SELECT COUNT(*), MIN(n), MAX(n) FROM wl;'])).stdout.trim();
            const [count, min, max] = rows.split('|').map(Number);
            expect([count, min]).toEqual([max, 1]); // one row per step, none missing
            n = max;
          } else {
            const log = path.join(to, `${d.vm}.log`);
            await run('debugfs', ['-R', `dump /sh/log ${log}`, d.file]);
            const lines = (await readFile(log, 'utf8')).split('\n').filter(Boolean);
            expect(lines).toEqual(lines.map((_, i) => `line ${i + 1}`)); // whole lines, in order, no hole
            n = lines.length;
          }
          expect(n, `${p.id} ${d.vm}: last record ${n}, console ${lo}..${hi}`).toBeGreaterThanOrEqual(lo);
          expect(n, `${p.id} ${d.vm}: last record ${n}, console ${lo}..${hi}`).toBeLessThanOrEqual(hi + 1);
          report.push(`${p.id} ${d.vm}: last ${n} in ${lo}..${hi}`);
        }
      }
      figures.restoredPoints = report;
    }, 300_000);

    it('a restored VM registered and booted: its workload continues where the backup left it', async () => {
      const lastPoint = points.at(-1)!;
      const r = await restoreRegistered(repo, api, lastPoint.id, { vm: SQL, name: `${SQL}-r` });
      expect(r.registered).toEqual([`${SQL}-r`]);
      const v = await api.showVm(`${SQL}-r`);
      expect(v.boot?.kind).toBe('kernel');
      expect(v.memoryMiB).toBe(256);
      const t = performance.now();
      await api.startVm(`${SQL}-r`);
      await waitFor('the restored guest counting', 240_000, async () => (await counters(`${SQL}-r`)).length >= 2);
      figures.restoredBootToCounterMs = Math.round(performance.now() - t);
      const first = (await counters(`${SQL}-r`))[0];
      expect(first.boot).toBe(2); // a second boot of that disk
      expect(first.n).toBeGreaterThanOrEqual(lastPoint.window[SQL][0] + 1);
      expect(first.n).toBeLessThanOrEqual(lastPoint.window[SQL][1] + 2);
      await expectNoIoError(`${SQL}-r`);
      expect((await api.stopVm(`${SQL}-r`, true)).state).toBe('Off');
    }, 300_000);

    it('the standard checkpoint applied: the shell guest resumes from its memory, its writer where it was', async () => {
      const atCheckpoint = points[0].window[SH][1];
      expect((await api.stopVm(SH, true)).state).toBe('Off');
      const offset = (await readFile(await consolePath(SH))).length;
      let t = performance.now();
      await api.applyCheckpoint(SH, standardCp!);
      figures.standardCheckpointApplyMs = Math.round(performance.now() - t);
      expect((await api.showVm(SH)).state).toBe('Saved');
      t = performance.now();
      expect((await api.startVm(SH)).state).toBe('Running');
      const resumed = await waitFor(
        'the writer after the resume',
        120_000,
        async () => (await counters(SH, offset))[0],
      );
      figures.standardResumeToCounterMs = Math.round(performance.now() - t);
      // The writer lived only in the guest's memory: it goes on from the checkpoint, not from 1.
      expect(resumed.n).toBeGreaterThan(atCheckpoint);
      expect(resumed.n).toBeLessThanOrEqual(points[1].window[SH][0] + 1);
      await expectNoIoError(SH);
    }, 240_000);
  },
);
