/**
 * Backups into a real repository on disk and restores out of it: plain and encrypted, several chunk sizes,
 * full and incremental, dedup, zero chunks, keys. Every restore is compared byte for byte with the source.
 */
import { randomUUID } from 'node:crypto';
import { readdir, readFile, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { newKeyFileContents, Repository } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { backup, incremental, makeDiskImage, mutate, packedChunkIds, restoreToBuffer, vmSpec } from './helpers.js';

const KiB = 1024;
const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_REPO_SEED', 4242);
const SCRYPT = 15; // the minimum: keeps the tests fast; the default is 17

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('repo'));
});
afterAll(async () => cleanup?.());

let n = 0;
const fresh = () => path.join(dir, `r${++n}`);

async function files(root: string, sub: string): Promise<string[]> {
  try {
    const out: string[] = [];
    for (const e of await readdir(path.join(root, sub), { withFileTypes: true, recursive: true })) {
      if (e.isFile()) out.push(path.join(e.parentPath, e.name));
    }
    return out;
  } catch {
    return [];
  }
}

async function expectCode(p: Promise<unknown>, code: string): Promise<TidemarkError> {
  const err = await p.then(
    () => null,
    (e: unknown) => e,
  );
  expect(err, `expected ${code}`).toBeInstanceOf(TidemarkError);
  expect((err as TidemarkError).code).toBe(code);
  return err as TidemarkError;
}

describe(`round trips (seed ${SEED})`, () => {
  const cases = [
    { chunkSize: 64 * KiB, encrypted: false, workers: 0 },
    { chunkSize: 64 * KiB, encrypted: true, workers: 2 },
    { chunkSize: MiB, encrypted: false, workers: 2 },
    { chunkSize: MiB, encrypted: true, workers: 0 },
    { chunkSize: 8 * MiB, encrypted: true, workers: 1 },
  ];
  for (const c of cases) {
    it(`chunk ${c.chunkSize / KiB} KiB, ${c.encrypted ? 'encrypted' : 'plain'}, ${c.workers} workers: full + incrementals restore exactly`, async () => {
      const r = rng(SEED + c.chunkSize + (c.encrypted ? 1 : 0));
      const where = fresh();
      const secret = c.encrypted ? { passphrase: 'correct horse battery staple', scryptLogN: SCRYPT } : {};
      const repo = await Repository.init(where, { chunkSize: c.chunkSize, workers: c.workers, ...secret });
      try {
        // Sizes that are not multiples of the chunk size: the last chunk is short.
        const slots = c.chunkSize <= 64 * KiB ? 24 : c.chunkSize <= MiB ? 8 : 2;
        const size = slots * c.chunkSize + 4096 + 512;
        const a = makeDiskImage(r, size, c.chunkSize);
        const b = makeDiskImage(r, 3 * c.chunkSize + 1234, c.chunkSize);
        let vms = [
          vmSpec('web', [
            { name: 'scsi0-0', data: a },
            { name: 'scsi0-1', data: b },
          ]),
        ];
        const p1 = await backup(repo, vms);
        const images = [[Buffer.from(a), Buffer.from(b)]];
        let prev = p1;
        const points = [p1];
        for (let i = 0; i < 2; i++) {
          const changedA = mutate(r, a, c.chunkSize, 3);
          vms = incremental(prev, vms, new Map([[vms[0].disks[0].diskId, changedA]]));
          prev = await backup(repo, vms, { parentId: prev.id });
          points.push(prev);
          images.push([Buffer.from(a), Buffer.from(b)]);
          // The incremental read only the changed chunks.
          expect(prev.vms[0].disks[0].stats.bytesRead).toBeLessThanOrEqual(changedA.length * c.chunkSize);
          expect(prev.vms[0].disks[0].read).toBe('incremental');
          // The unchanged disk shares its index with the previous point.
          expect(prev.vms[0].disks[1].index.id).toBe(points[i].vms[0].disks[1].index.id);
        }
        await repo.close();
        // Every point restores alone, from a freshly opened repository.
        const again = await Repository.open(where, {
          workers: c.workers,
          ...(c.encrypted ? { passphrase: 'correct horse battery staple' } : {}),
        });
        try {
          for (let i = 0; i < points.length; i++) {
            for (let d = 0; d < 2; d++) {
              const got = await restoreToBuffer(again, points[i].id, vms[0].disks[d].diskId, { parallel: 3 });
              expect(got.equals(images[i][d]), `point ${i} disk ${d}`).toBe(true);
            }
          }
          const report = await again.verify();
          expect(report.ok).toBe(true);
          expect(report.checked.points).toBe(3);
        } finally {
          await again.close();
        }
      } finally {
        await repo.close();
      }
    });
  }
});

