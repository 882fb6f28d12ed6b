/**
 * Change tracking across crashes (invariant 1): a child process writes through the engine into a tracked
 * disk (ChangeTracker.attach), sealing ids and flushing as it goes, and is killed with SIGKILL at seeded
 * random points: after a random delay; right after its k-th reported operation or seal; or just before
 * its k-th file write / truncate / datasync (inside seals, coarse-map updates and log commits). A quarter
 * of the trials crash a second session too. After reopening (VhdxFile.open writable + attach), every id
 * the worker reported sealed (and the template's own id) is either refused with
 * MISSING_CHANGE_TRACKING_INFORMATION or its answer covers every byte that differs between the content at
 * that seal (recomputed from the seed) and the content read from the disk now. Never a silent miss; and
 * since SIGKILL leaves the coarse map intact, a crash must not reset the epoch at all.
 *
 * Each trial starts from a copy of a template made before its tracked session: a copy is another file
 * instance (another lineage), so the trial's first session resets the epoch (the copy) and seals the
 * template's id itself, in the trial's own lineage.
 *
 * The worker (crash-worker.mjs) runs the built engine in dist/: `npm test` builds first.
 * Environment: TIDEMARK_CRASH_TRIALS (default 200), TIDEMARK_CRASH_SEED, TIDEMARK_CRASH_ONLY=<trial>.
 */
import { spawn } from 'node:child_process';
import { copyFile, mkdir, open, readFile, rm } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { ChangeTracker, DEFAULT_GRANULARITY, trackingPaths } from '../../src/tracking/tracker.js';
import { forEachBounded } from '../../src/util/bounded.js';
import { tempDir } from '../helpers/peers.js';
import { opData, planOp, words, type PlannedOp } from './crash-plan.mjs';
import { firstUncoveredDifference, firstUncoveredDifferenceFlat, PAGE, PagedImage, totalBytes } from './model.js';

const MiB = 2 ** 20;
/** Two coarse regions (64 MiB and 16 MiB), 1 MiB blocks. */
const SIZE = 80 * MiB;
const OPS = 70;
const TRIALS = Number(process.env.TIDEMARK_CRASH_TRIALS ?? 200);
const SEED = Number(process.env.TIDEMARK_CRASH_SEED ?? 0xc0ffee);
const ONLY = process.env.TIDEMARK_CRASH_ONLY;
const here = path.dirname(fileURLToPath(import.meta.url));
const worker = path.join(here, 'crash-worker.mjs');
console.log(
  `tracking crash seed ${SEED}, ${TRIALS} trials (TIDEMARK_CRASH_SEED, TIDEMARK_CRASH_TRIALS, TIDEMARK_CRASH_ONLY=<trial>)`,
);

let dir: string;
let cleanup: () => Promise<void>;

interface Template {
  granularity: number;
  /** Tracking enabled, before the tracked session (`trackedSession` runs it on each copy). */
  file: string;
  /** The content at the id the tracked session seals. */
  content0: Buffer;
  /** The template's content (what every trial starts from). */
  content: Buffer;
  /** From a run of the worker that is not killed. */
  fullMs: number;
  fullFileOps: number;
  fullSeals: number;
}
const templates: Template[] = [];

async function applyToDisk(disk: VhdxFile, op: PlannedOp, data: () => Buffer): Promise<void> {
  if (op.kind === 'write') await disk.write(data(), op.offset);
  else if (op.kind === 'zero') await disk.writeZeroes(op.offset, op.length);
  else if (op.kind === 'trim') await disk.trim(op.offset, op.length);
}

async function readContent(file: string): Promise<Buffer> {
  const d = await VhdxFile.open(file); // read-only: a dirty log is replayed in memory, nothing is written
  try {
    return await d.readAt(0, SIZE);
  } finally {
    await d.close();
  }
}

/** Templates in memory as their non-zero 64 KiB pieces: a trial's copy writes only those (sparse, fast). */
const sparseImages = new Map<string, { size: number; pieces: [number, Buffer][] }>();

async function sparseCopy(from: string, to: string): Promise<void> {
  let img = sparseImages.get(from);
  if (!img) {
    const all = await readFile(from);
    const pieces: [number, Buffer][] = [];
    const zero = Buffer.alloc(64 * 1024);
    for (let at = 0; at < all.length; at += zero.length) {
      const piece = all.subarray(at, Math.min(all.length, at + zero.length));
      if (!piece.equals(zero.subarray(0, piece.length))) pieces.push([at, piece]);
    }
    img = { size: all.length, pieces };
    sparseImages.set(from, img);
  }
  const f = await open(to, 'wx');
  try {
    await f.truncate(img.size);
    for (const [at, piece] of img.pieces) await f.write(piece, 0, piece.length, at);
  } finally {
    await f.close();
  }
}

