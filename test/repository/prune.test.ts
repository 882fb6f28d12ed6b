/**
 * Retention: the policy against a simple model (seeded random point times and policies), ISO weeks at year
 * boundaries, and prune on a real repository (dry run, groups of VMs, damaged manifests, chunks left for gc).
 */
import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { Repository, applyRetention, isoWeek, type RetentionPolicy } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { backup, vmSpec } from './helpers.js';

const SEED = seedFrom('TIDEMARK_FUZZ_SEED', 2718);
const CASES = Number(process.env.TIDEMARK_FUZZ_CASES ?? 300);
/** Long runs (TIDEMARK_FUZZ_CASES) get time in proportion. */
const LONG_RUN_TIMEOUT = Math.max(120_000, CASES * 20);

interface P {
  id: string;
  time: Date;
  group: string;
}

/**
 * The model, written as plainly as possible: for each rule, the newest point of each period, the N newest
 * periods. A point is kept if any rule picks it.
 */
function model(points: P[], policy: RetentionPolicy): Map<string, string[]> {
  const pad = (n: number, w = 2) => String(n).padStart(w, '0');
  const period: Record<string, (t: Date) => string> = {
    hourly: (t) => `${t.getUTCFullYear()}-${pad(t.getUTCMonth() + 1)}-${pad(t.getUTCDate())}T${pad(t.getUTCHours())}`,
    daily: (t) => `${t.getUTCFullYear()}-${pad(t.getUTCMonth() + 1)}-${pad(t.getUTCDate())}`,
    weekly: (t) => isoWeek(t),
    monthly: (t) => `${t.getUTCFullYear()}-${pad(t.getUTCMonth() + 1)}`,
    yearly: (t) => `${t.getUTCFullYear()}`,
  };
  const newer = (a: P, b: P) =>
    a.time.getTime() > b.time.getTime() || (a.time.getTime() === b.time.getTime() && a.id > b.id);
  const kept = new Map<string, string[]>();
  const keep = (p: P, why: string) => kept.set(p.id, [...(kept.get(p.id) ?? []), why]);
  for (const group of new Set(points.map((p) => p.group))) {
    const members = points.filter((p) => p.group === group);
    const newestFirst = [...members].sort((a, b) => (newer(a, b) ? -1 : 1));
    newestFirst.slice(0, policy.keepLast ?? 0).forEach((p, i) => keep(p, `last ${i + 1}`));
    const counts: Record<string, number | undefined> = {
      hourly: policy.keepHourly,
      daily: policy.keepDaily,
      weekly: policy.keepWeekly,
      monthly: policy.keepMonthly,
      yearly: policy.keepYearly,
    };
    for (const rule of ['hourly', 'daily', 'weekly', 'monthly', 'yearly']) {
      const best = new Map<string, P>();
      for (const p of members) {
        const k = period[rule](p.time);
        const cur = best.get(k);
        if (!cur || newer(p, cur)) best.set(k, p);
      }
      [...best.entries()]
        .sort((a, b) => (newer(a[1], b[1]) ? -1 : 1))
        .slice(0, counts[rule] ?? 0)
        .forEach(([k, p]) => keep(p, `${rule} ${k}`));
    }
  }
  return kept;
}

describe(`retention policy against the model (${CASES} cases, seed ${SEED})`, () => {
  it('keeps exactly what the model keeps, for the same reasons', { timeout: LONG_RUN_TIMEOUT }, () => {
    const r = rng(SEED);
    for (let c = 0; c < CASES; c++) {
      const points: P[] = [];
      const groups = 1 + r.int(3);
      const count = r.int(60);
      // Times cluster (several per hour and per day) over about three years, some equal.
      let t = Date.UTC(2024, 0, 1) + r.int(365) * 86_400_000;
      for (let i = 0; i < count; i++) {
        const step = [60_000, 3_600_000, 86_400_000, 7 * 86_400_000, 40 * 86_400_000, 0][r.int(6)];
        t += r.int(Math.max(1, step));
        points.push({
          id: `p${String(i).padStart(3, '0')}${r.int(10)}`,
          time: new Date(t),
          group: `g${r.int(groups)}`,
        });
      }
      const policy: RetentionPolicy = {};
      for (const k of ['keepLast', 'keepHourly', 'keepDaily', 'keepWeekly', 'keepMonthly', 'keepYearly'] as const) {
        if (r.int(2)) policy[k] = r.int(6);
      }
      const shuffled = [...points].sort(() => r.next() - 0.5);
      const got = applyRetention(shuffled, policy);
      const want = model(points, policy);
      expect(got).toHaveLength(points.length);
      for (const d of got) {
        const w = want.get(d.id);
        expect(d.keep, `case ${c}, point ${d.id} (${d.time}), policy ${JSON.stringify(policy)}`).toBe(w !== undefined);
        if (w) expect([...d.reasons].sort(), `case ${c} ${d.id}`).toEqual([...w].sort());
        else expect(d.reasons).toEqual(['no rule keeps it']);
      }
      // Newest first.
      for (let i = 1; i < got.length; i++) expect(got[i - 1].time >= got[i].time).toBe(true);
    }
  });

  it('ISO weeks at year boundaries', () => {
    expect(isoWeek(new Date('2021-01-03T23:59:59Z'))).toBe('2020-W53');
    expect(isoWeek(new Date('2021-01-04T00:00:00Z'))).toBe('2021-W01');
    expect(isoWeek(new Date('2024-12-30T12:00:00Z'))).toBe('2025-W01');
    expect(isoWeek(new Date('2026-11-24T20:00:00Z'))).toBe('2026-W48');
    expect(isoWeek(new Date('2027-01-01T00:00:00Z'))).toBe('2026-W53');
  });
});

