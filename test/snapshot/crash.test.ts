/**
 * A process holding a cow snapshot is killed with SIGKILL while it rewrites the snapshotted files: the
 * live files hold exactly what the process wrote (the provider only ever reads them: nothing to undo),
 * the diff area is left behind, and recover() in another process removes it.
 *
 * Kills come two ways: the worker kills itself just before an operation reaches the file (after the
 * old content went to the diff area: the window between preservation and the write), or the test kills
 * it a random moment after it reported an operation (anywhere: mid-copy, mid-write).
 *
 * Environment: TIDEMARK_SNAPSHOT_CRASH_TRIALS (default 8), TIDEMARK_SNAPSHOT_SEED.
 */
import { accessSync, constants } from 'node:fs';
import { mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CowProvider } from '../../src/snapshot/cow.js';
import { rng } from '../helpers/random.js';
import { SEED, firstDiff } from './conformance.js';
import { startWorker } from './worker.js';
import { applyOp, initialContent, planOp, type PlannedOp } from './worker-plan.mjs';
import { sleep } from '../helpers/async.js';

const TRIALS = Number(process.env.TIDEMARK_SNAPSHOT_CRASH_TRIALS ?? 8);
const KiB = 1024;
const FILES = 3;
const OPS = 80;
const MAX_SIZE = 1024 * KiB;
const sizeOf = (i: number) => 384 * KiB + i * 77_777;

function scratchRoot(): string {
  try {
    accessSync('/dev/shm', constants.W_OK);
    return '/dev/shm';
  } catch {
    return os.tmpdir();
  }
}

/** Whether `got` is `before` with operation `op` done in part (a write cut short by the kill). */
function partly(got: Buffer, before: Buffer, after: Buffer, op: PlannedOp): boolean {
  if (op.kind === 'truncate') return false;
  const lo = Math.min(before.length, after.length);
  const hi = Math.max(before.length, after.length);
  if (got.length < lo || got.length > hi) return false;
  for (let i = 0; i < got.length; i++) {
    const b = i < before.length ? before[i] : 0;
    const a = i < after.length ? after[i] : 0;
    if (got[i] !== b && got[i] !== a) return false;
  }
  return true;
}

describe(`cow snapshot: a process killed while its snapshot lives (seed ${SEED}, ${TRIALS} trials)`, () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(scratchRoot(), 'tidemark-snapcrash-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  for (let t = 0; t < TRIALS; t++) {
    const self = t % 2 === 0;
    it(`trial ${t}: ${self ? 'kills itself before an operation' : 'killed by the test at a random moment'}`, async () => {
      const r = rng(SEED * 31 + t);
      const seed = (SEED + 1000 * t) >>> 0;
      const trial = path.join(dir, `t${t}`);
      const root = path.join(trial, 'areas');
      const files = Array.from({ length: FILES }, (_, i) => path.join(trial, `vm-${i}.img`));
      await mkdir(trial);
      const states: Buffer[][] = [files.map((_, i) => initialContent(seed, i, sizeOf(i)))];
      await Promise.all(files.map((f, i) => writeFile(f, states[0][i])));
      const ops = Array.from({ length: OPS }, (_, i) => planOp(seed, i, FILES, MAX_SIZE));
      for (const op of ops) states.push(applyOp(states.at(-1)!, op));

      const killAt = self ? r.int(OPS) : undefined;
      // hold: a worker that finished its operations waits for the kill with its snapshot alive.
      const cfg = { provider: 'cow', files, root, seed, ops: OPS, maxSize: MAX_SIZE, killAtOp: killAt, hold: true };
      const w = startWorker(cfg);
      if (!self) {
        await w.waitFor(`OP ${r.int(OPS / 2)}`);
        await sleep(r.int(4));
        await w.kill();
      }
      const exit = await w.exited;
      expect(exit.signal, exit.stderr).toBe('SIGKILL');

      const live = await Promise.all(files.map((f) => readFile(f)));
      let matched: string | undefined;
      if (self) {
        expect(w.crashedAt).toBe(killAt);
        const want = states[killAt!];
        files.forEach((f, i) => expect(firstDiff(live[i], want[i]), `${f} after ${killAt} ops`).toBe(-1));
        matched = `exactly ${killAt} ops`;
      } else {
        // Operations run one at a time: the files hold the first m of them, the next perhaps in part.
        for (let m = w.completed; m <= OPS && !matched; m++) {
          const whole = live.every((b, i) => b.equals(states[m][i]));
          if (whole) matched = `${m} ops`;
          else if (
            m < OPS &&
            live.every((b, i) =>
              i === ops[m].file ? partly(b, states[m][i], states[m + 1][i], ops[m]) : b.equals(states[m][i]),
            )
          )
            matched = `${m} ops and part of op ${m}`;
        }
        expect(matched, `live files after a kill with ${w.completed} ops reported`).toBeDefined();
      }

      // The diff area is left behind; recovery (here, another process) removes it and only it.
      const left = await readdir(root);
      expect(left).toHaveLength(1);
      expect(left[0]).toMatch(new RegExp(`^cow-${w.pid}-`));
      const data = await readdir(path.join(root, left[0]));
      expect(data).toContain('snapshot.json');
      let bytes = 0;
      for (const f of data) if (f.endsWith('.data')) bytes += (await stat(path.join(root, left[0], f))).size;
      expect(await new CowProvider().recover({ diffAreaRoot: root })).toBe(1);
      expect(await readdir(root)).toEqual([]);
      const after = await Promise.all(files.map((f) => readFile(f)));
      after.forEach((b, i) => expect(b.equals(live[i])).toBe(true));
      console.log(`trial ${t}: ${matched} applied, diff area of ${bytes} bytes removed`);
    });
  }
});
