/**
 * Backup runs beside each other and beside other products, against a real host with disks written through
 * NBD between runs (seeded writes; the expected image is known at every checkpoint):
 * - two backups of one VM at once: the second is BUSY, naming the holder, and the first completes exactly;
 *   with a wait both complete, one after the other;
 * - clean-up of what a run left touches only runs that have ended (a dead process's checkpoint and snapshot
 *   set go; a live run's stay, and its VM is BUSY);
 * - two repositories backing up one VM alternately stay incremental and exact, and destroy only their own
 *   previous reference points: a person's and an unowned one survive everything;
 * - a configuration 5.0 VM is backed up in full (and says why), upgraded (tracking files made at once),
 *   backed up in full once more (no previous id), then incrementally.
 * Every restore of every point equals the disk at its checkpoint.
 *
 * Seed: TIDEMARK_RUNS_SEED.
 */
import { spawn } from 'node:child_process';
import { access, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet, type BackupSetSummary } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SIZE = 16 * MiB;
const UNIT = 64 * 1024;
const SEED = seedFrom('TIDEMARK_RUNS_SEED', 1313);
console.log(`backup runs seed ${SEED} (TIDEMARK_RUNS_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
let api: HostClient;
const repos: Repository[] = [];
const r = rng(SEED);

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('runs'));
  running = await startHost({ store: path.join(dir, 'store'), log: HostLog.silent() });
  api = await HostClient.connect({ store: path.join(dir, 'store') });
});
afterAll(async () => {
  for (const g of guests.values()) await g.nbd?.close().catch(() => undefined);
  for (const repo of repos) await repo.close().catch(() => undefined);
  await running?.close();
  await cleanup?.();
});

/** A VM's disk as its guest wrote it (written only between runs, so a checkpoint's content is exact). */
interface Guest {
  vm: string;
  nbd: NbdClient | undefined;
  image: Buffer;
}
const guests = new Map<string, Guest>();

async function newRepo(name: string): Promise<Repository> {
  const repo = await Repository.init(path.join(dir, name), { chunkSize: 256 * 1024 });
  repos.push(repo);
  return repo;
}

async function newGuest(vm: string, configVersion?: string): Promise<Guest> {
  await api.createVm({ name: vm, configVersion, disks: [{ slot: 'scsi0-0', size: SIZE }] });
  const g: Guest = { vm, nbd: undefined, image: Buffer.alloc(SIZE) };
  guests.set(vm, g);
  await start(g);
  return g;
}

async function start(g: Guest): Promise<void> {
  const v = await api.startVm(g.vm);
  g.nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: v.disks[0].export! });
}

async function stop(g: Guest): Promise<void> {
  await g.nbd!.close();
  g.nbd = undefined;
  await api.stopVm(g.vm);
}

/** `n` seeded 64 KiB writes, flushed. */
async function write(g: Guest, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    const at = r.int(SIZE / UNIT) * UNIT;
    const data = r.bytes(UNIT);
    await g.nbd!.write(at, data);
    data.copy(g.image, at);
  }
  await g.nbd!.flush();
}

function backup(repo: Repository, vms: string[], extra: Partial<Parameters<typeof runBackupSet>[0]> = {}) {
  return runBackupSet({ host: api, repo, vms, consistency: 'crash', ...extra });
}

function expectOk(s: BackupSetSummary): BackupSetSummary {
  expect(s.errors).toEqual([]);
  expect(s.ok).toBe(true);
  return s;
}

async function expectRestores(repo: Repository, point: string, vm: string, image: Buffer): Promise<void> {
  const out = await restorePoint(repo, point, { to: path.join(dir, `restore-${point}`), vm, format: 'raw' });
  expect(out.disks).toHaveLength(1);
  const img = await readFile(out.disks[0].file);
  const bad: number[] = [];
  for (let u = 0; u < SIZE / UNIT && bad.length < 5; u++) {
    if (!img.subarray(u * UNIT, (u + 1) * UNIT).equals(image.subarray(u * UNIT, (u + 1) * UNIT))) bad.push(u);
  }
  expect(bad, `${point} ${vm}: units that differ from the disk at the checkpoint`).toEqual([]);
}

/** A process standing for a backup run: alive until killed. */
function runProcess(): { pid: number; kill: () => Promise<void> } {
  const child = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 600000)'], { stdio: 'ignore' });
  return {
    pid: child.pid!,
    kill: async () => {
      const gone = new Promise((resolve) => child.once('exit', resolve));
      child.kill('SIGKILL');
      await gone;
    },
  };
}

describe(`backup runs (seed ${SEED})`, () => {
  it('a second concurrent backup of a VM is BUSY and leaves the first intact; with --wait both complete', async () => {
    const g = await newGuest('app');
    const repo = await newRepo('repo-concurrent');
    await write(g, 60);
    const image = Buffer.from(g.image);
    const [a, b] = await Promise.allSettled([backup(repo, ['app']), backup(repo, ['app'])]);
    const done = [a, b].filter((x) => x.status === 'fulfilled');
    const refused = [a, b].filter((x) => x.status === 'rejected');
    expect(done).toHaveLength(1);
    expect(refused).toHaveLength(1);
    const err = (refused[0] as PromiseRejectedResult).reason;
    expect(err.code).toBe('BUSY');
    expect(err.message).toMatch(new RegExp(`app is leased by run .*pid ${process.pid} on ${os.hostname()}.* since `));
    const first = expectOk((done[0] as PromiseFulfilledResult<BackupSetSummary>).value);
    await expectRestores(repo, first.pointId!, 'app', image);
    expect(await api.listLeases()).toEqual([]);

    // Waiting: the second runs when the first has ended, and both are exact.
    await write(g, 40);
    const image2 = Buffer.from(g.image);
    const logs: string[][] = [[], []];
    const both = await Promise.all(
      [0, 1].map((i) => backup(repo, ['app'], { wait: 300, events: { log: (l) => logs[i].push(l) } })),
    );
    for (const s of both) expectOk(s);
    expect(logs.flat().some((l) => /app: waiting for the lease/.test(l))).toBe(true);
    for (const s of both) {
      expect(s.vms[0].disks[0].read).toBe('incremental');
      await expectRestores(repo, s.pointId!, 'app', image2);
    }
    // The repository's previous reference points are gone; its newest stays.
    const own = (await api.listReferencePoints('app')).filter(
      (rp) => rp.owner?.kind === 'repository' && rp.owner.id === repo.config.id,
    );
    expect(own).toHaveLength(1);
  });

  it("clean-up removes what ended runs left and never a live run's", async () => {
    const app = guests.get('app')!;
    const other = await newGuest('other');
    const repo = await newRepo('repo-cleanup');
    await write(app, 20);
    await write(other, 20);
    // A run that dies after its checkpoint and snapshot set: its process is gone, they remain.
    const proc = runProcess();
    const dead = await api.acquireLease('app', {
      owner: { runId: 'dead-run', pid: proc.pid, hostname: os.hostname(), command: 'tidemark backup app' },
    });
    const deadCp = await api.createCheckpoint('app', { type: 'recovery', name: 'dead cp', lease: dead.id });
    const deadSet = await api.createSnapshotSet({ vms: [{ name: 'app', checkpoint: deadCp.id, lease: dead.id }] });
    await proc.kill();
    // A run that lives (this process), working on the other VM.
    const liveOwner = {
      runId: 'live-run',
      pid: process.pid,
      hostname: os.hostname(),
      command: 'tidemark backup other',
    };
    const live = await api.acquireLease('other', { owner: liveOwner });
    const liveCp = await api.createCheckpoint('other', { type: 'recovery', name: 'live cp', lease: live.id });
    const liveSet = await api.createSnapshotSet({ vms: [{ name: 'other', checkpoint: liveCp.id, lease: live.id }] });

    const image = Buffer.from(app.image);
    const log: string[] = [];
    const s = expectOk(await backup(repo, ['app'], { events: { log: (l) => log.push(l) } }));
    expect(log.some((l) => l.includes(`releasing snapshot set ${deadSet.id.slice(0, 8)}`))).toBe(true);
    expect(
      log.some((l) => l.includes(`removing recovery checkpoint ${deadCp.id.slice(0, 8)} left by run dead-run`)),
    ).toBe(true);
    expect(await api.listCheckpoints('app')).toEqual([]);
    await expectRestores(repo, s.pointId!, 'app', image);
    // The live run's set and checkpoint are untouched, and its VM is BUSY for another run.
    expect((await api.listSnapshotSets()).map((x) => x.id)).toEqual([liveSet.id]);
    expect((await api.listCheckpoints('other')).map((c) => c.id)).toEqual([liveCp.id]);
    const busy = await backup(repo, ['other']).catch((e) => e);
    expect(busy.code).toBe('BUSY');
    expect(busy.message).toContain('live-run');
    // In a set with a free VM, only the leased one fails, with its code.
    const mixed = await backup(repo, ['app', 'other']);
    expect(mixed.ok).toBe(false);
    expect(mixed.vms.find((v) => v.name === 'other')).toMatchObject({ status: 'failed', errorCode: 'BUSY' });
    expect(mixed.vms.find((v) => v.name === 'app')!.status).toBe('ok');
    expect((await api.listSnapshotSets()).map((x) => x.id)).toEqual([liveSet.id]);

    // Once that run has ended (its lease released), its leftovers go with the next run.
    await api.releaseLease(live.id);
    const otherImage = Buffer.from(other.image);
    const next = expectOk(await backup(repo, ['other']));
    expect(await api.listSnapshotSets()).toEqual([]);
    expect(await api.listCheckpoints('other')).toEqual([]);
    await expectRestores(repo, next.pointId!, 'other', otherImage);
  });

  it('two repositories alternating on one VM stay incremental and exact; a person’s reference points survive', async () => {
    const g = await newGuest('shared');
    const [a, b] = [await newRepo('repo-a'), await newRepo('repo-b')];
    expect(a.config.id).not.toBe(b.config.id);
    const user = await api.createReferencePoint('shared', { owner: { kind: 'user', name: 'alice' } });
    const unowned = await api.createReferencePoint('shared');
    expect(user.owner).toEqual({ kind: 'user', name: 'alice' });
    expect(unowned.owner).toBeNull();
    const points: { repo: Repository; id: string; image: Buffer }[] = [];
    for (let round = 0; round < 3; round++) {
      for (const repo of [a, b]) {
        await write(g, 10 + r.int(30));
        const image = Buffer.from(g.image);
        const s = expectOk(await backup(repo, ['shared']));
        const disk = s.vms[0].disks[0];
        if (round === 0) expect(disk.fullReason).toBe('first backup');
        else expect(disk.read, `round ${round}: ${disk.fullReason}`).toBe('incremental');
        points.push({ repo, id: s.pointId!, image });
        const rps = await api.listReferencePoints('shared');
        const manifest = await repo.readPoint(s.pointId!);
        const mine = rps.filter((rp) => rp.owner?.kind === 'repository' && rp.owner.id === repo.config.id);
        expect(mine.map((rp) => rp.id)).toEqual([manifest.vms[0].referencePointId]);
        expect(rps.map((rp) => rp.id)).toEqual(expect.arrayContaining([user.id, unowned.id]));
        // At most: the person's, the unowned one, and one per repository.
        expect(rps.length).toBe(round === 0 && repo === a ? 3 : 4);
      }
    }
    for (const p of points) await expectRestores(p.repo, p.id, 'shared', p.image);
  });

  it('configuration 5.0: full (and why), upgrade makes tracking files at once, full once more, then incremental', async () => {
    const g = await newGuest('old', '5.0');
    const repo = await newRepo('repo-upgrade');
    const vm = await api.showVm('old');
    expect(vm.configVersion).toBe('5.0');
    expect(vm.disks[0].tracking).toBe('none');
    const rct = `${vm.disks[0].base}.rct`;
    await expect(access(rct)).rejects.toThrow();
    const points: { id: string; image: Buffer }[] = [];
    const run = async (expectRead: 'full' | 'incremental', reason: RegExp | null) => {
      await write(g, 30);
      const image = Buffer.from(g.image);
      const s = expectOk(await backup(repo, ['old']));
      const d = s.vms[0].disks[0];
      expect(d.read, String(d.fullReason)).toBe(expectRead);
      if (reason) expect(d.fullReason).toMatch(reason);
      points.push({ id: s.pointId!, image });
      return d;
    };
    // Both full, and each says the configuration version is why (not "no previous id").
    for (let i = 0; i < 2; i++) {
      const d = await run('full', /configuration version 5\.0/);
      expect(d.rctId).toBeNull();
    }
    await expect(api.modifyVm('old', { configVersion: '4.7' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await expect(api.upgradeVm('old', { version: '9.0' })).rejects.toMatchObject({ code: 'CONFLICT' });
    await stop(g);
    await expect(api.upgradeVm('old', { version: '99.0' })).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    const up = await api.upgradeVm('old');
    expect(up.configVersion).toBe('9.0');
    expect(up.disks[0].tracking).toBe('enabled');
    await access(rct);
    await access(`${vm.disks[0].base}.mrt`);
    await expect(api.modifyVm('old', { configVersion: '8.0' })).rejects.toMatchObject({ code: 'NOT_SUPPORTED' });
    expect((await api.showVm('old')).configVersion).toBe('9.0');
    await start(g);
    expect((await api.showVm('old')).disks[0].tracking).toBe('enabled');
    // Naming the version it has is no change, also while it runs.
    expect((await api.modifyVm('old', { configVersion: '9.0' })).configVersion).toBe('9.0');
    const full = await run('full', /previous restore point has no change-tracking id/);
    expect(full.rctId).not.toBeNull();
    const inc = await run('incremental', null);
    expect(inc.bytesRead).toBeLessThan(SIZE / 2);
    for (const p of points) await expectRestores(repo, p.id, 'old', p.image);
  });
});