async function copySet(from: string, to: string): Promise<void> {
  await sparseCopy(from, to);
  const a = trackingPaths(from);
  const b = trackingPaths(to);
  await copyFile(a.rct, b.rct);
  await copyFile(a.mrt, b.mrt);
}

// ------------------------------------------------------------------ the worker, and how it is killed

type Kill =
  | { how: 'none' }
  | { how: 'timer'; ms: number }
  | { how: 'event'; k: number } // right after the k-th OP/FLUSHED/SEALED line
  | { how: 'seal'; k: number } // right after the k-th SEALED line
  | { how: 'fileop'; k: number }; // the worker kills itself before its k-th file operation

interface Session {
  seed: number;
  kill: Kill;
  sealed: { index: number; id: string }[];
  events: number;
  ended: boolean;
  fileOps: number;
  ms: number;
}

function runWorker(file: string, seed: number, kill: Kill): Promise<Session> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const env = { ...process.env, KILL_AT_FILE_OP: kill.how === 'fileop' ? String(kill.k) : '0' };
    const child = spawn(process.execPath, [worker, file, String(seed), String(OPS)], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env,
    });
    const s: Session = { seed, kill, sealed: [], events: 0, ended: false, fileOps: 0, ms: 0 };
    let stderr = '';
    let buf = '';
    let seals = 0;
    const die = () => child.kill('SIGKILL');
    const timer = kill.how === 'timer' ? setTimeout(die, kill.ms) : undefined;
    child.stdout.on('data', (d: Buffer) => {
      buf += d.toString();
      let nl;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        const [word, a, b] = line.split(' ');
        if (word === 'OP' || word === 'FLUSHED' || word === 'SEALED') {
          s.events++;
          if (word === 'SEALED') {
            s.sealed.push({ index: Number(a), id: b });
            seals++;
            if (kill.how === 'seal' && seals === kill.k) die();
          }
          if (kill.how === 'event' && s.events === kill.k) die();
        } else if (word === 'END') {
          s.ended = true;
          s.fileOps = Number(a);
        }
      }
    });
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      s.ms = performance.now() - t0;
      if (code !== 0 && signal !== 'SIGKILL') reject(new Error(`worker failed (${code} ${signal}): ${stderr}`));
      else resolve(s);
    });
  });
}

function pickKill(r: () => number, t: Template): Kill {
  const x = r() / 2 ** 32;
  const u = () => r() / 2 ** 32;
  if (x < 0.3) return { how: 'timer', ms: Math.floor(u() * t.fullMs * 1.05) };
  if (x < 0.55) return { how: 'event', k: 1 + Math.floor(u() * OPS) };
  if (x < 0.7) return { how: 'seal', k: 1 + Math.floor(u() * Math.max(1, t.fullSeals)) };
  return { how: 'fileop', k: 1 + Math.floor(u() * t.fullFileOps) };
}

// ------------------------------------------------------------------ checking a crashed disk

interface Outcome {
  trial: number;
  granularity: number;
  sessions: Session[];
  ids: number;
  valid: number;
  refused: number;
  reason: string | null;
  reportedBytes: number;
  problems: string[];
}

/**
 * Reopens the disk writable with its tracker (recovery runs here) and checks every id: refused, or an
 * answer that covers every byte differing between the content at the seal and the content now.
 */
