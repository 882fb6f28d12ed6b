/**
 * Seeded mutation fuzzer (invariant 5): damaged or hostile files get a typed TidemarkError naming the
 * structure: never another exception, a hang or an unbounded allocation. Mutations aim at headers,
 * region tables, metadata (table, items, parent locator), the BAT and log entries, with checksums
 * recomputed half of the time so the damage gets past them; plus random flips and truncation.
 */
import { closeSync, copyFileSync, openSync, readFileSync, readSync, truncateSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { crc32cWithZeroedField } from '../../src/util/crc32c.js';
import { tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const KiB = 1024;
const CASES = Number(process.env.TIDEMARK_FUZZ_CASES ?? 10_000);
const SEED = seedFrom('TIDEMARK_FUZZ_SEED', 1_000_003);
console.log(`fuzz seed ${SEED}, ${CASES} cases (TIDEMARK_FUZZ_SEED, TIDEMARK_FUZZ_CASES)`);

let dir: string;
let cleanup: () => Promise<void>;

interface Base {
  name: string;
  pristine: string; // never touched
  work: string; // mutated per case, restored after
  bytes: Buffer;
}
const bases: Base[] = [];

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('fuzz'));
  const fill = async (file: string, pieces: [number, number, number][], abandon = false) => {
    const d = await VhdxFile.open(file, { writable: true });
    for (const [at, n, v] of pieces) await d.write(Buffer.alloc(n, v), at);
    if (abandon) {
      await d.flush(); // the log holds a live entry: the next open must replay it
      await d.abandon();
    } else await d.close();
  };
  await createVhdx(`${dir}/dyn.vhdx`, { size: 8 * MiB, blockSize: MiB });
  await fill(`${dir}/dyn.vhdx`, [[0, 3000, 1], [2 * MiB + 512, MiB, 2], [7 * MiB, 4096, 3]], true);
  await createVhdx(`${dir}/fixed.vhdx`, { size: 4 * MiB, type: 'fixed', blockSize: MiB, logicalSectorSize: 4096 });
  await fill(`${dir}/fixed.vhdx`, [[4096, 8192, 4]]);
  await createVhdx(`${dir}/parent.vhdx`, { size: 8 * MiB, blockSize: MiB });
  await fill(`${dir}/parent.vhdx`, [[0, 8 * MiB, 5]]);
  await createVhdx(`${dir}/child.avhdx`, { parent: `${dir}/parent.vhdx`, blockSize: MiB });
  await fill(`${dir}/child.avhdx`, [[512, 1024, 6], [3 * MiB, MiB, 7], [5 * MiB + 4096, 512, 8]]);
  for (const name of ['dyn.vhdx', 'fixed.vhdx', 'child.avhdx']) {
    const pristine = `${dir}/${name}.pristine`;
    copyFileSync(`${dir}/${name}`, pristine);
    bases.push({ name, pristine, work: `${dir}/${name}`, bytes: readFileSync(pristine) });
  }
});
afterAll(async () => cleanup?.());

type Rng = ReturnType<typeof rng>;

const INTERESTING = [0, 1, 2, 3, 4, 5, 6, 7, 0x7f, 0x80, 0xff, 0x100, 0xfff, 0x1000, 0xffff, 0x10000, 0x100000, 0x7fffffff, 0x80000000, 0xffffffff];

function value(r: Rng): number {
  return r.next() < 0.6 ? r.pick(INTERESTING) : (r.next() * 2 ** 32) >>> 0;
}

interface Patch {
  offset: number;
  data: Buffer;
}

