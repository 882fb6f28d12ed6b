/**
 * Crash safety of the VHD engine: a worker process is killed with SIGKILL at seeded points while it
 * writes (fixed and dynamic disks, differencing children allocating blocks), while it creates a
 * differencing disk, and while it merges a child into its parent. After each kill the file opens, every
 * write covered by a completed flush reads back (and no sector holds anything but its last flushed value
 * or a later write's bytes), `check` finds no error and `check --repair` leaves it clean, and QEMU reads
 * the crashed file (dynamic and fixed disks; `qemu-img check` has no VHD support, so QEMU's reading of it
 * is the comparison) as we do; 7-Zip reads recovered chains. An interrupted merge leaves a chain that
 * reads the same and can be finished; an interrupted create leaves no disk under the name asked for, or
 * a whole one.
 *
 * Kills come four ways, mixed: after a random delay; right after the k-th reported flush plus a random
 * number of microseconds; the worker killing itself just before its k-th file operation (write, truncate
 * or datasync), sometimes leaving that write torn at a 4 KiB boundary; and the same with a simulated power
 * loss (pages written since the last datasync lose their new content at random). A quarter of the write
 * trials crash a second time while recovering.
 *
 * The worker (crash-worker.mjs) runs the built engine in dist/: `npm test` builds first.
 *
 * Environment: TIDEMARK_VHD_CRASH_TRIALS (default 80: 50 writes, 10 creates, 20 merges),
 * TIDEMARK_VHD_CRASH_SEED (default 20261206), TIDEMARK_VHD_CRASH_ONLY=w17, c3 or m4 (one trial),
 * TIDEMARK_VHD_CRASH_DIR (where trial files go; default /dev/shm, else the system temp directory).
 */
