/**
 * Garbage collection and locks: gc removes exactly what no restore point references (no orphan left, nothing
 * lost), abandoned sessions leave only garbage, backups and gc exclude each other (BUSY) even when they race, and
 * locks of dead local processes are broken while live or foreign ones are respected.
 */
import { spawn } from 'node:child_process';
import { readdir, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import type { ObjectInfo } from '../../src/repository/backend.js';
import { LocalBackend, Repository, type PointManifest } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import {
  backup,
  incremental,
  makeDiskImage,
  mutate,
  packedChunkIds,
  restoreToBuffer,
  vmSpec,
  type VmSpec,
} from './helpers.js';

const KiB = 1024;
const CS = 64 * KiB;
const SEED = seedFrom('TIDEMARK_REPO_SEED', 4242);
const ROUNDS = Number(process.env.TIDEMARK_REPO_ROUNDS ?? 12);
/** Packs of about three chunks: sessions leave whole packs behind, and gc has packs to repack. */
const PACK = 3 * CS;
/** the virtual disk id of the VHD disk (no change tracking) committed by hand below */
const IDE_DISK = '7f1c6a52-3b0e-4c1d-9a4e-2f6b8d0c1e93';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('repo-gc'));
});
afterAll(async () => cleanup?.());
let n = 0;
const fresh = () => path.join(dir, `r${++n}`);

async function keysUnder(root: string, sub: string): Promise<string[]> {
  try {
    return (await readdir(path.join(root, sub), { withFileTypes: true, recursive: true }))
      .filter((e) => e.isFile())
      .map((e) => e.name)
      .sort();
  } catch {
    return [];
  }
}

/** Every chunk and index some remaining point references. */
async function referenced(repo: Repository): Promise<{ chunks: string[]; indexes: string[] }> {
  const chunks = new Set<string>();
  const indexes = new Set<string>();
  for (const id of await repo.listPointIds()) {
    for (const vm of (await repo.readPoint(id)).vms) {
      for (const d of vm.disks) {
        indexes.add(d.index.id);
        for (const c of (await repo.readIndex(d.index)).chunkIds()) chunks.add(c);
      }
    }
  }
  return { chunks: [...chunks].sort(), indexes: [...indexes].sort() };
}

async function errorOf(p: Promise<unknown>): Promise<TidemarkError | null> {
  return p.then(
    () => null,
    (e: unknown) => {
      if (!(e instanceof TidemarkError)) throw e;
      return e;
    },
  );
}

/** A process that exists while the test holds it, then does not (its pid is then dead). */
function childProcess(): { pid: number; kill: () => Promise<void> } {
  const c = spawn(process.execPath, ['-e', 'setTimeout(() => {}, 60000)'], { stdio: 'ignore' });
  const exited = new Promise<void>((resolve) => c.on('exit', () => resolve()));
  return {
    pid: c.pid!,
    kill: async () => {
      c.kill('SIGKILL');
      await exited;
    },
  };
}

async function writeLock(where: string, name: string, info: Record<string, unknown>): Promise<void> {
  await mkdir(path.join(where, 'locks'), { recursive: true });
  await writeFile(path.join(where, 'locks', name), JSON.stringify(info));
}

