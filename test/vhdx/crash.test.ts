/**
 * Crash safety: a writer process is killed with SIGKILL at seeded random points while it allocates
 * blocks (dynamic disks, and differencing children whose sector bitmaps get allocated) and while it
 * merges a child into its parent. After each kill the file reopens (log replay), every write covered by
 * a completed flush reads back, no sector holds anything but its last flushed value or a later write's
 * bytes, our check and `qemu-img check` are clean, QEMU's own replay of the same crashed file reads the
 * same, and an interrupted merge leaves a chain that reads the same and can be finished.
 *
 * Kills come four ways, mixed: after a random delay; right after the k-th reported flush plus a random
 * number of microseconds (so kills land inside the next writes and flushes); the worker killing itself
 * just before its k-th file operation (write, truncate or datasync: inside flushes, header updates and
 * log writes exactly), sometimes leaving that write torn at a 4 KiB boundary; and the same with a
 * simulated power loss (pages written since the last datasync lose their new content at random). A
 * quarter of the trials crash a second time while recovering.
 *
 * The worker (crash-worker.mjs) runs the built engine in dist/: `npm test` builds first.
 *
 * Trial files live in /dev/shm when it exists: a SIGKILL loses nothing the page cache holds, so a real
 * disk adds only fdatasync waits (power loss is simulated in the worker, not left to the disk).
 *
 * Environment: TIDEMARK_CRASH_TRIALS (default 200, split 125 allocation / 75 merge),
 * TIDEMARK_CRASH_SEED (default 20261124), TIDEMARK_CRASH_ONLY=a17 or m4 (one trial, to reproduce it),
 * TIDEMARK_CRASH_DIR (where trial files go; default /dev/shm, else the system temp directory),
 * TIDEMARK_CRASH_DIST (the built engine the worker runs; default dist/: point it at a deliberately
 * broken copy to see that these trials catch the breakage).
 */
