/**
 * Damaged repositories: a flipped byte in a chunk, a missing chunk, a truncated index, a manifest that does not
 * parse, an oversized chunk file, swapped chunks. verify names each damage and EVERY restore point it affects
 * (also when asked about one point); reads give typed errors (REPOSITORY_CORRUPT), never a crash.
 */
import { copyFile, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { Repository, chunkKey, indexKey, type PointManifest } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { backup, incremental, makeDiskImage, mutate, restoreToBuffer, vmSpec, type VmSpec } from './helpers.js';

const KiB = 1024;
const CS = 64 * KiB;
const SEED = seedFrom('TIDEMARK_REPO_SEED', 4242);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('repo-damage'));
});
afterAll(async () => cleanup?.());

interface Fixture {
  where: string;
  repo: Repository;
  /** p1 full, p2 and p3 incrementals of VM "app"; p4 a full of VM "clone" whose disk is a copy of app's first */
  points: PointManifest[];
  vms: VmSpec[];
  clone: VmSpec;
}

let n = 0;
async function fixture(encrypted: boolean): Promise<Fixture> {
  const where = path.join(dir, `r${++n}`);
  const r = rng(SEED + n);
  const repo = await Repository.init(where, {
    chunkSize: CS,
    workers: 0,
    ...(encrypted ? { passphrase: 'pw', scryptLogN: 15 } : {}),
  });
  const a = makeDiskImage(r, 16 * CS, CS);
  // Chunk 0 of disk a: random, so that it is stored and shared with the clone.
  r.bytes(CS).copy(a, 0);
  const b = makeDiskImage(r, 8 * CS, CS);
  r.bytes(CS).copy(b, 0);
  let vms = [
    vmSpec('app', [
      { name: 'os', data: a },
      { name: 'data', data: b },
    ]),
  ];
  const clone = vmSpec('clone', [{ name: 'os', data: Buffer.from(a) }]);
  const points: PointManifest[] = [await backup(repo, vms)];
  for (let i = 0; i < 2; i++) {
    // Never slot 0 of disk a: the damaged chunk below must stay shared by every point.
    const changed = mutate(r, a, CS, 2).filter((o) => o !== 0);
    vms = incremental(points.at(-1)!, vms, new Map([[vms[0].disks[0].diskId, changed]]));
    points.push(await backup(repo, vms, { parentId: points.at(-1)!.id }));
  }
  points.push(await backup(repo, [clone]));
  return { where, repo, points, vms, clone };
}

const file = (f: Fixture, key: string) => path.join(f.where, ...key.split('/'));
const ids = (ps: PointManifest[]) => ps.map((p) => p.id).sort();

async function codeOf(p: Promise<unknown>): Promise<TidemarkError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(TidemarkError);
  return err as TidemarkError;
}

