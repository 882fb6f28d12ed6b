/**
 * `check --repair` of misplaced entries killed at seeded points (crash-worker.mjs in `repair` mode, which
 * SIGKILLs itself instead of issuing its k-th write, truncate or datasync; in half the trials the kill also
 * loses or keeps, page by page, what was written since each file's last datasync, as a power loss would).
 *
 * The damaged disk: a 16 MiB dynamic disk in 1 MiB blocks with blocks 0..7 written, then block 2 pointed into
 * the metadata region (lost: --repair sets it to ZERO), block 5 pointed at block 0's space (shared: moved to a
 * copy) and the file cut in the middle of block 7 (truncated: moved with the half that exists). After every
 * kill the file must open (read-only), its intact blocks must read as before (block 0 may be refused while block 5
 * still shares its space), and a second repair must finish
 * with the content the uninterrupted repair gives; qemu-img check must then pass.
 *
 * TIDEMARK_REPAIR_CRASH_SEED (default 6061) and TIDEMARK_REPAIR_CRASH_TRIALS (default 24) select the run.
 */
import { spawn, spawnSync } from 'node:child_process';
import {
  accessSync,
  constants,
  copyFileSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeBatEntry } from '../../src/formats/vhdx/bat.js';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { copyEngine, copyWorkerScripts } from '../helpers/engine-copy.js';
import { missingPeers, qemuImgCheck } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_REPAIR_CRASH_SEED', 6061);
const TRIALS = Number(process.env.TIDEMARK_REPAIR_CRASH_TRIALS ?? 24);
console.log(`repair crash seed ${SEED}, ${TRIALS} trials (TIDEMARK_REPAIR_CRASH_SEED, TIDEMARK_REPAIR_CRASH_TRIALS)`);

const here = path.dirname(fileURLToPath(import.meta.url));
let dir: string;
let worker: string;
let damaged: string;
let expected: Buffer;
let data: Buffer;

function scratchRoot(): string {
  try {
    accessSync('/dev/shm', constants.W_OK);
    return '/dev/shm';
  } catch {
    return os.tmpdir();
  }
}

beforeAll(async () => {
  dir = mkdtempSync(path.join(scratchRoot(), 'tidemark-repair-crash-'));
  // The worker runs from a copy of dist/, so a build elsewhere cannot hand it a half-written module.
  copyEngine(path.join(here, '../../dist'), dir);
  copyWorkerScripts(dir, ['test/vhdx/crash-worker.mjs', 'test/vhdx/crash-plan.mjs']);
  worker = path.join(dir, 'test/vhdx/crash-worker.mjs');

  damaged = path.join(dir, 'damaged.vhdx');
  await createVhdx(damaged, { size: 16 * MiB, blockSize: MiB });
  data = rng(SEED).bytes(8 * MiB);
  const d = await VhdxFile.open(damaged, { writable: true });
  await d.write(data, 0);
  const bat = d.batRegion.fileOffset;
  const md = d.metadataRegion.fileOffset;
  const b0 = (await d.payloadEntry(0)).offset;
  const b7 = (await d.payloadEntry(7)).offset;
  await d.close();
  const buf = readFileSync(damaged);
  const point = (index: number, offset: number) => {
    const [lo, hi] = encodeBatEntry(6, offset);
    buf.writeUInt32LE(lo, bat + index * 8);
    buf.writeUInt32LE(hi, bat + index * 8 + 4);
  };
  point(2, md);
  point(5, b0);
  writeFileSync(damaged, buf);
  truncateSync(damaged, b7 + MiB / 2);

  expected = Buffer.from(data);
  expected.fill(0, 2 * MiB, 3 * MiB); // lost
  data.copy(expected, 5 * MiB, 0, MiB); // it read block 0's space, and still does
  expected.fill(0, 7 * MiB + MiB / 2, 8 * MiB); // the half cut off
});

afterAll(() => {
  if (dir) rmSync(dir, { recursive: true, force: true });
});