import { spawn, spawnSync } from 'node:child_process';
import { accessSync, constants, copyFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { mergeIntoParent } from '../../src/formats/vhdx/merge.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { forEachBounded } from '../../src/util/bounded.js';
import { copyEngine, copyWorkerScripts } from '../helpers/engine-copy.js';
import { hasPeer, missingPeers, qemuImgCheck, run, sevenZipExtract } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { scribble } from '../helpers/scribble.js';
import { fillSector, planWrite, SECTOR, sectorWriteIndex } from './crash-plan.mjs';

const MiB = 2 ** 20;
const SIZE = 64 * MiB;
const WRITES = 240;
const TRIALS = Number(process.env.TIDEMARK_CRASH_TRIALS ?? 200);
const SEED = seedFrom('TIDEMARK_CRASH_SEED', 20261124);
const ONLY = process.env.TIDEMARK_CRASH_ONLY;
const ALLOC_TRIALS = Math.round(TRIALS * 0.625);
const MERGE_TRIALS = TRIALS - ALLOC_TRIALS;
const here = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.resolve(process.env.TIDEMARK_CRASH_DIST ?? path.join(here, '../../dist'));
/** The worker runs from a snapshot of dist/ (see snapshotWorker), set in beforeAll. */
let WORKER = path.join(here, 'crash-worker.mjs');
console.log(
  `crash seed ${SEED}, ${TRIALS} trials: ${ALLOC_TRIALS} allocation, ${MERGE_TRIALS} merge ` +
    `(TIDEMARK_CRASH_SEED, TIDEMARK_CRASH_TRIALS, TIDEMARK_CRASH_ONLY=a<n>|m<n>)`,
);

// ------------------------------------------------------------------ worker protocol

/** What crash-worker.mjs is told (JSON in argv). */
interface WorkerConfig {
  mode: 'write' | 'merge' | 'recover';
  file: string;
  seed?: number;
  writes?: number;
  flushEvery?: number;
  /** The worker kills itself instead of issuing its k-th file operation (1-based). */
  killAtOp?: number;
  torn?: boolean;
  powerLoss?: boolean;
  lossSeed?: number;
}

/** How the test process kills the worker (self-kills are in the WorkerConfig). */
type ParentKill = { kind: 'timer'; delayMs: number } | { kind: 'flush'; afterFlushes: number; spinUs: number };

interface Outcome {
  /** Writes covered by the last FLUSHED line. */
  flushed: number;
  done: boolean;
  ops?: number;
  ms: number;
  /** Where the kill landed: the worker's CRASH line, or the last thing it said before the test killed it. */
  where: string;
}

function runWorker(cfg: WorkerConfig, kill?: ParentKill): Promise<Outcome> {
  return new Promise((resolve, reject) => {
    const started = performance.now();
    const child = spawn(process.execPath, [WORKER, JSON.stringify(cfg)], { stdio: ['ignore', 'pipe', 'pipe'] });
    const o: Outcome = { flushed: 0, done: false, ms: 0, where: 'start' };
    let flushes = 0;
    let killed = false;
    let stderr = '';
    let buf = '';
    let inFlush = false;
    const killNow = () => {
      if (killed || o.done) return;
      killed = true;
      o.where = `${cfg.mode !== 'write' ? cfg.mode : inFlush ? 'flush' : flushes > 0 ? 'write' : 'open'} (test's kill)`;
      child.kill('SIGKILL');
    };
    const timer = kill?.kind === 'timer' ? setTimeout(killNow, kill.delayMs) : undefined;
    child.stdout.setEncoding('latin1');
    child.stdout.on('data', (d: string) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line === 'F+') inFlush = true;
        else if (line.startsWith('FLUSHED ')) {
          inFlush = false;
          o.flushed = Number(line.slice(8));
          if (kill?.kind === 'flush' && ++flushes === kill.afterFlushes && !killed) {
            // A busy wait: timers cannot wait microseconds.
            const until = process.hrtime.bigint() + BigInt(kill.spinUs) * 1000n;
            while (process.hrtime.bigint() < until);
            killNow();
          } else if (kill?.kind !== 'flush') flushes++;
        } else if (line.startsWith('CRASH ')) {
          // CRASH <k> <op> <file> <phase> [torn] [power-loss]
          const [, , op, file, phase] = line.split(' ');
          o.where = `${phase} (${op}${cfg.mode === 'merge' ? ` ${file}` : ''})`;
        } else if (line.startsWith('DONE ')) {
          o.done = true;
          o.ops = Number(line.slice(5));
        }
      }
    });
    child.stderr.on('data', (d) => (stderr += d));
    child.on('error', reject);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      o.ms = performance.now() - started;
      if (o.done) o.where = 'completed';
      if (code !== 0 && signal !== 'SIGKILL')
        reject(new Error(`worker ${JSON.stringify(cfg)} failed (${code}): ${stderr}`));
      else resolve(o);
    });
  });
}

// ------------------------------------------------------------------ verification

async function readAll(file: string, writable: boolean): Promise<Buffer> {
  const d = await VhdxFile.open(file, { writable }); // writable: the log is replayed in place
  try {
    return await d.readAt(0, d.virtualSize);
  } finally {
    await d.close();
  }
}

/**
 * Every sector holds its last flushed value (the last write below `flushed` covering it, else its
 * content before the trial), or the bytes of a write issued after that flush (below `issued`) that
 * covers it. Returns the first offending sectors, or [] when all is well.
 */
function verifyWrites(content: Buffer, before: Buffer, seed: number, flushed: number, issued: number): string[] {
  const sectors = content.length / SECTOR;
  const last = new Int32Array(sectors).fill(-1);
  const later = new Map<number, number[]>();
  for (let i = 0; i < issued; i++) {
    const w = planWrite(seed, i, content.length);
    const s0 = w.offset / SECTOR;
    for (let s = s0; s < s0 + w.data.length / SECTOR; s++) {
      if (i < flushed) last[s] = i;
      else later.set(s, [...(later.get(s) ?? []), i]);
    }
  }
  const want = Buffer.alloc(SECTOR);
  const problems: string[] = [];
  for (let s = 0; s < sectors && problems.length < 5; s++) {
    const got = content.subarray(s * SECTOR, (s + 1) * SECTOR);
    const id = sectorWriteIndex(got, seed);
    if (id >= 0 && (id === last[s] || later.get(s)?.includes(id))) {
      fillSector(want, seed, id, s);
      if (got.equals(want)) continue;
    } else if (last[s] < 0 && got.equals(before.subarray(s * SECTOR, (s + 1) * SECTOR))) continue;
    const what =
      id === -1
        ? `bytes ${got.subarray(0, 12).toString('hex')} that no write made`
        : id < last[s]
          ? `write ${id}, older than its flushed write ${last[s]} (a flushed write was lost)`
          : id >= issued
            ? `write ${id}, which was not issued yet (only ${issued} could have been)`
            : `bytes claiming write ${id} that do not match it`;
    problems.push(`sector ${s} (virtual offset ${s * SECTOR}): flushed value from write ${last[s]}, holds ${what}`);
  }
  return problems;
}