async function checkDisk(
  trial: number,
  file: string,
  tpl: Template,
  id0: string,
  sessions: { session: Session; start: Buffer }[],
): Promise<Outcome> {
  const out: Outcome = {
    trial,
    granularity: tpl.granularity,
    sessions: sessions.map((x) => x.session),
    ids: 0,
    valid: 0,
    refused: 0,
    reason: null,
    reportedBytes: 0,
    problems: [],
  };
  const disk = await VhdxFile.open(file, { writable: true });
  try {
    const tracker = await ChangeTracker.attach(disk, { writable: true });
    if (!tracker) throw new Error('the tracking files are gone');
    const status = tracker.status();
    out.reason = status.reason;
    const current = await disk.readAt(0, SIZE);

    const check = async (id: string, atSeal: Buffer | Buffer[], now: Buffer[] | undefined, label: string) => {
      out.ids++;
      let ranges;
      try {
        ranges = (await tracker.changes(id)).ranges;
      } catch (err) {
        if (err instanceof TidemarkError && err.code === 'MISSING_CHANGE_TRACKING_INFORMATION') {
          out.refused++;
          if (status.state !== 'reset') out.problems.push(`${label}: refused, but status says ${status.state}`);
          return;
        }
        out.problems.push(`${label}: changes() failed: ${(err as Error).message}`);
        return;
      }
      out.valid++;
      out.reportedBytes += totalBytes(ranges);
      const missed = Array.isArray(atSeal)
        ? firstUncoveredDifference(atSeal, now!, ranges)
        : firstUncoveredDifferenceFlat(atSeal, current, ranges);
      if (missed !== undefined) {
        out.problems.push(`${label} (${id}): MISS: byte ${missed} differs but changes() does not report it`);
      }
    };

    await check(id0, tpl.content0, undefined, 'template id');
    for (const [n, { session, start }] of sessions.entries()) {
      // The content at each seal, as pages over the session's start: a seal's pages differ from the start
      // only where its operations wrote, and the current content is compared with the start in full once,
      // so each check compares only pages that may differ (and still every byte of them).
      const image = PagedImage.view(start);
      const startPages = image.snapshot();
      const currentPages = startPages.slice();
      for (let p = 0; p < currentPages.length; p++) {
        const page = current.subarray(p * PAGE, (p + 1) * PAGE);
        if (!page.equals(startPages[p])) currentPages[p] = page;
      }
      let applied = 0;
      for (const s of session.sealed) {
        for (; applied < s.index; applied++) {
          const op = planOp(session.seed, applied, SIZE);
          if (op.kind === 'write') image.write(op.offset, opData(op));
          else if (op.kind === 'zero' || op.kind === 'trim') image.zero(op.offset, op.length);
        }
        await check(s.id, image.snapshot(), currentPages, `session ${n + 1} seal at op ${s.index}`);
      }
    }
    if (out.refused > 0 && out.valid > 0) out.problems.push('some ids answer and others are refused');

    // The tracker keeps working after recovery: a new id, a write, and the write is reported.
    const fresh = await tracker.seal();
    await disk.write(Buffer.alloc(4096, 0xee), 5 * MiB + 100);
    const after = await tracker.changes(fresh);
    if (!after.ranges.some((x) => x.offset <= 5 * MiB + 100 && x.offset + x.length >= 5 * MiB + 4196))
      out.problems.push(`a write after recovery is not reported: ${JSON.stringify(after.ranges)}`);
  } finally {
    await disk.close();
  }
  return out;
}

/** The template's tracked session on `file`: writes, a sealed id, more writes, a clean close. */
async function trackedSession(file: string, granularity: number): Promise<{ id0: string; content0: Buffer }> {
  const tseed = (SEED + granularity) >>> 0;
  const disk = await VhdxFile.open(file, { writable: true });
  try {
    const tracker = (await ChangeTracker.attach(disk, { writable: true }))!;
    for (const op of templateOps(tseed, 30, 45)) await applyToDisk(disk, op, () => opData(op));
    const content0 = await disk.readAt(0, SIZE);
    const id0 = await tracker.seal();
    for (const op of templateOps(tseed, 45, 60)) await applyToDisk(disk, op, () => opData(op));
    return { id0, content0 };
  } finally {
    await disk.close();
  }
}

function templateOps(tseed: number, from: number, to: number): PlannedOp[] {
  return Array.from({ length: to - from }, (_, i) => planOp(tseed, from + i, SIZE)).filter(
    (o) => o.kind !== 'flush' && o.kind !== 'seal',
  );
}

async function runTrial(trial: number): Promise<Outcome> {
  const r = words((SEED ^ Math.imul(trial + 1, 0x2545f491)) >>> 0);
  const tpl = templates[trial % templates.length];
  const tdir = path.join(dir, `t${trial}`);
  await mkdir(tdir, { recursive: true });
  const file = path.join(tdir, 'disk.vhdx');
  try {
    await copySet(tpl.file, file);
    const { id0 } = await trackedSession(file, tpl.granularity);
    const sessions: { session: Session; start: Buffer }[] = [];
    const s1 = await runWorker(file, r(), pickKill(r, tpl));
    sessions.push({ session: s1, start: tpl.content });
    if (r() / 2 ** 32 < 0.25) {
      // A second session starts from whatever the first crash left, recovers, writes, and crashes too.
      const start = await readContent(file);
      const s2 = await runWorker(file, r(), pickKill(r, tpl));
      sessions.push({ session: s2, start });
    }
    return await checkDisk(trial, file, tpl, id0, sessions);
  } finally {
    await rm(tdir, { recursive: true, force: true });
  }
}