interface Run {
  done: boolean;
  ops?: number;
  where?: string;
  stderr: string;
}

function runRepair(file: string, extra: Record<string, unknown> = {}): Promise<Run> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [worker, JSON.stringify({ mode: 'repair', file, ...extra })], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let out = '';
    let stderr = '';
    child.stdout.setEncoding('latin1').on('data', (d: string) => (out += d));
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
    child.on('error', reject);
    child.on('close', () => {
      clearTimeout(timer);
      const done = /^DONE (\d+)$/m.exec(out);
      const crash = /^CRASH \d+ (\S+) \S+ (\S+)/m.exec(out);
      resolve({
        done: !!done,
        ops: done ? Number(done[1]) : undefined,
        where: crash ? `${crash[2]} (${crash[1]})` : undefined,
        stderr,
      });
    });
  });
}

async function content(file: string): Promise<Buffer> {
  const d = await VhdxFile.open(file);
  try {
    return await d.readAt(0, 8 * MiB);
  } finally {
    await d.close();
  }
}

describe('check --repair killed at seeded points', () => {
  it(`${TRIALS} trials: the file opens after each kill, and a second repair ends where an uninterrupted one does`, async () => {
    // The uninterrupted repair: how many file operations it issues, and the content it gives.
    const clean = path.join(dir, 'clean.vhdx');
    copyFileSync(damaged, clean);
    const full = await runRepair(clean);
    expect(full.done, full.stderr).toBe(true);
    expect((await content(clean)).equals(expected)).toBe(true);
    const ops = full.ops!;
    console.log(`an uninterrupted repair issues ${ops} file operations`);

    const r = rng(SEED + 1);
    const where = new Map<string, number>();
    for (let t = 0; t < TRIALS; t++) {
      const file = path.join(dir, `trial-${t}.vhdx`);
      copyFileSync(damaged, file);
      const killAtOp = 1 + r.int(ops);
      const powerLoss = r.next() < 0.5;
      const run = await runRepair(file, { killAtOp, powerLoss, torn: r.next() < 0.5, lossSeed: r.int(2 ** 31) });
      const label = `trial ${t} (seed ${SEED}, kill at op ${killAtOp}${powerLoss ? ', power loss' : ''}): ${run.where ?? 'finished'}`;
      where.set(run.where ?? 'finished', (where.get(run.where ?? 'finished') ?? 0) + 1);
      // It opens, and what was never damaged reads as it did.
      const d = await VhdxFile.open(file);
      try {
        // Block 0 shares its space with block 5 until the repair moved 5: its reads may be refused until then.
        const b0 = await d.readAt(0, MiB).catch((err: Error & { code?: string }) => err.code ?? err.message);
        expect(
          b0 === 'VHDX_CORRUPT' || (Buffer.isBuffer(b0) && b0.equals(data.subarray(0, MiB))),
          `${label}: block 0`,
        ).toBe(true);
        for (const b of [1, 3, 4, 6])
          expect(
            (await d.readAt(b * MiB, MiB)).equals(data.subarray(b * MiB, (b + 1) * MiB)),
            `${label}: block ${b}`,
          ).toBe(true);
      } finally {
        await d.close();
      }
      const again = await checkVhdx(file, { repair: true });
      expect(again.ok, `${label}: ${JSON.stringify(again.errors)}`).toBe(true);
      expect((await content(file)).equals(expected), `${label}: content after the second repair`).toBe(true);
      if (!missingPeers('qemu-img')) {
        const q = await qemuImgCheck(file);
        expect(q.ok, `${label}: ${q.output}`).toBe(true);
      }
      rmSync(file);
    }
    console.log(`kills landed in: ${[...where].map(([k, n]) => `${k} ${n}`).join(', ')}`);
  }, 600_000);
});

// The worker must load (a missing export would make every trial "crash" at start).
it('the worker loads', () => {
  const probe = spawnSync(process.execPath, [worker, '{"mode":"none"}'], { encoding: 'utf8' });
  expect(probe.stderr).toContain('unknown mode none');
});