describe(`gc (seed ${SEED}, ${ROUNDS} rounds)`, () => {
  it('after random backups, prunes and abandoned sessions, gc leaves no orphan and loses nothing', async () => {
    const r = rng(SEED);
    const where = fresh();
    const repo = await Repository.init(where, { chunkSize: CS, workers: 0, packSize: PACK });
    try {
      const a = makeDiskImage(r, 20 * CS + 777, CS);
      const b = makeDiskImage(r, 6 * CS, CS);
      let vms: VmSpec[] = [vmSpec('app', [{ name: 'scsi0-0', data: a }]), vmSpec('db', [{ name: 'scsi0-1', data: b }])];
      const images = new Map<string, Buffer[]>();
      let prev: PointManifest | null = null;
      // The first rounds make sure every action happens; then chance decides.
      const schedule = [3, 3, 0, 3, 1, 2];
      const done = new Set<number>();
      for (let round = 0; round < Math.max(ROUNDS, schedule.length); round++) {
        const action = schedule[round] ?? r.int(6);
        done.add(Math.min(action, 3));
        if (action === 0 && prev) {
          // An abandoned session: chunks and an index stored, no manifest.
          const s = await repo.startBackup();
          const w = await s.openIndex({ virtualSize: 3 * CS });
          for (let i = 0; i < 3; i++) await w.put(i * CS, r.bytes(CS));
          await s.writeIndex(w);
          await s.abort();
          continue;
        }
        if (action === 1 && (await repo.listPointIds()).length > 2) {
          await repo.prune({ keepLast: 1 + r.int(3) });
          continue;
        }
        if (action === 2) {
          const report = await repo.gc();
          expect(report.chunksKept).toBe((await referenced(repo)).chunks.length);
          continue;
        }
        const changed = new Map([
          [vms[0].disks[0].diskId, mutate(r, a, CS, 1 + r.int(3))],
          [vms[1].disks[0].diskId, mutate(r, b, CS, r.int(2))],
        ]);
        const still = prev && (await repo.listPointIds()).includes(prev.id);
        if (still) vms = incremental(prev!, vms, changed);
        else
          vms = vms.map((v) => ({ ...v, disks: v.disks.map((d) => ({ ...d, base: undefined, changed: undefined })) }));
        prev = await backup(repo, vms, { parentId: still ? prev!.id : null });
        images.set(prev.id, [Buffer.from(a), Buffer.from(b)]);
      }
      expect([...done].sort()).toEqual([0, 1, 2, 3]);
      const last = await repo.gc();
      expect(last.packsRepacked).toBeGreaterThan(0);
      // No orphan: exactly the referenced chunks are left in the packs, each once, and the referenced indexes.
      const ref = await referenced(repo);
      expect(await packedChunkIds(repo, where)).toEqual(ref.chunks);
      expect(await keysUnder(where, 'indexes')).toEqual(ref.indexes);
      expect(await keysUnder(where, 'packindex')).toHaveLength(1);
      // Nothing lost: every remaining point verifies and restores exactly.
      expect((await repo.verify()).ok).toBe(true);
      for (const id of await repo.listPointIds()) {
        const [ia, ib] = images.get(id)!;
        expect((await restoreToBuffer(repo, id, vms[0].disks[0].diskId)).equals(ia)).toBe(true);
        expect((await restoreToBuffer(repo, id, vms[1].disks[0].diskId)).equals(ib)).toBe(true);
      }
      // A second gc finds nothing to do.
      const again = await repo.gc();
      expect(again.chunksRemoved + again.indexesRemoved + again.packsRemoved + again.packsWritten).toBe(0);
    } finally {
      await repo.close();
    }
  });

  it('a crashed backup (its process gone, its lock left) leaves orphans that gc removes; points still verify', async () => {
    const where = fresh();
    // One chunk per pack: each chunk the crashed backup put is in a pack of its own before the crash.
    const repo = await Repository.init(where, { chunkSize: CS, workers: 0, packSize: CS });
    try {
      const r = rng(SEED + 1);
      const vm = vmSpec('app', [{ name: 'scsi0-0', data: makeDiskImage(r, 8 * CS, CS) }]);
      const p1 = await backup(repo, [vm]);
      const before = await packedChunkIds(repo, where);
      // The crashed backup: chunks and an index in the repository, a lock whose holder is dead, no manifest.
      const s = await repo.startBackup();
      const w = await s.openIndex({ virtualSize: 4 * CS });
      for (let i = 0; i < 4; i++) await w.put(i * CS, r.bytes(CS));
      await s.writeIndex(w);
      const dead = childProcess();
      await dead.kill();
      await writeLock(where, 'shared-deadbeefdeadbeef', {
        kind: 'shared',
        operation: 'backup',
        pid: dead.pid,
        hostname: os.hostname(),
        createdAt: new Date().toISOString(),
      });
      await s.abort(); // our own lock goes; the dead process's stays
      expect(await packedChunkIds(repo, where)).toHaveLength(before.length + 4);
      expect(await repo.listPointIds()).toEqual([p1.id]);
      const report = await repo.gc();
      expect(report.chunksRemoved).toBe(4);
      expect(report.packsRemoved).toBe(4);
      expect(report.indexesRemoved).toBe(1);
      expect(await packedChunkIds(repo, where)).toEqual(before);
      expect(await keysUnder(where, 'locks')).toEqual([]);
      expect((await repo.verify()).ok).toBe(true);
      expect((await restoreToBuffer(repo, p1.id, vm.disks[0].diskId)).equals(vm.disks[0].data)).toBe(true);
    } finally {
      await repo.close();
    }
  });
});

