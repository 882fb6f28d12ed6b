/**
 * Measurement, not a regular test (skipped unless TIDEMARK_REPO_BENCH=1): backup and restore throughput with the
 * codec inline and on 1–3 worker threads, rounds interleaved so that background load hits every variant alike.
 * Prints MiB/s and the ratio to inline. TIDEMARK_REPO_BENCH_MIB sets the disk size (default 256), ..._ROUNDS the
 * rounds (default 3).
 *
 *   TIDEMARK_REPO_BENCH=1 npx vitest run test/repository/throughput.test.ts
 */
import { randomBytes } from 'node:crypto';
import { readdirSync, readFileSync, statSync, type Dirent } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { Repository } from '../../src/repository/index.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;
const SIZE = Number(process.env.TIDEMARK_REPO_BENCH_MIB ?? 256) * MiB;
const ROUNDS = Number(process.env.TIDEMARK_REPO_BENCH_ROUNDS ?? 3);

/**
 * A disk-like image: the files of this machine's /usr (libraries, programs, text) packed one after another, as a
 * filesystem holds them (what compresses and how fast depends on real content: random bytes or single-symbol
 * patterns would measure zstd's fast paths); then random, text-like, zero and repeated chunks if /usr is short.
 */
function image(size: number): Buffer {
  const img = Buffer.alloc(size);
  let at = 0;
  const walk = (d: string) => {
    let entries: Dirent[];
    try {
      entries = readdirSync(d, { withFileTypes: true }).sort((a, b) => (a.name < b.name ? -1 : 1));
    } catch {
      return;
    }
    for (const e of entries) {
      if (at >= size) return;
      const p = path.join(d, e.name);
      try {
        if (e.isDirectory()) walk(p);
        else if (e.isFile() && statSync(p).size < 64 * MiB) at += readFileSync(p).copy(img, at);
      } catch {
        // unreadable: skip
      }
    }
  };
  for (const d of ['/usr/lib/x86_64-linux-gnu', '/usr/bin', '/usr/share']) walk(d);
  for (let s = Math.ceil(at / MiB); s < size / MiB; s++) {
    const off = s * MiB;
    const k = s % 20;
    if (k < 7) randomBytes(MiB).copy(img, off);
    else if (k < 14) {
      const r = randomBytes(MiB);
      for (let i = 0; i < MiB; i++) img[off + i] = 0x40 | (r[i] & 0x3f);
    } else if (k < 18) continue;
    else if (s > 5) img.copy(img, off, off - 5 * MiB, off - 4 * MiB);
  }
  return img;
}

describe.skipIf(process.env.TIDEMARK_REPO_BENCH !== '1')('repository throughput', () => {
  it('backup and restore, codec inline vs worker threads', async () => {
    const { dir, cleanup } = await tempDir('repo-bench');
    const img = image(SIZE);
    const variants = [0, 1, 2, 3];
    const results = new Map<string, number[]>();
    const note = (k: string, v: number) => results.set(k, [...(results.get(k) ?? []), v]);
    try {
      for (let round = 0; round < ROUNDS; round++) {
        for (const encrypted of [false, true]) {
          for (const workers of variants) {
            const where = path.join(dir, `r${round}-${encrypted}-${workers}`);
            const repo = await Repository.init(where, {
              workers,
              ...(encrypted ? { passphrase: 'x', scryptLogN: 15 } : {}),
            });
            const s = await repo.startBackup();
            const w = await s.openIndex({ virtualSize: SIZE });
            const t0 = performance.now();
            let next = 0;
            const inFlight = Math.max(2, 2 * workers + 2);
            await Promise.all(
              Array.from({ length: inFlight }, async () => {
                while (next < SIZE / MiB) {
                  const off = next++ * MiB;
                  await w.put(off, img.subarray(off, off + MiB));
                }
              }),
            );
            const index = await s.writeIndex(w);
            await repo.backend.sync();
            const backupSecs = (performance.now() - t0) / 1000;
            await s.abort();
            const out = Buffer.alloc(SIZE);
            const t1 = performance.now();
            const idx = await repo.readIndex(index);
            let done = 0;
            await Promise.all(
              Array.from({ length: 8 }, async () => {
                for (;;) {
                  const slot = done++;
                  if (slot >= idx.slotCount) return;
                  const id = idx.idAt(slot);
                  if (id) (await repo.readChunk(id, MiB)).copy(out, slot * MiB);
                }
              }),
            );
            const restoreSecs = (performance.now() - t1) / 1000;
            expect(out.equals(img)).toBe(true);
            const tag = `${encrypted ? 'encrypted' : 'plain'} workers=${workers}`;
            note(`${tag} backup`, SIZE / MiB / backupSecs);
            note(`${tag} restore`, SIZE / MiB / restoreSecs);
            await repo.close();
          }
        }
      }
    } finally {
      await cleanup();
    }
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    console.log(`repository throughput, ${SIZE / MiB} MiB disk, ${ROUNDS} rounds (median MiB/s, ratio to inline)`);
    for (const enc of ['plain', 'encrypted']) {
      for (const op of ['backup', 'restore']) {
        const base = median(results.get(`${enc} workers=0 ${op}`)!);
        const line = variants
          .map((w) => {
            const m = median(results.get(`${enc} workers=${w} ${op}`)!);
            return `w${w} ${m.toFixed(0)} (${(m / base).toFixed(2)})`;
          })
          .join('  ');
        console.log(`  ${enc.padEnd(9)} ${op.padEnd(7)} ${line}`);
      }
    }
  });
});
