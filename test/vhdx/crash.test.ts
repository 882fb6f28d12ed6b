/**
 * Crash safety (invariant 2): a writer process is killed with SIGKILL at seeded random points while it
 * allocates blocks (dynamic disks and differencing children) and while it merges a child into its parent.
 * After each kill the file reopens (log replay), every write covered by a completed flush reads back, no
 * sector holds anything but some write's bytes or its older content, `qemu-img check` is clean where QEMU
 * can read the file, and an interrupted merge leaves a chain that reads the same and can be finished.
 */
import { spawn } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { mergeIntoParent } from '../../src/formats/vhdx/merge.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { missingPeers, qemuImgCheck, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { scribble } from '../helpers/scribble.js';
// @ts-expect-error plain ESM shared with the worker
import { planWrite } from './crash-plan.mjs';

const MiB = 2 ** 20;
const SIZE = 32 * MiB;
const TRIALS = Number(process.env.TIDEMARK_CRASH_TRIALS ?? 240);
const SEED = seedFrom('TIDEMARK_CRASH_SEED', 777);
const WRITES = 400;
const here = path.dirname(fileURLToPath(import.meta.url));
const worker = path.join(here, 'crash-worker.mjs');
console.log(`crash seed ${SEED}, ${TRIALS} trials (TIDEMARK_CRASH_SEED, TIDEMARK_CRASH_TRIALS)`);

let dir: string;
let cleanup: () => Promise<void>;
const expectedBase = Buffer.alloc(SIZE);
const expectedChain = Buffer.alloc(SIZE);

beforeAll(async () => {
  if (!existsSync(path.resolve(here, '../../dist/formats/vhdx/vhdx.js')))
    throw new Error('dist/ is missing: run `npm run build` (npm test does)');
  ({ dir, cleanup } = await tempDir('crash'));
  // Templates: an empty dynamic disk; a base with data; a child over it with data (for writes and merges).
  await createVhdx(`${dir}/empty.vhdx`, { size: SIZE, blockSize: MiB });
  await createVhdx(`${dir}/base.vhdx`, { size: SIZE, blockSize: MiB });
  let d = await VhdxFile.open(`${dir}/base.vhdx`, { writable: true });
  await scribble(d, expectedBase, SEED, 40);
  await d.close();
  await createVhdx(`${dir}/child.avhdx`, { parent: `${dir}/base.vhdx`, blockSize: MiB });
  expectedBase.copy(expectedChain);
  d = await VhdxFile.open(`${dir}/child.avhdx`, { writable: true });
  await scribble(d, expectedChain, SEED + 1, 40);
  await d.close();
});
afterAll(async () => cleanup?.());

interface Outcome {
  flushed: number;
  done: boolean;
}

/** Runs the worker and kills it after `delayMs`, or right after the `afterFlushes`-th flush line. */
function runAndKill(args: string[], delayMs: number, afterFlushes: number | undefined): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [worker, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let flushed = 0;
    let flushes = 0;
    let done = false;
    let stderr = '';
    let buf = '';
    const kill = () => child.kill('SIGKILL');
    const timer = afterFlushes === undefined ? setTimeout(kill, delayMs) : undefined;
    child.stdout.on('data', (d) => {
      buf += d;
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.startsWith('FLUSHED ')) {
          flushed = Number(line.slice(8));
          if (afterFlushes !== undefined && ++flushes === afterFlushes) setTimeout(kill, delayMs);
        } else if (line === 'DONE') done = true;
      }
    });
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      if (code !== 0 && signal !== 'SIGKILL') reject(new Error(`worker failed (${code}): ${stderr}`));
      else resolve({ flushed, done });
    });
  });
}

async function readAll(file: string): Promise<Buffer> {
  const d = await VhdxFile.open(file, { writable: true }); // writable: the log is replayed in place
  try {
    return await d.readAt(0, d.virtualSize);
  } finally {
    await d.close();
  }
}

/** Every sector holds its last flushed value, or the bytes of a write that came after the flush. */
function verifyWrites(
  content: Buffer,
  before: Buffer,
  seed: number,
  flushed: number,
  performedMax: number,
): string | undefined {
  const plans = Array.from(
    { length: performedMax },
    (_, i) => planWrite(seed, i, SIZE) as { offset: number; data: Buffer },
  );
  const sectorOf = (i: number, s: number) => {
    const at = (s - plans[i].offset / 512) * 512;
    return plans[i].data.subarray(at, at + 512);
  };
  const sectors = SIZE / 512;
  const last = new Int32Array(sectors).fill(-1); // index of the last flushed write per sector
  const later = new Map<number, Set<number>>();
  plans.forEach((w, i) => {
    const s0 = w.offset / 512;
    for (let s = s0; s < s0 + w.data.length / 512; s++) {
      if (i < flushed) last[s] = i;
      else {
        if (!later.has(s)) later.set(s, new Set());
        later.get(s)!.add(i);
      }
    }
  });
  for (let s = 0; s < sectors; s++) {
    const got = content.subarray(s * 512, s * 512 + 512);
    const want = last[s] >= 0 ? sectorOf(last[s], s) : before.subarray(s * 512, s * 512 + 512);
    if (got.equals(want)) continue;
    const id = got.readUInt32LE(0) - 1;
    if (later.get(s)?.has(id) && got.equals(sectorOf(id, s))) continue;
    return `sector ${s}: holds neither its flushed value (write ${last[s]}) nor a later write's bytes (first bytes ${got.subarray(0, 8).toString('hex')})`;
  }
  return undefined;
}