describe('prune on a repository', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('repo-prune'));
  });
  afterAll(async () => cleanup?.());

  it('dry run removes nothing; prune removes manifests per VM group; damaged points stay; gc frees the chunks', async () => {
    const where = path.join(dir, 'r');
    const repo = await Repository.init(where, { chunkSize: 64 * 1024, workers: 0 });
    try {
      const r = rng(SEED + 1);
      const web = vmSpec('web', [{ name: 'scsi0-0', data: r.bytes(128 * 1024) }]);
      const db = vmSpec('db', [{ name: 'scsi0-0', data: r.bytes(128 * 1024) }]);
      const made: { id: string; vm: string; time: string }[] = [];
      // web: four days, two points on the last; db: one point, old.
      for (const time of [
        '2026-03-01T10:00:00Z',
        '2026-03-02T10:00:00Z',
        '2026-03-03T10:00:00Z',
        '2026-03-04T09:00:00Z',
        '2026-03-04T18:00:00Z',
      ]) {
        web.disks[0].data = r.bytes(128 * 1024);
        made.push({ id: (await backup(repo, [web], { time })).id, vm: 'web', time });
      }
      made.push({
        id: (await backup(repo, [db], { time: '2025-01-01T00:00:00Z' })).id,
        vm: 'db',
        time: '2025-01-01T00:00:00Z',
      });
      const policy = { keepDaily: 2 };
      const dry = await repo.prune({ ...policy, dryRun: true });
      expect(dry.dryRun).toBe(true);
      expect(await repo.listPointIds()).toHaveLength(6);
      // web keeps the newest of 03-04 and of 03-03; db's only point is its group's newest day.
      const keptIds = [made[4].id, made[2].id, made[5].id].sort();
      expect(dry.kept.map((k) => k.id).sort()).toEqual(keptIds);
      expect(dry.kept.find((k) => k.id === made[4].id)?.reasons).toEqual(['daily 2026-03-04']);
      expect(dry.kept.find((k) => k.id === made[5].id)?.vms).toEqual(['db']);
      expect(dry.removed.map((k) => k.id).sort()).toEqual([made[0].id, made[1].id, made[3].id].sort());

      // A damaged manifest is never pruned (its time and VMs are unknown).
      await writeFile(path.join(where, 'points', made[0].id), 'damaged');
      const chunksBefore = (await repo.info()).chunks.count;
      const real = await repo.prune(policy);
      expect(real.damaged.map((d) => d.id)).toEqual([made[0].id]);
      expect(real.removed.map((k) => k.id).sort()).toEqual([made[1].id, made[3].id].sort());
      expect((await repo.listPointIds()).sort()).toEqual([made[0].id, ...keptIds].sort());
      // Prune removes manifests only; gc (after the damaged point is forgotten) frees their chunks.
      expect((await repo.info()).chunks.count).toBe(chunksBefore);
      await repo.forgetPoint(made[0].id);
      const gc = await repo.gc();
      expect(gc.chunksRemoved).toBe(3 * 2);
      expect((await repo.verify()).ok).toBe(true);

      const err = await repo.prune({ keepLast: 0 }).catch((e: TidemarkError) => e);
      expect((err as TidemarkError).code).toBe('INVALID_ARGUMENT');
    } finally {
      await repo.close();
    }
  });
});