const tally = (m: Map<string, number>, k: string, n = 1) => m.set(k, (m.get(k) ?? 0) + n);
/** Wall time per step, summed over trials (both lanes), for the summary line. */
const spent = new Map<string, number>();
async function step<T>(label: string, fn: () => Promise<T> | T): Promise<T> {
  const t0 = performance.now();
  try {
    return await fn();
  } finally {
    tally(spent, label, performance.now() - t0);
  }
}
const showSpent = () => [...spent].map(([k, v]) => `${k} ${(v / 1000).toFixed(1)} s`).join(', ');
const show = (m: Map<string, number>) => [...m].map(([k, v]) => `${k}: ${v}`).join(', ');

// ------------------------------------------------------------------ templates

interface Template {
  name: string;
  /** Files copied into a trial's directory; the last is the one written (or merged). */
  files: string[];
  /** Content before the trial. */
  before: Buffer;
  differencing: boolean;
  /** Calibration: ops ≈ a + b / flushEvery, likewise milliseconds (merges: b = 0). */
  ops: { a: number; b: number };
  ms: { a: number; b: number };
  /** Observed/calibrated duration of the runs that completed: timer kills scale by their median. */
  pace: number[];
}

let dir: string;
let cleanup: (() => Promise<void>) | undefined;
const templates = new Map<string, Template>();

function copyTemplate(t: Template, to: string): string {
  mkdirSync(to, { recursive: true });
  for (const f of t.files) copyFileSync(path.join(dir, t.name, f), path.join(to, f));
  return path.join(to, t.files.at(-1)!);
}

async function makeTemplates(): Promise<void> {
  for (const bs of [1, 2]) {
    mkdirSync(`${dir}/dyn${bs}`);
    await createVhdx(`${dir}/dyn${bs}/disk.vhdx`, { size: SIZE, blockSize: bs * MiB });
    templates.set(`dyn${bs}`, {
      name: `dyn${bs}`,
      files: ['disk.vhdx'],
      before: Buffer.alloc(SIZE),
      differencing: false,
      ops: { a: 0, b: 0 },
      ms: { a: 0, b: 0 },
      pace: [],
    });
  }
  // Chains with data on both levels (full, partial, zeroed and trimmed blocks in the child), base and
  // child block sizes both ways round.
  for (const [name, baseBs, childBs] of [
    ['chainA', 1, 2],
    ['chainB', 2, 1],
  ] as const) {
    const d = `${dir}/${name}`;
    mkdirSync(d);
    const expected = Buffer.alloc(SIZE);
    await createVhdx(`${d}/base.vhdx`, { size: SIZE, blockSize: baseBs * MiB });
    let disk = await VhdxFile.open(`${d}/base.vhdx`, { writable: true });
    await scribble(disk, expected, SEED + baseBs, 40);
    await disk.close();
    await createVhdx(`${d}/child.avhdx`, { parent: `${d}/base.vhdx`, blockSize: childBs * MiB });
    disk = await VhdxFile.open(`${d}/child.avhdx`, { writable: true });
    await scribble(disk, expected, SEED + 10 + childBs, 40);
    const r = rng(SEED + 20);
    for (let i = 0; i < 20; i++) {
      const data = r.bytes(SECTOR * (1 + r.int(16)));
      const at = r.int(SIZE / SECTOR - 16) * SECTOR;
      await disk.write(data, at);
      data.copy(expected, at);
    }
    await disk.close();
    templates.set(name, {
      name,
      files: ['base.vhdx', 'child.avhdx'],
      before: expected,
      differencing: true,
      ops: { a: 0, b: 0 },
      ms: { a: 0, b: 0 },
      pace: [],
    });
  }
}

