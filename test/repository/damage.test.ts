/**
 * Damaged repositories: a flipped byte in a chunk, a missing pack, a truncated index, a manifest that does not
 * parse, a lost or damaged pack index (rebuilt from the packs), a hostile pack index entry, a truncated pack,
 * swapped chunks, entries that are not objects (symlinks, FIFOs, directories). verify names each damage and EVERY
 * restore point it affects (also when asked about one point); reads give typed errors (REPOSITORY_CORRUPT), never a
 * crash; nothing that cannot be read is skipped silently.
 */
import { execFileSync } from 'node:child_process';
import { mkdir, readFile, rename, rm, stat, symlink, truncate, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { Repository, indexKey, type PointManifest } from '../../src/repository/index.js';
import { encodePackIndexes, packIndexKey } from '../../src/repository/pack.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import {
  backup,
  incremental,
  makeDiskImage,
  mutate,
  packFiles,
  restoreToBuffer,
  vmSpec,
  type VmSpec,
} from './helpers.js';

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
      { name: 'scsi0-0', data: a },
      { name: 'scsi0-1', data: b },
    ]),
  ];
  const clone = vmSpec('clone', [{ name: 'scsi0-0', data: Buffer.from(a) }]);
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
        const loc = (await f.repo.locateChunk(victim))!;
        const key = loc.key;
        const raw = await readFile(file(f, key));
        raw[loc.offset + (loc.length >> 1)] ^= 0x04;
        await writeFile(file(f, key), raw);

        for (const scope of [undefined, f.points[0].id, f.points[3].id]) {
          const report = await f.repo.verify(scope);
          expect(report.ok).toBe(false);
          expect(report.damage).toHaveLength(1);
          const d = report.damage[0];
          expect(d).toMatchObject({
            object: 'chunk',
            id: victim,
            key,
            range: { offset: loc.offset, length: loc.length },
            problem: 'corrupt',
          });
          expect(report.affectedPoints).toEqual(ids(f.points));
          const app = d.affects.find((a) => a.pointId === f.points[0].id)!;
          expect(app).toMatchObject({ vm: 'app', disk: 'scsi0-0', diskId: f.vms[0].disks[0].diskId });
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

    it('a missing pack: verify says each of its chunks is missing and names the points that hold them', async () => {
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
        // Its pack holds only what that incremental stored: chunks no other point has.
        const loc = (await f.repo.locateChunk(victim!))!;
        const inPack = (await f.repo.readPackHeader(loc.key.slice(-64), (await stat(file(f, loc.key))).size)).map(
          (e) => e.id,
        );
        expect(inPack).toContain(victim);
        await rm(file(f, loc.key));
        const report = await f.repo.verify();
        expect(report.damage.map((d) => [d.object, d.problem, d.key])).toEqual(
          inPack.map(() => ['chunk', 'missing', loc.key]),
        );
        expect(report.damage.map((d) => d.id).sort()).toEqual([...inPack].sort());
        expect(report.affectedPoints).toEqual([f.points[2].id]);
        // Verifying an unaffected point finds nothing.
        expect((await f.repo.verify(f.points[0].id)).ok).toBe(true);
        expect((await codeOf(f.repo.readChunk(victim!))).details.problem).toBe('missing');
      } finally {
        await f.repo.close();
      }
    });

    it('lost and damaged pack indexes: chunks look missing, gc refuses, repair-index rebuilds them from the packs', async () => {
      const f = await fixture(encrypted);
      try {
        const listed = async () =>
          (await f.repo.backend.list('packindex/')[Symbol.asyncIterator]().next()).value as { key: string };
        // Damaged: verify names the pack index and, as missing, the chunks only it listed; gc will not guess.
        const victim = (await listed()).key;
        const raw = await readFile(file(f, victim));
        raw[raw.length - 20] ^= 0x10;
        await writeFile(file(f, victim), raw);
        let report = await f.repo.verify();
        expect(report.ok).toBe(false);
        expect(report.damage[0]).toMatchObject({ object: 'pack-index', key: victim, problem: 'corrupt' });
        expect(report.damage.slice(1).every((d) => d.object === 'chunk' && d.problem === 'missing')).toBe(true);
        expect((await codeOf(f.repo.gc())).message).toMatch(/repair-index/);
        // Lost: every pack index gone.
        for (let o = await listed(); o; o = await listed()) await rm(file(f, o.key));
        report = await f.repo.verify();
        expect(report.damage.length).toBeGreaterThan(0);
        expect(new Set(report.damage.map((d) => d.problem))).toEqual(new Set(['missing']));
        expect(report.affectedPoints).toEqual(ids(f.points));
        const repaired = await f.repo.repairPackIndexes();
        expect(repaired.unreadable).toEqual([]);
        expect(repaired.packs).toBe((await packFiles(f.where)).length);
        expect((await f.repo.verify()).ok).toBe(true);
        for (const p of f.points) {
          for (const d of p === f.points[3] ? f.clone.disks : f.vms[0].disks) {
            if (p === f.points[2] || p === f.points[3]) {
              expect((await restoreToBuffer(f.repo, p.id, d.diskId)).equals(d.data)).toBe(true);
            }
          }
        }
        expect((await f.repo.gc()).packsRemoved).toBe(0);
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
  it('a pack index entry claiming an oversized chunk is refused before anything is read', async () => {
    for (const encrypted of [false, true]) {
      const f = await fixture(encrypted);
      try {
        const body = encodePackIndexes([
          { packId: 'ab'.repeat(32), entries: [{ id: 'cd'.repeat(32), offset: 0, length: 2 ** 31 }] },
        ])[0];
        const key = packIndexKey(f.repo.hashId(body));
        await writeFile(file(f, key), await f.repo.seal('pack-index', key, body));
        const report = await f.repo.verify();
        const d = report.damage.find((x) => x.object === 'pack-index')!;
        expect(d).toMatchObject({ key, problem: 'corrupt' });
        expect(d.message).toMatch(/entry 0 is 2147483648 bytes long/);
        // The real pack indexes still serve: every point restores.
        expect(
          (await restoreToBuffer(f.repo, f.points[3].id, f.clone.disks[0].diskId)).equals(f.clone.disks[0].data),
        ).toBe(true);
      } finally {
        await f.repo.close();
      }
    }
  });

  it('a truncated pack and swapped chunks are caught, named by chunk and pack', async () => {
    for (const encrypted of [false, true]) {
      const f = await fixture(encrypted);
      try {
        // Slot 0 of each disk is random (stored as is, so the two envelopes have one length).
        const b = (await f.repo.readIndex(f.points[0].vms[0].disks[0].index)).idAt(0)!;
        const c = (await f.repo.readIndex(f.points[0].vms[0].disks[1].index)).idAt(0)!;
        const lb = (await f.repo.locateChunk(b))!;
        const lc = (await f.repo.locateChunk(c))!;
        expect(lb.length).toBe(lc.length);
        // Chunk b's place holds chunk c's (valid) envelope.
        const packB = await readFile(file(f, lb.key));
        const packC = await readFile(file(f, lc.key));
        packC.copy(packB, lb.offset, lc.offset, lc.offset + lc.length);
        await writeFile(file(f, lb.key), packB);
        const e = await codeOf(f.repo.readChunk(b));
        expect(e.code).toBe('REPOSITORY_CORRUPT');
        expect(e.message).toMatch(encrypted ? /authentication failed/ : /does not hash to its name|holds/);
        // The last incremental's pack (not the pack of b and c) cut short inside its first chunk.
        const earlier = (await f.repo.readIndex(f.points[1].vms[0].disks[0].index)).chunkIds();
        const last = [...(await f.repo.readIndex(f.points[2].vms[0].disks[0].index)).chunkIds()].filter(
          (id) => !earlier.has(id),
        );
        const located = await Promise.all(last.map(async (id) => ({ id, loc: (await f.repo.locateChunk(id))! })));
        const cut = located.sort((x, y) => x.loc.offset - y.loc.offset)[0];
        expect(cut, 'the last incremental stored a chunk').toBeDefined();
        expect([lb.key, lc.key]).not.toContain(cut.loc.key);
        await truncate(file(f, cut.loc.key), cut.loc.offset + 10);
        expect((await codeOf(f.repo.readChunk(cut.id))).details.problem).toBe('truncated');
        const report = await f.repo.verify();
        expect(report.damage.map((d) => d.id)).toContain(b);
        expect(report.damage.find((d) => d.id === cut.id)).toMatchObject({ problem: 'truncated', key: cut.loc.key });
      } finally {
        await f.repo.close();
      }
    }
  });
});

describe('entries that are not objects are damage, never skipped', () => {
  it('a symlinked manifest, a FIFO point, a directory index, a symlinked pack, a FIFO pack index', async () => {
    const f = await fixture(false);
    try {
      const outside = path.join(dir, `outside-${n}`);
      await mkdir(outside);
      // points: one manifest replaced by a symlink to a copy of itself; a FIFO named like a point.
      const linked = f.points[0].id;
      await rename(file(f, `points/${linked}`), path.join(outside, 'manifest'));
      await symlink(path.join(outside, 'manifest'), file(f, `points/${linked}`));
      const fifoPoint = '20990101-000000-0000ffff';
      execFileSync('mkfifo', [file(f, `points/${fifoPoint}`)]);
      // indexes: the index only the clone's point uses, replaced by a directory.
      const cloneIndex = f.points[3].vms[0].disks[0].index.id;
      await rm(file(f, indexKey(cloneIndex)));
      await mkdir(file(f, indexKey(cloneIndex)));
      // packs: the pack of the last incremental's newest chunk moved out and symlinked back.
      const earlier = (await f.repo.readIndex(f.points[1].vms[0].disks[0].index)).chunkIds();
      const fresh = [...(await f.repo.readIndex(f.points[2].vms[0].disks[0].index)).chunkIds()].filter(
        (id) => !earlier.has(id),
      );
      const packKey = (await f.repo.locateChunk(fresh[0]))!.key;
      await rename(file(f, packKey), path.join(outside, 'pack'));
      await symlink(path.join(outside, 'pack'), file(f, packKey));
      // packindex: a FIFO named like a pack index.
      const fifoIndex = packIndexKey('ee'.repeat(32));
      execFileSync('mkfifo', [file(f, fifoIndex)]);

      const { points, damaged } = await f.repo.listPoints();
      expect(damaged.map((d) => [d.id, d.code])).toEqual([
        [linked, 'REPOSITORY_CORRUPT'],
        [fifoPoint, 'REPOSITORY_CORRUPT'],
      ]);
      expect(damaged[0].message).toMatch(/is a symbolic link, not an object/);
      expect(damaged[1].message).toMatch(/is a FIFO/);
      expect(points.map((p) => p.id)).toEqual(f.points.slice(1).map((p) => p.id));

      const report = await f.repo.verify();
      expect(report.ok).toBe(false);
      const by = (object: string, key: string) => report.damage.filter((d) => d.object === object && d.key === key);
      expect(by('manifest', `points/${linked}`)).toMatchObject([{ problem: 'unreadable' }]);
      expect(by('manifest', `points/${fifoPoint}`)).toMatchObject([{ problem: 'unreadable' }]);
      expect(by('index', indexKey(cloneIndex))).toMatchObject([
        { problem: 'unreadable', affects: [{ pointId: f.points[3].id, vm: 'clone' }] },
      ]);
      expect(by('pack-index', fifoIndex)).toMatchObject([{ problem: 'unreadable' }]);
      const packDamage = report.damage.filter((d) => d.key === packKey);
      expect(packDamage.length).toBeGreaterThan(0);
      expect(packDamage.every((d) => d.object === 'chunk' && d.problem === 'unreadable')).toBe(true);
      expect(packDamage.map((d) => d.id)).toContain(fresh[0]);
      expect(report.affectedPoints).toEqual(
        expect.arrayContaining([linked, fifoPoint, f.points[2].id, f.points[3].id]),
      );

      const info = await f.repo.info();
      expect(info.damage.map((d) => [d.object, d.key, d.problem]).sort()).toEqual(
        [
          ['manifest', `points/${linked}`, 'unreadable'],
          ['manifest', `points/${fifoPoint}`, 'unreadable'],
          ['index', indexKey(cloneIndex), 'unreadable'],
          ['pack', packKey, 'unreadable'],
          ['pack-index', fifoIndex, 'unreadable'],
        ].sort(),
      );
      const pruned = await f.repo.prune({ keepLast: 1, dryRun: true });
      expect(pruned.damaged.map((d) => d.id)).toEqual([linked, fifoPoint]);
      expect((await codeOf(f.repo.gc({ dryRun: true }))).code).toBe('REPOSITORY_CORRUPT');
    } finally {
      await f.repo.close();
    }
  });
});