describe('dedup and zero chunks', () => {
  it('the same data twice is stored once; all-zero chunks are never stored', async () => {
    const r = rng(SEED + 1);
    const cs = 64 * KiB;
    const where = fresh();
    const repo = await Repository.init(where, { chunkSize: cs, workers: 0 });
    try {
      // 16 chunks: 4 zero, 4 copies of one random chunk, 8 distinct random.
      const one = r.bytes(cs);
      const img = Buffer.alloc(16 * cs);
      for (let s = 4; s < 8; s++) one.copy(img, s * cs);
      for (let s = 8; s < 16; s++) r.bytes(cs).copy(img, s * cs);
      const vm = vmSpec('db', [{ name: 'scsi0-0', data: img }]);
      const p1 = await backup(repo, [vm]);
      const stats1 = p1.vms[0].disks[0].stats;
      expect(await packedChunkIds(repo, where)).toHaveLength(9);
      expect(p1.vms[0].disks[0].index.storedSlots).toBe(12);
      expect(stats1.bytesNew).toBe(9 * cs);

      // The same disk again (another VM, full read): nothing new is stored.
      const copy = vmSpec('db-clone', [{ name: 'scsi0-0', data: Buffer.from(img) }]);
      const p2 = await backup(repo, [copy]);
      expect(p2.vms[0].disks[0].stats.bytesNew).toBe(0);
      expect(p2.vms[0].disks[0].stats.bytesStored).toBe(0);
      expect(await packedChunkIds(repo, where)).toHaveLength(9);
      // Identical disks share one index object.
      expect(p2.vms[0].disks[0].index.id).toBe(p1.vms[0].disks[0].index.id);
      expect((await files(where, 'indexes')).length).toBe(1);

      // putChunk directly: zero → no id, nothing stored.
      const s = await repo.startBackup();
      expect(await s.putChunk(Buffer.alloc(cs))).toEqual({ id: null, isNew: false, storedBytes: 0 });
      const again = await s.putChunk(one);
      expect(again.isNew).toBe(false);
      expect(again.id).toMatch(/^[0-9a-f]{64}$/);
      await s.abort();
      expect(await packedChunkIds(repo, where)).toHaveLength(9);
      expect((await restoreToBuffer(repo, p2.id, copy.disks[0].diskId)).equals(img)).toBe(true);
    } finally {
      await repo.close();
    }
  });

  it("latestPoints finds each VM's newest point in one pass, as latestPoint does one VM at a time", async () => {
    const cs = 64 * KiB;
    const repo = await Repository.init(fresh(), { chunkSize: cs, workers: 0 });
    try {
      const img = (b: number) => Buffer.alloc(2 * cs, b);
      const a = vmSpec('a', [{ name: 'scsi0-0', data: img(1) }]);
      const b = vmSpec('b', [{ name: 'scsi0-0', data: img(2) }]);
      const p1 = await backup(repo, [a, b], { time: '2026-12-01T00:00:00.000Z' });
      // The newer run holds only 'a' ('b' failed in it): 'b' keeps its older point.
      const p2 = await backup(repo, [a], { time: '2026-12-02T00:00:00.000Z' });
      const found = await repo.latestPoints(['a', 'b', 'c', b.id]);
      expect([...found].map(([vm, m]) => [vm, m?.id ?? null])).toEqual([
        ['a', p2.id],
        ['b', p1.id],
        ['c', null],
        [b.id, p1.id],
      ]);
      for (const vm of ['a', 'b', 'c'])
        expect((await repo.latestPoint(vm))?.id ?? null).toBe(found.get(vm)?.id ?? null);
    } finally {
      await repo.close();
    }
  });

  it('concurrent puts of one new chunk store it once', async () => {
    const where = fresh();
    const repo = await Repository.init(where, { chunkSize: 64 * KiB, workers: 2 });
    try {
      const s = await repo.startBackup();
      const data = rng(SEED + 2).bytes(64 * KiB);
      const results = await Promise.all(Array.from({ length: 6 }, () => s.putChunk(data)));
      expect(results.filter((x) => x.isNew)).toHaveLength(1);
      expect(new Set(results.map((x) => x.id)).size).toBe(1);
      await s.abort();
      // An aborted session's last pack is never written.
      expect(await packedChunkIds(repo, where)).toEqual([]);
      // A backup of six copies, all put at once: one stored.
      const img = Buffer.concat(Array.from({ length: 6 }, () => data));
      const p = await backup(repo, [vmSpec('dup', [{ name: 'scsi0-0', data: img }])], { inFlight: 6 });
      expect(p.vms[0].disks[0].stats.bytesNew).toBe(64 * KiB);
      expect(await packedChunkIds(repo, where)).toEqual([results[0].id]);
    } finally {
      await repo.close();
    }
  });

  it('an encrypted repository names chunks by keyed hash: the same data gets different names in two repositories', async () => {
    const data = rng(SEED + 3).bytes(64 * KiB);
    const ids: string[] = [];
    for (let i = 0; i < 2; i++) {
      const repo = await Repository.init(fresh(), {
        chunkSize: 64 * KiB,
        passphrase: 'x',
        scryptLogN: SCRYPT,
        workers: 0,
      });
      const s = await repo.startBackup();
      ids.push((await s.putChunk(data)).id!);
      await s.abort();
      await repo.close();
    }
    expect(ids[0]).not.toBe(ids[1]);
    const plain = await Repository.init(fresh(), { chunkSize: 64 * KiB, workers: 0 });
    const s = await plain.startBackup();
    const { createHash } = await import('node:crypto');
    expect((await s.putChunk(data)).id).toBe(createHash('sha256').update(data).digest('hex'));
    await s.abort();
    await plain.close();
  });
});

