/**
 * The cow provider: the conformance suite (default 64 KiB extents, and 4 KiB extents so that writes span
 * many extents), then what is particular to copy-on-write: the diff area grows with the extents
 * overwritten and nothing else, each extent is copied once however many writes race for it, the hook
 * covers every handle and both names of a hard-linked file, a diff area over its limit discards the
 * snapshot instead of failing the host's writes, and without a snapshot the file layer is untouched.
 */
import { link, readFile, readdir, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CowProvider } from '../../src/snapshot/cow.js';
import { NodeFile, fileWriteInterceptors } from '../../src/util/file.js';
import { tempDir } from '../helpers/peers.js';
import { rng } from '../helpers/random.js';
import { SEED, codeOf, expectInstant, firstDiff, providerConformance, readView } from './conformance.js';

const KiB = 1024;
const MiB = 1024 * KiB;

providerConformance(
  'cow',
  () => new CowProvider(),
  () => tempDir('snap-cow'),
);
providerConformance(
  'cow (4 KiB extents)',
  () => new CowProvider({ extentSize: 4 * KiB }),
  () => tempDir('snap-cow4k'),
  { processes: false },
);

describe(`cow provider (seed ${SEED})`, () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let root: string;
  const opened: { close(): Promise<void> }[] = [];
  const open = async (f: string, mode: 'r+' | 'w' = 'r+') => {
    const h = await NodeFile.open(f, mode);
    opened.push(h);
    return h;
  };
  /** prepare + commit; a snapshot a failed test leaves alive is released after it. */
  const take = async (provider: CowProvider, files: string[]) => {
    const snap = await (await provider.prepare(files, { diffAreaRoot: root })).commit();
    opened.push({ close: () => snap.release() });
    return snap;
  };

  beforeEach(async () => {
    ({ dir, cleanup } = await tempDir('snap-cowx'));
    root = path.join(dir, 'areas');
  });
  afterEach(async () => {
    for (const h of opened.splice(0).reverse()) await h.close().catch(() => undefined);
    await cleanup();
  });

  /** Bytes the diff area takes on disk (data files). */
  async function areaDataBytes(): Promise<{ size: number; allocated: number }> {
    let size = 0;
    let allocated = 0;
    for (const a of await readdir(root)) {
      for (const f of await readdir(path.join(root, a))) {
        if (!f.endsWith('.data')) continue;
        const st = await stat(path.join(root, a, f));
        size += st.size;
        allocated += st.blocks * 512;
      }
    }
    return { size, allocated };
  }

  it('the diff area grows with the extents overwritten, once per extent; appends cost nothing', async () => {
    const r = rng(SEED + 10);
    const E = 64 * KiB;
    const file = path.join(dir, 'disk.img');
    const content = r.bytes(16 * MiB);
    await writeFile(file, content);
    const h = await open(file);
    const provider = new CowProvider({ extentSize: E });
    const snap = await take(provider, [file]);
    expect(snap.stats()).toEqual({ diffAreaBytes: 0, preservedExtents: 0 });

    const touched = new Set<number>();
    let written = 0;
    for (let i = 0; i < 300; i++) {
      const len = 1 + r.int(8 * KiB);
      const off = r.int(content.length - len);
      await h.write(r.bytes(len), off);
      written += len;
      for (let e = Math.floor(off / E); e <= Math.floor((off + len - 1) / E); e++) touched.add(e);
    }
    expect(snap.stats()).toEqual({ diffAreaBytes: touched.size * E, preservedExtents: touched.size });
    const disk = await areaDataBytes();
    expect(disk.size).toBe(touched.size * E);
    expect(disk.allocated).toBeLessThanOrEqual(touched.size * E + 64 * KiB);

    // Overwriting the same extents again, and appending past the size at the instant: no growth.
    const before = snap.stats();
    for (const e of [...touched].slice(0, 50)) await h.write(r.bytes(100), e * E + r.int(E - 100));
    for (let i = 0; i < 20; i++) await h.write(r.bytes(256 * KiB), h.size());
    expect(snap.stats()).toEqual(before);
    console.log(
      `cow cost: ${written} bytes in 300 small writes over a 16 MiB file -> ${touched.size} extents, ` +
        `diff area ${before.diffAreaBytes} bytes (${(before.diffAreaBytes / content.length).toFixed(3)} of the file)`,
    );
    await expectInstant(snap, [file], [content]);
    await snap.release();
    expect(await readdir(root)).toEqual([]);
  });

  it('a truncate preserves what it cuts off; a file opened with "w" is preserved before it is emptied', async () => {
    const r = rng(SEED + 11);
    const E = 64 * KiB;
    const a = path.join(dir, 'a.img');
    const b = path.join(dir, 'b.img');
    const ca = r.bytes(10 * E + 123);
    const cb = r.bytes(3 * E);
    await writeFile(a, ca);
    await writeFile(b, cb);
    const h = await open(a);
    const snap = await take(new CowProvider(), [a, b]);
    await h.truncate(4 * E + 5); // extents 4..10 (the last one partial) go to the diff area
    expect(snap.stats()).toEqual({ diffAreaBytes: 6 * E + 123, preservedExtents: 7 });
    await h.truncate(20 * E); // growing again changes no byte of the instant
    expect(snap.stats().preservedExtents).toBe(7);
    const w = await open(b, 'w'); // "w" truncates through the hooked path
    expect(w.size()).toBe(0);
    expect((await stat(b)).size).toBe(0);
    await expectInstant(snap, [a, b], [ca, cb]);
    await snap.release();
  });

  it(`races: concurrent writes to the same extents copy each once, and views read the instant meanwhile`, async () => {
    const r = rng(SEED + 12);
    const E = 64 * KiB;
    const file = path.join(dir, 'disk.img');
    const content = r.bytes(4 * MiB);
    await writeFile(file, content);
    const handles = [await open(file), await open(file), await open(file)];
    const snap = await take(new CowProvider({ extentSize: E }), [file]);
    const view = await snap.openFile(file);
    const touched = new Set<number>();
    for (let round = 0; round < 20; round++) {
      const tasks: Promise<unknown>[] = [];
      const hot = r.int(content.length / E - 2); // a few extents every write of the round aims at
      for (let i = 0; i < 12; i++) {
        const len = 1 + r.int(E);
        const off = hot * E + r.int(2 * E);
        for (let e = Math.floor(off / E); e <= Math.floor((off + len - 1) / E); e++) touched.add(e);
        tasks.push(r.pick(handles).write(r.bytes(len), off));
        const roff = Math.max(0, hot * E - r.int(E));
        const want = content.subarray(roff, roff + 3 * E);
        tasks.push(
          (async () => {
            const got = Buffer.alloc(want.length);
            await view.read(got, roff);
            expect(firstDiff(got, want), `round ${round}: view read at ${roff}`).toBe(-1);
          })(),
        );
      }
      await Promise.all(tasks);
    }
    expect(snap.stats().preservedExtents).toBe(touched.size);
    expect((await areaDataBytes()).size).toBe(touched.size * E);
    expect(firstDiff(await readView(view), content)).toBe(-1);
    await snap.release();
  });

  it('a long view read racing writes into the range it is reading still reads the instant', async () => {
    // The read of 32 MiB is one pread taking milliseconds; writes issued just after it, near its end,
    // are preserved and land before the read gets there. The view must notice and use the diff area.
    const r = rng(SEED + 16);
    const E = 64 * KiB;
    const file = path.join(dir, 'disk.img');
    const content = r.bytes(32 * MiB);
    await writeFile(file, content);
    const h = await open(file);
    const snap = await take(new CowProvider({ extentSize: E }), [file]);
    const view = await snap.openFile(file);
    for (let round = 0; round < 4; round++) {
      const got = Buffer.alloc(content.length);
      const reading = view.read(got, 0);
      const writes = Array.from({ length: 8 }, () => {
        const off = content.length - 1 - r.int(8 * MiB);
        return h.write(Buffer.alloc(1, 0xff ^ content[off]), off); // always a different byte
      });
      await Promise.all([reading, ...writes]);
      expect(firstDiff(got, content), `round ${round}`).toBe(-1);
    }
    await snap.release();
  });

  it('two names of one file (a hard link) share one preservation', async () => {
    const r = rng(SEED + 13);
    const a = path.join(dir, 'a.img');
    const b = path.join(dir, 'b.img');
    const content = r.bytes(1 * MiB);
    await writeFile(a, content);
    await link(a, b);
    const snap = await take(new CowProvider(), [a, b]);
    const hb = await open(b);
    await hb.write(r.bytes(100), 70 * KiB);
    expect(snap.stats().preservedExtents).toBe(1);
    await expectInstant(snap, [a, b], [content, content]);
    await snap.release();
  });

  it('a diff area over its limit discards the snapshot; the live writes still happen', async () => {
    const r = rng(SEED + 14);
    const E = 64 * KiB;
    const file = path.join(dir, 'disk.img');
    await writeFile(file, r.bytes(1 * MiB));
    const h = await open(file);
    const provider = new CowProvider({ extentSize: E, maxDiffAreaBytes: 2 * E });
    const snap = await take(provider, [file]);
    const view = await snap.openFile(file);
    const writes = [0, 3, 7].map((e) => ({ off: e * E + 10, data: r.bytes(1000) }));
    for (const w of writes) await h.write(w.data, w.off);
    const live = await readFile(file);
    for (const w of writes) expect(live.subarray(w.off, w.off + 1000).equals(w.data)).toBe(true);
    expect(await codeOf(view.read(Buffer.alloc(10), 0))).toBe('LIMIT_EXCEEDED');
    expect(await codeOf(snap.openFile(file))).toBe('LIMIT_EXCEEDED');
    expect(fileWriteInterceptors.size).toBe(0); // writes no longer wait for it
    await snap.release();
    expect(await readdir(root)).toEqual([]);
  });

  it('without a snapshot the file layer has no interceptor; measures write cost with and without one', async () => {
    const r = rng(SEED + 15);
    const file = path.join(dir, 'disk.img');
    await writeFile(file, r.bytes(32 * MiB));
    const h = await open(file);
    const blocks = Array.from({ length: 2000 }, () => ({ off: r.int(32 * MiB - 4096), data: r.bytes(4096) }));
    const timed = async () => {
      const t0 = performance.now();
      for (const b of blocks) await h.write(b.data, b.off);
      return performance.now() - t0;
    };
    expect(fileWriteInterceptors.size).toBe(0);
    await timed(); // warm up
    const plain = await timed();
    const snap = await take(new CowProvider(), [file]);
    expect(fileWriteInterceptors.size).toBe(1);
    const first = await timed(); // preserves up to 512 extents
    const again = await timed(); // everything already preserved
    await snap.release();
    expect(fileWriteInterceptors.size).toBe(0);
    console.log(
      `cow write cost (2000 random 4 KiB writes, ${os.cpus().length} cpus): no snapshot ${plain.toFixed(0)} ms, ` +
        `first pass with snapshot ${(first / plain).toFixed(2)}x, second pass ${(again / plain).toFixed(2)}x`,
    );
  });

  it('refuses bad options', () => {
    expect(() => new CowProvider({ extentSize: 3000 })).toThrow(/power of two/);
    expect(() => new CowProvider({ extentSize: 16 * MiB })).toThrow(/power of two/);
    expect(() => new CowProvider({ maxDiffAreaBytes: -1 })).toThrow(/byte count/);
  });
});