describe('locks', () => {
  it('a backup in progress makes gc and prune BUSY; backups run side by side; gc runs after', async () => {
    const where = fresh();
    const repo = await Repository.init(where, { chunkSize: CS, workers: 0 });
    try {
      const r = rng(SEED + 2);
      const vm = vmSpec('app', [{ name: 'scsi0-0', data: makeDiskImage(r, 4 * CS, CS) }]);
      const s1 = await repo.startBackup();
      const s2 = await repo.startBackup();
      const w = await s1.openIndex({ virtualSize: 2 * CS });
      const data = r.bytes(2 * CS);
      await w.put(0, data.subarray(0, CS));
      const gcErr = await errorOf(repo.gc());
      expect(gcErr?.code).toBe('BUSY');
      expect(gcErr?.message).toMatch(/locked by backup \(shared lock, pid \d+/);
      expect((await errorOf(repo.prune({ keepLast: 1 })))?.code).toBe('BUSY');
      expect((await errorOf(repo.forgetPoint('20200101-000000-00000000')))?.code).toBe('BUSY');
      // The chunk put before gc tried is still there; the session goes on and commits.
      await w.put(CS, data.subarray(CS));
      const index = await s1.writeIndex(w);
      await s2.abort();
      const m = await s1.commit({
        flow: '2016',
        parentId: null,
        snapshots: 1,
        vms: [
          {
            name: vm.name,
            id: vm.id,
            definition: {},
            consistency: 'crash',
            freezeWindowMs: null,
            ioPauseMs: null,
            disks: [
              {
                diskId: IDE_DISK,
                name: 'ide0-0',
                controller: { bus: 'ide', controller: 0, location: 0 },
                virtualSize: 2 * CS,
                logicalSectorSize: 512,
                blockSize: 0,
                format: 'vhd',
                rctId: null,
                read: 'full',
                fullReason: 'VHD has no resilient change tracking',
                index,
                stats: w.stats(),
              },
            ],
          },
        ],
      });
      expect((await repo.gc()).chunksRemoved).toBe(0);
      expect((await restoreToBuffer(repo, m.id, IDE_DISK)).equals(data)).toBe(true);
    } finally {
      await repo.close();
    }
  });

  it(`gc and a backup started together never hold the repository at once (${ROUNDS} races)`, async () => {
    const where = fresh();
    await (await Repository.init(where, { chunkSize: CS, workers: 0 })).close();
    // Two processes' worth of repositories on one directory, their lock traffic in one log.
    const log: string[] = [];
    class Recording extends LocalBackend {
      constructor(private readonly who: string) {
        super(where);
      }
      override async put(key: string, data: Uint8Array, opts?: { sync?: boolean }): Promise<void> {
        await super.put(key, data, opts);
        if (key.startsWith('locks/')) log.push(`${this.who} put`);
      }
      override async delete(key: string): Promise<void> {
        if (key.startsWith('locks/')) log.push(`${this.who} delete`);
        await super.delete(key);
      }
      override async *list(prefix: string): AsyncIterable<ObjectInfo> {
        const all: ObjectInfo[] = [];
        for await (const o of super.list(prefix)) all.push(o);
        if (prefix === 'locks/') log.push(`${this.who} listed`);
        yield* all;
      }
    }
    const a = await Repository.open(new Recording('gc'), { workers: 0 });
    const b = await Repository.open(new Recording('backup'), { workers: 0 });
    try {
      let outcomes = '';
      for (let i = 0; i < ROUNDS; i++) {
        log.length = 0;
        const [g, s] = await Promise.all([
          errorOf(a.gc()),
          b.startBackup().then(
            (x) => x,
            (e: TidemarkError) => e,
          ),
        ]);
        if (g) expect(g.code).toBe('BUSY');
        if (s instanceof TidemarkError) expect(s.code).toBe('BUSY');
        else {
          if (!g) {
            // Both proceeded: then gc had released before the backup looked (the backup's check came after
            // gc's lock was gone), never while gc was sweeping.
            expect(log.indexOf('gc delete'), log.join(' → ')).toBeLessThan(log.indexOf('backup listed'));
          }
          await s.abort();
        }
        outcomes += `${g ? 'B' : 'g'}${s instanceof TidemarkError ? 'B' : 'b'} `;
      }
      expect(await a.locks()).toEqual([]);
      console.log(`race outcomes (gc, backup; B = BUSY): ${outcomes}`);
    } finally {
      await a.close();
      await b.close();
    }
  });

  it(`gc at any moment of a backup is BUSY; backups racing gc and prune lose nothing (${ROUNDS} races)`, async () => {
    const where = fresh();
    const repo = await Repository.init(where, { chunkSize: CS, workers: 0 });
    const r = rng(SEED + 3);
    const images = new Map<string, { diskId: string; data: Buffer }>();
    // Two disks that keep coming back: later backups dedup against chunks of points prune has dropped, which gc
    // would delete if it could sweep while such a backup is between "the chunk exists" and its commit.
    const disks = [makeDiskImage(r, 4 * CS, CS), makeDiskImage(r, 4 * CS, CS)];
    try {
      let gcBusy = 0;
      for (let i = 0; i < ROUNDS; i++) {
        const data = Buffer.from(disks[i % 2]);
        mutate(r, data, CS, 1);
        const vm = vmSpec(`vm${i % 3}`, [{ name: 'scsi0-0', data }]);
        if (i % 3 === 2) await repo.prune({ keepLast: 1 });
        // gc fired after a random number of the backup's steps (puts, index, commit).
        const s = await repo.startBackup();
        const w = await s.openIndex({ virtualSize: data.length });
        const fireAt = r.int(6);
        const attempts: Promise<unknown>[] = [];
        for (let slot = 0; slot < 4; slot++) {
          if (slot === fireAt)
            attempts.push(
              repo.gc().then(
                () => 'ran',
                (e: TidemarkError) => e.code,
              ),
            );
          await w.put(slot * CS, data.subarray(slot * CS, (slot + 1) * CS));
        }
        const index = await s.writeIndex(w);
        if (fireAt === 4)
          attempts.push(
            repo.gc().then(
              () => 'ran',
              (e: TidemarkError) => e.code,
            ),
          );
        const m = await s.commit({
          flow: '2016',
          parentId: null,
          snapshots: 1,
          vms: [
            {
              name: vm.name,
              id: vm.id,
              definition: null,
              consistency: 'application',
              freezeWindowMs: 5,
              ioPauseMs: 1,
              disks: [
                {
                  diskId: vm.disks[0].diskId,
                  name: 'scsi0-0',
                  controller: { bus: 'scsi', controller: 0, location: 0 },
                  virtualSize: data.length,
                  logicalSectorSize: 512,
                  blockSize: 0,
                  format: 'vhdx',
                  rctId: null,
                  read: 'full',
                  fullReason: 'test',
                  index,
                  stats: w.stats(),
                },
              ],
            },
          ],
        });
        images.set(m.id, { diskId: vm.disks[0].diskId, data });
        for (const a of await Promise.all(attempts)) {
          expect(a).toBe('BUSY');
          gcBusy++;
        }
        // And started together: whichever loses is BUSY; whatever commits stays whole.
        const [b, g] = await Promise.allSettled([backup(repo, [vm]), repo.gc()]);
        if (b.status === 'fulfilled') images.set(b.value.id, { diskId: vm.disks[0].diskId, data });
        else expect((b.reason as TidemarkError).code).toBe('BUSY');
        if (g.status === 'rejected') expect((g.reason as TidemarkError).code).toBe('BUSY');
      }
      expect(gcBusy).toBeGreaterThan(0);
      await repo.gc();
      expect((await repo.verify()).ok).toBe(true);
      for (const id of await repo.listPointIds()) {
        const { diskId, data } = images.get(id)!;
        expect((await restoreToBuffer(repo, id, diskId)).equals(data)).toBe(true);
      }
      expect(await repo.locks()).toEqual([]);
    } finally {
      await repo.close();
    }
  });

  it('stale locks of dead local processes are broken; live and foreign ones are respected', async () => {
    const where = fresh();
    const repo = await Repository.init(where, { chunkSize: CS, workers: 0 });
    try {
      const live = childProcess();
      const base = { operation: 'gc', hostname: os.hostname(), createdAt: '2026-01-01T00:00:00.000Z' };
      await writeLock(where, 'exclusive-1111111111111111', { ...base, kind: 'exclusive', pid: live.pid });
      const e = await errorOf(repo.startBackup());
      expect(e?.code).toBe('BUSY');
      expect(e?.message).toContain(`pid ${live.pid}`);
      // The holder dies: its lock is stale and the next taker breaks it.
      await live.kill();
      const s = await repo.startBackup();
      expect((await repo.locks()).map((l) => l.key)).toEqual([s['lock'].key]);
      await s.abort();
      // Another host's lock: we cannot tell whether its holder lives, so it is never broken automatically.
      const gone = childProcess();
      await gone.kill();
      await writeLock(where, 'shared-2222222222222222', {
        ...base,
        kind: 'shared',
        pid: gone.pid,
        hostname: 'elsewhere.example',
      });
      expect((await errorOf(repo.gc()))?.code).toBe('BUSY');
      expect(await repo.unlock()).toEqual([]);
      const removed = await repo.unlock({ force: true });
      expect(removed.map((l) => l.hostname)).toEqual(['elsewhere.example']);
      expect((await errorOf(repo.gc())) ?? null).toBeNull();
      // An unreadable lock counts as held (it could be anyone's).
      await writeLock(where, 'exclusive-3333333333333333', { nonsense: true });
      expect((await errorOf(repo.startBackup()))?.code).toBe('BUSY');
    } finally {
      await repo.close();
    }
  });
});
