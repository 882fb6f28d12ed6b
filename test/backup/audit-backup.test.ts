/**
 * The tracking audit end to end (DESIGN.md "Invariants" 1), a host in process, VMs with tracked disks, backups
 * into repositories. A change is injected BELOW the tracker: payload bytes written through the disk's own engine
 * instance with its change-tracker observer detached, so tracking never hears of them (checked with a change
 * query), then:
 * - `--audit full` always finds it, finishes the disk as a full read in the same run, warns, records it in the
 *   manifest, and the restore equals the disk;
 * - at the default rate, over seeded trials, each trial finds it exactly when the replayed sample (from the seed
 *   the run recorded) holds the changed chunk, and the detection rate lies in the binomial interval of the
 *   sample's probability n/U;
 * - `--audit off` reads nothing beyond the changed chunks (the NBD server's byte count) and finds nothing; the
 *   default reads exactly its sample; the time bound stops a long audit and says so (library and CLI);
 * - no false positives: many incrementals of an encrypted repository (keyed chunk ids) with guests writing,
 *   standard checkpoints created and merged, VMs stopped and started, and the host restarted, each audited in
 *   full: never a mismatch, and the last point restores exactly. (A disk whose tracking refuses its id is read in
 *   full without an audit: counted, printed, and at least 3/4 of the disk-rounds must have been audited.)
 *
 * Seed: TIDEMARK_AUDIT_SEED; trials: TIDEMARK_AUDIT_TRIALS (default 30); rounds: TIDEMARK_AUDIT_ROUNDS (default 8).
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { DEFAULT_AUDIT, auditSample, diskSeed, sampleSize } from '../../src/backup/audit.js';
import { runBackupSet, type BackupSetOptions, type BackupSetSummary } from '../../src/backup/backup-set.js';
import { chunksTouched } from '../../src/backup/disk-reader.js';
import type { VirtualDisk } from '../../src/disk/virtual-disk.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { MIN_SCRYPT_LOG_N, Repository } from '../../src/repository/index.js';
import { Workload } from '../../src/workload/generator.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const CHUNK = 256 * 1024;
const SEED = seedFrom('TIDEMARK_AUDIT_SEED', 1306);
const TRIALS = Number(process.env.TIDEMARK_AUDIT_TRIALS ?? 30);
const ROUNDS = Number(process.env.TIDEMARK_AUDIT_ROUNDS ?? 8);
console.log(
  `audit seed ${SEED}, ${TRIALS} trials, ${ROUNDS} rounds (TIDEMARK_AUDIT_SEED, TIDEMARK_AUDIT_TRIALS, TIDEMARK_AUDIT_ROUNDS)`,
);

let dir: string;
let store: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
let api: HostClient;
let repo: Repository;
const SLOT = 'scsi0-0';

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('audit'));
  store = path.join(dir, 'store');
  running = await startHost({ store, log: HostLog.silent() });
  api = await HostClient.connect({ store });
  repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: CHUNK });
});
afterAll(async () => {
  await repo?.close();
  await running?.close();
  await cleanup?.();
});

/** A VM with one tracked disk, running, and a guest's NBD connection to it. */
async function vmWithDisk(name: string, size: number): Promise<{ nbd: NbdClient; diskId: string }> {
  await api.createVm({ name, disks: [{ slot: SLOT, size }] });
  const vm = await api.startVm(name);
  const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: vm.disks[0].export! });
  return { nbd, diskId: vm.disks[0].virtualDiskId };
}

/** Writes through the host's own engine instance of the disk with the change tracker detached: tracking never sees it. */
async function writeBelowTracker(vm: string, offset: number, data: Buffer): Promise<void> {
  const file = (running.host.runningDisk(vm, SLOT) as VirtualDisk).file;
  const observer = file.observer;
  expect(observer, 'the disk is tracked').toBeDefined();
  file.observer = undefined;
  try {
    await file.write(data, offset);
    await file.flush();
  } finally {
    file.observer = observer;
  }
}

async function guestWrite(nbd: NbdClient, offset: number, data: Buffer): Promise<void> {
  await nbd.write(offset, data);
  await nbd.flush();
}

async function backup(
  vms: string[],
  extra: Partial<BackupSetOptions> = {},
  lines: string[] = [],
): Promise<BackupSetSummary> {
  const s = await runBackupSet({
    host: api,
    repo,
    vms,
    consistency: 'crash',
    events: { log: (l) => lines.push(l) },
    ...extra,
  });
  expect(s.errors).toEqual([]);
  expect(s.ok).toBe(true);
  return s;
}