for (const encrypted of [false, true]) {
  describe(`${encrypted ? 'encrypted' : 'plain'} repository`, () => {
    it('a flipped byte in a shared chunk: verify names all four points, whatever point it is asked about', async () => {
      const f = await fixture(encrypted);
      try {
        const index = await f.repo.readIndex(f.points[0].vms[0].disks[0].index);
        const victim = index.idAt(0)!;
        const key = chunkKey(victim);
        const raw = await readFile(file(f, key));
        raw[raw.length >> 1] ^= 0x04;
        await writeFile(file(f, key), raw);

        for (const scope of [undefined, f.points[0].id, f.points[3].id]) {
          const report = await f.repo.verify(scope);
          expect(report.ok).toBe(false);
          expect(report.damage).toHaveLength(1);
          const d = report.damage[0];
          expect(d).toMatchObject({ object: 'chunk', id: victim, key, problem: 'corrupt' });
          expect(report.affectedPoints).toEqual(ids(f.points));
          const app = d.affects.find((a) => a.pointId === f.points[0].id)!;
          expect(app).toMatchObject({ vm: 'app', disk: 'os', diskId: f.vms[0].disks[0].diskId });
          expect(app.offsets).toContain(0);
          expect(d.affects.find((a) => a.pointId === f.points[3].id)?.vm).toBe('clone');
        }
        // Reading through the damage is a typed error, for every point; the other disk still restores.
        const e = await codeOf(restoreToBuffer(f.repo, f.points[2].id, f.vms[0].disks[0].diskId));
        expect(e.code).toBe('REPOSITORY_CORRUPT');
        expect(e.message).toContain(victim);
        expect(
          (await restoreToBuffer(f.repo, f.points[2].id, f.vms[0].disks[1].diskId)).equals(f.vms[0].disks[1].data),
        ).toBe(true);
      } finally {
        await f.repo.close();
      }
    });

    it('a missing chunk: verify says missing and names the points that hold it', async () => {
      const f = await fixture(encrypted);
      try {
        // A chunk only the last incremental of "app" has: the slot it changed.
        const i2 = await f.repo.readIndex(f.points[1].vms[0].disks[0].index);
        const i3 = await f.repo.readIndex(f.points[2].vms[0].disks[0].index);
        let victim: string | null = null;
        for (let s = 0; s < i3.slotCount && !victim; s++) {
          const id = i3.idAt(s);
          if (
            id &&
            id !== i2.idAt(s) &&
            !(await f.repo.readIndex(f.points[3].vms[0].disks[0].index)).chunkIds().has(id)
          ) {
            victim = id;
          }
        }
        expect(victim).not.toBeNull();
        await rm(file(f, chunkKey(victim!)));
        const report = await f.repo.verify();
        expect(report.damage.map((d) => [d.object, d.problem, d.id])).toEqual([['chunk', 'missing', victim]]);
        expect(report.affectedPoints).toEqual([f.points[2].id]);
        // Verifying an unaffected point finds nothing.
        expect((await f.repo.verify(f.points[0].id)).ok).toBe(true);
        expect((await codeOf(f.repo.readChunk(victim!))).details.problem).toBe('missing');
      } finally {
        await f.repo.close();
      }
    });

    it('a truncated index: verify names every point that shares it; restore refuses', async () => {
      const f = await fixture(encrypted);
      try {
        // Disk "data" never changed: p1..p3 share its index.
        const ref = f.points[0].vms[0].disks[1].index;
        expect(f.points[2].vms[0].disks[1].index.id).toBe(ref.id);
        const p = file(f, indexKey(ref.id));
        await truncate(p, (await readFile(p)).length - 7);
        const report = await f.repo.verify(f.points[1].id);
        expect(report.damage).toHaveLength(1);
        expect(report.damage[0]).toMatchObject({ object: 'index', id: ref.id, problem: 'truncated' });
        expect(report.affectedPoints).toEqual(ids(f.points.slice(0, 3)));
        const e = await codeOf(restoreToBuffer(f.repo, f.points[0].id, f.vms[0].disks[1].diskId));
        expect(e.code).toBe('REPOSITORY_CORRUPT');
        expect(e.message).toMatch(/index .* is damaged/);
      } finally {
        await f.repo.close();
      }
    });

    it('a manifest that does not parse: typed error, listed as damaged, verify names that point only', async () => {
      const f = await fixture(encrypted);
      try {
        const key = `points/${f.points[1].id}`;
        // Garbage over the file, and (a subtler case) a well-sealed object that is not a manifest.
        await writeFile(file(f, key), 'garbage');
        let e = await codeOf(f.repo.readPoint(f.points[1].id));
        expect(e.code).toBe('REPOSITORY_CORRUPT');
        await writeFile(file(f, key), await f.repo.seal('manifest', key, Buffer.from('{"format":"tidemark-point"')));
        e = await codeOf(f.repo.readPoint(f.points[1].id));
        expect(e.code).toBe('REPOSITORY_CORRUPT');
        expect(e.message).toMatch(/not JSON/);
        const { points, damaged } = await f.repo.listPoints();
        expect(points.map((p) => p.id)).toEqual([f.points[0], f.points[2], f.points[3]].map((p) => p.id));
        expect(damaged.map((d) => d.id)).toEqual([f.points[1].id]);
        const report = await f.repo.verify();
        expect(report.damage.map((d) => [d.object, d.id])).toEqual([['manifest', f.points[1].id]]);
        expect(report.affectedPoints).toEqual([f.points[1].id]);
        // gc refuses to guess what the damaged point references; forgetting it unblocks gc.
        expect((await codeOf(f.repo.gc())).message).toMatch(/points forget/);
        await f.repo.forgetPoint(f.points[1].id);
        await f.repo.gc();
        expect((await f.repo.verify()).ok).toBe(true);
      } finally {
        await f.repo.close();
      }
    });
  });
}

describe('hostile objects', () => {
  it('an oversized chunk file is refused before it is read; swapped chunks are caught', async () => {
    for (const encrypted of [false, true]) {
      const f = await fixture(encrypted);
      try {
        const index = await f.repo.readIndex(f.points[0].vms[0].disks[0].index);
        const [a, b] = [...index.chunkIds()];
        await writeFile(file(f, chunkKey(a)), Buffer.alloc(CS + 4096));
        const e = await codeOf(f.repo.readChunk(a));
        expect(e.code).toBe('REPOSITORY_CORRUPT');
        expect(e.message).toMatch(/more than the/);
        // Chunk b's file holds another chunk's (valid) object.
        const c = [...(await f.repo.readIndex(f.points[0].vms[0].disks[1].index)).chunkIds()][0];
        await copyFile(file(f, chunkKey(c)), file(f, chunkKey(b)));
        const e2 = await codeOf(f.repo.readChunk(b));
        expect(e2.code).toBe('REPOSITORY_CORRUPT');
        expect(e2.message).toMatch(encrypted ? /authentication failed/ : /does not hash to its name|holds/);
        const report = await f.repo.verify();
        expect(new Set(report.damage.map((d) => d.id))).toEqual(new Set([a, b]));
      } finally {
        await f.repo.close();
      }
    }
  });
});