describe('verify counts', () => {
  it("verify's totals equal repo info's with parallel workers, and its progress counts the stored bytes read", async () => {
    const r = rng(SEED + 9);
    const cs = 64 * KiB;
    const repo = await Repository.init(fresh(), { chunkSize: cs, workers: 2 });
    try {
      // Random (stored as is) and compressible chunks: envelopes of many lengths.
      let vms = [vmSpec('app', [{ name: 'scsi0-0', data: makeDiskImage(r, 40 * cs + 777, cs) }])];
      const p1 = await backup(repo, vms);
      const img = Buffer.from(vms[0].disks[0].data);
      vms = incremental(
        p1,
        [{ ...vms[0], disks: [{ ...vms[0].disks[0], data: img }] }],
        new Map([[vms[0].disks[0].diskId, mutate(r, img, cs, 6)]]),
      );
      await backup(repo, vms, { parentId: p1.id });
      const info = await repo.info();
      const progress: { doneBytes: number; totalBytes: number; doneChunks: number; totalChunks: number }[] = [];
      const report = await repo.verify(undefined, { parallel: 8, onProgress: (p) => progress.push(p) });
      expect(report.ok).toBe(true);
      // No garbage: every chunk the pack indexes list is referenced, so the two counts must agree exactly.
      expect(report.checked.chunks).toBe(info.chunks.count);
      expect(report.checked.storedBytes).toBe(info.chunks.bytes);
      expect(progress).toHaveLength(info.chunks.count);
      const last = progress.at(-1)!;
      expect(last).toEqual({
        doneBytes: info.chunks.bytes,
        totalBytes: info.chunks.bytes,
        doneChunks: info.chunks.count,
        totalChunks: info.chunks.count,
      });
      for (let i = 1; i < progress.length; i++)
        expect(progress[i].doneBytes).toBeGreaterThan(progress[i - 1].doneBytes);
    } finally {
      await repo.close();
    }
  });
});