/** Picks a mutation of `b` (the pristine bytes); returns the patches to apply and a description. */
function mutate(b: Buffer, r: Rng): { patches: Patch[]; what: string; truncate?: number } {
  const u32 = (at: number, v: number) => {
    const d = Buffer.alloc(4);
    d.writeUInt32LE(v >>> 0);
    return { offset: at, data: d };
  };
  const u64 = (at: number, hi: number, lo: number) => {
    const d = Buffer.alloc(8);
    d.writeUInt32LE(lo >>> 0, 0);
    d.writeUInt32LE(hi >>> 0, 4);
    return { offset: at, data: d };
  };
  /** Applies patches to a copy of the structure at [start, start+len) and recomputes its CRC field. */
  const withCrc = (patches: Patch[], start: number, len: number, crcAt: number): Patch[] => {
    const s = Buffer.from(b.subarray(start, start + len));
    for (const p of patches) p.data.copy(s, p.offset - start);
    s.writeUInt32LE(crc32cWithZeroedField(s, crcAt - start), crcAt - start);
    return [{ offset: start, data: s }];
  };
  const kind = r.int(9);
  switch (kind) {
    case 0: {
      const slot = r.pick([64 * KiB, 128 * KiB]);
      const field = r.pick([0, 8, 12, 16, 32, 48, 52, 64, 66, 68, 72, 76]);
      const p = [u32(slot + field, value(r))];
      const fix = r.next() < 0.5;
      return { patches: fix ? withCrc(p, slot, 4 * KiB, slot + 4) : p, what: `header@${slot}+${field}${fix ? ' (crc fixed)' : ''}` };
    }
    case 1: {
      const t = r.pick([192 * KiB, 256 * KiB]);
      const field = r.pick([8, 16, 32, 36, 40, 44, 48, 64, 68, 72, 76]);
      const p = [u32(t + field, value(r))];
      const fix = r.next() < 0.5;
      return { patches: fix ? withCrc(p, t, 64 * KiB, t + 4) : p, what: `region table@${t}+${field}${fix ? ' (crc fixed)' : ''}` };
    }
    case 2: {
      const md = 2 * MiB;
      const at = r.next() < 0.5 ? md + r.pick([8, 10, 32 + 16, 32 + 20, 32 + 24, 64 + 16, 64 + 20, 64 + 24, 96 + 20, 160 + 20, 192 + 16, 192 + 20]) : md + 64 * KiB + r.int(600);
      return { patches: [u32(at, value(r))], what: `metadata@${at - md}` };
    }
    case 3: {
      const bat = 3 * MiB;
      const idx = r.int(24);
      const state = r.int(8);
      const mb = r.pick([0, 1, 3, 4, 5, 6, 100, 4095, 0xfffff, 0xfffffffff]);
      const lo = ((mb % 4096) << 20) | state | (r.next() < 0.2 ? 8 : 0);
      return { patches: [u64(bat + idx * 8, Math.floor(mb / 4096), lo)], what: `BAT[${idx}] state ${state} at ${mb} MiB` };
    }
    case 4: {
      // The log entry (live in dyn.vhdx): header fields and descriptors.
      const log = MiB;
      const field = r.pick([8, 12, 16, 20, 24, 48, 56, 64, 68, 72, 80, 88, 96, 4096, 4100, 8192]);
      const p = [u32(log + field, value(r))];
      const len = b.readUInt32LE(log + 8);
      const fix = r.next() < 0.5 && len > 0 && len <= MiB && field < len;
      return { patches: fix ? withCrc(p, log, len, log + 4) : p, what: `log entry +${field}${fix ? ' (crc fixed)' : ''}` };
    }
    case 5: {
      const n = 1 + r.int(8);
      const patches: Patch[] = [];
      for (let i = 0; i < n; i++) patches.push({ offset: r.int(Math.min(b.length, 4 * MiB)), data: Buffer.from([r.int(256)]) });
      return { patches, what: `${n} random byte flips` };
    }
    case 6:
      return { patches: [], truncate: r.pick([0, 100, 64 * KiB, MiB, 2 * MiB + 100, 3 * MiB, b.length - MiB, b.length - 1]), what: 'truncation' };
    case 7: {
      // Parent locator strings and counts (child only; elsewhere lands in free metadata space).
      const md = 2 * MiB + 64 * KiB;
      const at = md + r.int(400);
      const d = Buffer.from(r.pick(['..\\..\\..\\etc\\passwd', '\\\\?\\Z:\\etc\\shadow', '\\\\?\\Volume{00000000-0000-0000-0000-000000000000}\\x', '.\\child.avhdx', '\0\0\0\0']), 'utf16le');
      return { patches: [{ offset: at, data: d }], what: `locator text at ${at - 2 * MiB}` };
    }
    default: {
      const at = r.int(b.length);
      const d = Buffer.alloc(1 + r.int(64));
      for (let i = 0; i < d.length; i++) d[i] = r.int(256);
      return { patches: [{ offset: at, data: d }], what: `random ${d.length} bytes at ${at}` };
    }
  }
}