beforeAll(async () => {
  if (!existsSync(path.resolve(here, '../../dist/tracking/tracker.js')))
    throw new Error('dist/ is missing: run `npm run build` (npm test does)');
  ({ dir, cleanup } = await tempDir('rct-crash'));
  for (const granularity of [4096, DEFAULT_GRANULARITY]) {
    // Every copy keeps the file name: the tracker binds to the head's name (a renamed disk resets).
    await mkdir(path.join(dir, `template-${granularity}`));
    const file = path.join(dir, `template-${granularity}`, 'disk.vhdx');
    await createVhdx(file, { size: SIZE, blockSize: MiB });
    // Content from before tracking, then (trackedSession) tracked content, a sealed id, and changes after it.
    let disk = await VhdxFile.open(file, { writable: true });
    for (const op of templateOps((SEED + granularity) >>> 0, 0, 30)) await applyToDisk(disk, op, () => opData(op));
    await disk.close();
    disk = await VhdxFile.open(file);
    await ChangeTracker.enable(disk, granularity);
    await disk.close();
    // The tracked session, once on a scratch copy: the contents at its seal and at its end.
    await mkdir(path.join(dir, `scratch-${granularity}`));
    const scratch = path.join(dir, `scratch-${granularity}`, 'disk.vhdx');
    await copySet(file, scratch);
    const { content0 } = await trackedSession(scratch, granularity);
    const content = await readContent(scratch);

    // A run without a kill: how long a session takes and how many file operations it makes.
    await mkdir(path.join(dir, `calibrate-${granularity}`));
    const cal = path.join(dir, `calibrate-${granularity}`, 'disk.vhdx');
    await copySet(file, cal);
    const { id0 } = await trackedSession(cal, granularity);
    const full = await runWorker(cal, 1, { how: 'none' });
    if (!full.ended) throw new Error('the calibration run did not finish');
    const tpl: Template = {
      granularity,
      file,
      content0,
      content,
      fullMs: full.ms,
      fullFileOps: full.fileOps,
      fullSeals: full.sealed.length,
    };
    const o = await checkDisk(-1, cal, tpl, id0, [{ session: full, start: content }]);
    if (o.problems.length > 0 || o.refused > 0)
      throw new Error(`an uninterrupted run fails its own check: ${JSON.stringify(o.problems)}`);
    console.log(
      `template g=${granularity}: a full session takes ${full.ms.toFixed(0)} ms, ${full.fileOps} file operations, ${full.sealed.length} seals`,
    );
    templates.push(tpl);
  }
});
afterAll(async () => cleanup?.());

describe('change tracking survives SIGKILL (crash injection)', () => {
  it(
    `${TRIALS} seeded trials: every reported id is refused or complete, never a silent miss`,
    { timeout: Math.max(900_000, TRIALS * 1_000) }, // long runs get time in proportion
    async () => {
      const t0 = performance.now();
      const trials = ONLY !== undefined ? [Number(ONLY)] : Array.from({ length: TRIALS }, (_, i) => i);
      const outcomes: Awaited<ReturnType<typeof runTrial>>[] = [];
      await forEachBounded(trials.keys(), 2, async (i) => {
        outcomes[i] = await runTrial(trials[i]);
      });
      const problems = outcomes.flatMap((o) =>
        o.problems.map(
          (p) =>
            `trial ${o.trial} (g=${o.granularity}, kills ${o.sessions.map((s) => JSON.stringify(s.kill)).join(' then ')}): ${p}`,
        ),
      );
      const validTrials = outcomes.filter((o) => o.refused === 0).length;
      const refusedTrials = outcomes.filter((o) => o.refused > 0);
      const ids = outcomes.reduce((n, o) => n + o.ids, 0);
      const valid = outcomes.reduce((n, o) => n + o.valid, 0);
      const refused = outcomes.reduce((n, o) => n + o.refused, 0);
      const reported = outcomes.reduce((n, o) => n + o.reportedBytes, 0);
      const byKill = new Map<string, number>();
      for (const o of outcomes) for (const s of o.sessions) byKill.set(s.kill.how, (byKill.get(s.kill.how) ?? 0) + 1);
      const finished = outcomes.reduce((n, o) => n + o.sessions.filter((s) => s.ended).length, 0);
      console.log(
        `tracking crash: ${outcomes.length} trials (${outcomes.filter((o) => o.sessions.length > 1).length} with a second crash), ` +
          `kills ${JSON.stringify(Object.fromEntries(byKill))}, ${finished} sessions finished before their kill; ` +
          `${validTrials} trials with every id valid, ${refusedTrials.length} with ids refused; ` +
          `${ids} ids checked: ${valid} answered and complete, ${refused} refused; ` +
          `mean answer ${(reported / Math.max(1, valid) / MiB).toFixed(1)} MiB of ${SIZE / MiB} MiB; ` +
          `${((performance.now() - t0) / 1000).toFixed(1)} s`,
      );
      for (const o of refusedTrials.slice(0, 10)) console.log(`  trial ${o.trial} refused: ${o.reason}`);
      expect(problems.slice(0, 20), `seed ${SEED}`).toEqual([]);
      // SIGKILL never tears the coarse map: a crash alone must never cost the earlier ids.
      expect(refusedTrials.map((o) => `trial ${o.trial}: ${o.reason}`)).toEqual([]);
    },
  );
});