/** Full runs without a kill: how many file operations and milliseconds a trial takes. */
async function calibrate(): Promise<void> {
  const jobs: (() => Promise<void>)[] = [];
  for (const t of templates.values()) {
    const runs: Record<number, Outcome> = {};
    for (const f of [1, 8]) {
      jobs.push(async () => {
        const tdir = `${dir}/cal-${t.name}-${f}`;
        const file = copyTemplate(t, tdir);
        const seed = SEED + 5;
        const o = await runWorker({ mode: 'write', file, seed, writes: WRITES, flushEvery: f });
        // The run that was not killed must hold every write: the verifier's own sanity check.
        const problems = verifyWrites(await readAll(file, false), t.before, seed, WRITES, WRITES);
        if (problems.length > 0 || !o.done) throw new Error(`calibration ${t.name}/${f}: ${problems.join('; ')}`);
        runs[f] = o;
        if (runs[1] && runs[8]) {
          // x = a + b / f through (1, x1) and (8, x8).
          const fit = (x1: number, x8: number) => ({ b: ((x1 - x8) * 8) / 7, a: x8 - (x1 - x8) / 7 });
          t.ops = fit(runs[1].ops!, runs[8].ops!);
          t.ms = fit(runs[1].ms, runs[8].ms);
        }
        rmSync(tdir, { recursive: true, force: true });
      });
    }
    if (t.differencing) {
      jobs.push(async () => {
        const tdir = `${dir}/cal-${t.name}-merge`;
        const file = copyTemplate(t, tdir);
        const o = await runWorker({ mode: 'merge', file });
        if (!o.done || existsSync(file)) throw new Error(`calibration merge ${t.name} did not finish`);
        const base = await readAll(`${tdir}/base.vhdx`, false);
        if (!base.equals(t.before))
          throw new Error(`calibration merge ${t.name}: the merged base reads different content`);
        templates.set(`${t.name}-merge`, {
          ...t,
          name: t.name,
          ops: { a: o.ops!, b: 0 },
          ms: { a: o.ms, b: 0 },
          pace: [],
        });
        rmSync(tdir, { recursive: true, force: true });
      });
    }
  }
  await forEachBounded(jobs, 2, (job) => job());
}

/**
 * Copies dist/ and the worker into the scratch directory (same relative layout) and returns the
 * worker's path there: a build running elsewhere while the trials run (tsc rewrites dist/ file by file)
 * must not hand a worker a half-written module.
 */
function snapshotWorker(): string {
  for (let attempt = 1; ; attempt++) {
    const snap = `${dir}/snapshot-${attempt}`;
    copyEngine(DIST, snap);
    copyWorkerScripts(snap, ['test/vhdx/crash-worker.mjs', 'test/vhdx/crash-plan.mjs']);
    const worker = `${snap}/test/vhdx/crash-worker.mjs`;
    const probe = spawnSync(process.execPath, [worker, '{"mode":"none"}'], { encoding: 'utf8' });
    if (probe.stderr.includes('unknown mode none')) return worker; // every module loaded
    if (attempt === 3) throw new Error(`the crash worker does not load from a copy of dist/: ${probe.stderr}`);
    spawnSync('sleep', ['5']);
  }
}

function scratchRoot(): string {
  if (process.env.TIDEMARK_CRASH_DIR) return process.env.TIDEMARK_CRASH_DIR;
  try {
    accessSync('/dev/shm', constants.W_OK);
    return '/dev/shm';
  } catch {
    return os.tmpdir();
  }
}

const peersMissing = missingPeers('qemu-img');

beforeAll(async () => {
  if (peersMissing) return;
  if (!existsSync(`${DIST}/formats/vhdx/vhdx.js`))
    throw new Error(`${DIST} is missing: run \`npm run build\` first (npm test does)`);
  dir = mkdtempSync(path.join(scratchRoot(), 'tidemark-crash-'));
  cleanup = async () => rmSync(dir, { recursive: true, force: true });
  WORKER = snapshotWorker();
  await makeTemplates();
  await calibrate();
  for (const [k, t] of templates)
    console.log(
      `template ${k}: ~${Math.round(t.ops.a + t.ops.b / 4)} file ops, ~${Math.round(t.ms.a + t.ms.b / 4)} ms`,
    );
}, 300_000);
afterAll(async () => cleanup?.());

