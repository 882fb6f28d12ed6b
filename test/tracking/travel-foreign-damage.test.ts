/**
 * Change tracking at its edges (invariant 1): where continuity cannot be proven, ids are refused and
 * `rct status` says why; where it can, the answers are the same wherever the files go.
 *
 * - CLI flow: enable, `vhdx write`, seal, changes (--json, paged), disable, re-enable.
 * - Foreign writer: qemu-io writes into a tracked VHDX → old ids refused, status says another program
 *   wrote; a foreign reader (qemu-img check, qemu-io read) costs nothing.
 * - An older copy of the disk put back → old ids refused.
 * - Travel: disk + .rct + .mrt moved elsewhere (the same file instances) answer the same; copied, they are
 *   another lineage: every id is refused and status says it is a copy; the disk alone has no tracking.
 * - Damaged tracking files (truncated, bad CRC, random bytes, deleted, from another disk, rolled back),
 *   after a clean and after an unclean close, opened read-only and writable: a TidemarkError or a reset
 *   (ids refused), never an answer that misses a change (checked against a model of the content). Each
 *   case works on a copy whose tracking file is made to name the copy's file instances (`adoptCopy`), as
 *   if the damage had happened in place: the damage, not the copy, is what is judged.
 */
import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { copyFile, mkdir, open, readFile, rename, rm, stat, truncate, unlink, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { createHash } from 'node:crypto';
import {
  decodeMrtSlot,
  decodeRctHeader,
  encodeRctHeader,
  HEADER_SLOT,
  mapSlotOffset,
  mrtSlotLength,
  type FileRecord,
} from '../../src/tracking/format.js';
import { mergeWithTracking } from '../../src/tracking/merge.js';
import { ChangeTracker, COARSE_REGION, trackingPaths, type ChangeRange } from '../../src/tracking/tracker.js';
import { missingPeers, tempDir } from '../helpers/peers.js';
import { firstUncoveredDifference, firstUncoveredDifferenceFlat, PagedImage, prng, totalBytes } from './model.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const KiB = 1024;
const here = path.dirname(fileURLToPath(import.meta.url));
const repo = path.resolve(here, '../..');
const bin = path.join(repo, 'bin', 'tidemark.js');
const SEED = Number(process.env.TIDEMARK_RCT_SEED ?? 0x5eed1);
console.log(`travel/foreign/damage seed ${SEED} (TIDEMARK_RCT_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  if (!existsSync(path.join(repo, 'dist', 'cli', 'main.js')))
    throw new Error('dist/ is missing: run `npm run build` (npm test does)');
  ({ dir, cleanup } = await tempDir('rct-edges'));
});
afterAll(async () => cleanup?.());

async function cli(...args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [bin, ...args], { maxBuffer: 64 * MiB });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string };
    return { code: typeof e.code === 'number' ? e.code : -1, stdout: e.stdout ?? '', stderr: e.stderr ?? '' };
  }
}

async function sub(name: string): Promise<string> {
  const d = path.join(dir, name);
  await rm(d, { recursive: true, force: true });
  await mkdir(d, { recursive: true });
  return d;
}

/** Copies a disk and (unless `alone`) its tracking files into `toDir`, keeping the file name. */
async function copyDisk(file: string, toDir: string, alone = false): Promise<string> {
  const to = path.join(toDir, path.basename(file));
  await copyFile(file, to);
  if (!alone) {
    const a = trackingPaths(file);
    const b = trackingPaths(to);
    if (existsSync(a.rct)) await copyFile(a.rct, b.rct);
    if (existsSync(a.mrt)) await copyFile(a.mrt, b.mrt);
  }
  return to;
}

/**
 * Makes a copy's tracking file name the copy's own file instances (device, inode, birth time, and times
 * and sizes), as the original's named the original's: the copy then stands for the original with its
 * damage done in place. Header slots that do not decode are left as they are.
 */
async function adoptCopy(file: string): Promise<void> {
  const { rct, mrt } = trackingPaths(file);
  const record = async (p: string, named: boolean): Promise<FileRecord> => {
    const st = await stat(p, { bigint: true });
    return {
      nameHash: named ? createHash('sha256').update(path.basename(p)).digest('hex').slice(0, 16) : '',
      dev: st.dev,
      ino: st.ino,
      birthNs: st.birthtimeNs,
      ctimeNs: st.ctimeNs,
      mtimeNs: st.mtimeNs,
      size: st.size,
    };
  };
  const disk = await record(file, true);
  const f = await open(rct, 'r+');
  try {
    for (const slot of [0, 1]) {
      const b = Buffer.alloc(HEADER_SLOT);
      await f.read(b, 0, HEADER_SLOT, slot * HEADER_SLOT);
      const h = decodeRctHeader(b);
      if (typeof h === 'string') continue;
      h.chain = h.chain.map((r) => (r.nameHash === disk.nameHash ? disk : r));
      h.rctFile = await record(rct, false);
      h.mrtFile = existsSync(mrt) ? await record(mrt, false) : h.mrtFile;
      await f.write(encodeRctHeader(h), 0, HEADER_SLOT, slot * HEADER_SLOT);
    }
  } finally {
    await f.close();
  }
}

async function withTracker<T>(
  file: string,
  writable: boolean,
  fn: (t: ChangeTracker, disk: VhdxFile) => Promise<T>,
): Promise<T> {
  const disk = await VhdxFile.open(file, { writable });
  try {
    const t = await ChangeTracker.attach(disk, { writable });
    if (!t) throw new Error(`${file}: not tracked`);
    return await fn(t, disk);
  } finally {
    await disk.close();
  }
}

async function allChanges(t: ChangeTracker, id: string): Promise<ChangeRange[]> {
  return (await t.changes(id)).ranges;
}

async function refusal(p: Promise<unknown>): Promise<TidemarkError | undefined> {
  try {
    await p;
    return undefined;
  } catch (err) {
    if (err instanceof TidemarkError) return err;
    throw err;
  }
}

// ------------------------------------------------------------------------------------------ CLI flow

describe('rct on the command line', () => {
  it('enable, vhdx write, seal, changes (--json, paged, *), disable, re-enable', async () => {
    const d = await sub('cli');
    const disk = path.join(d, 'disk.vhdx');
    expect((await cli('vhdx', 'create', disk, '--size', '64M', '--block-size', '1M')).code).toBe(0);
    const en = await cli('rct', 'enable', disk, '--granularity', '64K');
    expect(en.code, en.stderr).toBe(0);
    expect(en.stdout).toMatch(/change tracking enabled/);
    expect(existsSync(`${disk}.rct`) && existsSync(`${disk}.mrt`)).toBe(true);
    expect((await cli('rct', 'enable', disk)).code).not.toBe(0); // already enabled

    let st = JSON.parse((await cli('rct', 'status', disk, '--json')).stdout);
    expect(st).toMatchObject({ enabled: true, state: 'valid', granularity: 64 * KiB, lastId: null, inUse: false });

    const data1 = path.join(d, 'data1');
    await writeFile(data1, Buffer.alloc(3000, 0x11));
    const w1 = await cli('vhdx', 'write', disk, '--offset', String(MiB + 7), '--input', data1);
    expect(w1.code, w1.stderr).toBe(0);
    const s1 = await cli('rct', 'seal', disk, '--json');
    expect(s1.code, s1.stderr).toBe(0);
    const id1 = JSON.parse(s1.stdout).id as string;
    expect(id1).toMatch(/^rct2:[0-9a-f]{8}(:[0-9a-f]{4}){3}:[0-9a-f]{12}:00000001:[0-9a-f]{16}$/);

    // Two separate writes after id1: [10M+5, +100000) and [40M, +1).
    const data2 = path.join(d, 'data2');
    await writeFile(data2, Buffer.alloc(100000, 0x22));
    expect((await cli('vhdx', 'write', disk, '--offset', String(10 * MiB + 5), '--input', data2)).code).toBe(0);
    await writeFile(data2, Buffer.alloc(1, 0x33));
    expect((await cli('vhdx', 'write', disk, '--offset', String(40 * MiB), '--input', data2)).code).toBe(0);

    const ch = await cli('rct', 'changes', disk, '--since', id1, '--json');
    expect(ch.code, ch.stderr).toBe(0);
    const answer = JSON.parse(ch.stdout);
    const g = 64 * KiB;
    const want = [
      { offset: 10 * MiB, length: Math.ceil((10 * MiB + 5 + 100000) / g) * g - 10 * MiB },
      { offset: 40 * MiB, length: g },
    ];
    expect(answer).toMatchObject({ since: id1, offset: 0, length: 64 * MiB, processedLength: 64 * MiB });
    expect(answer.ranges).toEqual(want);
    expect(answer.totalBytes).toBe(totalBytes(want));

    // Paged by hand: one range per call, continuing from processedLength.
    const p1 = JSON.parse((await cli('rct', 'changes', disk, '--since', id1, '--max-ranges', '1', '--json')).stdout);
    expect(p1.ranges).toEqual([want[0]]);
    expect(p1.processedLength).toBe(40 * MiB);
    const p2 = JSON.parse(
      (await cli('rct', 'changes', disk, '--since', id1, '--offset', String(p1.processedLength), '--json')).stdout,
    );
    expect(p2.ranges).toEqual([want[1]]);

    // Text output and "*" (every allocated range, for a first full backup).
    const txt = await cli('rct', 'changes', disk, '--since', id1);
    expect(txt.stdout).toMatch(/# 2 ranges, \d+ bytes changed/);
    const star = JSON.parse((await cli('rct', 'changes', disk, '--since', '*', '--json')).stdout);
    expect(star.ranges.length).toBeGreaterThan(0);
    expect(star.ranges.some((r: ChangeRange) => r.offset <= MiB + 7 && r.offset + r.length >= MiB + 3007)).toBe(true);

    const id2 = (await cli('rct', 'seal', disk)).stdout.trim();
    expect(id2).toMatch(/:00000002:[0-9a-f]{16}$/);
    expect(JSON.parse((await cli('rct', 'changes', disk, '--since', id2, '--json')).stdout).ranges).toEqual([]);
    st = JSON.parse((await cli('rct', 'status', disk, '--json')).stdout);
    expect(st).toMatchObject({ state: 'valid', firstId: id1, lastId: id2, inUse: false });

    // Malformed, never-sealed, other-lineage (a sealed counter with another nonce: what a copy seals) and
    // older-format ids: refused with the code, one line on stderr.
    const otherNonce = id2.replace(
      /:([0-9a-f]{16})$/,
      (_m, n: string) => `:${(BigInt(`0x${n}`) ^ 1n).toString(16).padStart(16, '0')}`,
    );
    for (const [bad, why] of [
      ['nonsense', /not a change tracking id/],
      [id2.replace(/:00000002:/, ':00000009:'), /never sealed/],
      [otherNonce, /another copy or another state/],
      [id2.replace(/^rct2:/, 'rct1:').replace(/:[0-9a-f]{16}$/, ''), /older Tidemark tracking format/],
    ] as const) {
      const r = await cli('rct', 'changes', disk, '--since', bad);
      expect(r.code).toBe(6);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/MISSING_CHANGE_TRACKING_INFORMATION/);
      expect(r.stderr).toMatch(why);
    }

    const dis = await cli('rct', 'disable', disk);
    expect(dis.code, dis.stderr).toBe(0);
    expect(existsSync(`${disk}.rct`) || existsSync(`${disk}.mrt`)).toBe(false);
    expect(JSON.parse((await cli('rct', 'status', disk, '--json')).stdout)).toMatchObject({ enabled: false });
    const off = await cli('rct', 'changes', disk, '--since', id1);
    expect(off.code).toBe(3);
    expect(off.stderr).toMatch(/TRACKING_NOT_ENABLED/);

    // Re-enabled: a new epoch, the old ids mean nothing in it.
    expect((await cli('rct', 'enable', disk)).code).toBe(0);
    const again = await cli('rct', 'changes', disk, '--since', id1);
    expect(again.code).toBe(6);
    expect(again.stderr).toMatch(/MISSING_CHANGE_TRACKING_INFORMATION/);
  });
});

// ------------------------------------------------------------------------------------ foreign writers

/** A tracked disk with one sealed id and a write after it, closed cleanly. */
async function trackedDisk(
  d: string,
  name = 'disk.vhdx',
  granularity = 64 * KiB,
): Promise<{ file: string; id1: string }> {
  const file = path.join(d, name);
  await createVhdx(file, { size: 64 * MiB, blockSize: MiB });
  let disk = await VhdxFile.open(file);
  await ChangeTracker.enable(disk, granularity);
  await disk.close();
  disk = await VhdxFile.open(file, { writable: true });
  const t = (await ChangeTracker.attach(disk))!;
  await disk.write(Buffer.alloc(5000, 1), 3 * MiB + 11);
  const id1 = await t.seal();
  await disk.write(Buffer.alloc(5000, 2), 20 * MiB + 11);
  await disk.close();
  return { file, id1 };
}

describe.skipIf(missingPeers('qemu-io', 'qemu-img'))('a foreign writer resets the epoch', () => {
  it('qemu-io writes into a tracked VHDX: rct status says another program wrote, old ids are refused', async () => {
    const d = await sub('foreign');
    const { file, id1 } = await trackedDisk(d);
    const q = await execFileP('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 0 4k', file]);
    expect(q.stdout + q.stderr).not.toMatch(/error|fail/i);

    const st = await cli('rct', 'status', file, '--json');
    expect(st.code, st.stderr).toBe(0);
    const status = JSON.parse(st.stdout);
    expect(status).toMatchObject({ enabled: true, state: 'reset', lastId: null });
    expect(status.reason).toMatch(/another program/);
    const human = await cli('rct', 'status', file);
    expect(human.stdout).toMatch(/reset \(.*another program/);

    const ch = await cli('rct', 'changes', file, '--since', id1);
    expect(ch.code).not.toBe(0);
    expect(ch.stderr.trim().split('\n')).toHaveLength(1);
    expect(ch.stderr).toMatch(/MISSING_CHANGE_TRACKING_INFORMATION/);
    expect(ch.stdout).toBe('');
  });

  it('the same, asking for changes first (the query itself notices the foreign write)', async () => {
    const d = await sub('foreign2');
    const { file, id1 } = await trackedDisk(d);
    await execFileP('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 8M 512', file]);
    const ch = await cli('rct', 'changes', file, '--since', id1, '--json');
    expect(ch.code).toBe(6);
    expect(ch.stderr.trim().split('\n')).toHaveLength(1);
    expect(ch.stderr).toMatch(/MISSING_CHANGE_TRACKING_INFORMATION/);
    const status = JSON.parse((await cli('rct', 'status', file, '--json')).stdout);
    expect(status.state).toBe('reset');
    expect(status.reason).toMatch(/another program/);
    // Tracking restarts from here: a new id after the reset works.
    const s = await cli('rct', 'seal', file, '--json');
    expect(s.code, s.stderr).toBe(0);
    expect(
      JSON.parse((await cli('rct', 'changes', file, '--since', JSON.parse(s.stdout).id, '--json')).stdout).ranges,
    ).toEqual([]);
  });

  it('a foreign writer after an unclean close is caught too', async () => {
    const d = await sub('foreign3');
    const file = path.join(d, 'disk.vhdx');
    await createVhdx(file, { size: 64 * MiB, blockSize: MiB });
    let disk = await VhdxFile.open(file);
    await ChangeTracker.enable(disk);
    await disk.close();
    disk = await VhdxFile.open(file, { writable: true });
    const t = (await ChangeTracker.attach(disk))!;
    await disk.write(Buffer.alloc(4096, 1), 0);
    const id1 = await t.seal();
    await disk.write(Buffer.alloc(4096, 2), 8192);
    await disk.close(); // clean for the VHDX (qemu refuses a dirty log read-only, and replays it read-write)
    // ... but the tracker was abandoned mid-session: reopen it writable and drop it without closing.
    disk = await VhdxFile.open(file, { writable: true });
    const t2 = (await ChangeTracker.attach(disk))!;
    await disk.flush();
    await t2.abandon();
    await disk.abandon();
    await execFileP('qemu-io', ['-f', 'vhdx', '-c', 'write -P 0x5a 32M 4k', file]);
    const ch = await cli('rct', 'changes', file, '--since', id1);
    expect(ch.code).toBe(6);
    expect(ch.stderr).toMatch(/MISSING_CHANGE_TRACKING_INFORMATION/);
  });

  it('foreign readers cost nothing: qemu-img check and qemu-io read keep the ids valid', async () => {
    const d = await sub('foreign-read');
    const { file, id1 } = await trackedDisk(d);
    const before = JSON.parse((await cli('rct', 'changes', file, '--since', id1, '--json')).stdout).ranges;
    await execFileP('qemu-img', ['check', '-f', 'vhdx', file]);
    await execFileP('qemu-io', ['-r', '-f', 'vhdx', '-c', 'read 0 64k', file]);
    await execFileP('qemu-io', ['-f', 'vhdx', '-c', 'read 0 64k', file]); // opened read-write, nothing written
    const st = JSON.parse((await cli('rct', 'status', file, '--json')).stdout);
    expect(st.state, st.reason).toBe('valid');
    expect(JSON.parse((await cli('rct', 'changes', file, '--since', id1, '--json')).stdout).ranges).toEqual(before);
  });
});

// ---------------------------------------------------------------------- writers that bypass tracking

/** Reads the whole virtual disk through `file`'s chain. */
async function readDisk(file: string): Promise<Buffer> {
  const d = await VhdxFile.open(file);
  try {
    return await d.readAt(0, d.virtualSize);
  } finally {
    await d.close();
  }
}

/**
 * Never a silent miss: `id` is refused (MISSING_CHANGE_TRACKING_INFORMATION), or its answer covers every
 * byte that differs between `atSeal` and the disk's content now. Returns which of the two happened.
 */
async function refusedOrComplete(file: string, id: string, atSeal: Buffer): Promise<'refused' | 'answered'> {
  const now = await readDisk(file);
  return withTracker(file, false, async (t) => {
    const e = await refusal(t.changes(id));
    if (e) {
      expect(e.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(t.status().state).toBe('reset');
      return 'refused';
    }
    const ranges = await allChanges(t, id);
    const missed = firstUncoveredDifferenceFlat(atSeal, now, ranges);
    expect(
      missed,
      `SILENT MISS: byte ${missed} changed since ${id} but changes() answers ${JSON.stringify(ranges)} (status ${JSON.stringify(t.status().state)})`,
    ).toBeUndefined();
    return 'answered';
  });
}

describe('writers that bypass the tracker', () => {
  it('Tidemark itself writing without attaching a tracker: the ids are refused', async () => {
    const d = await sub('untracked-write');
    const { file, id1 } = await trackedDisk(d);
    const before = await readDisk(file);
    const disk = await VhdxFile.open(file, { writable: true });
    await disk.write(Buffer.alloc(4096, 0x77), 40 * MiB);
    await disk.close();
    expect(await refusedOrComplete(file, id1, before)).toBe('refused');
  });

  it('after a reset, the reason outlives the next seal: old ids stay refused with the reason', async () => {
    const d = await sub('reason-kept');
    const { file, id1 } = await trackedDisk(d);
    const disk = await VhdxFile.open(file, { writable: true });
    await disk.write(Buffer.alloc(4096, 0x77), 40 * MiB); // untracked
    await disk.close();
    const first = JSON.parse((await cli('rct', 'status', file, '--json')).stdout);
    expect(first.state).toBe('reset');
    expect(first.reason).toMatch(/another program/);
    // The backup application seals a new baseline in the new epoch (its full backup) ...
    expect((await cli('rct', 'seal', file)).code).toBe(0);
    // ... and the old id is still refused, with the reason the epoch began (the backup report says why).
    const ch = await cli('rct', 'changes', file, '--since', id1);
    expect(ch.code).toBe(6);
    expect(ch.stderr).toMatch(/another program/);
  });

  it('a child written without tracking, then hidden under a new empty child: refused, never answered short', async () => {
    // base (tracked, id1 sealed) <- mid.avhdx (written by a program that did not track) <- top.avhdx (empty).
    const d = await sub('hidden-middle');
    const { file: base, id1 } = await trackedDisk(d, 'base.vhdx');
    const atId1 = await readDisk(base); // nothing was written after the close that followed id1's write
    const mid = path.join(d, 'mid.avhdx');
    const top = path.join(d, 'top.avhdx');
    await createVhdx(mid, { parent: base });
    const disk = await VhdxFile.open(mid, { writable: true });
    await disk.write(Buffer.alloc(4096, 0x99), 10 * MiB); // not tracked: no ChangeTracker.attach
    await disk.close();
    await createVhdx(top, { parent: mid });
    // The content the chain shows differs from the content at id1 at 10 MiB: the answer must cover it.
    expect((await readDisk(top)).subarray(10 * MiB, 10 * MiB + 4).toString('hex')).toBe('99999999');
    // atId1 is the base as closed (it includes the write made after id1, which the answer covers too).
    expect(await refusedOrComplete(top, id1, atId1)).toBe('refused');
  });

  it('a discarded checkpoint (the child deleted, the base is the head again): refused', async () => {
    const d = await sub('discarded');
    const { file: base, id1 } = await trackedDisk(d, 'base.vhdx');
    const atBase = await readDisk(base);
    const child = path.join(d, 'base-ckpt.avhdx');
    await createVhdx(child, { parent: base });
    const id2 = await withTracker(child, true, async (t, dk) => {
      await dk.write(Buffer.alloc(4096, 0x42), 12 * MiB);
      return t.seal();
    });
    const atId2 = await readDisk(child);
    await withTracker(child, true, async (_t, dk) => dk.write(Buffer.alloc(4096, 0x43), 13 * MiB));
    await unlink(child); // revert: the guest goes back to the base's content
    expect(await refusedOrComplete(base, id2, atId2)).toBe('refused');
    expect(await refusedOrComplete(base, id1, atBase)).toBe('refused');
  });

  it('a checkpoint replaced by a new child of the same name: refused', async () => {
    const d = await sub('replaced-child');
    const { file: base } = await trackedDisk(d, 'base.vhdx');
    const child = path.join(d, 'base-ckpt.avhdx');
    await createVhdx(child, { parent: base });
    const id2 = await withTracker(child, true, async (t, dk) => {
      await dk.write(Buffer.alloc(4096, 0x42), 12 * MiB);
      return t.seal();
    });
    const atId2 = await readDisk(child);
    await unlink(child);
    await createVhdx(child, { parent: base }); // same name, the base's content again
    expect(await refusedOrComplete(child, id2, atId2)).toBe('refused');
  });

  it('a second writable attach on one open disk: refused, or every answer still covers every write', async () => {
    const d = await sub('double-attach');
    const { file } = await trackedDisk(d);
    const disk = await VhdxFile.open(file, { writable: true });
    try {
      const t1 = (await ChangeTracker.attach(disk))!;
      const id = await t1.seal();
      const atId = await disk.readAt(0, disk.virtualSize);
      let t2: ChangeTracker | undefined;
      try {
        t2 = await ChangeTracker.attach(disk);
      } catch (err) {
        expect(err).toBeInstanceOf(TidemarkError); // refusing the second tracker is a fine answer
        return;
      }
      await disk.write(Buffer.alloc(100, 0x31), 20 * MiB);
      const now = await disk.readAt(0, disk.virtualSize);
      for (const [name, t] of [
        ['first tracker', t1],
        ['second tracker', t2!],
      ] as const) {
        const e = await refusal(t.changes(id));
        if (e) continue;
        const ranges = await allChanges(t, id);
        expect(
          firstUncoveredDifferenceFlat(atId, now, ranges),
          `${name}: SILENT MISS ${JSON.stringify(ranges)}`,
        ).toBeUndefined();
      }
    } finally {
      await disk.close();
    }
  });

  it('an interrupted tracked merge: ids still answer completely; finishing the merge keeps them', async () => {
    const d = await sub('merge-interrupted');
    const base = path.join(d, 'base.vhdx');
    const child = path.join(d, 'base-ckpt.avhdx');
    await createVhdx(base, { size: 64 * MiB, blockSize: MiB });
    const disk = await VhdxFile.open(base);
    await ChangeTracker.enable(disk, 16 * KiB);
    await disk.close();
    const r = prng(SEED + 3);
    const id1 = await withTracker(base, true, async (t, dk) => {
      for (let i = 0; i < 20; i++) await dk.write(r.bytes(1 + r.int(30000)), r.int(60 * MiB));
      return t.seal();
    });
    const atId1 = await readDisk(base);
    await createVhdx(child, { parent: base, blockSize: MiB });
    const id2 = await withTracker(child, true, async (t, dk) => {
      for (let i = 0; i < 30; i++) await dk.write(r.bytes(1 + r.int(30000)), r.int(60 * MiB));
      await dk.trim(30 * MiB, 3 * MiB);
      return t.seal();
    });
    const atId2 = await readDisk(child);
    await withTracker(child, true, async (_t, dk) => dk.write(r.bytes(5000), 50 * MiB + 3));
    const content = await readDisk(child);

    // Interrupted after a few blocks: the parent is half merged, the child still the head.
    let blocks = 0;
    await expect(
      mergeWithTracking(child, {
        onProgress: () => {
          if (++blocks === 20) throw new Error('power cut');
        },
      }),
    ).rejects.toThrow('power cut');
    expect((await readDisk(child)).equals(content)).toBe(true);
    expect(await refusedOrComplete(child, id1, atId1)).toBe('answered');
    expect(await refusedOrComplete(child, id2, atId2)).toBe('answered');

    // Run again to finish: the base is the head, with the same content and the same ids.
    await mergeWithTracking(child);
    expect(existsSync(child)).toBe(false);
    expect((await readDisk(base)).equals(content)).toBe(true);
    expect(await refusedOrComplete(base, id1, atId1)).toBe('answered');
    expect(await refusedOrComplete(base, id2, atId2)).toBe('answered');
    await withTracker(base, false, async (t) => expect(t.status().state).toBe('valid'));
  });
});

describe('a replaced disk resets the epoch', () => {
  it('an older copy of the disk put back: every id is refused and status says why', async () => {
    const d = await sub('old-copy');
    const { file, id1 } = await trackedDisk(d);
    const saved = path.join(d, 'saved.bin');
    await copyFile(file, saved);
    const id2 = await withTracker(file, true, async (t, disk) => {
      await disk.write(Buffer.alloc(7000, 3), 30 * MiB + 1);
      return t.seal();
    });
    await withTracker(file, true, async (_t, disk) => disk.write(Buffer.alloc(10, 4), 50 * MiB));
    await copyFile(saved, file); // the tracking files stay: they describe the newer disk
    await withTracker(file, false, async (t) => {
      for (const id of [id1, id2]) {
        const e = await refusal(t.changes(id));
        expect(e?.code, id).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      }
      expect(t.status().state).toBe('reset');
      expect(t.status().reason).toMatch(/another program or replaced by another copy/);
    });
  });

  it('a disk renamed without its tracking files is not tracked; renamed with them, the ids are refused', async () => {
    const d = await sub('renamed');
    const { file, id1 } = await trackedDisk(d);
    const renamed = path.join(d, 'other.vhdx');
    await copyFile(file, renamed);
    expect(JSON.parse((await cli('rct', 'status', renamed, '--json')).stdout)).toMatchObject({ enabled: false });
    await copyFile(`${file}.rct`, `${renamed}.rct`);
    await copyFile(`${file}.mrt`, `${renamed}.mrt`);
    await withTracker(renamed, false, async (t) => {
      expect((await refusal(t.changes(id1)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(t.status().reason).toMatch(/other\.vhdx/);
    });
  });
});

// -------------------------------------------------------------------------------------------- travel

describe('tracking travels with the disk, and a copy is another lineage', () => {
  it('disk + .rct + .mrt moved elsewhere answer the same queries; copied, every id is refused; the disk alone has no tracking', async () => {
    const d = await sub('travel');
    const file = path.join(d, 'vm.vhdx');
    await createVhdx(file, { size: 64 * MiB, blockSize: MiB });
    let disk = await VhdxFile.open(file);
    await ChangeTracker.enable(disk, 16 * KiB);
    await disk.close();
    const r = prng(SEED);
    const ids: string[] = [];
    disk = await VhdxFile.open(file, { writable: true });
    const t = (await ChangeTracker.attach(disk))!;
    for (let s = 0; s < 5; s++) {
      for (let i = 0; i < 20; i++) await disk.write(r.bytes(1 + r.int(20000)), r.int(64 * MiB - 20000));
      ids.push(await t.seal());
    }
    await disk.write(r.bytes(777), 33 * MiB + 3);
    await disk.close();

    const answers = async (f: string) =>
      withTracker(f, false, async (tr) => ({
        status: { ...tr.status(), trackingFiles: undefined },
        changes: await Promise.all(ids.map((id) => allChanges(tr, id))),
      }));
    const here1 = await answers(file);
    expect(here1.changes.every((c) => c.length > 0)).toBe(true);

    // A copy (disk and tracking files together) is another file instance: nothing it says can be vouched for.
    const copy = await copyDisk(file, await sub('travel-copy'));
    await withTracker(copy, false, async (tr) => {
      for (const id of ids)
        expect((await refusal(tr.changes(id)))?.code, id).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(tr.status()).toMatchObject({ state: 'reset' });
      expect(tr.status().reason).toMatch(/copy/);
    });
    const cc = await cli('rct', 'changes', copy, '--since', ids[4]);
    expect(cc.code).toBe(6);
    expect(cc.stderr).toMatch(/MISSING_CHANGE_TRACKING_INFORMATION: .*copy/);

    // Moved (renamed into another directory of the same file system): the same instances, the same answers.
    const farDir = await sub('travel-far');
    const far = path.join(farDir, path.basename(file));
    for (const [a, b] of [
      [file, far],
      [`${file}.rct`, `${far}.rct`],
      [`${file}.mrt`, `${far}.mrt`],
    ])
      await rename(a, b);
    const there = await answers(far);
    expect(there).toEqual(here1);
    // The CLI agrees.
    const a = await cli('rct', 'changes', far, '--since', ids[4], '--json');
    expect(a.code, a.stderr).toBe(0);
    expect(JSON.parse(a.stdout).ranges).toEqual(here1.changes[4]);

    // The copy goes on by itself in its own lineage: its ids are refused on the original, and the other way round.
    const copyId = await withTracker(copy, true, async (tr, dk) => {
      const id = await tr.seal();
      await dk.write(Buffer.alloc(100, 9), 60 * MiB);
      return id;
    });
    await withTracker(copy, false, async (tr) =>
      expect(await allChanges(tr, copyId)).toEqual([{ offset: 60 * MiB, length: 16 * KiB }]),
    );
    const farId = await withTracker(far, true, async (tr) => tr.seal());
    await withTracker(far, false, async (tr) =>
      expect((await refusal(tr.changes(copyId)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION'),
    );
    await withTracker(copy, false, async (tr) =>
      expect((await refusal(tr.changes(farId)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION'),
    );

    // The disk copied alone: no tracking (status says so, queries say so), nothing invented.
    const alone = await copyDisk(far, await sub('travel-alone'), true);
    const st = await cli('rct', 'status', alone, '--json');
    expect(st.code).toBe(0);
    expect(JSON.parse(st.stdout)).toMatchObject({ enabled: false });
    const ch = await cli('rct', 'changes', alone, '--since', ids[0]);
    expect(ch.code).toBe(3);
    expect(ch.stderr).toMatch(/TRACKING_NOT_ENABLED/);
    const dk = await VhdxFile.open(alone);
    expect(await ChangeTracker.attach(dk)).toBeUndefined();
    await dk.close();
  });

  it('a chain (base, child, tracking files beside the base) travels when moved; copied, it is refused', async () => {
    const d = await sub('travel-chain');
    const base = path.join(d, 'base.vhdx');
    const child = path.join(d, 'base-1.avhdx');
    await createVhdx(base, { size: 64 * MiB, blockSize: MiB });
    let disk = await VhdxFile.open(base);
    await ChangeTracker.enable(disk);
    await disk.close();
    const id1 = await withTracker(base, true, async (t, dk) => {
      await dk.write(Buffer.alloc(1000, 1), 100);
      return t.seal();
    });
    await createVhdx(child, { parent: base });
    const id2 = await withTracker(child, true, async (t, dk) => {
      await dk.write(Buffer.alloc(1000, 2), 9 * MiB);
      const id = await t.seal();
      await dk.write(Buffer.alloc(1000, 3), 19 * MiB);
      return id;
    });
    const q = (f: string) =>
      withTracker(f, false, async (t) => [await allChanges(t, id1), await allChanges(t, id2), t.status().state]);
    const a = await q(child);
    expect(a[2]).toBe('valid');

    const copied = await sub('travel-chain-copy');
    await copyDisk(base, copied);
    await copyFile(child, path.join(copied, path.basename(child)));
    await withTracker(path.join(copied, path.basename(child)), false, async (t) => {
      expect((await refusal(t.changes(id2)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      expect(t.status().reason).toMatch(/copy/);
    });

    const far = await sub('travel-chain-far');
    for (const f of [base, `${base}.rct`, `${base}.mrt`, child]) await rename(f, path.join(far, path.basename(f)));
    expect(await q(path.join(far, path.basename(child)))).toEqual(a);
    disk = await VhdxFile.open(path.join(far, path.basename(child)));
    expect(disk.chain()).toHaveLength(2);
    await disk.close();
  });
});

// -------------------------------------------------------------------------------------------- damage

const DSIZE = 80 * MiB; // two coarse regions (64 MiB + 16 MiB)
const DG = 16 * KiB;

interface DamageSet {
  name: string;
  file: string;
  clean: boolean;
  ids: { id: string; content: Buffer[] }[];
  final: Buffer[];
}

/**
 * A tracked disk with two sealed ids and writes after each, in both coarse regions; closed cleanly, or
 * (unclean) flushed and then dropped without closing, as a crash leaves it.
 */
async function damageSet(name: string, clean: boolean): Promise<DamageSet> {
  const d = await sub(`damage-${name}`);
  const file = path.join(d, 'disk.vhdx');
  await createVhdx(file, { size: DSIZE, blockSize: MiB });
  const model = new PagedImage(DSIZE);
  const r = prng(SEED + (clean ? 1 : 2));
  let disk = await VhdxFile.open(file, { writable: true });
  const put = async (offset: number, length: number) => {
    const data = r.bytes(length);
    await disk.write(data, offset);
    model.write(offset, data);
  };
  await put(2 * MiB, 300000); // before tracking
  await disk.close();
  disk = await VhdxFile.open(file);
  await ChangeTracker.enable(disk, DG);
  await disk.close();

  disk = await VhdxFile.open(file, { writable: true });
  const t = (await ChangeTracker.attach(disk))!;
  const ids: DamageSet['ids'] = [];
  await put(MiB + 123, 10000);
  ids.push({ id: await t.seal(), content: model.snapshot() });
  await put(5 * MiB + 1, 20000); // region 0
  await put(COARSE_REGION + 6 * MiB + 5, 30000); // region 1
  ids.push({ id: await t.seal(), content: model.snapshot() });
  await put(3 * MiB + 77, 5000); // region 0: the coarse map marks region 0 ...
  await put(COARSE_REGION + 11 * MiB + 999, 3000); // ... then regions 0 and 1 (its other slot)
  await disk.trim(COARSE_REGION + 6 * MiB, 8192);
  model.zero(COARSE_REGION + 6 * MiB, 8192);
  if (clean) await disk.close();
  else {
    await disk.flush(); // the data is durable; the tracker is not told
    await t.abandon();
    await disk.abandon();
  }
  const got = await (async () => {
    const dk = await VhdxFile.open(file);
    try {
      return await dk.readAt(0, DSIZE);
    } finally {
      await dk.close();
    }
  })();
  expect(got.equals(model.toBuffer())).toBe(true);
  return { name, file, clean, ids, final: model.snapshot() };
}

type Outcome =
  { kind: 'answered' } | { kind: 'refused'; reason: string } | { kind: 'error'; code: string } | { kind: 'untracked' };

/**
 * Opens a damaged copy (read-only or writable) and asks for every id. Throws on a silent miss or an
 * error that is not a TidemarkError; otherwise says what happened.
 */
async function judge(set: DamageSet, file: string, writable: boolean): Promise<Outcome> {
  const disk = await VhdxFile.open(file, { writable });
  try {
    let t: ChangeTracker | undefined;
    try {
      t = await ChangeTracker.attach(disk, { writable });
    } catch (err) {
      if (err instanceof TidemarkError) return { kind: 'error', code: err.code };
      throw err;
    }
    if (!t) return { kind: 'untracked' };
    const st = t.status();
    let answered = 0;
    let refused = 0;
    let code = '';
    for (const [i, { id, content }] of set.ids.entries()) {
      let ranges: ChangeRange[];
      try {
        ranges = (await t.changes(id)).ranges;
      } catch (err) {
        if (!(err instanceof TidemarkError)) throw err;
        refused++;
        code = err.code;
        continue;
      }
      answered++;
      const missed = firstUncoveredDifference(content, set.final, ranges);
      if (missed !== undefined)
        throw new Error(
          `SILENT MISS: id ${i + 1} answered, but byte ${missed} changed since and is not reported ` +
            `(ranges ${JSON.stringify(ranges)})`,
        );
    }
    if (answered > 0 && refused > 0) throw new Error('some ids answered, some refused');
    if (answered > 0) {
      expect(st.state).toBe('valid');
      return { kind: 'answered' };
    }
    if (code !== 'MISSING_CHANGE_TRACKING_INFORMATION') return { kind: 'error', code };
    expect(st.state).toBe('reset');
    expect(st.reason).toBeTruthy();
    return { kind: 'refused', reason: st.reason! };
  } finally {
    await disk.close();
  }
}

async function currentRctHeader(rctPath: string): Promise<0 | 1> {
  const b = await readFile(rctPath);
  const a = decodeRctHeader(b.subarray(0, HEADER_SLOT));
  const c = decodeRctHeader(b.subarray(HEADER_SLOT, 2 * HEADER_SLOT));
  if (typeof a === 'string') return 1;
  if (typeof c === 'string') return 0;
  return c.sequence > a.sequence ? 1 : 0;
}

async function mapSlots(rctPath: string): Promise<{ current: [number, number]; other: [number, number] }> {
  const b = await readFile(rctPath);
  const h = decodeRctHeader(b.subarray((await currentRctHeader(rctPath)) * HEADER_SLOT));
  if (typeof h === 'string') throw new Error(h);
  const granules = Math.ceil(h.virtualSize / h.granularity);
  const at = (s: 0 | 1): [number, number] => [mapSlotOffset(granules, s), granules * 4];
  return { current: at(h.mapSlot), other: at(h.mapSlot === 0 ? 1 : 0) };
}

/** The newer and the older slot of the .mrt (by .rct sequence, then slot sequence). */
async function mrtSlots(mrtPath: string): Promise<{ newer: number; older: number; len: number }> {
  const regions = Math.ceil(DSIZE / COARSE_REGION);
  const len = mrtSlotLength(regions);
  const b = await readFile(mrtPath);
  const s = [decodeMrtSlot(b.subarray(0, len), regions), decodeMrtSlot(b.subarray(len, 2 * len), regions)];
  const key = (x: (typeof s)[0]) => (typeof x === 'string' ? -1n : x.rctSequence * 2n ** 32n + x.sequence);
  const newer = key(s[1]) > key(s[0]) ? 1 : 0;
  return { newer: newer * len, older: (1 - newer) * len, len };
}

async function flip(p: string, at: number, n = 1): Promise<void> {
  const f = await open(p, 'r+');
  try {
    const b = Buffer.alloc(n);
    await f.read(b, 0, n, at);
    for (let i = 0; i < n; i++) b[i] ^= 0xff;
    await f.write(b, 0, n, at);
  } finally {
    await f.close();
  }
}

async function randomFill(p: string, seed: number, from = 0, to?: number): Promise<void> {
  const size = (await stat(p)).size;
  const end = to ?? size;
  const f = await open(p, 'r+');
  try {
    await f.write(prng(seed).bytes(end - from), 0, end - from, from);
  } finally {
    await f.close();
  }
}

type Damage = (rct: string, mrt: string, set: DamageSet) => Promise<void>;

const DAMAGES: [string, Damage][] = [
  ['.rct truncated to 0', (rct) => truncate(rct, 0)],
  ['.rct truncated inside header 1', (rct) => truncate(rct, 2000)],
  ['.rct truncated after the headers', (rct) => truncate(rct, 2 * HEADER_SLOT)],
  [
    '.rct truncated inside the current map',
    async (rct) => {
      const m = await mapSlots(rct);
      await truncate(rct, m.current[0] + Math.floor(m.current[1] / 2));
    },
  ],
  ['.rct truncated by one byte', async (rct) => truncate(rct, (await stat(rct)).size - 1)],
  [
    '.rct current header: a flipped byte (bad CRC)',
    async (rct) => flip(rct, (await currentRctHeader(rct)) * HEADER_SLOT + 48),
  ],
  ['.rct current header: its CRC flipped', async (rct) => flip(rct, (await currentRctHeader(rct)) * HEADER_SLOT + 8)],
  [
    '.rct older header: a flipped byte',
    async (rct) => flip(rct, (1 - (await currentRctHeader(rct))) * HEADER_SLOT + 60),
  ],
  [
    '.rct both headers flipped',
    async (rct) => {
      await flip(rct, 100);
      await flip(rct, HEADER_SLOT + 100);
    },
  ],
  [
    '.rct current header zeroed',
    async (rct) => {
      const f = await open(rct, 'r+');
      await f.write(Buffer.alloc(HEADER_SLOT), 0, HEADER_SLOT, (await currentRctHeader(rct)) * HEADER_SLOT);
      await f.close();
    },
  ],
  [
    '.rct current map: a flipped byte',
    async (rct) => {
      const m = await mapSlots(rct);
      await flip(rct, m.current[0] + 4 * Math.floor((5 * MiB) / DG));
    },
  ],
  [
    '.rct current map: a counter cleared',
    async (rct) => {
      const m = await mapSlots(rct);
      const f = await open(rct, 'r+');
      // The granule of a write between id 1 and id 2: a nonzero counter in every persisted map since.
      await f.write(Buffer.alloc(4), 0, 4, m.current[0] + 4 * Math.floor((COARSE_REGION + 6 * MiB + 5) / DG));
      await f.close();
    },
  ],
  [
    '.rct other map: flipped bytes',
    async (rct) => {
      const m = await mapSlots(rct);
      await flip(rct, m.other[0], 64);
    },
  ],
  ['.rct random bytes', (rct) => randomFill(rct, SEED + 11)],
  ['.rct headers random bytes', (rct) => randomFill(rct, SEED + 12, 0, 2 * HEADER_SLOT)],
  ['.rct deleted', (rct) => unlink(rct)],
  ['.mrt truncated to 0', (_rct, mrt) => truncate(mrt, 0)],
  ['.mrt truncated to half a slot', async (_rct, mrt) => truncate(mrt, (await mrtSlots(mrt)).len / 2)],
  ['.mrt newer slot: a flipped byte', async (_rct, mrt) => flip(mrt, (await mrtSlots(mrt)).newer + 64)],
  ['.mrt newer slot: its CRC flipped', async (_rct, mrt) => flip(mrt, (await mrtSlots(mrt)).newer + 8)],
  ['.mrt older slot: a flipped byte', async (_rct, mrt) => flip(mrt, (await mrtSlots(mrt)).older + 64)],
  ['.mrt random bytes', (_rct, mrt) => randomFill(mrt, SEED + 13)],
  ['.mrt deleted', (_rct, mrt) => unlink(mrt)],
  [
    'tracking files of another disk',
    async (rct, mrt) => {
      const other = await sub('damage-other');
      const o = path.join(other, 'disk.vhdx');
      await createVhdx(o, { size: DSIZE, blockSize: MiB });
      const dk = await VhdxFile.open(o);
      await ChangeTracker.enable(dk, DG);
      await dk.close();
      await copyFile(`${o}.rct`, rct);
      await copyFile(`${o}.mrt`, mrt);
    },
  ],
];

describe('damaged tracking files: a clear error or a reset, never a wrong answer', () => {
  const sets: Record<string, DamageSet> = {};
  const outcomes: string[] = [];
  beforeAll(async () => {
    sets.clean = await damageSet('clean', true);
    sets.unclean = await damageSet('unclean', false);
  });
  afterAll(() => {
    console.log(`damage outcomes:\n  ${outcomes.join('\n  ')}`);
  });

  const cases = (['clean', 'unclean'] as const).flatMap((which) => DAMAGES.map(([name, fn]) => ({ which, name, fn })));
  it.each(cases)('$which close, $name', async ({ which, name, fn }) => {
    const set = sets[which];
    const got: string[] = [];
    for (const writable of [false, true]) {
      const d = await sub(`dmg-${which}-${name.replace(/[^a-z0-9]+/gi, '-')}-${writable ? 'w' : 'r'}`);
      const file = await copyDisk(set.file, d);
      await adoptCopy(file);
      const { rct, mrt } = trackingPaths(file);
      await fn(rct, mrt, set);
      const o = await judge(set, file, writable);
      got.push(
        `${writable ? 'writable' : 'read-only'}: ${o.kind}${'reason' in o ? ` (${o.reason})` : ''}${'code' in o ? ` ${o.code}` : ''}`,
      );
      // After whatever happened, a second look (and a writable session) is still consistent.
      const again = await judge(set, file, true);
      if (o.kind === 'refused') expect(again.kind, 'a reset must stick').not.toBe('answered');
    }
    outcomes.push(`${which} / ${name}: ${got.join('; ')}`);
  });

  it('seeded random byte flips and truncations in .rct and .mrt (clean and unclean)', async () => {
    const r = prng(SEED + 99);
    const tally: Record<string, number> = {};
    const failures: string[] = [];
    for (let i = 0; i < 48; i++) {
      const which = i % 2 === 0 ? 'clean' : 'unclean';
      const set = sets[which];
      const d = await sub(`fuzz-${i}`);
      const file = await copyDisk(set.file, d);
      await adoptCopy(file);
      const { rct, mrt } = trackingPaths(file);
      const target = r.next() < 0.6 ? rct : mrt;
      const size = (await stat(target)).size;
      let what: string;
      if (r.next() < 0.8) {
        // Headers and slot starts are where it hurts: half the flips land in the first 8 KiB.
        const at = r.next() < 0.5 ? r.int(Math.min(size, 2 * HEADER_SLOT)) : r.int(size);
        await flip(target, at, 1 + r.int(4));
        what = `flip at ${at}`;
      } else {
        const to = r.int(size);
        await truncate(target, to);
        what = `truncate to ${to}`;
      }
      let o: Outcome;
      try {
        o = await judge(set, file, r.next() < 0.5);
      } catch (err) {
        failures.push(`case ${i}: ${which}, ${path.extname(target)} ${what}: ${(err as Error).message}`);
        o = { kind: 'error', code: 'SILENT MISS' };
      }
      tally[o.kind] = (tally[o.kind] ?? 0) + 1;
      await rm(d, { recursive: true, force: true });
    }
    console.log(`random damage: ${JSON.stringify(tally)}`);
    expect(failures).toEqual([]);
  });

  it('tracking files rolled back to an older copy of themselves: refused, or still complete', async () => {
    const d = await sub('rollback');
    const file = path.join(d, 'disk.vhdx');
    await createVhdx(file, { size: DSIZE, blockSize: MiB });
    const model = new PagedImage(DSIZE);
    let disk = await VhdxFile.open(file);
    await ChangeTracker.enable(disk, DG);
    await disk.close();
    const r = prng(SEED + 5);
    const ids: DamageSet['ids'] = [];
    const session = async (writes: number) => {
      disk = await VhdxFile.open(file, { writable: true });
      const t = (await ChangeTracker.attach(disk))!;
      for (let i = 0; i < writes; i++) {
        const data = r.bytes(1 + r.int(9000));
        const at = r.int(DSIZE - data.length);
        await disk.write(data, at);
        model.write(at, data);
      }
      ids.push({ id: await t.seal(), content: model.snapshot() });
      await disk.write(Buffer.alloc(10, 7), 70 * MiB);
      model.write(70 * MiB, Buffer.alloc(10, 7));
      await disk.close();
    };
    await session(10);
    const saved = { rct: await readFile(`${file}.rct`), mrt: await readFile(`${file}.mrt`) };
    await session(10);
    await session(10);
    await writeFile(`${file}.rct`, saved.rct);
    await writeFile(`${file}.mrt`, saved.mrt);
    const set: DamageSet = { name: 'rollback', file, clean: true, ids, final: model.snapshot() };
    const o = await judge(set, file, false);
    expect(o.kind).not.toBe('answered');
  });
});