async function exercise(file: string, writable: boolean, r: Rng): Promise<void> {
  const disk = await VhdxFile.open(file, { writable, allowedRoots: [dir] });
  try {
    for (let i = 0; i < 3; i++) {
      const n = 1 + r.int(256 * KiB);
      const at = r.int(Math.max(1, disk.virtualSize - n));
      await disk.read(Buffer.alloc(Math.min(n, disk.virtualSize - at)), at);
    }
    if (writable) {
      await disk.write(Buffer.alloc(4096, 9), r.int(disk.virtualSize / 4096) * 4096);
      await disk.trim(0, Math.min(disk.virtualSize, MiB));
      await disk.flush();
    }
    await disk.allocatedExtents();
  } finally {
    await disk.close();
  }
}

describe('mutation fuzzer', () => {
  it(`${CASES} cases: only typed errors, no hang, bounded memory`, { timeout: 900_000 }, async () => {
    const r = rng(SEED);
    const failures: string[] = [];
    const codes = new Map<string, number>();
    let opened = 0;
    for (let c = 0; c < CASES; c++) {
      const base = bases[c % bases.length];
      const m = mutate(base.bytes, r);
      const writable = r.next() < 0.1;
      const restoreWhole = writable || m.truncate !== undefined;
      if (m.truncate !== undefined) truncateSync(base.work, Math.max(0, m.truncate));
      const fd = openSync(base.work, 'r+');
      const saved: Patch[] = [];
      for (const p of m.patches) {
        if (p.offset + p.data.length > base.bytes.length) continue;
        const old = Buffer.alloc(p.data.length);
        readSync(fd, old, 0, old.length, p.offset);
        saved.push({ offset: p.offset, data: old });
        writeSync(fd, p.data, 0, p.data.length, p.offset);
      }
      closeSync(fd);
      let timer: NodeJS.Timeout | undefined;
      try {
        await Promise.race([
          exercise(base.work, writable, r),
          new Promise((_, reject) => (timer = setTimeout(() => reject(new Error('HANG: case took over 5 s')), 5000))),
        ]);
        opened++;
      } catch (err) {
        if (err instanceof TidemarkError && typeof err.code === 'string' && !err.message.includes('\n')) {
          codes.set(err.code, (codes.get(err.code) ?? 0) + 1);
        } else {
          failures.push(`case ${c} (seed ${SEED}, ${base.name}, ${m.what}${writable ? ', writable' : ''}): ${(err as Error)?.stack?.split('\n').slice(0, 3).join(' | ')}`);
        }
      } finally {
        clearTimeout(timer);
      }
      if (restoreWhole) copyFileSync(base.pristine, base.work);
      else {
        const fd2 = openSync(base.work, 'r+');
        for (const p of saved.reverse()) writeSync(fd2, p.data, 0, p.data.length, p.offset);
        closeSync(fd2);
      }
      if (c % 500 === 0 && process.memoryUsage().rss > 1.5 * 2 ** 30) failures.push(`case ${c}: rss ${process.memoryUsage().rss} over 1.5 GiB`);
      if (failures.length >= 10) break;
    }
    console.log(`fuzz: ${opened} cases opened and read; typed errors by code: ${JSON.stringify(Object.fromEntries(codes))}`);
    expect(failures).toEqual([]);
  });
});