/** The chunks change tracking reports changed since `rctId`, as the backup computes them. */
async function trackedChunks(vm: string, rctId: string, size: number): Promise<number[]> {
  const { ranges } = await api.allChanges({ vm, slot: SLOT, limitId: rctId, length: size });
  return chunksTouched(ranges, CHUNK, size);
}

async function restoredImage(r: Repository, point: string, vm: string): Promise<Buffer> {
  const to = path.join(dir, `restore-${point}-${vm}`);
  const out = await restorePoint(r, point, { to, vm, format: 'raw' });
  return readFile(out.disks[0].file);
}

function cli(args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [path.join(REPO_ROOT, 'bin', 'tidemark.js'), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d) => (stdout += d));
  child.stderr.on('data', (d) => (stderr += d));
  return new Promise((resolve) => child.on('exit', (code) => resolve({ code, stdout, stderr })));
}

describe(`tracking audit (seed ${SEED})`, () => {
  it('--audit full finds a change below the tracker, reads the disk in full, warns, and restores exactly', async () => {
    const SIZE = 8 * MiB;
    const { nbd } = await vmWithDisk('deep', SIZE);
    const r = rng(SEED);
    try {
      for (let s = 0; s < SIZE / CHUNK; s += 2) await guestWrite(nbd, s * CHUNK, r.bytes(CHUNK));
      const first = await backup(['deep'], { audit: { kind: 'full' } });
      expect(first.vms[0].disks[0]).toMatchObject({ read: 'full', fullReason: 'first backup', audit: null });
      const prevRct = first.vms[0].disks[0].rctId!;

      await guestWrite(nbd, 2 * CHUNK + 4096, r.bytes(8192)); // tracked
      const hidden = 9 * CHUNK + 12_345;
      await writeBelowTracker('deep', hidden, r.bytes(3000)); // not tracked
      const changed = await trackedChunks('deep', prevRct, SIZE);
      expect(changed).toEqual([2]);

      const lines: string[] = [];
      const s = await backup(['deep'], { audit: { kind: 'full' } }, lines);
      const d = s.vms[0].disks[0];
      const reason = `tracking audit found a change at offset ${9 * CHUNK} that tracking missed`;
      expect(d.read).toBe('full');
      expect(d.fullReason).toBe(reason);
      expect(d.audit).toMatchObject({
        mode: 'full',
        rate: null,
        unchanged: SIZE / CHUNK - 1,
        sampled: SIZE / CHUNK - 1,
        mismatches: 1,
        firstMismatchOffset: 9 * CHUNK,
        missedChunks: 1,
        timeBudgetMs: null,
        stoppedEarly: false,
      });
      expect(s.warnings).toHaveLength(1);
      expect(s.warnings[0]).toMatch(/deep scsi0-0: change tracking missed a change at offset 2359296: 1 of the 31/);
      expect(lines.some((l) => l.includes('TRACKING DISTRUSTED') && l.includes(reason))).toBe(true);
      expect(lines.some((l) => l.startsWith('WARNING: deep scsi0-0: change tracking missed'))).toBe(true);
      // Every chunk read again (those with data); the first pass's chunk is not stored twice.
      expect(d.bytesRead).toBeGreaterThanOrEqual((SIZE / 2) * 1);

      // The manifest says the same.
      const m = await repo.readPoint(s.pointId!);
      const md = m.vms[0].disks[0];
      expect(md.read).toBe('full');
      expect(md.fullReason).toBe(reason);
      expect(md.audit).toEqual(d.audit);
      expect(md.audit!.seed).toBe(s.auditSeed);

      // The restore equals the disk (nothing has written it since).
      const img = await restoredImage(repo, s.pointId!, 'deep');
      expect(img.equals(await nbd.read(0, SIZE))).toBe(true);

      // The new point is a true baseline: the next incremental's full audit finds nothing.
      await guestWrite(nbd, 5 * CHUNK, r.bytes(CHUNK));
      const next = await backup(['deep'], { audit: { kind: 'full' } });
      expect(next.vms[0].disks[0]).toMatchObject({ read: 'incremental', audit: { mismatches: 0, checked: 31 } });
      expect(next.warnings).toEqual([]);
      expect((await restoredImage(repo, next.pointId!, 'deep')).equals(await nbd.read(0, SIZE))).toBe(true);
    } finally {
      await nbd.close();
    }
  });

  it(
    `at the default rate finds the change exactly when its replayed sample holds it: ${TRIALS} trials`,
    { timeout: 120_000 + TRIALS * 5_000 },
    async () => {
      const SIZE = 16 * MiB;
      const SLOTS = SIZE / CHUNK;
      const { nbd, diskId } = await vmWithDisk('sampled', SIZE);
      const r = rng(SEED + 1);
      try {
        for (let s = 0; s < SLOTS; s++) if (r.int(2) === 0) await guestWrite(nbd, s * CHUNK, r.bytes(CHUNK));
        let rct = (await backup(['sampled'])).vms[0].disks[0].rctId!;
        let detected = 0;
        let expected = 0;
        let variance = 0;
        for (let t = 0; t < TRIALS; t++) {
          // Some tracked guest writes, then one change below the tracker in another chunk.
          const written = new Set<number>();
          for (let k = r.int(4); k > 0; k--) {
            const s = r.int(SLOTS);
            written.add(s);
            await guestWrite(nbd, s * CHUNK, r.bytes(CHUNK));
          }
          let hiddenSlot: number;
          do hiddenSlot = r.int(SLOTS);
          while (written.has(hiddenSlot));
          const at = hiddenSlot * CHUNK + 512 * r.int((CHUNK - 4096) / 512); // sector-aligned (the guest reads it)
          const old = await nbd.read(at, 4096);
          await writeBelowTracker('sampled', at, r.bytes(4096));
          const auditSeed = r.int(2 ** 32);
          const s = await backup(['sampled'], { auditSeed, auditTimeMs: 600_000 });
          const d = s.vms[0].disks[0];
          const a = d.audit!;
          // Replay the sample from the seed the run recorded, over the chunks tracking reported.
          const changed = await trackedChunks('sampled', rct, SIZE);
          expect(changed.includes(hiddenSlot), `trial ${t}: tracking saw the hidden write`).toBe(false);
          expect(a.unchanged, `trial ${t}`).toBe(SLOTS - changed.length);
          expect(a.seed).toBe(auditSeed);
          const n = sampleSize(DEFAULT_AUDIT, SLOTS, a.unchanged);
          expect(a.sampled).toBe(n);
          const inSample = auditSample(diskSeed(auditSeed, diskId), SLOTS, changed, n).includes(hiddenSlot);
          const found = a.mismatches > 0;
          expect(found, `trial ${t}: slot ${hiddenSlot}, seed ${auditSeed}, disk ${diskId}`).toBe(inSample);
          if (found) {
            expect(d.read).toBe('full');
            expect(a.firstMismatchOffset).toBe(hiddenSlot * CHUNK);
            expect(a.missedChunks).toBe(1);
            detected++;
          } else {
            expect(d.read).toBe('incremental');
            expect(a.checked).toBe(n);
            // Put the old bytes back below the tracker: the disk again holds what the repository says it does.
            await writeBelowTracker('sampled', at, old);
          }
          const p = n / a.unchanged;
          expected += p;
          variance += p * (1 - p);
          rct = d.rctId!;
        }
        // The detection count lies in the 99.9% interval of its Poisson-binomial distribution (normal approximation).
        const half = 3.29 * Math.sqrt(variance);
        console.log(
          `audit trials: ${detected} of ${TRIALS} found; expected ${expected.toFixed(1)} ± ${half.toFixed(1)} (99.9%); disk ${diskId} (samples derive from it and each trial's seed)`,
        );
        expect(Math.abs(detected - expected)).toBeLessThanOrEqual(half);
        // Every missed change was put back: a full audit now finds nothing.
        const check = await backup(['sampled'], { audit: { kind: 'full' } });
        expect(check.vms[0].disks[0].audit).toMatchObject({ mismatches: 0, stoppedEarly: false });
      } finally {
        await nbd.close();
      }
    },
  );

  it('--audit off reads nothing extra and finds nothing; the default reads its sample; the time bound stops', async () => {
    const SIZE = 32 * MiB;
    const SLOTS = SIZE / CHUNK;
    const { nbd } = await vmWithDisk('quiet', SIZE);
    const r = rng(SEED + 2);
    try {
      for (let s = 0; s < SLOTS; s++) await guestWrite(nbd, s * CHUNK, r.bytes(CHUNK)); // no zero chunk
      await backup(['quiet'], { audit: { kind: 'off' } });

      const served = () => running.host.nbd.stats().bytesRead;
      await guestWrite(nbd, 3 * CHUNK, r.bytes(CHUNK));
      await guestWrite(nbd, 70 * CHUNK, r.bytes(CHUNK));
      let before = served();
      const off = await backup(['quiet'], { audit: { kind: 'off' } });
      expect(off.auditSeed).toBeNull();
      expect(off.vms[0].disks[0]).toMatchObject({ read: 'incremental', bytesRead: 2 * CHUNK, audit: null });
      expect(served() - before).toBe(2 * CHUNK);
      expect((await repo.readPoint(off.pointId!)).vms[0].disks[0].audit).toBeNull();

      await guestWrite(nbd, 5 * CHUNK, r.bytes(CHUNK));
      before = served();
      const dflt = await backup(['quiet'], { auditTimeMs: 600_000 });
      const a = dflt.vms[0].disks[0].audit!;
      expect(a).toMatchObject({ mode: 'sample', rate: 0.01, unchanged: SLOTS - 1, sampled: 16, checked: 16 });
      expect(a.bytesRead).toBe(16 * CHUNK);
      expect(served() - before).toBe(CHUNK + a.bytesRead);

      // A change below the tracker with the audit off: nothing finds it (the point misses it, as tracking did).
      const old = await nbd.read(40 * CHUNK, 4096);
      await writeBelowTracker('quiet', 40 * CHUNK, r.bytes(4096));
      const blind = await backup(['quiet'], { audit: { kind: 'off' } });
      expect(blind.vms[0].disks[0]).toMatchObject({ read: 'incremental', audit: null });
      expect(blind.warnings).toEqual([]);
      await writeBelowTracker('quiet', 40 * CHUNK, old);

      // The time bound: every unchanged chunk asked for, 1 ms given.
      const bounded = await backup(['quiet'], { audit: { kind: 'sample', rate: 1 }, auditTimeMs: 1 });
      const b = bounded.vms[0].disks[0].audit!;
      expect(b).toMatchObject({ sampled: SLOTS, stoppedEarly: true, mismatches: 0, timeBudgetMs: 1 });
      expect(b.checked).toBeLessThan(b.sampled);
      expect(bounded.vms[0].disks[0].read).toBe('incremental');
    } finally {
      await nbd.close();
    }
  });

  it('the CLI: --audit, --audit-time, --audit-seed, JSON and text, and bad values refused', async () => {
    const repoPath = path.join(dir, 'repo');
    const base = ['backup', 'quiet', '--store', store, '--repo', repoPath, '--consistency', 'crash'];
    const json = await cli([...base, '--audit', '100%', '--audit-time', '0.001', '--audit-seed', '77', '--json']);
    expect(json.code, json.stderr).toBe(0);
    const s = JSON.parse(json.stdout) as BackupSetSummary;
    expect(s.auditSeed).toBe(77);
    expect(s.warnings).toEqual([]);
    expect(s.vms[0].disks[0].audit).toMatchObject({ mode: 'sample', rate: 1, seed: 77, stoppedEarly: true });
    expect(json.stderr).toMatch(/tracking audit: 100% of the chunks \(at least 16\) tracking calls unchanged, seed 77/);
    expect(json.stderr).toMatch(/quiet scsi0-0: tracking audit of a sample of 128 of 128 unchanged chunks \(seed 77\)/);

    const text = await cli([...base, '--audit', 'full']);
    expect(text.code, text.stderr).toBe(0);
    expect(text.stdout).toMatch(
      /scsi0-0: incremental, read .*; audit checked 128 of 128 unchanged chunks \(full, seed \d+\): no mismatch/,
    );

    for (const [args, msg] of [
      [['--audit', '2'], /--audit must be off, full, a fraction/],
      [['--audit', 'full', '--audit-time', '5'], /--audit-time bounds a sampled audit/],
      [['--audit-time', '-1'], /--audit-time must be a positive number/],
      [['--audit-seed', 'x'], /--audit-seed must be an integer/],
    ] as [string[], RegExp][]) {
      const bad = await cli([...base, ...args]);
      expect(bad.code, args.join(' ')).toBe(2);
      expect(bad.stderr).toMatch(/^tidemark: INVALID_ARGUMENT: /);
      expect(bad.stderr).toMatch(msg);
    }
  });

  it(
    `never a false positive on an honest tracker: ${ROUNDS} audited incrementals with writes, checkpoints, reopenings`,
    { timeout: 120_000 + ROUNDS * 15_000 },
    async () => {
      const enc = await Repository.init(path.join(dir, 'repo-enc'), {
        chunkSize: 128 * 1024,
        passphrase: 'audit',
        scryptLogN: MIN_SCRYPT_LOG_N,
      });
      const SIZES = [12 * MiB, 8 * MiB];
      const SLOTS = ['scsi0-0', 'scsi0-1'];
      await api.createVm({ name: 'honest', disks: SIZES.map((size, i) => ({ slot: SLOTS[i], size })) });
      let guests: { nbd: NbdClient; w: Workload }[] = [];
      let seed = SEED + 100;
      const startGuests = async () => {
        const vm = await api.startVm('honest');
        guests = [];
        for (const d of vm.disks) {
          const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: d.export! });
          const w = new Workload(nbd, { seed: seed++, concurrency: 2, flushEvery: 8, delayMs: 5 });
          w.start();
          guests.push({ nbd, w });
        }
      };
      const stopGuests = async () => {
        for (const g of guests) {
          await g.w.stop();
          await g.nbd.close();
        }
        guests = [];
      };
      const audited = async (label: string) => {
        const s = await runBackupSet({
          host: api,
          repo: enc,
          vms: ['honest'],
          consistency: 'crash',
          audit: { kind: 'full' },
        });
        expect(s.errors, label).toEqual([]);
        expect(s.warnings, label).toEqual([]);
        return s;
      };
      let audits = 0;
      const refused: string[] = [];
      try {
        await startGuests();
        await new Promise((r) => setTimeout(r, 100));
        await audited('first');
        for (let round = 0; round < ROUNDS; round++) {
          const event = ['writes', 'standard checkpoint', 'VM restart', 'host restart'][round % 4];
          if (event === 'standard checkpoint') {
            const cp = await api.createCheckpoint('honest', { type: 'standard', consistency: 'crash' });
            await new Promise((r) => setTimeout(r, 60));
            await api.deleteCheckpoint('honest', cp.id); // merged back online while the guests write
          } else if (event === 'VM restart') {
            await stopGuests();
            await api.stopVm('honest');
            await startGuests();
          } else if (event === 'host restart') {
            await stopGuests();
            await running.close();
            running = await startHost({ store, log: HostLog.silent() });
            api = await HostClient.connect({ store });
            if ((await api.showVm('honest')).state !== 'Running') await api.startVm('honest');
            const vm = await api.showVm('honest');
            for (const d of vm.disks) {
              const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: d.export! });
              const w = new Workload(nbd, { seed: seed++, concurrency: 2, flushEvery: 8, delayMs: 5 });
              w.start();
              guests.push({ nbd, w });
            }
          }
          await new Promise((r) => setTimeout(r, 80));
          const s = await audited(`round ${round} (${event})`);
          for (const d of s.vms[0].disks) {
            const where = `round ${round} (${event}) ${d.slot}`;
            if (d.read === 'full') {
              // Tracking refused its id (it restarts its epoch when in doubt): a full read, no audit. Never the
              // audit's doing: it found nothing (no warning, reason not the audit's).
              expect(d.fullReason, where).not.toMatch(/tracking audit/);
              expect(d.audit, where).toBeNull();
              refused.push(`${where}: ${d.fullReason}`);
              continue;
            }
            expect(d.audit, where).toMatchObject({ mode: 'full', mismatches: 0, stoppedEarly: false });
            expect(d.audit!.checked, where).toBe(d.audit!.unchanged);
            audits++;
          }
        }
        if (refused.length > 0)
          console.log(`tracking refused its id (full reads, no audit):\n  ${refused.join('\n  ')}`);
        // The audit ran on (nearly) every disk of every round: the absence of mismatches means something.
        expect(audits).toBeGreaterThanOrEqual(Math.ceil(ROUNDS * SIZES.length * 0.75));
        await stopGuests();
        const last = await audited('last');
        const out = await restorePoint(enc, last.pointId!, { to: path.join(dir, 'restore-honest'), format: 'raw' });
        const vm = await api.showVm('honest');
        for (const [i, d] of last.vms[0].disks.entries()) {
          expect(d.audit!.mismatches).toBe(0);
          const img = await readFile(out.disks.find((x) => x.slot === d.slot)!.file);
          const nbd = await NbdClient.connect({
            socket: running.host.nbdSocket,
            exportName: vm.disks.find((x) => x.slot === d.slot)!.export!,
          });
          try {
            expect(img.equals(await nbd.read(0, SIZES[i])), d.slot).toBe(true);
          } finally {
            await nbd.close();
          }
        }
      } finally {
        await stopGuests().catch(() => undefined);
        await enc.close();
      }
    },
  );
});