// ------------------------------------------------------------------ trials

/** A kill, equally likely: by timer, after a flush (writers only), self-kill at an op, or power loss. */
function chooseKill(
  r: ReturnType<typeof rng>,
  t: Template,
  flushEvery: number,
): { self: Partial<WorkerConfig>; parent?: ParentKill; label: string } {
  const ops = t.ops.a + t.ops.b / flushEvery;
  const ms = t.ms.a + t.ms.b / flushEvery;
  const kinds = t.ops.b === 0 ? ['timer', 'op', 'power'] : ['timer', 'flush', 'op', 'power'];
  const kind = r.pick(kinds);
  if (kind === 'timer') {
    // Calibration ran on a busier process than most trials: scale by how fast completed runs were.
    const pace = [...t.pace].sort((x, y) => x - y)[Math.floor(t.pace.length / 2)] ?? 1;
    const delayMs = Math.floor(r.next() * ms * Math.min(1, pace));
    return { self: {}, parent: { kind: 'timer', delayMs }, label: `timer ${delayMs} ms` };
  }
  if (kind === 'flush') {
    const afterFlushes = 1 + r.int(Math.ceil(WRITES / flushEvery));
    const spinUs = r.int(3000);
    return { self: {}, parent: { kind: 'flush', afterFlushes, spinUs }, label: `flush ${afterFlushes} + ${spinUs} µs` };
  }
  const killAtOp = 1 + r.int(Math.ceil(ops * 1.05));
  const torn = r.next() < 0.5;
  const powerLoss = kind === 'power';
  const lossSeed = r.int(2 ** 31);
  return {
    self: { killAtOp, torn, powerLoss, lossSeed },
    label: `op ${killAtOp}${torn ? ' torn' : ''}${powerLoss ? ` power-loss ${lossSeed}` : ''}`,
  };
}

/** A second crash while recovering: open writable (log replay) and close, killed at an early op. */
function chooseRecoveryCrash(r: ReturnType<typeof rng>): WorkerConfig | undefined {
  if (r.next() >= 0.25) return undefined;
  return { mode: 'recover', file: '', killAtOp: 1 + r.int(16), powerLoss: r.next() < 0.5, lossSeed: r.int(2 ** 31) };
}

const trialIndexes = (prefix: string, n: number) =>
  ONLY ? (ONLY.startsWith(prefix) ? [Number(ONLY.slice(1))] : []) : Array.from({ length: n }, (_, t) => t);

