// What change tracking costs (the issue's budget): write throughput with tracking on vs off on the same disk
// layout (goal: tracked/untracked <= 1.05), the change map's memory per TiB of virtual disk at the default
// granularity (goal: <= 16 MiB), and a change query over a 1 TiB disk with 1% of its granules changed
// (goal: < 200 ms). Runs the built engine (dist/): `npm run build` first (scripts/bench.sh does).
//
//   node bench/rct-overhead.mjs
//
// Environment: RCT_BENCH_DIR (scratch directory, default the OS temp dir; needs ~4 GiB free for the
// sequential case), RCT_BENCH_RANDOM_WRITES (default 20000), RCT_BENCH_SEQ_MIB (default 1024),
// RCT_BENCH_REPS (default 3), RCT_BENCH_SEED.
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { createVhdx } from '../dist/formats/vhdx/create.js';
import { VhdxFile } from '../dist/formats/vhdx/vhdx.js';
import { ChangeTracker, DEFAULT_GRANULARITY } from '../dist/tracking/tracker.js';
import { NodeFile } from '../dist/util/file.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const RANDOM_WRITES = Number(process.env.RCT_BENCH_RANDOM_WRITES ?? 20000);
const SEQ_MIB = Number(process.env.RCT_BENCH_SEQ_MIB ?? 1024);
const REPS = Number(process.env.RCT_BENCH_REPS ?? 3);
const SEED = Number(process.env.RCT_BENCH_SEED ?? 7);
const DISK = 4 * GiB;
const root = mkdtempSync(path.join(process.env.RCT_BENCH_DIR ?? os.tmpdir(), 'tidemark-rct-bench-'));
process.on('exit', () => rmSync(root, { recursive: true, force: true }));

