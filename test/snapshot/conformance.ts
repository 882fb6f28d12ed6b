/**
 * The one conformance suite every storage-snapshot provider runs (as unstorage's testDriver does for its
 * drivers): a set of files snapshotted together reads exactly as it was at the instant while the files
 * are rewritten heavily (seeded writes, concurrent batches racing view reads, truncates, appends, deletes,
 * rename-over), through handles opened before and after the snapshot; two snapshots living at once each
 * keep their own instant; the lifecycle (read-only views, CLOSED after release, the area freed, abort);
 * bad input; and recovery after a process holding a snapshot is killed, sparing live snapshots.
 *
 * Environment: TIDEMARK_SNAPSHOT_SEED (default 20261201), TIDEMARK_SNAPSHOT_OPS (operations of the heavy
 * test, default 250).
 */
import { randomBytes } from 'node:crypto';
import { mkdir, readFile, readdir, rename, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import type { SnapshotProvider, StorageSnapshot } from '../../src/snapshot/provider.js';
import { NodeFile, fileWriteInterceptors, type RandomAccessFile } from '../../src/util/file.js';
import { rng, seedFrom } from '../helpers/random.js';
import { startWorker } from './worker.js';
import { applyOp, initialContent, planOp } from './worker-plan.mjs';
import { codeOf } from '../helpers/async.js';

export const SEED = seedFrom('TIDEMARK_SNAPSHOT_SEED', 20261201);
const OPS = Number(process.env.TIDEMARK_SNAPSHOT_OPS ?? 250);
const KiB = 1024;

type Rng = ReturnType<typeof rng>;

export interface ConformanceOptions {
  /** Run the tests that spawn a worker process (snapshot-worker.mjs over dist/). Default true. */
  processes?: boolean;
}

/** The code of a rejected promise's TidemarkError (test/helpers/async.ts; cow and reflink import it here). */
export { codeOf };

/** -1 when equal, else the first offset where they differ (or the shorter length). */
export function firstDiff(a: Uint8Array, b: Uint8Array): number {
  const n = Math.min(a.length, b.length);
  if (Buffer.compare(a, b) === 0) return -1;
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return n;
}

/** The files of a set, with seeded content and sizes that are not multiples of any extent size. */
export async function makeFiles(dir: string, count: number, r: Rng, maxSize = 1536 * KiB): Promise<string[]> {
  await mkdir(dir, { recursive: true });
  const files: string[] = [];
  for (let i = 0; i < count; i++) {
    const f = path.join(dir, `disk-${i}.img`);
    await writeFile(f, r.bytes(128 * KiB + r.int(maxSize - 128 * KiB) + 1));
    files.push(f);
  }
  return files;
}

export async function readView(view: RandomAccessFile): Promise<Buffer> {
  const buf = Buffer.alloc(view.size());
  await view.read(buf, 0);
  return buf;
}

/** Every file of the snapshot, through a fresh view, is byte for byte `expected`. */
export async function expectInstant(snap: StorageSnapshot, files: string[], expected: Buffer[]): Promise<void> {
  for (let i = 0; i < files.length; i++) {
    const view = await snap.openFile(files[i]);
    try {
      expect(view.size(), `${files[i]}: size at the instant`).toBe(expected[i].length);
      expect(firstDiff(await readView(view), expected[i]), `${files[i]}: first byte that differs`).toBe(-1);
    } finally {
      await view.close();
    }
  }
}

/** A range of a view equals the same range of the file at the instant (zeros past its end). */
async function expectRange(view: RandomAccessFile, expected: Buffer, offset: number, length: number): Promise<void> {
  const got = Buffer.alloc(length);
  await view.read(got, offset);
  const want = Buffer.alloc(length);
  if (offset < expected.length) expected.copy(want, 0, offset, Math.min(expected.length, offset + length));
  expect(firstDiff(got, want), `${view.path} [${offset}, +${length}): first byte that differs`).toBe(-1);
}

/** Random writes, truncates and appends through `handles`. */
async function scribble(handles: NodeFile[], r: Rng, ops: number): Promise<void> {
  for (let i = 0; i < ops; i++) {
    const h = r.pick(handles);
    const k = r.next();
    if (k < 0.15) await h.truncate(r.int(Math.floor(h.size() * 1.2) + 1));
    else if (k < 0.25) await h.write(r.bytes(1 + r.int(100 * KiB)), h.size());
    else await h.write(r.bytes(1 + r.int(r.next() < 0.3 ? 200 * KiB : 4 * KiB)), r.int(h.size() + 64 * KiB));
  }
}

export function providerConformance(
  name: string,
  makeProvider: () => SnapshotProvider,
  makeDir: () => Promise<{ dir: string; cleanup: () => Promise<void> }>,
  opts: ConformanceOptions = {},
): void {
  describe(`snapshot provider ${name}: conformance (seed ${SEED}, TIDEMARK_SNAPSHOT_SEED)`, () => {
    let dir: string;
    let cleanup: () => Promise<void>;
    let root: string;
    let filesDir: string;
    const opened: { close(): Promise<void> }[] = [];
    const track = <T extends { close(): Promise<void> }>(f: T): T => {
      opened.push(f);
      return f;
    };
    const open = async (f: string, mode: 'r+' | 'wx' = 'r+') => track(await NodeFile.open(f, mode));
    /** prepare + commit; a snapshot a failed test leaves alive is released after it. */
    const take = async (provider: SnapshotProvider, files: string[]): Promise<StorageSnapshot> => {
      const snap = await (await provider.prepare(files, { diffAreaRoot: root })).commit();
      track({ close: () => snap.release() });
      return snap;
    };

    beforeEach(async () => {
      ({ dir, cleanup } = await makeDir());
      root = path.join(dir, 'areas');
      filesDir = path.join(dir, 'files');
    });
    afterEach(async () => {
      for (const f of opened.splice(0).reverse()) await f.close().catch(() => undefined);
      await cleanup();
    });

    it(`files rewritten heavily while the snapshot lives read as at the instant (${OPS} ops, TIDEMARK_SNAPSHOT_OPS)`, async () => {
      const r = rng(SEED);
      const files = await makeFiles(filesDir, 4, r);
      const provider = makeProvider();
      expect(await provider.supports(files, { diffAreaRoot: root })).toBeUndefined();
      // Handles opened before the snapshot and after it: both must be covered.
      const handles: { h: NodeFile; i: number }[] = [];
      for (let i = 0; i < files.length; i++) handles.push({ h: await open(files[i]), i });
      const snap = await take(provider, files);
      const expected = await Promise.all(files.map((f) => readFile(f)));
      for (let i = 0; i < files.length; i++) handles.push({ h: await open(files[i]), i });
      const views = await Promise.all(files.map((f) => snap.openFile(f)));
      expect(snap.files).toEqual(files);
      let replaced = 0;

      for (let op = 0; op < OPS; op++) {
        const k = r.next();
        if (k < 0.55) {
          // Concurrent writes (some to the same extents) racing reads of the views.
          const tasks: Promise<void>[] = [];
          for (let b = 1 + r.int(6); b > 0; b--) {
            const { h } = r.pick(handles);
            const len = 1 + r.int(r.next() < 0.3 ? 200 * KiB : 5 * KiB);
            tasks.push(h.write(r.bytes(len), r.int(h.size() + 70 * KiB)));
          }
          for (let b = 0; b < 2; b++) {
            const v = r.int(files.length);
            tasks.push(expectRange(views[v], expected[v], r.int(expected[v].length + 4 * KiB), 1 + r.int(100 * KiB)));
          }
          await Promise.all(tasks);
        } else if (k < 0.7) {
          const { h } = r.pick(handles);
          await h.truncate(r.int(Math.floor(h.size() * 1.2) + 1));
        } else if (k < 0.8) {
          const { h } = r.pick(handles);
          await h.write(r.bytes(1 + r.int(100 * KiB)), h.size());
        } else if (k < 0.84) {
          // Delete, and a new file under the same name (open handles keep writing to the deleted one).
          const i = r.int(files.length);
          await unlink(files[i]);
          const h = await open(files[i], 'wx');
          await h.write(r.bytes(1 + r.int(300 * KiB)), 0);
          handles.push({ h, i });
          replaced++;
        } else if (k < 0.88) {
          // Rename-over, as an atomic file replacement does.
          const i = r.int(files.length);
          const tmp = `${files[i]}.tmp`;
          await writeFile(tmp, r.bytes(1 + r.int(300 * KiB)));
          await rename(tmp, files[i]);
          handles.push({ h: await open(files[i]), i });
          replaced++;
        } else {
          const v = r.int(files.length);
          expect(firstDiff(await readView(views[v]), expected[v]), `${files[v]} after op ${op}`).toBe(-1);
        }
      }
      await expectInstant(snap, files, expected);
      // The live files did change (the test would prove nothing otherwise).
      for (let i = 0; i < files.length; i++) expect((await readFile(files[i])).equals(expected[i])).toBe(false);
      console.log(`${name}: ${OPS} ops (${replaced} deletes/renames), stats ${JSON.stringify(snap.stats())}`);
      await snap.release();
      expect(await readdir(root)).toEqual([]);
      expect(fileWriteInterceptors.size).toBe(0);
    });

    it('two snapshots living at once each see their own instant', async () => {
      const r = rng(SEED + 1);
      const files = await makeFiles(filesDir, 3, r);
      const handles = await Promise.all(files.map((f) => open(f)));
      const provider = makeProvider();
      const a = await take(provider, files);
      const atA = await Promise.all(files.map((f) => readFile(f)));
      await scribble(handles, r, 40);
      const b = await take(provider, files);
      const atB = await Promise.all(files.map((f) => readFile(f)));
      expect(a.id).not.toBe(b.id);
      await scribble(handles, r, 40);
      await expectInstant(a, files, atA);
      await expectInstant(b, files, atB);
      expect((await readdir(root)).length).toBe(2);
      await a.release();
      expect(await codeOf(a.openFile(files[0]))).toBe('CLOSED');
      await scribble(handles, r, 40);
      await expectInstant(b, files, atB);
      await b.release();
      expect(await readdir(root)).toEqual([]);
    });

    it('views say where the file held data at the instant: what they call a hole reads zeros, whatever the writes since', async () => {
      const r = rng(SEED + 7);
      // Sparse files: a seeded half of 64 KiB pieces written, the rest holes of the file system.
      const files: string[] = [];
      const expected: Buffer[] = [];
      await mkdir(filesDir, { recursive: true });
      for (let i = 0; i < 2; i++) {
        const f = path.join(filesDir, `sparse-${i}.img`);
        const h = await open(f, 'wx');
        const size = 32 * 64 * KiB + r.int(64 * KiB);
        const content = Buffer.alloc(size);
        await h.truncate(size);
        for (let at = 0; at < size; at += 64 * KiB) {
          if (r.next() < 0.5) continue;
          const piece = r.bytes(Math.min(64 * KiB, size - at));
          await h.write(piece, at);
          piece.copy(content, at);
        }
        files.push(f);
        expected.push(content);
      }
      const handles = await Promise.all(files.map((f) => open(f)));
      const snap = await take(makeProvider(), files);
      // Writes into holes and over data after the instant must not change the answer's truth.
      for (let k = 0; k < 12; k++) {
        const h = r.pick(handles);
        await h.write(r.bytes(1 + r.int(8 * KiB)), r.int(h.size()));
      }
      for (let i = 0; i < files.length; i++) {
        const view = await snap.openFile(files[i]);
        try {
          const data = view.dataExtents?.(0, view.size());
          if (data === undefined) continue; // this file system (or a build without the addon) cannot tell
          let at = 0;
          let holeBytes = 0;
          for (const d of [...data, { offset: view.size(), length: 0 }]) {
            expect(d.offset).toBeGreaterThanOrEqual(at);
            await expectRange(view, expected[i], at, d.offset - at); // the hole before d
            if (d.offset > at) expect(expected[i].subarray(at, d.offset).every((b) => b === 0)).toBe(true);
            holeBytes += d.offset - at;
            at = d.offset + d.length;
          }
          if (process.env.TIDEMARK_NO_SEEK_DATA !== '1') expect(holeBytes).toBeGreaterThan(0);
        } finally {
          await view.close();
        }
      }
      await expectInstant(snap, files, expected);
    });

    it('views are read-only and sized as at the instant; after release they and openFile fail with CLOSED', async () => {
      const r = rng(SEED + 2);
      const files = await makeFiles(filesDir, 2, r);
      const provider = makeProvider();
      const before = Date.now();
      const snap = await take(provider, files);
      expect(snap.provider).toBe(provider.name);
      expect(snap.createdAt.getTime()).toBeGreaterThanOrEqual(before - 1000);
      const expected = await readFile(files[0]);
      const view = await snap.openFile(files[0]);
      expect(view.writable).toBe(false);
      expect(await codeOf(view.write(Buffer.alloc(1), 0))).toBe('READ_ONLY');
      expect(await codeOf(view.truncate(0))).toBe('READ_ONLY');
      expect(await codeOf(snap.openFile(path.join(filesDir, 'not-in-the-set')))).toBe('NOT_FOUND');
      // The live file grows; the view keeps its size, and reads past it are zeros.
      const h = await open(files[0]);
      await h.write(r.bytes(300 * KiB), expected.length - 100);
      expect(view.size()).toBe(expected.length);
      await expectRange(view, expected, expected.length - 1000, 50 * KiB);
      // A second view of the same file, and a relative path to it.
      const again = await snap.openFile(path.relative(process.cwd(), files[0]));
      expect(firstDiff(await readView(again), expected)).toBe(-1);
      await again.close();
      expect(await codeOf(again.read(Buffer.alloc(1), 0))).toBe('CLOSED');

      await snap.release();
      expect(await readdir(root)).toEqual([]);
      expect(await codeOf(snap.openFile(files[0]))).toBe('CLOSED');
      expect(await codeOf(view.read(Buffer.alloc(16), 0))).toBe('CLOSED');
      await snap.release(); // twice is fine
      await view.close();
    });

    it('abort leaves nothing behind; commit and abort refuse the wrong state', async () => {
      const files = await makeFiles(filesDir, 2, rng(SEED + 3));
      const provider = makeProvider();
      const p = await provider.prepare(files, { diffAreaRoot: root });
      expect((await readdir(root)).length).toBe(1);
      await p.abort();
      expect(await readdir(root)).toEqual([]);
      expect(await codeOf(p.commit())).toBe('CLOSED');
      await p.abort(); // twice is fine

      const q = await provider.prepare(files, { diffAreaRoot: root });
      const snap = await q.commit();
      expect(await codeOf(q.commit())).toBe('CLOSED');
      expect(await codeOf(q.abort())).toBe('CONFLICT');
      await snap.release();
      expect(await readdir(root)).toEqual([]);
      expect(fileWriteInterceptors.size).toBe(0);
    });

    it('bad sets are refused with typed errors and leave nothing behind', async () => {
      const files = await makeFiles(filesDir, 2, rng(SEED + 4));
      const provider = makeProvider();
      const o = { diffAreaRoot: root };
      expect(await codeOf(provider.prepare([], o))).toBe('INVALID_ARGUMENT');
      expect(await codeOf(provider.prepare([files[0], files[0]], o))).toBe('INVALID_ARGUMENT');
      expect(await codeOf(provider.prepare([files[0], path.join(filesDir, 'missing')], o))).toBe('NOT_FOUND');
      expect(await codeOf(provider.prepare([filesDir], o))).toBe('INVALID_ARGUMENT');
      expect(await codeOf(provider.prepare(files, { diffAreaRoot: '' }))).toBe('INVALID_ARGUMENT');
      expect(await provider.supports([path.join(filesDir, 'missing')], o)).toMatch(/missing/);
      expect(await provider.supports([filesDir], o)).toMatch(/not a regular file/);
      // A file deleted between prepare and commit.
      const p = await provider.prepare(files, o);
      await unlink(files[1]);
      expect(await codeOf(p.commit())).toBe('NOT_FOUND');
      expect(await readdir(root).catch(() => [])).toEqual([]);
      expect(fileWriteInterceptors.size).toBe(0);
    });

    it('a file renamed over between prepare and commit is snapshotted as it is at commit', async () => {
      const r = rng(SEED + 5);
      const files = await makeFiles(filesDir, 2, r);
      const provider = makeProvider();
      const p = await provider.prepare(files, { diffAreaRoot: root });
      await writeFile(`${files[0]}.new`, r.bytes(200 * KiB));
      await rename(`${files[0]}.new`, files[0]);
      const snap = await p.commit();
      const expected = await Promise.all(files.map((f) => readFile(f)));
      const handles = await Promise.all(files.map((f) => open(f)));
      await scribble(handles, r, 30);
      await expectInstant(snap, files, expected);
      await snap.release();
    });

    it('recover() spares live snapshots and removes what a killed process left', async () => {
      const r = rng(SEED + 6);
      const provider = makeProvider();
      const o = { diffAreaRoot: root };
      expect(await provider.recover({ diffAreaRoot: path.join(dir, 'no-such-root') })).toBe(0);
      const files = await makeFiles(path.join(filesDir, 'here'), 2, r);
      const live = await take(provider, files);
      const expected = await Promise.all(files.map((f) => readFile(f)));
      const handles = await Promise.all(files.map((f) => open(f)));
      await scribble(handles, r, 20);
      expect(await provider.recover(o)).toBe(0);
      const liveAreas = await readdir(root);
      expect(liveAreas.length).toBe(1);

      if (opts.processes !== false) {
        // Another process holds a snapshot of its own files: alive, its area stays; killed, it goes.
        const seed = SEED + 7;
        const maxSize = 512 * KiB;
        const theirs = path.join(filesDir, 'theirs');
        await mkdir(theirs);
        const their = await Promise.all(
          [0, 1, 2].map(async (i) => {
            const f = path.join(theirs, `vm-${i}.img`);
            await writeFile(f, initialContent(seed, i, 256 * KiB + i * 1000));
            return f;
          }),
        );
        const ops = 30;
        const w = startWorker({ provider: provider.name, files: their, root, seed, ops, maxSize, hold: true });
        try {
          await w.waitFor('DONE');
          expect((await readdir(root)).length).toBe(2);
          expect(await provider.recover(o)).toBe(0);
          expect((await readdir(root)).length).toBe(2);
        } finally {
          await w.kill();
        }
        expect(await provider.recover(o)).toBe(1);
        expect(await readdir(root)).toEqual(liveAreas);
        // Recovery never touches the live files: they hold what the process wrote.
        let want = [0, 1, 2].map((i) => initialContent(seed, i, 256 * KiB + i * 1000));
        for (let i = 0; i < ops; i++) want = applyOp(want, planOp(seed, i, 3, maxSize));
        for (let i = 0; i < 3; i++) expect(firstDiff(await readFile(their[i]), want[i])).toBe(-1);
      }

      await expectInstant(live, files, expected);
      await live.release();
      expect(await provider.recover(o)).toBe(0);
      expect(await readdir(root)).toEqual([]);
      // Something that is not a snapshot area is never removed.
      await mkdir(path.join(root, `${provider.name}-keep-me`));
      await writeFile(path.join(root, 'notes.txt'), randomBytes(10));
      expect(await provider.recover(o)).toBe(0);
      expect((await readdir(root)).sort()).toEqual([`${provider.name}-keep-me`, 'notes.txt'].sort());
    });
  });
}