describe.skipIf(peersMissing)('SIGKILL at seeded random points', () => {
  it('the verifier catches lost, stale and garbage sectors', () => {
    const seed = 99;
    const content = Buffer.alloc(SIZE);
    for (let i = 0; i < 10; i++) {
      const w = planWrite(seed, i, SIZE);
      w.data.copy(content, w.offset);
    }
    expect(verifyWrites(content, Buffer.alloc(SIZE), seed, 10, 10)).toEqual([]);
    expect(verifyWrites(content, Buffer.alloc(SIZE), seed, 5, 10)).toEqual([]); // later writes may be there
    const w9 = planWrite(seed, 9, SIZE);
    const lost = Buffer.from(content);
    lost.fill(0, w9.offset, w9.offset + SECTOR);
    expect(verifyWrites(lost, Buffer.alloc(SIZE), seed, 10, 10).length).toBeGreaterThan(0);
    const garbage = Buffer.from(content);
    garbage[w9.offset + 100] ^= 1;
    expect(verifyWrites(garbage, Buffer.alloc(SIZE), seed, 10, 10).length).toBeGreaterThan(0);
    const early = Buffer.alloc(SIZE); // write 9's bytes where it was never issued
    w9.data.copy(early, w9.offset);
    expect(verifyWrites(early, Buffer.alloc(SIZE), seed, 0, 5).length).toBeGreaterThan(0);
  });

  it(
    `while allocating blocks: ${ALLOC_TRIALS} trials`,
    { timeout: Math.max(900_000, ALLOC_TRIALS * 10_000) },
    async () => {
      const failures: string[] = [];
      const where = new Map<string, number>();
      const kinds = new Map<string, number>();
      let verifiedFlushed = 0;
      let qemuReplays = 0;
      let sevenZip = 0;
      await forEachBounded(trialIndexes('a', ALLOC_TRIALS), 2, async (t) => {
        const r = rng(SEED * 31 + t);
        const tpl = templates.get(r.next() < 2 / 3 ? r.pick(['dyn1', 'dyn2']) : r.pick(['chainA', 'chainB']))!;
        const seed = (SEED * 1000 + t) >>> 0;
        const flushEvery = 1 + r.int(8);
        const kill = chooseKill(r, tpl, flushEvery);
        const recovery = chooseRecoveryCrash(r);
        const id = `a${t} (${tpl.name}, seed ${seed}, flush every ${flushEvery}, ${kill.label}${recovery ? `, recovery crash at op ${recovery.killAtOp}${recovery.powerLoss ? ' power-loss' : ''}` : ''})`;
        const fail = (msg: string) => failures.push(`${id}: ${msg}`);
        const tdir = `${dir}/a${t}`;
        try {
          const file = await step('copy', () => copyTemplate(tpl, tdir));
          const cfg: WorkerConfig = { mode: 'write', file, seed, writes: WRITES, flushEvery, ...kill.self };
          const o = await step('worker', () => runWorker(cfg, kill.parent));
          tally(where, o.done ? `completed before a ${kill.label.split(' ')[0]} kill` : o.where);
          tally(kinds, kill.label.split(' ')[0]);
          if (o.done) tpl.pace.push(o.ms / (tpl.ms.a + tpl.ms.b / flushEvery));
          if (recovery) {
            const ro = await step('worker', () => runWorker({ ...recovery, file }));
            tally(where, `recovery: ${ro.where}`);
          }
          const flushed = o.done ? WRITES : o.flushed;
          // After the last reported flush the worker issues at most flushEvery more writes.
          const issued = o.done ? WRITES : Math.min(WRITES, o.flushed + flushEvery);

          // QEMU replays the same crashed file on its own (check -r opens it writable); compared below.
          let qemuView: Buffer | undefined;
          if (!tpl.differencing) {
            copyFileSync(file, `${tdir}/qemu.vhdx`);
            const q = await step('qemu', () =>
              run('qemu-img', ['check', '-r', 'leaks', '-f', 'vhdx', `${tdir}/qemu.vhdx`], { allowFail: true }),
            );
            if (q.code !== 0) fail(`qemu-img check -r leaks on the crashed file: ${q.stdout}${q.stderr}`);
            else {
              qemuView = await step('qemu', async () => {
                await run('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', `${tdir}/qemu.vhdx`, `${tdir}/qemu.raw`]);
                return readFileSync(`${tdir}/qemu.raw`);
              });
            }
          }

          let content: Buffer;
          try {
            content = await step('reopen', () => readAll(file, true));
          } catch (err) {
            fail(`reopening after the crash failed: ${(err as Error).message}`);
            return;
          }
          const problems = await step('verify', () => verifyWrites(content, tpl.before, seed, flushed, issued));
          if (problems.length > 0) fail(`after ${flushed} flushed writes: ${problems.join('; ')}`);
          verifiedFlushed += flushed;
          const report = await step('check', () => checkVhdx(file));
          if (!report.ok) fail(`checkVhdx: ${report.errors.map((e) => e.message).join('; ')}`);
          if (!tpl.differencing) {
            const q = await step('qemu', () => qemuImgCheck(file));
            if (!q.ok) fail(`qemu-img check after our recovery: ${q.output}`);
            if (qemuView) {
              qemuReplays++;
              if (!qemuView.equals(content)) fail('QEMU replaying the crashed file reads different content than we do');
            }
          } else if (hasPeer('7zz') && t % 4 === 0) {
            // An independent reader of the recovered child (sector bitmaps included), in a quarter of
            // the trials (it is slow); 7zz does not replay logs, but our writable open left none.
            const view = await step('7zz', async () => {
              await sevenZipExtract(file, `${tdir}/7zz.raw`);
              return readFileSync(`${tdir}/7zz.raw`);
            });
            sevenZip++;
            if (!view.equals(content)) fail('7zz reads the recovered chain differently');
          }
        } catch (err) {
          fail(`unexpected: ${(err as Error).stack}`);
        } finally {
          rmSync(tdir, { recursive: true, force: true });
        }
      });
      console.log(
        `allocation: ${ALLOC_TRIALS} trials; kills ${show(kinds)}; landed in ${show(where)}; ` +
          `${verifiedFlushed} flushed writes verified; QEMU replay compared ${qemuReplays}, 7zz compared ${sevenZip}; time: ${showSpent()}`,
      );
      spent.clear();
      expect(failures).toEqual([]);
    },
  );

  it(`while merging: ${MERGE_TRIALS} trials`, { timeout: Math.max(900_000, MERGE_TRIALS * 10_000) }, async () => {
    const failures: string[] = [];
    const where = new Map<string, number>();
    const outcomes = new Map<string, number>();
    await forEachBounded(trialIndexes('m', MERGE_TRIALS), 2, async (t) => {
      const r = rng(SEED * 37 + t);
      const tpl = templates.get(`${r.pick(['chainA', 'chainB'])}-merge`)!;
      const kill = chooseKill(r, tpl, 1);
      // Some interrupted merges are interrupted again when resumed.
      const again = r.next() < 0.25 ? chooseKill(r, tpl, 1) : undefined;
      const id = `m${t} (${tpl.name}, ${kill.label}${again ? `, then ${again.label}` : ''})`;
      const fail = (msg: string) => failures.push(`${id}: ${msg}`);
      const tdir = `${dir}/m${t}`;
      try {
        const child = await step('copy', () => copyTemplate(tpl, tdir));
        const base = `${tdir}/base.vhdx`;
        const interrupted = async (label: string): Promise<boolean> => {
          if (!existsSync(child)) return false;
          // The chain must open and read exactly what it read before the merge began.
          for (const f of [child, base]) {
            const c = await step('check', () => checkVhdx(f));
            if (!c.ok) fail(`${label}: checkVhdx ${path.basename(f)}: ${c.errors.map((e) => e.message).join('; ')}`);
          }
          try {
            if (!(await step('reopen', () => readAll(child, false))).equals(tpl.before))
              fail(`${label}: the chain reads different content`);
          } catch (err) {
            fail(`${label}: the interrupted chain does not open: ${(err as Error).message}`);
          }
          return true;
        };
        const o = await step('worker', () => runWorker({ mode: 'merge', file: child, ...kill.self }, kill.parent));
        tally(where, o.done ? `completed before a ${kill.label.split(' ')[0]} kill` : o.where);
        if (o.done) tpl.pace.push(o.ms / tpl.ms.a);
        let left = await interrupted('after the crash');
        if (left && again) {
          const o2 = await step('worker', () => runWorker({ mode: 'merge', file: child, ...again.self }, again.parent));
          tally(where, `again: ${o2.where}`);
          left = await interrupted('after the second crash');
        }
        tally(outcomes, left ? 'child left' : 'merge had finished');
        if (left) {
          await step('resume merge', () => mergeIntoParent(child));
          if (existsSync(child)) fail('the resumed merge left the child behind');
        }
        const merged = await step('reopen', () => readAll(base, true));
        if (!merged.equals(tpl.before)) fail('the merged base reads different content');
        const c = await step('check', () => checkVhdx(base));
        if (!c.ok) fail(`checkVhdx base: ${c.errors.map((e) => e.message).join('; ')}`);
        const q = await step('qemu', () => qemuImgCheck(base));
        if (!q.ok) fail(`qemu-img check base: ${q.output}`);
      } catch (err) {
        fail(`unexpected: ${(err as Error).stack}`);
      } finally {
        rmSync(tdir, { recursive: true, force: true });
      }
    });
    console.log(
      `merge: ${MERGE_TRIALS} trials; ${show(outcomes)}; kills landed in ${show(where)}; time: ${showSpent()}`,
    );
    expect(failures).toEqual([]);
  });
});
