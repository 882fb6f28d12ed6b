/**
 * Invariant 1, the change tracker's half: a change query never misses a change. Seeded random unaligned
 * writes, write-zeroes, trims and flushes interleaved with seals, on a tracked dynamic VHDX, then through a
 * differencing child (tracking follows the chain head), across a clean close and reopen and across a
 * tracked merge. At every seal j, for every earlier sealed id i: every byte that differs between the
 * content at i and at j lies inside changes(i), and the answer is exact to what was written (bytes
 * reported / bytes of the granules any operation touched since i = 1.0).
 *
 * Long runs: TIDEMARK_RCT_OPS (operations per run), TIDEMARK_RCT_SEED.
 */
import { mkdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { mergeWithTracking } from '../../src/tracking/merge.js';
import {
  ChangeTracker,
  DEFAULT_GRANULARITY,
  type ChangeRange,
  type ChangesResult,
} from '../../src/tracking/tracker.js';
import { tempDir } from '../helpers/peers.js';
import { firstUncoveredDifference, granuleRanges, PagedImage, prng, rangeShapeProblem, totalBytes } from './model.js';

const MiB = 2 ** 20;
const KiB = 1024;
const SIZE = 64 * MiB;
const BASE_BLOCK = MiB;
const CHILD_BLOCK = 2 * MiB;
const OPS = Number(process.env.TIDEMARK_RCT_OPS ?? 2000);
/** Long runs (TIDEMARK_RCT_OPS) get time in proportion (the pair checks grow faster than the operations). */
const LONG_RUN_TIMEOUT = Math.max(120_000, OPS * 100);
const SEED = Number(process.env.TIDEMARK_RCT_SEED ?? 0x5eed1);
console.log(`never-miss seed ${SEED}, ${OPS} operations per run (TIDEMARK_RCT_SEED, TIDEMARK_RCT_OPS)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('never-miss')));
afterAll(async () => cleanup?.());

interface Sealed {
  id: string;
  content: Buffer[];
  /** Index into the tracked-operation generations: ops after this seal carry a higher generation. */
  gen: number;
}

interface Stats {
  ops: number;
  seals: number;
  pairs: number;
  pagedQueries: number;
  windowQueries: number;
  reportedBytes: number;
  changedBytes: number;
  maxPairRatio: number;
  minPairRatio: number;
}

class Run {
  readonly r: ReturnType<typeof prng>;
  readonly model: PagedImage;
  readonly granules: number;
  /** Per granule, the generation of the last operation that touched it (-1: none since enable). */
  readonly touchGen: Int32Array;
  gen = 0;
  sealed: Sealed[] = [];
  failures: string[] = [];
  stats: Stats = {
    ops: 0,
    seals: 0,
    pairs: 0,
    pagedQueries: 0,
    windowQueries: 0,
    reportedBytes: 0,
    changedBytes: 0,
    maxPairRatio: 0,
    minPairRatio: Infinity,
  };
  disk!: VhdxFile;
  tracker!: ChangeTracker;

  constructor(
    readonly granularity: number,
    seed: number,
  ) {
    this.r = prng(seed);
    this.model = new PagedImage(SIZE);
    this.granules = Math.ceil(SIZE / granularity);
    this.touchGen = new Int32Array(this.granules).fill(-1);
  }

  fail(msg: string): void {
    if (this.failures.length < 20) this.failures.push(msg);
  }

  private touch(offset: number, length: number): void {
    const g = this.granularity;
    for (let x = Math.floor(offset / g); x <= Math.floor((offset + length - 1) / g); x++) this.touchGen[x] = this.gen;
  }

  /** An unaligned range: small, medium or large; often straddling a block or granule boundary. */
  private pickRange(): { offset: number; length: number } {
    const r = this.r;
    const roll = r.next();
    const len = 1 + (roll < 0.72 ? r.int(16 * KiB) : roll < 0.95 ? r.int(256 * KiB) : r.int(3 * MiB));
    const where = r.next();
    let near: number;
    if (where < 0.35) near = r.int(SIZE / BASE_BLOCK + 1) * BASE_BLOCK - r.int(Math.min(len, 8 * KiB) + 1);
    else if (where < 0.55) near = r.int(this.granules + 1) * this.granularity - r.int(Math.min(len, 8 * KiB) + 1);
    else near = r.int(SIZE);
    const offset = Math.max(0, Math.min(SIZE - 1, near));
    return { offset, length: Math.min(len, SIZE - offset) };
  }

  /** One random operation through the disk (tracked when `tracked`), mirrored in the model. */
  async step(tracked = true): Promise<void> {
    const r = this.r;
    const kind = r.next();
    const { offset, length } = this.pickRange();
    if (kind < 0.7) {
      const k = r.next();
      // Mostly random bytes; some all-zero writes, some rewrites of what is already there.
      const data = k < 0.85 ? r.bytes(length) : k < 0.93 ? Buffer.alloc(length) : this.model.read(offset, length);
      await this.disk.write(data, offset);
      this.model.write(offset, data);
    } else if (kind < 0.8) {
      await this.disk.writeZeroes(offset, length);
      this.model.zero(offset, length);
    } else if (kind < 0.95) {
      await this.disk.trim(offset, length);
      this.model.zero(offset, length);
    } else {
      await this.disk.flush();
      return;
    }
    if (tracked) this.touch(offset, length);
    this.stats.ops++;
  }

  async seal(): Promise<void> {
    const id = await this.tracker.seal();
    if (this.sealed.some((s) => s.id === id)) this.fail(`seal returned ${id} twice`);
    this.sealed.push({ id, content: this.model.snapshot(), gen: this.gen });
    this.gen++;
    this.stats.seals++;
    await this.checkAllPairs(`seal ${this.sealed.length}`);
  }

  /** The whole answer for `id`, in one query. */
  private async fullQuery(id: string): Promise<ChangesResult> {
    return this.tracker.changes(id);
  }

  /** Pages through [offset, offset+length) with a small maxRanges, as a backup application loops. */
  private async pagedQuery(id: string, offset: number, length: number, maxRanges: number): Promise<ChangeRange[]> {
    const out: ChangeRange[] = [];
    let processed = 0;
    for (let guard = 0; processed < length; guard++) {
      if (guard > 1_000_000) throw new Error('paging does not progress');
      const page = await this.tracker.changes(id, offset + processed, length - processed, maxRanges);
      if (page.ranges.length > maxRanges) this.fail(`${id}: ${page.ranges.length} ranges for maxRanges ${maxRanges}`);
      if (page.totalBytes !== totalBytes(page.ranges)) this.fail(`${id}: totalBytes disagrees with its ranges`);
      if (page.processedLength <= 0 || page.processedLength > length - processed)
        this.fail(`${id}: processedLength ${page.processedLength} of ${length - processed}`);
      for (const x of page.ranges) {
        if (x.offset + x.length > offset + processed + page.processedLength)
          this.fail(`${id}: a range ends past the processed length`);
      }
      out.push(...page.ranges);
      processed += Math.max(page.processedLength, 1);
    }
    return out;
  }

  /** At the current state (the last seal, or now when nothing was written since): check every sealed id. */
  async checkAllPairs(where: string): Promise<void> {
    const now = this.model.snapshot();
    const g = this.granularity;
    for (let i = 0; i < this.sealed.length; i++) {
      const s = this.sealed[i];
      let answer: ChangesResult;
      try {
        answer = await this.fullQuery(s.id);
      } catch (err) {
        this.fail(`${where}: changes(${s.id}) threw ${(err as TidemarkError).code ?? ''} ${(err as Error).message}`);
        continue;
      }
      this.stats.pairs++;
      const shape = rangeShapeProblem(answer.ranges, g, 0, SIZE, SIZE);
      if (shape) this.fail(`${where}: changes(${s.id}): ${shape}`);
      if (answer.processedLength !== SIZE) this.fail(`${where}: processedLength ${answer.processedLength}`);
      if (answer.totalBytes !== totalBytes(answer.ranges)) this.fail(`${where}: totalBytes disagrees`);
      const missed = firstUncoveredDifference(s.content, now, answer.ranges);
      if (missed !== undefined) {
        this.fail(
          `${where}: MISS: byte ${missed} differs between id ${i + 1} (${s.id}) and now but is not in changes()`,
        );
      }
      // Exactness: the granules any operation touched since the seal.
      const expected = granuleRanges(this.granules, g, SIZE, (x) => this.touchGen[x] > s.gen);
      const changed = totalBytes(expected);
      this.stats.reportedBytes += answer.totalBytes;
      this.stats.changedBytes += changed;
      const ratio = changed === 0 ? (answer.totalBytes === 0 ? 1 : Infinity) : answer.totalBytes / changed;
      this.stats.maxPairRatio = Math.max(this.stats.maxPairRatio, ratio);
      this.stats.minPairRatio = Math.min(this.stats.minPairRatio, ratio);
      if (ratio !== 1)
        this.fail(`${where}: changes(id ${i + 1}) reports ${answer.totalBytes} bytes, ${changed} were touched`);

      // Sometimes: the same answer paged with a small maxRanges, and over an unaligned window.
      if (this.r.next() < 0.08) {
        this.stats.pagedQueries++;
        const paged = await this.pagedQuery(s.id, 0, SIZE, 1 + this.r.int(4));
        if (JSON.stringify(paged) !== JSON.stringify(answer.ranges))
          this.fail(`${where}: paged answer for id ${i + 1} differs from the whole answer`);
      }
      if (this.r.next() < 0.08) {
        this.stats.windowQueries++;
        const off = this.r.int(SIZE);
        const len = this.r.int(SIZE - off + 1);
        const paged = this.r.next() < 0.5;
        const got = paged
          ? await this.pagedQuery(s.id, off, len, 1 + this.r.int(3))
          : (await this.tracker.changes(s.id, off, len)).ranges;
        const want = clip(answer.ranges, off, len);
        if (JSON.stringify(got) !== JSON.stringify(want))
          this.fail(`${where}: window [${off}, +${len}) for id ${i + 1}: ${JSON.stringify(got).slice(0, 200)}`);
        const wshape = rangeShapeProblem(got, g, off, len, SIZE);
        if (wshape) this.fail(`${where}: window answer: ${wshape}`);
      }
    }
  }

  async verifyContent(where: string): Promise<void> {
    const got = await this.disk.readAt(0, SIZE);
    const want = this.model.toBuffer();
    if (!got.equals(want)) {
      let i = 0;
      while (got[i] === want[i]) i++;
      this.fail(`${where}: the disk reads differently from the model at byte ${i}`);
    }
  }

  async open(file: string, writable = true): Promise<void> {
    this.disk = await VhdxFile.open(file, { writable });
    const t = await ChangeTracker.attach(this.disk, { writable });
    if (!t) throw new Error(`${file}: no tracking`);
    this.tracker = t;
    const st = t.status();
    if (st.state !== 'valid') this.fail(`${file}: tracking ${st.state} at open: ${st.reason}`);
    const last = this.sealed.at(-1)?.id ?? null;
    if (st.lastId !== last) this.fail(`${file}: status.lastId ${st.lastId}, expected ${last}`);
  }
}

function clip(ranges: ChangeRange[], offset: number, length: number): ChangeRange[] {
  const out: ChangeRange[] = [];
  for (const r of ranges) {
    const from = Math.max(offset, r.offset);
    const to = Math.min(offset + length, r.offset + r.length);
    if (to > from) out.push({ offset: from, length: to - from });
  }
  return out;
}

async function runProperty(granularity: number, seed: number): Promise<Run> {
  const run = new Run(granularity, seed);
  const sub = path.join(dir, `g${granularity}`);
  await rm(sub, { recursive: true, force: true });
  await mkdir(sub, { recursive: true });
  const base = path.join(sub, 'base.vhdx');
  const child = path.join(sub, 'base-ckpt.avhdx');
  await createVhdx(base, { size: SIZE, blockSize: BASE_BLOCK });

  // Content written before tracking starts is the starting point, not a change.
  run.disk = await VhdxFile.open(base, { writable: true });
  for (let i = 0; i < 40; i++) await run.step(false);
  await run.disk.close();
  run.disk = await VhdxFile.open(base);
  await ChangeTracker.enable(run.disk, granularity);
  await run.disk.close();

  const phase = async (count: number) => {
    for (let i = 0; i < count; i++) {
      if (run.r.next() < 0.03) await run.seal();
      await run.step();
    }
  };
  const n = (f: number) => Math.round(OPS * f);

  // A: the base, tracked.
  await run.open(base);
  await run.seal();
  await phase(n(0.3));
  await run.seal();

  // A clean close and reopen: every id survives and answers the same.
  await run.disk.close();
  await run.open(base);
  await run.verifyContent('after reopen');
  await run.checkAllPairs('after reopen');

  // B: more on the base, then a checkpoint: a differencing child over the tracked base.
  await phase(n(0.2));
  await run.seal();
  await run.disk.close();
  await createVhdx(child, { parent: base, blockSize: CHILD_BLOCK });
  await run.open(child);
  if (run.disk.chain().length !== 2) run.fail('the child did not open over its parent');
  await run.checkAllPairs('child opened');

  // C: writes through the child; tracking follows the chain head.
  await phase(n(0.25));
  await run.seal();
  await run.verifyContent('child');
  await run.disk.close();

  // A tracked merge moves data between files and changes nothing the guest reads: it adds no changes.
  await mergeWithTracking(child);
  await run.open(base);
  if (run.disk.chain().length !== 1) run.fail('after the merge the base still has a parent');
  await run.verifyContent('after merge');
  await run.checkAllPairs('after merge');

  // D: the merged base, tracked again.
  await phase(n(0.25));
  await run.seal();
  await run.verifyContent('end');
  await run.disk.close();

  // A read-only look at the end gives the same answers.
  await run.open(base, false);
  await run.checkAllPairs('read-only reopen');
  await run.disk.close();
  return run;
}

describe('change tracking never misses a change (property)', () => {
  for (const granularity of [4096, DEFAULT_GRANULARITY]) {
    it(
      `granularity ${granularity / KiB} KiB: ${OPS} seeded operations with seals, a child, a reopen and a merge`,
      { timeout: LONG_RUN_TIMEOUT },
      async () => {
        const seed = (SEED + granularity) >>> 0;
        const t0 = performance.now();
        const run = await runProperty(granularity, seed);
        const s = run.stats;
        const ratio = s.changedBytes === 0 ? 1 : s.reportedBytes / s.changedBytes;
        console.log(
          `never-miss g=${granularity / KiB}K (TIDEMARK_RCT_SEED=${SEED}, run seed ${seed}): ${s.ops} ops, ${s.seals} seals, ${s.pairs} (id, later state) pairs ` +
            `(${s.pagedQueries} paged, ${s.windowQueries} windows), over-report ${ratio.toFixed(4)} ` +
            `(reported ${s.reportedBytes} / touched ${s.changedBytes} bytes, per pair ${s.minPairRatio}..${s.maxPairRatio}), ` +
            `${((performance.now() - t0) / 1000).toFixed(1)} s`,
        );
        expect(run.failures, `seed ${seed}`).toEqual([]);
        expect(s.seals).toBeGreaterThan(10);
        expect(ratio).toBe(1);
      },
    );
  }
});