async function pool<T>(items: T[], width: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: width }, async () => {
      while (next < items.length) await fn(items[next++]);
    }),
  );
}

const peersMissing = missingPeers('qemu-img');

describe.skipIf(peersMissing)('SIGKILL at seeded random points', () => {
  const writeTrials = Math.ceil((TRIALS * 2) / 3);
  const mergeTrials = TRIALS - writeTrials;

  it(`while allocating blocks: ${writeTrials} trials`, { timeout: 900_000 }, async () => {
    const r = rng(SEED);
    const trials = Array.from({ length: writeTrials }, (_, t) => ({
      t,
      child: t % 3 === 2, // a third of the trials write through a differencing child
      seed: SEED * 1000 + t,
      delay: r.int(250),
      afterFlushes: r.next() < 0.5 ? 1 + r.int(40) : undefined,
    }));
    const failures: string[] = [];
    let survivedFlushes = 0;
    await pool(trials, 2, async (trial) => {
      const tdir = `${dir}/w${trial.t}`;
      mkdirSync(tdir, { recursive: true });
      let file: string;
      let before: Buffer;
      if (trial.child) {
        copyFileSync(`${dir}/base.vhdx`, `${tdir}/base.vhdx`);
        copyFileSync(`${dir}/child.avhdx`, `${tdir}/child.avhdx`);
        file = `${tdir}/child.avhdx`;
        before = expectedChain;
      } else {
        copyFileSync(`${dir}/empty.vhdx`, `${tdir}/disk.vhdx`);
        file = `${tdir}/disk.vhdx`;
        before = Buffer.alloc(SIZE);
      }
      const out = await runAndKill(
        ['write', file, String(trial.seed), String(WRITES)],
        trial.delay,
        trial.afterFlushes,
      );
      survivedFlushes += out.flushed;
      const content = await readAll(file);
      // Writes up to `flushed + 4` may have been issued before the kill (4 writes between flushes).
      const problem = verifyWrites(
        content,
        before,
        trial.seed,
        out.flushed,
        out.done ? WRITES : Math.min(WRITES, out.flushed + 4),
      );
      if (problem) failures.push(`trial ${trial.t} (seed ${trial.seed}, flushed ${out.flushed}): ${problem}`);
      const report = await checkVhdx(file);
      if (!report.ok) failures.push(`trial ${trial.t}: check: ${report.errors.map((e) => e.message).join('; ')}`);
      if (!trial.child) {
        const q = await qemuImgCheck(file);
        if (!q.ok) failures.push(`trial ${trial.t}: qemu-img check: ${q.output}`);
      }
      rmSync(tdir, { recursive: true, force: true });
    });
    console.log(`allocation crash trials: ${writeTrials}, flushed writes verified: ${survivedFlushes}`);
    expect(failures).toEqual([]);
  });

  it(`while merging: ${mergeTrials} trials`, { timeout: 900_000 }, async () => {
    const r = rng(SEED + 1);
    const failures: string[] = [];
    const outcomes = { childLeft: 0, merged: 0 };
    await pool(
      Array.from({ length: mergeTrials }, (_, t) => t),
      2,
      async (t) => {
        const tdir = `${dir}/m${t}`;
        mkdirSync(tdir, { recursive: true });
        copyFileSync(`${dir}/base.vhdx`, `${tdir}/base.vhdx`);
        copyFileSync(`${dir}/child.avhdx`, `${tdir}/child.avhdx`);
        await runAndKill(['merge', `${tdir}/child.avhdx`, '0'], r.int(400), undefined);
        if (existsSync(`${tdir}/child.avhdx`)) {
          outcomes.childLeft++;
          const d = await VhdxFile.open(`${tdir}/child.avhdx`);
          const content = await d.readAt(0, SIZE);
          await d.close();
          if (!content.equals(expectedChain))
            failures.push(`trial ${t}: the interrupted chain reads different content`);
          await mergeIntoParent(`${tdir}/child.avhdx`);
        } else outcomes.merged++;
        const base = await readAll(`${tdir}/base.vhdx`);
        if (!base.equals(expectedChain)) failures.push(`trial ${t}: the merged base reads different content`);
        const q = await qemuImgCheck(`${tdir}/base.vhdx`);
        if (!q.ok) failures.push(`trial ${t}: qemu-img check: ${q.output}`);
        rmSync(tdir, { recursive: true, force: true });
      },
    );
    console.log(
      `merge crash trials: ${mergeTrials}; interrupted ${outcomes.childLeft}, completed before the kill ${outcomes.merged}`,
    );
    expect(failures).toEqual([]);
  });
});