import { spawn, spawnSync } from 'node:child_process';
import {
  accessSync,
  constants,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { mergeVhd } from '../../src/formats/vhd/merge.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { forEachBounded } from '../../src/util/bounded.js';
import { copyEngine, copyWorkerScripts } from '../helpers/engine-copy.js';
import { hasPeer, missingPeers, run } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { fillSector, planWrite, SECTOR, sectorWriteIndex } from '../vhdx/crash-plan.mjs';
import { qemuVpc, scribbleVhd, sevenZipVhd } from './helpers.js';

const MiB = 2 ** 20;
const SIZE = 32 * MiB;
const WRITES = 160;
const TRIALS = Number(process.env.TIDEMARK_VHD_CRASH_TRIALS ?? 80);
const SEED = seedFrom('TIDEMARK_VHD_CRASH_SEED', 20261206);
const ONLY = process.env.TIDEMARK_VHD_CRASH_ONLY;
const WRITE_TRIALS = Math.round(TRIALS * 0.625);
const CREATE_TRIALS = Math.round(TRIALS * 0.125);
const MERGE_TRIALS = TRIALS - WRITE_TRIALS - CREATE_TRIALS;
const here = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.resolve(path.join(here, '../../dist'));
let WORKER = path.join(here, 'crash-worker.mjs');
console.log(
  `vhd crash seed ${SEED}, ${TRIALS} trials: ${WRITE_TRIALS} writes, ${CREATE_TRIALS} creates, ${MERGE_TRIALS} merges ` +
    `(TIDEMARK_VHD_CRASH_SEED, TIDEMARK_VHD_CRASH_TRIALS, TIDEMARK_VHD_CRASH_ONLY=w<n>|c<n>|m<n>)`,
);

// ------------------------------------------------------------------ worker protocol

interface WorkerConfig {
  mode: 'write' | 'merge' | 'recover' | 'create';
  file: string;
  parent?: string;
  blockSize?: number;
  seed?: number;
  writes?: number;
  flushEvery?: number;
  killAtOp?: number;
  torn?: boolean;
  powerLoss?: boolean;
  lossSeed?: number;
}

type ParentKill = { kind: 'timer'; delayMs: number } | { kind: 'flush'; afterFlushes: number; spinUs: number };

interface Outcome {
  flushed: number;
  done: boolean;
  ops?: number;
  ms: number;
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
            const until = process.hrtime.bigint() + BigInt(kill.spinUs) * 1000n;
            while (process.hrtime.bigint() < until);
            killNow();
          } else if (kill?.kind !== 'flush') flushes++;
        } else if (line.startsWith('CRASH ')) {
          const [, , op, file, phase] = line.split(' ');
          o.where = `${phase} (${op}${cfg.mode !== 'write' ? ` ${file}` : ''})`;
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

async function readAll(file: string, writable = false): Promise<Buffer> {
  const d = await VhdFile.open(file, { writable });
  try {
    return await d.readAt(0, d.virtualSize);
  } finally {
    await d.close();
  }
}

/**
 * Every sector holds its last flushed value (the last write below `flushed` covering it, else its
 * content before the trial), or the bytes of a write issued after that flush (below `issued`).
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
            ? `write ${id}, which was not issued yet`
            : `bytes claiming write ${id} that do not match it`;
    problems.push(`sector ${s}: flushed value from write ${last[s]}, holds ${what}`);
  }
  return problems;
}

/** Findings a crash may leave that the repair restores: footer copies lost, torn or stale. */
const REPAIRABLE = new Set(['FOOTER_INVALID', 'FOOTER_COPY_INVALID', 'FOOTERS_DIFFER', 'FILE_SIZE_UNALIGNED']);

/** No errors; warnings only of what the repair restores; after --repair, no findings at all. */
async function checkRepairable(file: string, fail: (m: string) => void, label: string): Promise<void> {
  const r = await checkVhd(file);
  if (!r.ok) fail(`${label}: check errors: ${r.errors.map((e) => e.message).join('; ')}`);
  const odd = r.warnings.filter((w) => !REPAIRABLE.has(w.code));
  if (odd.length) fail(`${label}: unexpected warnings: ${odd.map((w) => w.message).join('; ')}`);
  if (r.warnings.length) {
    const fixed = await checkVhd(file, { repair: true });
    if (fixed.errors.length || fixed.warnings.length)
      fail(`${label}: after --repair: ${[...fixed.errors, ...fixed.warnings].map((e) => e.message).join('; ')}`);
  }
}

async function qemuView(file: string, out: string): Promise<Buffer | string> {
  const r = await run('qemu-img', ['convert', '--image-opts', qemuVpc(file), '-O', 'raw', out], { allowFail: true });
  if (r.code !== 0) return r.stderr.trim();
  const b = readFileSync(out);
  rmSync(out);
  return b;
}

const tally = (m: Map<string, number>, k: string, n = 1) => m.set(k, (m.get(k) ?? 0) + n);
const show = (m: Map<string, number>) => [...m].map(([k, v]) => `${k}: ${v}`).join(', ');

// ------------------------------------------------------------------ templates

interface Template {
  name: string;
  files: string[];
  before: Buffer;
  differencing: boolean;
  ops: { a: number; b: number };
  ms: { a: number; b: number };
  pace: number[];
}

let dir: string;
const templates = new Map<string, Template>();

function copyTemplate(t: Template, to: string): string {
  mkdirSync(to, { recursive: true });
  for (const f of t.files) copyFileSync(path.join(dir, t.name, f), path.join(to, f));
  return path.join(to, t.files.at(-1)!);
}

const tpl = (name: string, files: string[], before: Buffer, differencing: boolean): Template => ({
  name,
  files,
  before,
  differencing,
  ops: { a: 0, b: 0 },
  ms: { a: 0, b: 0 },
  pace: [],
});

async function makeTemplates(): Promise<void> {
  mkdirSync(`${dir}/fixed`);
  await createVhd(`${dir}/fixed/disk.vhd`, { size: SIZE, type: 'fixed' });
  templates.set('fixed', tpl('fixed', ['disk.vhd'], Buffer.alloc(SIZE), false));
  for (const [name, bs] of [
    ['dyn512', 512 * 1024],
    ['dyn2', 2 * MiB],
  ] as const) {
    mkdirSync(`${dir}/${name}`);
    await createVhd(`${dir}/${name}/disk.vhd`, { size: SIZE, blockSize: bs });
    templates.set(name, tpl(name, ['disk.vhd'], Buffer.alloc(SIZE), false));
  }
  // Chains with data on both levels, base and child block sizes both ways round.
  for (const [name, baseBs, childBs] of [
    ['chainA', 512 * 1024, 2 * MiB],
    ['chainB', 2 * MiB, 512 * 1024],
  ] as const) {
    const d = `${dir}/${name}`;
    mkdirSync(d);
    const expected = Buffer.alloc(SIZE);
    await createVhd(`${d}/base.vhd`, { size: SIZE, blockSize: baseBs });
    let disk = await VhdFile.open(`${d}/base.vhd`, { writable: true });
    await scribbleVhd(disk, expected, SEED + baseBs, 30);
    await disk.close();
    if (name === 'chainA') {
      mkdirSync(`${dir}/create`);
      copyFileSync(`${d}/base.vhd`, `${dir}/create/base.vhd`);
      templates.set('create', tpl('create', ['base.vhd'], Buffer.from(expected), false));
    }
    await createVhd(`${d}/child.vhd`, { parent: `${d}/base.vhd`, blockSize: childBs });
    disk = await VhdFile.open(`${d}/child.vhd`, { writable: true });
    await scribbleVhd(disk, expected, SEED + childBs, 30);
    await disk.close();
    templates.set(name, tpl(name, ['base.vhd', 'child.vhd'], expected, true));
  }
}

/** Full runs without a kill: how many file operations and milliseconds a trial takes. */
async function calibrate(): Promise<void> {
  const jobs: (() => Promise<void>)[] = [];
  for (const t of [...templates.values()].filter((x) => x.name !== 'create')) {
    const runs: Record<number, Outcome> = {};
    for (const f of [1, 8]) {
      jobs.push(async () => {
        const tdir = `${dir}/cal-${t.name}-${f}`;
        const file = copyTemplate(t, tdir);
        const seed = SEED + 5;
        const o = await runWorker({ mode: 'write', file, seed, writes: WRITES, flushEvery: f });
        const problems = verifyWrites(await readAll(file), t.before, seed, WRITES, WRITES);
        if (problems.length > 0 || !o.done) throw new Error(`calibration ${t.name}/${f}: ${problems.join('; ')}`);
        runs[f] = o;
        if (runs[1] && runs[8]) {
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
        if (!(await readAll(`${tdir}/base.vhd`)).equals(t.before))
          throw new Error(`calibration merge ${t.name}: the merged base reads different content`);
        templates.set(`${t.name}-merge`, { ...t, ops: { a: o.ops!, b: 0 }, ms: { a: o.ms, b: 0 }, pace: [] });
        rmSync(tdir, { recursive: true, force: true });
      });
    }
  }
  jobs.push(async () => {
    const t = templates.get('create')!;
    const tdir = `${dir}/cal-create`;
    copyTemplate(t, tdir);
    const o = await runWorker({ mode: 'create', file: `${tdir}/child.vhd`, parent: `${tdir}/base.vhd` });
    if (!o.done || !(await readAll(`${tdir}/child.vhd`)).equals(t.before))
      throw new Error('calibration create: the new child does not read its parent');
    t.ops = { a: o.ops!, b: 0 };
    t.ms = { a: o.ms, b: 0 };
    rmSync(tdir, { recursive: true, force: true });
  });
  await forEachBounded(jobs, 2, (job) => job());
}

/** A copy of dist/ and the workers (same layout), so a build elsewhere never hands a worker a half-written module. */
function snapshotWorker(): string {
  for (let attempt = 1; ; attempt++) {
    const snap = `${dir}/snapshot-${attempt}`;
    copyEngine(DIST, snap);
    copyWorkerScripts(snap, ['test/vhd/crash-worker.mjs', 'test/vhdx/crash-plan.mjs']);
    const worker = `${snap}/test/vhd/crash-worker.mjs`;
    const probe = spawnSync(process.execPath, [worker, '{"mode":"none"}'], { encoding: 'utf8' });
    if (probe.stderr.includes('unknown mode none')) return worker;
    if (attempt === 3) throw new Error(`the crash worker does not load from a copy of dist/: ${probe.stderr}`);
    spawnSync('sleep', ['5']);
  }
}

function scratchRoot(): string {
  if (process.env.TIDEMARK_VHD_CRASH_DIR) return process.env.TIDEMARK_VHD_CRASH_DIR;
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
  if (!existsSync(`${DIST}/formats/vhd/vhd.js`))
    throw new Error(`${DIST} is missing the VHD engine: run \`npm run build\` first (npm test does)`);
  dir = mkdtempSync(path.join(scratchRoot(), 'tidemark-vhd-crash-'));
  WORKER = snapshotWorker();
  await makeTemplates();
  await calibrate();
  for (const [k, t] of templates)
    console.log(
      `template ${k}: ~${Math.round(t.ops.a + t.ops.b / 4)} file ops, ~${Math.round(t.ms.a + t.ms.b / 4)} ms`,
    );
}, 300_000);
afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

// ------------------------------------------------------------------ trials

function chooseKill(
  r: ReturnType<typeof rng>,
  t: Template,
  flushEvery: number,
): { self: Partial<WorkerConfig>; parent?: ParentKill; label: string } {
  const ops = t.ops.a + t.ops.b / flushEvery;
  const ms = t.ms.a + t.ms.b / flushEvery;
  const kind = r.pick(t.ops.b === 0 ? ['timer', 'op', 'power'] : ['timer', 'flush', 'op', 'power']);
  if (kind === 'timer') {
    const pace = [...t.pace].sort((x, y) => x - y)[Math.floor(t.pace.length / 2)] ?? 1;
    const delayMs = Math.floor(r.next() * ms * Math.min(1, pace));
    return { self: {}, parent: { kind: 'timer', delayMs }, label: `timer ${delayMs} ms` };
  }
  if (kind === 'flush') {
    const afterFlushes = 1 + r.int(Math.ceil(WRITES / flushEvery));
    const spinUs = r.int(3000);
    return { self: {}, parent: { kind: 'flush', afterFlushes, spinUs }, label: `flush ${afterFlushes} + ${spinUs} µs` };
  }
  const killAtOp = 1 + r.int(Math.max(1, Math.ceil(ops * 1.05)));
  const torn = r.next() < 0.5;
  const powerLoss = kind === 'power';
  const lossSeed = r.int(2 ** 31);
  return {
    self: { killAtOp, torn, powerLoss, lossSeed },
    label: `op ${killAtOp}${torn ? ' torn' : ''}${powerLoss ? ` power-loss ${lossSeed}` : ''}`,
  };
}

const trialIndexes = (prefix: string, n: number) =>
  ONLY ? (ONLY.startsWith(prefix) ? [Number(ONLY.slice(1))] : []) : Array.from({ length: n }, (_, t) => t);

let kills = 0;
const killed = (o: Outcome) => {
  if (!o.done) kills++;
};

describe.skipIf(peersMissing)('SIGKILL at seeded points', () => {
  it('the verifier catches lost, stale and garbage sectors', () => {
    const seed = 99;
    const content = Buffer.alloc(SIZE);
    for (let i = 0; i < 10; i++) {
      const w = planWrite(seed, i, SIZE);
      w.data.copy(content, w.offset);
    }
    expect(verifyWrites(content, Buffer.alloc(SIZE), seed, 10, 10)).toEqual([]);
    const w9 = planWrite(seed, 9, SIZE);
    const lost = Buffer.from(content);
    lost.fill(0, w9.offset, w9.offset + SECTOR);
    expect(verifyWrites(lost, Buffer.alloc(SIZE), seed, 10, 10).length).toBeGreaterThan(0);
    const garbage = Buffer.from(content);
    garbage[w9.offset + 100] ^= 1;
    expect(verifyWrites(garbage, Buffer.alloc(SIZE), seed, 10, 10).length).toBeGreaterThan(0);
  });

  it(`while writing: ${WRITE_TRIALS} trials`, { timeout: Math.max(900_000, WRITE_TRIALS * 15_000) }, async () => {
    const failures: string[] = [];
    const where = new Map<string, number>();
    let verified = 0;
    let qemuCompared = 0;
    let qemuRefused = 0;
    let sevenZip = 0;
    await forEachBounded(trialIndexes('w', WRITE_TRIALS), 2, async (t) => {
      const r = rng(SEED * 31 + t);
      const name = r.pick(['fixed', 'dyn512', 'dyn2', 'dyn512', 'dyn2', 'chainA', 'chainB', 'chainA', 'chainB']);
      const tp = templates.get(name)!;
      const seed = (SEED * 1000 + t) >>> 0;
      const flushEvery = 1 + r.int(8);
      const kill = chooseKill(r, tp, flushEvery);
      const recovery =
        r.next() < 0.25
          ? { mode: 'recover' as const, killAtOp: 1 + r.int(12), powerLoss: r.next() < 0.5, lossSeed: r.int(2 ** 31) }
          : undefined;
      const id = `w${t} (${name}, seed ${seed}, flush every ${flushEvery}, ${kill.label}${recovery ? `, recovery crash at op ${recovery.killAtOp}` : ''})`;
      const fail = (msg: string) => failures.push(`${id}: ${msg}`);
      const tdir = `${dir}/w${t}`;
      try {
        const file = copyTemplate(tp, tdir);
        const o = await runWorker({ mode: 'write', file, seed, writes: WRITES, flushEvery, ...kill.self }, kill.parent);
        killed(o);
        tally(where, o.where);
        if (o.done) tp.pace.push(o.ms / (tp.ms.a + tp.ms.b / flushEvery));
        if (recovery) {
          const ro = await runWorker({ ...recovery, file });
          killed(ro);
          tally(where, `recovery: ${ro.where}`);
        }
        const flushed = o.done ? WRITES : o.flushed;
        const issued = o.done ? WRITES : Math.min(WRITES, o.flushed + flushEvery);

        // QEMU reads the crashed file as it is (it finds the footer copy at 0 when the end one is lost).
        let qemu: Buffer | string | undefined;
        if (!tp.differencing) qemu = await qemuView(file, `${tdir}/q.raw`);

        let content: Buffer;
        try {
          content = await readAll(file);
        } catch (err) {
          fail(`the crashed file does not open: ${(err as Error).message}`);
          return;
        }
        const problems = verifyWrites(content, tp.before, seed, flushed, issued);
        if (problems.length) fail(`after ${flushed} flushed writes: ${problems.join('; ')}`);
        verified += flushed;
        await checkRepairable(file, fail, 'crashed file');
        const recovered = await readAll(file, true);
        if (!recovered.equals(content)) fail('the repaired file reads differently from the crashed one');
        const clean = await checkVhd(file);
        if (clean.errors.length || clean.warnings.length)
          fail(`after a writable open: ${[...clean.errors, ...clean.warnings].map((e) => e.message).join('; ')}`);
        if (typeof qemu === 'string') {
          // QEMU refuses a footer copy at 0 that a crash tore; after the repair it must read the file.
          qemuRefused++;
          qemu = await qemuView(file, `${tdir}/q.raw`);
          if (typeof qemu === 'string') fail(`qemu-img cannot read the repaired file: ${qemu}`);
        }
        if (qemu instanceof Buffer) {
          qemuCompared++;
          if (!qemu.equals(content)) fail('QEMU reads the crashed file differently than we do');
        }
        if (tp.differencing && hasPeer('7zz') && t % 3 === 0) {
          await sevenZipVhd(file, `${tdir}/7z.raw`);
          sevenZip++;
          if (!readFileSync(`${tdir}/7z.raw`).equals(content)) fail('7zz reads the recovered chain differently');
        }
      } catch (err) {
        fail(`unexpected: ${(err as Error).stack}`);
      } finally {
        rmSync(tdir, { recursive: true, force: true });
      }
    });
    console.log(
      `writes: ${WRITE_TRIALS} trials; landed in ${show(where)}; ${verified} flushed writes verified; ` +
        `QEMU compared ${qemuCompared} (${qemuRefused} only after the repair), 7zz compared ${sevenZip}`,
    );
    expect(failures).toEqual([]);
  });

  it(`while creating a differencing disk: ${CREATE_TRIALS} trials`, { timeout: 900_000 }, async () => {
    const failures: string[] = [];
    const outcomes = new Map<string, number>();
    const tp = templates.get('create')!;
    await forEachBounded(trialIndexes('c', CREATE_TRIALS), 2, async (t) => {
      const r = rng(SEED * 41 + t);
      const kill = chooseKill(r, tp, 1);
      const id = `c${t} (${kill.label})`;
      const fail = (msg: string) => failures.push(`${id}: ${msg}`);
      const tdir = `${dir}/c${t}`;
      try {
        const base = copyTemplate(tp, tdir);
        const child = `${tdir}/child.vhd`;
        const o = await runWorker({ mode: 'create', file: child, parent: base, ...kill.self }, kill.parent);
        killed(o);
        const strays = readdirSync(tdir).filter((n) => n.includes('tidemark-tmp'));
        if (existsSync(child)) {
          tally(outcomes, 'child complete');
          if (!(await readAll(child)).equals(tp.before)) fail('the new child does not read its parent');
          const c = await checkVhd(child);
          if (c.errors.length || c.warnings.length) fail(`check of the child: ${c.errors.map((e) => e.message)}`);
        } else {
          tally(outcomes, `no child${strays.length ? ', a temporary file left' : ''}`);
          // Creating again works, whatever the crash left.
          await createVhd(child, { parent: base });
          if (!(await readAll(child)).equals(tp.before)) fail('the child made again does not read its parent');
        }
        if (!(await readAll(base)).equals(tp.before)) fail('the parent changed');
      } catch (err) {
        fail(`unexpected: ${(err as Error).stack}`);
      } finally {
        rmSync(tdir, { recursive: true, force: true });
      }
    });
    console.log(`creates: ${CREATE_TRIALS} trials; ${show(outcomes)}`);
    expect(failures).toEqual([]);
  });

  it(`while merging: ${MERGE_TRIALS} trials`, { timeout: Math.max(900_000, MERGE_TRIALS * 15_000) }, async () => {
    const failures: string[] = [];
    const where = new Map<string, number>();
    const outcomes = new Map<string, number>();
    await forEachBounded(trialIndexes('m', MERGE_TRIALS), 2, async (t) => {
      const r = rng(SEED * 37 + t);
      const tp = templates.get(`${r.pick(['chainA', 'chainB'])}-merge`)!;
      const kill = chooseKill(r, tp, 1);
      const again = r.next() < 0.25 ? chooseKill(r, tp, 1) : undefined;
      const id = `m${t} (${tp.name}, ${kill.label}${again ? `, then ${again.label}` : ''})`;
      const fail = (msg: string) => failures.push(`${id}: ${msg}`);
      const tdir = `${dir}/m${t}`;
      try {
        const child = copyTemplate(tp, tdir);
        const base = `${tdir}/base.vhd`;
        const interrupted = async (label: string): Promise<boolean> => {
          if (!existsSync(child)) return false;
          await checkRepairable(child, fail, `${label}: child`);
          const c = await checkVhd(base);
          if (!c.ok) fail(`${label}: check of the base: ${c.errors.map((e) => e.message).join('; ')}`);
          try {
            if (!(await readAll(child)).equals(tp.before)) fail(`${label}: the chain reads different content`);
          } catch (err) {
            fail(`${label}: the interrupted chain does not open: ${(err as Error).message}`);
          }
          return true;
        };
        const o = await runWorker({ mode: 'merge', file: child, ...kill.self }, kill.parent);
        killed(o);
        tally(where, o.where);
        if (o.done) tp.pace.push(o.ms / tp.ms.a);
        let left = await interrupted('after the crash');
        if (left && again) {
          const o2 = await runWorker({ mode: 'merge', file: child, ...again.self }, again.parent);
          killed(o2);
          tally(where, `again: ${o2.where}`);
          left = await interrupted('after the second crash');
        }
        tally(outcomes, left ? 'child left' : 'merge had finished');
        if (left) {
          await mergeVhd(child);
          if (existsSync(child)) fail('the resumed merge left the child behind');
        }
        const merged = await readAll(base, true);
        if (!merged.equals(tp.before)) fail('the merged base reads different content');
        const c = await checkVhd(base);
        if (c.errors.length || c.warnings.length)
          fail(`check of the merged base: ${[...c.errors, ...c.warnings].map((e) => e.message).join('; ')}`);
        const q = await qemuView(base, `${tdir}/q.raw`);
        if (typeof q === 'string') fail(`qemu-img cannot read the merged base: ${q}`);
        else if (!q.equals(tp.before)) fail('QEMU reads the merged base differently');
      } catch (err) {
        fail(`unexpected: ${(err as Error).stack}`);
      } finally {
        rmSync(tdir, { recursive: true, force: true });
      }
    });
    console.log(`merges: ${MERGE_TRIALS} trials; ${show(outcomes)}; kills landed in ${show(where)}`);
    expect(failures).toEqual([]);
  });

  it('enough SIGKILLs landed', () => {
    console.log(`${kills} workers killed by SIGKILL over ${TRIALS} trials (and their second crashes)`);
    if (!ONLY) expect(kills).toBeGreaterThanOrEqual(Math.min(50, Math.floor(TRIALS * 0.6)));
  });
});
