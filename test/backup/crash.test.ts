/**
 * `tidemark backup` killed with SIGKILL at seeded random moments (checkpoint phase, snapshot, conversion,
 * data phase, commit), while the host keeps running. After every kill: every earlier restore point verifies,
 * the newest restores exactly to what the guests had written at its checkpoints, and regularly a backup run
 * to the end succeeds (cleaning what the killed run left on the host). At the end `gc` removes the orphans
 * the killed runs left, loses no chunk any point needs, and a second gc finds nothing more.
 *
 * Trials: TIDEMARK_BACKUP_CRASH_TRIALS (default 50); seed: TIDEMARK_BACKUP_CRASH_SEED.
 */
import { spawn } from 'node:child_process';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { Workload } from '../../src/workload/generator.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const TRIALS = Number(process.env.TIDEMARK_BACKUP_CRASH_TRIALS ?? 50);
const SEED = seedFrom('TIDEMARK_BACKUP_CRASH_SEED', 7);
const FULL_RUN_EVERY = 5;
console.log(`backup crash: ${TRIALS} trials, seed ${SEED} (TIDEMARK_BACKUP_CRASH_TRIALS, TIDEMARK_BACKUP_CRASH_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
let running: RunningHost;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('backup-crash'));
  running = await startHost({ store: path.join(dir, 'store'), log: HostLog.silent() });
});
afterAll(async () => {
  await running?.close();
  await cleanup?.();
});

function backupProcess(store: string, repo: string): { done: Promise<number | null>; kill: () => void } {
  const child = spawn(
    process.execPath,
    [
      path.join(REPO_ROOT, 'bin', 'tidemark.js'),
      'backup',
      'a',
      'b',
      '--store',
      store,
      '--repo',
      repo,
      '--consistency',
      'crash',
      '--json',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let err = '';
  child.stderr!.on('data', (d) => (err += d));
  const done = new Promise<number | null>((resolve) =>
    child.on('exit', (code) => {
      if (code !== 0 && code !== null) console.log(`backup exited ${code}: ${err.slice(-400)}`);
      resolve(code);
    }),
  );
  return { done, kill: () => child.kill('SIGKILL') };
}

describe(`backup killed (seed ${SEED})`, () => {
  it(
    `${TRIALS} kills: earlier points intact, next run succeeds, gc exact`,
    { timeout: Math.max(900_000, TRIALS * 12_000) }, // long runs get time in proportion (~3 s a trial, then every point restored)
    async () => {
      const store = path.join(dir, 'store');
      const repoPath = path.join(dir, 'repo');
      const r = rng(SEED);
      const api = await HostClient.connect({ store });
      const init = await Repository.init(repoPath, { chunkSize: 128 * 1024 });
      await init.close();
      const guests: { vm: string; w: Workload; nbd: NbdClient }[] = [];
      for (const [i, vm] of ['a', 'b'].entries()) {
        await api.createVm({ name: vm, disks: [{ slot: 'scsi0-0', size: 16 * MiB }] });
        const v = await api.startVm(vm);
        const nbd = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: v.disks[0].export! });
        guests.push({ vm, nbd, w: new Workload(nbd, { seed: SEED + i, concurrency: 2, flushEvery: 8 }) });
      }
      // What each committed point must restore to: the guests are still during a run, so it is exact.
      const expected = new Map<string, Map<string, Buffer>>();
      let kills = 0;
      let runMs = 1000;
      let completed = 0;
      for (let trial = 0; trial < TRIALS; trial++) {
        for (const g of guests) await g.w.run(1 + r.int(60));
        const images = new Map(guests.map((g) => [g.vm, g.w.expectedImage()]));
        const before = new Set(await listPoints(repoPath));
        const full = trial === 0 || trial % FULL_RUN_EVERY === FULL_RUN_EVERY - 1;
        const t0 = performance.now();
        const p = backupProcess(store, repoPath);
        if (!full) {
          // Anywhere in a run: from process start to just after its usual end.
          const delay = r.int(Math.ceil(runMs * 1.1));
          const timer = setTimeout(() => p.kill(), delay);
          const code = await p.done;
          clearTimeout(timer);
          if (code === null) kills++;
        } else {
          expect(await p.done, `trial ${trial}: the run after kills succeeds`).toBe(0);
          runMs = performance.now() - t0;
        }
        const after = await listPoints(repoPath);
        const added = after.filter((x) => !before.has(x));
        expect(added.length).toBeLessThanOrEqual(1);
        if (added.length === 1) {
          completed++;
          expected.set(added[0], images);
        }
        if (full) expect(added.length, `trial ${trial}: a finished run commits a point`).toBe(1);
        // Earlier points are intact: the newest restores exactly; every point verifies (checked every few trials).
        const newest = after.at(-1);
        if (newest && expected.has(newest) && (trial % 5 === 0 || added.length === 1)) {
          const repo = await Repository.open(repoPath);
          try {
            const out = await restorePoint(repo, newest, { to: path.join(dir, `restore-${trial}`), format: 'raw' });
            for (const d of out.disks) {
              const img = await readFile(d.file);
              const want = Buffer.alloc(d.virtualSize);
              expected.get(newest)!.get(d.vm)!.copy(want);
              expect(img.equals(want), `trial ${trial}: point ${newest} ${d.vm} restores exactly`).toBe(true);
            }
          } finally {
            await repo.close();
          }
        }
      }
      // Leftovers of the last kill are cleaned by one more run; then gc.
      const last = backupProcess(store, repoPath);
      expect(await last.done).toBe(0);
      for (const g of guests) await g.nbd.close();
      const repo = await Repository.open(repoPath);
      try {
        const gc = await repo.gc();
        const again = await repo.gc({ dryRun: true });
        const verify = await repo.verify();
        console.log(
          `backup crash: ${kills} kills, ${completed} points committed by the ${TRIALS} trials; gc removed ${gc.chunksRemoved} orphan chunk(s) and ${gc.indexesRemoved} index(es), kept ${gc.chunksKept}`,
        );
        expect(verify.damage).toEqual([]);
        expect(verify.ok).toBe(true);
        expect(gc.missingIndexes).toEqual([]);
        expect(again.chunksRemoved).toBe(0);
        expect(again.indexesRemoved).toBe(0);
        for (const [id, images] of expected) {
          const out = await restorePoint(repo, id, { to: path.join(dir, `final-${id}`), format: 'raw' });
          for (const d of out.disks) {
            const want = Buffer.alloc(d.virtualSize);
            images.get(d.vm)!.copy(want);
            expect((await readFile(d.file)).equals(want), `after gc: point ${id} ${d.vm}`).toBe(true);
          }
        }
      } finally {
        await repo.close();
      }
      expect(kills).toBeGreaterThan(TRIALS / 4);
    },
  );
});

async function listPoints(repoPath: string): Promise<string[]> {
  const repo = await Repository.open(repoPath);
  try {
    return (await repo.listPointIds()).sort();
  } finally {
    await repo.close();
  }
}