describe('incremental index copies', () => {
  it('an incremental copies the previous index and replaces only the changed slots', async () => {
    const r = rng(SEED + 4);
    const cs = 64 * KiB;
    const repo = await Repository.init(fresh(), { chunkSize: cs, workers: 0 });
    try {
      const img = makeDiskImage(r, 32 * cs, cs);
      const vms = [vmSpec('app', [{ name: 'scsi0-0', data: img }])];
      const p1 = await backup(repo, vms);
      const before = await repo.readIndex(p1.vms[0].disks[0].index);
      // Change slots 3 and 17 (17 made all zero: the index must say zero, not keep the old chunk).
      r.bytes(cs).copy(img, 3 * cs);
      img.fill(0, 17 * cs, 18 * cs);
      const p2 = await backup(repo, incremental(p1, vms, new Map([[vms[0].disks[0].diskId, [3 * cs, 17 * cs]]])), {
        parentId: p1.id,
      });
      const after = await repo.readIndex(p2.vms[0].disks[0].index);
      for (let s = 0; s < 32; s++) {
        if (s === 3) expect(after.idAt(s)).not.toBe(before.idAt(s));
        else if (s === 17) expect(after.idAt(s)).toBeNull();
        else expect(after.idAt(s)).toBe(before.idAt(s));
      }
      expect(p2.parentId).toBe(p1.id);
      expect(p2.vms[0].disks[0].stats.bytesRead).toBe(2 * cs);
      // The first point still restores the old contents; the second the new ones.
      expect((await restoreToBuffer(repo, p2.id, vms[0].disks[0].diskId)).equals(img)).toBe(true);
      const old = await restoreToBuffer(repo, p1.id, vms[0].disks[0].diskId);
      expect(old.equals(img)).toBe(false);
    } finally {
      await repo.close();
    }
  });

  it('refuses a base index of another size, unaligned puts and short chunks', async () => {
    const cs = 64 * KiB;
    const repo = await Repository.init(fresh(), { chunkSize: cs, workers: 0 });
    try {
      const vms = [vmSpec('x', [{ name: 'scsi0-0', data: Buffer.alloc(4 * cs, 1) }])];
      const p1 = await backup(repo, vms);
      const s = await repo.startBackup();
      await expectCode(s.openIndex({ virtualSize: 5 * cs, base: p1.vms[0].disks[0].index }), 'INVALID_ARGUMENT');
      const w = await s.openIndex({ virtualSize: 4 * cs + 100 });
      await expectCode(w.put(100, Buffer.alloc(cs, 1)), 'INVALID_ARGUMENT');
      await expectCode(w.put(cs, Buffer.alloc(cs - 1, 1)), 'INVALID_ARGUMENT');
      await expectCode(w.put(4 * cs, Buffer.alloc(cs, 1)), 'INVALID_ARGUMENT');
      expect((await w.put(4 * cs, Buffer.alloc(100, 1))).isNew).toBe(true);
      await expectCode(s.putChunk(Buffer.alloc(cs + 1)), 'INVALID_ARGUMENT');
      await s.abort();
      await expectCode(s.putChunk(Buffer.alloc(10, 1)), 'CLOSED');
    } finally {
      await repo.close();
    }
  });

  it('commit refuses a manifest that names a missing index or parent, and keeps the session open', async () => {
    const cs = 64 * KiB;
    const repo = await Repository.init(fresh(), { chunkSize: cs, workers: 0 });
    try {
      const s = await repo.startBackup();
      const w = await s.openIndex({ virtualSize: cs });
      await w.put(0, Buffer.alloc(cs, 7));
      const index = await s.writeIndex(w);
      const disk = {
        diskId: randomUUID(),
        name: 'scsi0-0',
        controller: { bus: 'scsi' as const, controller: 0, location: 0 },
        virtualSize: cs,
        logicalSectorSize: 512,
        blockSize: 0,
        format: 'vhdx',
        rctId: null,
        read: 'full' as const,
        fullReason: 'first',
        index,
        stats: { bytesRead: cs, bytesNew: cs, bytesStored: 100 },
      };
      const vm = {
        name: 'v',
        id: randomUUID(),
        definition: {},
        consistency: 'crash' as const,
        freezeWindowMs: null,
        ioPauseMs: null,
      };
      const base = { flow: '2016', parentId: null, snapshots: 1 };
      await expectCode(
        s.commit({ ...base, vms: [{ ...vm, disks: [{ ...disk, index: { ...index, id: 'ab'.repeat(32) } }] }] }),
        'INVALID_ARGUMENT',
      );
      await expectCode(
        s.commit({ ...base, parentId: '20200101-000000-00000000', vms: [{ ...vm, disks: [disk] }] }),
        'INVALID_ARGUMENT',
      );
      const e = await expectCode(
        s.commit({ ...base, vms: [{ ...vm, disks: [{ ...disk, read: 'partial' as 'full' }] }] }),
        'INVALID_ARGUMENT',
      );
      expect(e.message).toMatch(/vms\.0\.disks\.0\.read/);
      expect(s.isOpen).toBe(true);
      const m = await s.commit({ ...base, vms: [{ ...vm, disks: [disk] }] });
      expect((await repo.readPoint(m.id)).vms[0].disks[0].index.id).toBe(index.id);
      // Extension fields survive a round trip (readers keep what they do not know).
      const s2 = await repo.startBackup();
      const m2 = await s2.commit({
        ...base,
        vms: [{ ...vm, disks: [{ ...disk, futureField: 42 }] }],
        runId: 'abc',
      } as never);
      const read = (await repo.readPoint(m2.id)) as unknown as {
        runId: string;
        vms: { disks: { futureField: number }[] }[];
      };
      expect(read.runId).toBe('abc');
      expect(read.vms[0].disks[0].futureField).toBe(42);
    } finally {
      await repo.close();
    }
  });
});