function words(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

function randomBuffer(n, seed) {
  const w = words(seed);
  const u = new Uint32Array(n / 4);
  for (let i = 0; i < u.length; i++) u[i] = w();
  return Buffer.from(u.buffer);
}

// Where the time goes: every datasync the engine and the tracker make, counted and timed.
const syncs = { n: 0, ns: 0n };
{
  const original = NodeFile.prototype.datasync;
  NodeFile.prototype.datasync = async function () {
    const t = process.hrtime.bigint();
    try {
      return await original.call(this);
    } finally {
      syncs.n++;
      syncs.ns += process.hrtime.bigint() - t;
    }
  };
}

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const fmt = (s) => `${s.toFixed(3)} s`;

/** A fresh 4 GiB dynamic disk (32 MiB blocks); `prealloc` writes 4 KiB into every block first. */
async function freshDisk(name, { tracked, prealloc }) {
  const file = path.join(root, name, 'disk.vhdx');
  await rm(path.dirname(file), { recursive: true, force: true });
  await import('node:fs/promises').then((fs) => fs.mkdir(path.dirname(file), { recursive: true }));
  await createVhdx(file, { size: DISK });
  if (prealloc) {
    const d = await VhdxFile.open(file, { writable: true });
    const b = Buffer.alloc(4096, 1);
    for (let at = 0; at < DISK; at += d.blockSize) await d.write(b, at);
    await d.close();
  }
  if (tracked) {
    const d = await VhdxFile.open(file);
    await ChangeTracker.enable(d, DEFAULT_GRANULARITY);
    await d.close();
  }
  return file;
}

/** Opens (and attaches when tracked), runs `work`, flushes; returns [writes only, writes + flush] seconds. */
async function timedRun(file, tracked, work) {
  const d = await VhdxFile.open(file, { writable: true });
  let tracker;
  if (tracked) {
    tracker = await ChangeTracker.attach(d, { writable: true });
    if (!tracker) throw new Error('not tracked');
  }
  spawnSync('sync'); // start every run with no dirty pages of an earlier one
  syncs.n = 0;
  syncs.ns = 0n;
  const c0 = process.cpuUsage();
  const t0 = process.hrtime.bigint();
  await work(d);
  const t1 = process.hrtime.bigint();
  const beforeFlush = { n: syncs.n, ns: syncs.ns };
  await d.flush();
  const t2 = process.hrtime.bigint();
  const cpu = process.cpuUsage(c0);
  if (tracker) await tracker.seal(); // not timed: a seal is a backup's cost, not a write's
  await d.close();
  return {
    write: Number(t1 - t0) / 1e9,
    total: Number(t2 - t0) / 1e9,
    cpu: (cpu.user + cpu.system) / 1e6,
    syncsDuringWrites: beforeFlush.n,
    syncWaitDuringWrites: Number(beforeFlush.ns) / 1e9,
  };
}

const pool = Array.from({ length: 16 }, (_, i) => randomBuffer(4096, SEED + i));
const randomOffsets = (() => {
  const w = words(SEED);
  return Array.from({ length: RANDOM_WRITES }, () => (w() % (DISK / 4096)) * 4096);
})();
const big = randomBuffer(MiB, SEED + 99);

const workloads = [
  {
    name: `random 4 KiB writes (${RANDOM_WRITES}, preallocated 4 GiB disk)`,
    prealloc: true,
    bytes: RANDOM_WRITES * 4096,
    work: async (d) => {
      for (let i = 0; i < randomOffsets.length; i++) await d.write(pool[i & 15], randomOffsets[i]);
    },
  },
  {
    name: `random 4 KiB writes (${RANDOM_WRITES}, allocating 4 GiB disk)`,
    prealloc: false,
    bytes: RANDOM_WRITES * 4096,
    work: async (d) => {
      for (let i = 0; i < randomOffsets.length; i++) await d.write(pool[i & 15], randomOffsets[i]);
    },
  },
  {
    name: `sequential 1 MiB writes (${SEQ_MIB} MiB, preallocated)`,
    prealloc: true,
    bytes: SEQ_MIB * MiB,
    work: async (d) => {
      for (let i = 0; i < SEQ_MIB; i++) await d.write(big, i * MiB);
    },
  },
  {
    name: `sequential 1 MiB writes (${SEQ_MIB} MiB, allocating)`,
    prealloc: false,
    bytes: SEQ_MIB * MiB,
    work: async (d) => {
      for (let i = 0; i < SEQ_MIB; i++) await d.write(big, i * MiB);
    },
  },
];

console.log(`rct-overhead: ${REPS} alternating runs each, medians; seed ${SEED} (RCT_BENCH_SEED); scratch ${root}`);
const verdicts = [];
for (const w of workloads) {
  const runs = { off: [], on: [] };
  for (let rep = 0; rep < REPS; rep++) {
    // Alternate which goes first, so drift (page cache, writeback) hits both alike.
    const order = rep % 2 === 0 ? [false, true] : [true, false];
    for (const tracked of order) {
      const file = await freshDisk(tracked ? 'on' : 'off', { tracked, prealloc: w.prealloc });
      runs[tracked ? 'on' : 'off'].push(await timedRun(file, tracked, w.work));
      await rm(path.dirname(file), { recursive: true, force: true });
    }
  }
  const m = (k, f) => median(runs[k].map((r) => r[f]));
  const ratioFlush = m('on', 'total') / m('off', 'total');
  const ratioWrite = m('on', 'write') / m('off', 'write');
  const ratioCpu = m('on', 'cpu') / m('off', 'cpu');
  console.log(`${w.name}`);
  console.log(
    `  writes+flush  tracked/untracked = ${ratioFlush.toFixed(3)}  (${fmt(m('on', 'total'))} vs ${fmt(m('off', 'total'))}; ` +
      `${(w.bytes / MiB / m('off', 'total')).toFixed(0)} MiB/s untracked)`,
  );
  console.log(
    `  writes only   tracked/untracked = ${ratioWrite.toFixed(3)}  (${fmt(m('on', 'write'))} vs ${fmt(m('off', 'write'))})`,
  );
  console.log(
    `  CPU time      tracked/untracked = ${ratioCpu.toFixed(3)}  (${fmt(m('on', 'cpu'))} vs ${fmt(m('off', 'cpu'))})`,
  );
  console.log(
    `  datasyncs before the flush: tracked ${m('on', 'syncsDuringWrites')} (waiting ${fmt(m('on', 'syncWaitDuringWrites'))}), ` +
      `untracked ${m('off', 'syncsDuringWrites')} (waiting ${fmt(m('off', 'syncWaitDuringWrites'))})`,
  );
  // Under a noisy machine the ratios swing; the tracker's own cost is mostly its coarse-map datasyncs.
  const extraWait = m('on', 'syncWaitDuringWrites') - m('off', 'syncWaitDuringWrites');
  console.log(
    `  tracking's extra datasync wait: ${fmt(extraWait)} = ${((extraWait / m('off', 'total')) * 100).toFixed(1)}% of the untracked run`,
  );
  verdicts.push([w.name, ratioFlush, ratioWrite]);
}

// ------------------------------------------------------------------ memory and query time at 1 TiB
{
  const file = path.join(root, 'tib', 'disk.vhdx');
  await import('node:fs/promises').then((fs) => fs.mkdir(path.dirname(file), { recursive: true }));
  await createVhdx(file, { size: TiB, blockSize: 256 * MiB }); // few blocks to allocate while stamping
  let d = await VhdxFile.open(file);
  await ChangeTracker.enable(d, DEFAULT_GRANULARITY);
  await d.close();
  d = await VhdxFile.open(file, { writable: true });
  let t = process.hrtime.bigint();
  const tracker = await ChangeTracker.attach(d, { writable: true });
  const attachMs = Number(process.hrtime.bigint() - t) / 1e6;
  const mapMiB = tracker.mapBytes / MiB;
  const heapBefore = process.memoryUsage().arrayBuffers;
  t = process.hrtime.bigint();
  const id = await tracker.seal();
  const sealMs = Number(process.hrtime.bigint() - t) / 1e6;

  // 1% of the granules, spread over the whole disk (a seeded random choice), each stamped by a small write.
  const granules = TiB / DEFAULT_GRANULARITY;
  const w = words(SEED + 1);
  const chosen = new Set();
  while (chosen.size < granules / 100) chosen.add(w() % granules);
  const sorted = [...chosen].sort((a, b) => a - b);
  const piece = Buffer.alloc(512, 0x5a);
  t = process.hrtime.bigint();
  for (const g of sorted) await d.write(piece, g * DEFAULT_GRANULARITY + 4096 * (g % 8));
  await d.flush();
  const stampS = Number(process.hrtime.bigint() - t) / 1e9;
  await tracker.seal();

  const timeQuery = async (paged) => {
    const t0 = process.hrtime.bigint();
    let ranges = 0;
    let bytes = 0;
    if (!paged) {
      const r = await tracker.changes(id);
      ranges = r.ranges.length;
      bytes = r.totalBytes;
    } else {
      for (let done = 0; done < TiB;) {
        const r = await tracker.changes(id, done, TiB - done, 4096);
        ranges += r.ranges.length;
        bytes += r.totalBytes;
        done += r.processedLength;
      }
    }
    return { ms: Number(process.hrtime.bigint() - t0) / 1e6, ranges, bytes };
  };
  await timeQuery(false); // warm up
  const single = [];
  const paged = [];
  let shape;
  for (let i = 0; i < 5; i++) {
    const a = await timeQuery(false);
    single.push(a.ms);
    shape = a;
    paged.push((await timeQuery(true)).ms);
  }
  if (shape.bytes !== sorted.length * DEFAULT_GRANULARITY) throw new Error(`query answered ${shape.bytes} bytes`);
  await d.close();
  console.log(`1 TiB dynamic disk, default granularity ${DEFAULT_GRANULARITY / 1024} KiB`);
  console.log(
    `  map memory     ${mapMiB.toFixed(2)} MiB per TiB (goal <= 16); attach ${attachMs.toFixed(0)} ms, seal ${sealMs.toFixed(0)} ms ` +
      `(array buffers in the process: ${(heapBefore / MiB).toFixed(0)} MiB)`,
  );
  console.log(
    `  query          ${median(single).toFixed(1)} ms for ${shape.ranges} ranges (1% of granules changed, spread; goal < 200 ms); ` +
      `paged by 4096 ranges: ${median(paged).toFixed(1)} ms (median of 5); stamping took ${stampS.toFixed(1)} s`,
  );
  verdicts.push(['map MiB per TiB', mapMiB / 16, undefined]);
  verdicts.push(['query ms (1 TiB, 1%)', median(single) / 200, undefined]);
}

console.log('summary (each must be <= 1.05 for writes, <= 1.0 for memory and query as fractions of the goal):');
for (const [name, a, b] of verdicts)
  console.log(
    `  ${a <= (b === undefined ? 1 : 1.05) ? 'ok  ' : 'OVER'} ${name}: ${a.toFixed(3)}${b !== undefined ? ` (writes only ${b.toFixed(3)})` : ''}`,
  );
