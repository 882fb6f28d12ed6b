#!/usr/bin/env node
// What the open-time placement check costs on a large disk (docs/formats/vhdx.md, "What open enforces"),
// against QEMU opening and checking the same file.
//
// The disk: a dynamic VHDX of BENCH_VIRTUAL_TIB (default 8) TiB in BENCH_BLOCK_MIB (default 1) MiB blocks,
// so millions of BAT entries; made by the engine, then every block marked FULLY_PRESENT at consecutive
// offsets (the file is extended sparsely over them): the worst case for the scan, every entry placed.
// Then the same disk with an empty BAT (a new sparse disk). Timed, each in a fresh process:
//   open r/o    tidemark: VhdxFile.open read-only, close   | qemu-io -r -c quit (QEMU reads the whole BAT too)
//   open r/w    tidemark: VhdxFile.open writable, close    | qemu-io -c quit
//   check       tidemark: vhdx check                       | qemu-img check
// Wall times are medians of BENCH_REPS (default 3) runs; ratios are ours/peer (lower is better); the peak
// RSS of our process is reported too (the scan keeps a bit per MiB of file, never the entries).
// Environment: BENCH_TMPDIR (default /tmp; the file is sparse, its BAT is real: 8 bytes per block),
// BENCH_VIRTUAL_TIB, BENCH_BLOCK_MIB, BENCH_REPS. ext4 limits files to 16 TiB: larger disks need XFS or tmpfs.
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, ftruncateSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { URL } from 'node:url';

const ROOT = new URL('..', import.meta.url).pathname;
const MiB = 2 ** 20;
const TiB = 2 ** 40;
const VIRTUAL = Number(process.env.BENCH_VIRTUAL_TIB ?? 8) * TiB;
const BLOCK = Number(process.env.BENCH_BLOCK_MIB ?? 1) * MiB;
const REPS = Math.max(1, Number(process.env.BENCH_REPS ?? 3));
const work = mkdtempSync(path.join(process.env.BENCH_TMPDIR ?? '/tmp', 'tidemark-bench-open.'));
const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)];

/** Runs `node --input-type=module -e CODE` and returns what it printed as JSON. */
function ours(code) {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', code], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`child failed: ${r.stderr}`);
  return JSON.parse(r.stdout.trim().split('\n').pop());
}

const engine = (p) => JSON.stringify(path.join(ROOT, 'dist', p));
const openCode = (file, writable) => `
  const { VhdxFile } = await import(${engine('formats/vhdx/vhdx.js')});
  const t = performance.now();
  const d = await VhdxFile.open(${JSON.stringify(file)}, { writable: ${writable} });
  await d.close();
  console.log(JSON.stringify({ ms: performance.now() - t, rss: process.resourceUsage().maxRSS * 1024, damaged: d.placement.damagedCount }));`;
const checkCode = (file) => `
  const { checkVhdx } = await import(${engine('formats/vhdx/check.js')});
  const t = performance.now();
  const r = await checkVhdx(${JSON.stringify(file)});
  console.log(JSON.stringify({ ms: performance.now() - t, rss: process.resourceUsage().maxRSS * 1024, ok: r.ok }));`;

function peer(cmd, args) {
  const t = performance.now();
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  const ms = performance.now() - t;
  if (r.error) throw r.error;
  return { ms, status: r.status, out: (r.stdout + r.stderr).trim().split('\n')[0] };
}

function time(label, oursCode, peerCmd) {
  const a = [];
  const b = [];
  let rss = 0;
  let peerNote = '';
  for (let i = 0; i < REPS; i++) {
    const o = ours(oursCode);
    a.push(o.ms);
    rss = Math.max(rss, o.rss);
    if (peerCmd) {
      const p = peer(...peerCmd);
      b.push(p.ms);
      if (p.status !== 0) peerNote = ` (peer exit ${p.status}: ${p.out})`;
    }
  }
  const ma = median(a);
  const line = `${label.padEnd(34)} ours ${ma.toFixed(0).padStart(7)} ms, peak RSS ${(rss / MiB).toFixed(0).padStart(4)} MiB`;
  if (!peerCmd) return console.log(line);
  const mb = median(b);
  console.log(`${line} | peer ${mb.toFixed(0).padStart(7)} ms | ours/peer ${(ma / mb).toFixed(2)}${peerNote}`);
}

try {
  const { createVhdx } = await import(path.join(ROOT, 'dist', 'formats/vhdx/create.js'));
  const { VhdxFile } = await import(path.join(ROOT, 'dist', 'formats/vhdx/vhdx.js'));
  const file = path.join(work, 'big.vhdx');
  await createVhdx(file, { size: VIRTUAL, blockSize: BLOCK });
  const d = await VhdxFile.open(file);
  const g = d.geometry;
  const bat = d.batRegion.fileOffset;
  const dataStart = bat + d.batRegion.length;
  await d.close();
  console.log(
    `disk: ${VIRTUAL / TiB} TiB, ${BLOCK / MiB} MiB blocks: ${g.batEntries} BAT entries (${(g.batEntries * 8) / MiB} MiB of BAT), ${g.dataBlocks} blocks`,
  );

  time('empty BAT: open read-only', openCode(file, false), ['qemu-io', ['-f', 'vhdx', '-r', '-c', 'quit', file]]);
  time('empty BAT: open writable', openCode(file, true), ['qemu-io', ['-f', 'vhdx', '-c', 'quit', file]]);

  // Every block FULLY_PRESENT at consecutive offsets; the file extended (sparsely) over them.
  const fd = openSync(file, 'r+');
  const piece = Buffer.alloc(MiB);
  const cr1 = g.chunkRatio + 1;
  for (let first = 0; first < g.batEntries; first += MiB / 8) {
    const n = Math.min(MiB / 8, g.batEntries - first);
    piece.fill(0);
    for (let k = 0; k < n; k++) {
      const i = first + k;
      const chunk = Math.floor(i / cr1);
      const pos = i - chunk * cr1;
      if (pos === g.chunkRatio) continue; // sector bitmap entries stay NOT_PRESENT
      const block = chunk * g.chunkRatio + pos;
      const mb = (dataStart + block * BLOCK) / MiB;
      piece.writeUInt32LE((((mb % 4096) << 20) | 6) >>> 0, k * 8);
      piece.writeUInt32LE(Math.floor(mb / 4096), k * 8 + 4);
    }
    writeSync(fd, piece, 0, n * 8, bat + first * 8);
  }
  ftruncateSync(fd, dataStart + g.dataBlocks * BLOCK);
  closeSync(fd);
  console.log(`every block allocated: file size ${(dataStart + g.dataBlocks * BLOCK) / TiB} TiB (sparse)`);

  time('all allocated: open read-only', openCode(file, false), ['qemu-io', ['-f', 'vhdx', '-r', '-c', 'quit', file]]);
  time('all allocated: open writable', openCode(file, true), ['qemu-io', ['-f', 'vhdx', '-c', 'quit', file]]);
  time('all allocated: check', checkCode(file), ['qemu-img', ['check', '-f', 'vhdx', file]]);
  execFileSync('sync');
} finally {
  rmSync(work, { recursive: true, force: true });
}