describe('keys', () => {
  it('wrong passphrase → WRONG_KEY; missing passphrase → INVALID_ARGUMENT; right one opens', async () => {
    const where = fresh();
    const repo = await Repository.init(where, {
      chunkSize: 64 * KiB,
      passphrase: 'right',
      scryptLogN: SCRYPT,
      workers: 0,
    });
    const p = await backup(repo, [vmSpec('v', [{ name: 'scsi0-0', data: Buffer.alloc(64 * KiB, 3) }])]);
    await repo.close();
    const e = await expectCode(Repository.open(where, { passphrase: 'wrong', workers: 0 }), 'WRONG_KEY');
    expect(e.message).toMatch(/wrong passphrase/);
    await expectCode(Repository.open(where, { workers: 0 }), 'INVALID_ARGUMENT');
    const ok = await Repository.open(where, { passphrase: 'right', workers: 0 });
    expect((await ok.readPoint(p.id)).id).toBe(p.id);
    await ok.close();
    // The config states the KDF and its parameters; the master key is not in it in the clear.
    const config = JSON.parse(await readFile(path.join(where, 'config'), 'utf8'));
    expect(config.encryption.keys[0].kdf).toMatchObject({ name: 'scrypt', logN: SCRYPT, r: 8, p: 1 });
    expect(config.chunkId).toBe('hmac-sha256');
  });

  it('key files: the right file opens, another file → WRONG_KEY; passphrase and key file can both open', async () => {
    const where = fresh();
    const keyA = path.join(dir, `a${n}.key`);
    const keyB = path.join(dir, `b${n}.key`);
    await writeFile(keyA, newKeyFileContents());
    await writeFile(keyB, newKeyFileContents());
    const repo = await Repository.init(where, {
      chunkSize: 64 * KiB,
      keyFile: keyA,
      passphrase: 'pw',
      scryptLogN: SCRYPT,
      workers: 0,
    });
    await repo.close();
    await expectCode(Repository.open(where, { keyFile: keyB, workers: 0 }), 'WRONG_KEY');
    await (await Repository.open(where, { keyFile: keyA, workers: 0 })).close();
    await (await Repository.open(where, { passphrase: 'pw', workers: 0 })).close();
    // An editor's trailing newline does not change the key; a short file is refused.
    await writeFile(keyA, (await readFile(keyA, 'utf8')).trim() + '\n\n');
    await (await Repository.open(where, { keyFile: keyA, workers: 0 })).close();
    await writeFile(keyB, 'short');
    await expectCode(Repository.open(where, { keyFile: keyB, workers: 0 }), 'INVALID_ARGUMENT');
    // Only a key file: a passphrase has no slot to open.
    const only = fresh();
    await (await Repository.init(only, { keyFile: keyA, workers: 0 })).close();
    await expectCode(Repository.open(only, { passphrase: 'pw', workers: 0 }), 'WRONG_KEY');
  });

  it('a tampered config (chunk size changed) is refused in an encrypted repository', async () => {
    const where = fresh();
    await (
      await Repository.init(where, { chunkSize: 64 * KiB, passphrase: 'pw', scryptLogN: SCRYPT, workers: 0 })
    ).close();
    const file = path.join(where, 'config');
    const c = JSON.parse(await readFile(file, 'utf8'));
    c.chunkSize = 128 * KiB;
    await writeFile(file, JSON.stringify(c));
    await expectCode(Repository.open(where, { passphrase: 'pw', workers: 0 }), 'REPOSITORY_CORRUPT');
  });

  it('init refuses bad chunk sizes, a weak scrypt cost and a non-empty directory', async () => {
    for (const chunkSize of [32 * KiB, 3 * 64 * KiB, 16 * MiB]) {
      await expectCode(Repository.init(fresh(), { chunkSize }), 'INVALID_ARGUMENT');
    }
    await expectCode(Repository.init(fresh(), { passphrase: 'x', scryptLogN: 14 }), 'INVALID_ARGUMENT');
    const where = fresh();
    await (await Repository.init(where, { workers: 0 })).close();
    await expectCode(Repository.init(where), 'ALREADY_EXISTS');
    await expectCode(Repository.open(fresh()), 'NOT_FOUND');
    // Repository files are private to their owner.
    expect((await stat(path.join(where, 'config'))).mode & 0o077).toBe(0);
  });
});
