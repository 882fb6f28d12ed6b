/**
 * The VHD device (issue 17): `VhdVirtualDisk` over fixed, dynamic and differencing VHDs (512 KiB and
 * 2 MiB blocks) reads, writes, flushes and answers block status exactly as a model buffer says; `openDisk`
 * picks the device by magic and refuses other formats; checkpoints cut under a live writer freeze exactly
 * the acknowledged view, and the chain after several of them reads the same through us, libvhdi
 * (vhdimount or pyvhdi, vhdiinfo), 7-Zip and (flattened, as QEMU has no differencing VHDs) qemu-img;
 * an online merge while writing leaves the parent holding the writer's view and the child gone; the device
 * served over NBD takes qemu-io's writes and qemu-img compare agrees with the model; a crash at each moment
 * of a cut leaves a chain that re-opens and reads what was durable.
 *
 * Seed: TIDEMARK_VHD_DISK_SEED. Crash trials: TIDEMARK_VHD_DISK_CRASH_TRIALS (default 4, one per moment).
 */
import { access, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AllocationExtent } from '../../src/disk/device.js';
import { openDisk } from '../../src/disk/open.js';
import { VHD_TRACKING_UNAVAILABLE, VhdVirtualDisk } from '../../src/disk/vhd-disk.js';
import { VirtualDisk } from '../../src/disk/virtual-disk.js';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { convertVhdImage } from '../../src/formats/vhd/convert.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { mergeVhd } from '../../src/formats/vhd/merge.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { NbdServer } from '../../src/nbd/index.js';
import { Workload } from '../../src/workload/generator.js';
import { sleep } from '../helpers/async.js';
import { missingPeers, run, tempDir, vhdiInfo, vhdiRead } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { expectSame, qemuReadVhd, readWholeVhd, sevenZipVhd } from '../vhd/helpers.js';

const KiB = 1024;
const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_VHD_DISK_SEED', 1717);
const CRASH_TRIALS = Number(process.env.TIDEMARK_VHD_DISK_CRASH_TRIALS ?? 4);
console.log(
  `vhd-disk seed ${SEED}, ${CRASH_TRIALS} crash trials (TIDEMARK_VHD_DISK_SEED, TIDEMARK_VHD_DISK_CRASH_TRIALS)`,
);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('vhd-disk')));
afterAll(async () => cleanup?.());

const exists = (p: string) =>
  access(p).then(
    () => true,
    () => false,
  );

/** Checks block status of [0, size) against the model: contiguous, covering, holes read zeros. */
async function checkBlockStatus(disk: VhdVirtualDisk, model: Buffer, where: string): Promise<AllocationExtent[]> {
  const all: AllocationExtent[] = [];
  for (let at = 0; at < model.length;) {
    const len = Math.min(model.length - at, 7 * MiB + 512);
    const ext = await disk.blockStatus(at, len);
    expect(ext.length, where).toBeGreaterThan(0);
    let pos = at;
    for (const e of ext) {
      expect(e.offset, where).toBe(pos);
      expect(e.length, where).toBeGreaterThan(0);
      if (e.hole) {
        expect(e.zero, where).toBe(true);
        expect(
          model.subarray(e.offset, e.offset + e.length).every((b) => b === 0),
          `${where}: hole at ${e.offset}`,
        ).toBe(true);
      }
      pos += e.length;
    }
    expect(pos, where).toBe(at + len);
    all.push(...ext);
    at += len;
  }
  return all;
}

describe(`VhdVirtualDisk against a model (seed ${SEED})`, () => {
  const cases: ['fixed' | 'dynamic' | 'differencing', number][] = [];
  for (const type of ['fixed', 'dynamic', 'differencing'] as const)
    for (const bs of [512 * KiB, 2 * MiB]) if (type !== 'fixed' || bs === 2 * MiB) cases.push([type, bs]);

  it.each(cases)('%s, %i-byte blocks: read, write, zero, trim, flush and block status', async (type, bs) => {
    const size = 12 * MiB + 3 * 512; // a partial last block, and a partial last 4 KiB unit
    const seed = SEED + bs / KiB + (type === 'fixed' ? 1 : type === 'differencing' ? 2 : 0);
    const where = `${type}, ${bs}, seed ${seed}`;
    const model = Buffer.alloc(size);
    const file = path.join(dir, `m-${type}-${bs}.vhd`);
    if (type === 'differencing') {
      // The parent holds data of its own (in the other block size); the child writes over and beside it.
      const base = path.join(dir, `m-base-${bs}.vhd`);
      await createVhd(base, { size, blockSize: bs === 2 * MiB ? 512 * KiB : 2 * MiB });
      const p = await VhdFile.open(base, { writable: true });
      const r = rng(seed + 10);
      for (let i = 0; i < 6; i++) {
        const data = r.bytes(1 + r.int(300 * KiB));
        const at = r.int(size - data.length);
        await p.write(data, at);
        data.copy(model, at);
      }
      await p.close();
      await createVhd(file, { parent: base, blockSize: bs });
    } else {
      await createVhd(file, { size, type, blockSize: bs });
    }
    const disk = await VhdVirtualDisk.open(file);
    try {
      expect(disk.size).toBe(size);
      expect(disk.file.diskType).toBe(type);
      expect(disk.minimumBlockSize).toBe(512);
      expect(disk.preferredBlockSize).toBe(bs);
      if (type === 'dynamic') {
        // Nothing allocated: one hole.
        expect(await disk.blockStatus(0, size)).toEqual([{ offset: 0, length: size, hole: true, zero: true }]);
        // One 4 KiB write: data exactly there (a dynamic block holds all of its sectors).
        await disk.write(bs + 8192, Buffer.alloc(4096, 1));
        model.fill(1, bs + 8192, bs + 8192 + 4096);
        expect(await disk.blockStatus(0, size)).toEqual([
          { offset: 0, length: bs, hole: true, zero: true },
          { offset: bs, length: bs, hole: false, zero: false },
          { offset: 2 * bs, length: size - 2 * bs, hole: true, zero: true },
        ]);
      }
      if (type === 'differencing') {
        // Sector granularity: the child's 4 KiB write is data at exactly its place within the parent's holes.
        const before = await checkBlockStatus(disk, model, where);
        const hole = before.find((e) => e.hole && e.length >= 3 * bs);
        if (hole) {
          const at = Math.ceil(hole.offset / bs) * bs + 8192;
          await disk.write(at, Buffer.alloc(4096, 2));
          model.fill(2, at, at + 4096);
          const st = await disk.blockStatus(at - 8192, 3 * 8192);
          expect(st).toEqual([
            { offset: at - 8192, length: 8192, hole: true, zero: true },
            { offset: at, length: 4096, hole: false, zero: false },
            { offset: at + 4096, length: 8192 + 4096, hole: true, zero: true },
          ]);
        }
      }
      if (type === 'fixed') {
        expect(await disk.blockStatus(0, size)).toEqual([{ offset: 0, length: size, hole: false, zero: false }]);
        // A fast zero would write every byte: refused, nothing changed.
        await expect(disk.writeZeroes(0, MiB, { fast: true })).rejects.toMatchObject({ code: 'NOT_SUPPORTED' });
      } else {
        // Whole blocks no file of the head holds: zeroing them is metadata only.
        await disk.writeZeroes(bs, 2 * bs, { fast: true });
        model.fill(0, bs, 3 * bs);
      }
      const r = rng(seed);
      for (let i = 0; i < 60; i++) {
        const kind = r.int(12);
        const len = 1 + r.int(r.next() < 0.3 ? 3 * MiB : 64 * KiB);
        const near = r.next() < 0.5 ? r.int(Math.ceil(size / bs)) * bs - r.int(len) : r.int(size);
        const off = Math.max(0, Math.min(size - 1, near));
        const n = Math.min(len, size - off);
        if (kind === 0) {
          await disk.writeZeroes(off, n);
          model.fill(0, off, off + n);
        } else if (kind === 1) {
          await disk.trim(off, n, { fua: r.next() < 0.5 });
          model.fill(0, off, off + n);
        } else if (kind === 2) {
          await disk.writeZeroes(off, n, { noHole: true });
          model.fill(0, off, off + n);
        } else {
          const data = r.bytes(n);
          await disk.write(off, data, { fua: r.next() < 0.1 });
          data.copy(model, off);
        }
        if (r.next() < 0.15) await disk.flush();
        if (r.next() < 0.2) {
          const o = r.int(size - 1);
          const l = 1 + r.int(Math.min(size - o, 2 * MiB) - 1);
          expect((await disk.read(o, l)).equals(model.subarray(o, o + l)), `${where} read ${o}+${l}`).toBe(true);
          const into = Buffer.alloc(l);
          await disk.readInto(into, o);
          expect(into.equals(model.subarray(o, o + l)), where).toBe(true);
        }
      }
      expectSame(await disk.read(0, size), model, where);
      await checkBlockStatus(disk, model, where);
      // Out of range and no tracking.
      await expect(disk.read(size - 1, 2)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      await expect(disk.write(-1, Buffer.alloc(1))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
      expect(await disk.dirtyContexts()).toEqual([]);
      expect(await disk.seal()).toBeUndefined();
      expect(disk.changeTracker).toBeUndefined();
      expect(disk.trackingUnavailable).toBe(VHD_TRACKING_UNAVAILABLE);
      await expect(disk.changes('rct2:x')).rejects.toMatchObject({ code: 'MISSING_CHANGE_TRACKING_INFORMATION' });
      await expect(disk.dirtyStatus('rct2:x', 0, 4096)).rejects.toMatchObject({
        code: 'MISSING_CHANGE_TRACKING_INFORMATION',
      });
    } finally {
      await disk.close();
    }
    await expect(disk.read(0, 1)).rejects.toMatchObject({ code: 'CLOSED' });
    // Durable and the same through a fresh open of the file.
    expectSame(await readWholeVhd(file), model, `${where}, re-opened`);
    // Read-only: reads, no writes.
    const ro = await VhdVirtualDisk.open(file, { readOnly: true });
    try {
      expect(ro.readOnly).toBe(true);
      await expect(ro.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'READ_ONLY' });
      expect((await ro.read(0, 4096)).equals(model.subarray(0, 4096))).toBe(true);
    } finally {
      await ro.close();
    }
  });
});

describe('openDisk', () => {
  it('opens a VHDX as VirtualDisk and a VHD (fixed, dynamic, differencing) as VhdVirtualDisk, whatever the name', async () => {
    const x = path.join(dir, 'od.vhdx');
    await createVhdx(x, { size: 4 * MiB });
    const d = await openDisk(x);
    expect(d).toBeInstanceOf(VirtualDisk);
    await d.close();
    const fixed = path.join(dir, 'od-fixed.img');
    await createVhd(fixed, { size: 4 * MiB, type: 'fixed' });
    const dyn = path.join(dir, 'od-dyn.vhd');
    await createVhd(dyn, { size: 4 * MiB });
    const child = path.join(dir, 'od-dyn_1.avhd');
    await createVhd(child, { parent: dyn });
    for (const f of [fixed, dyn, child]) {
      const v = await openDisk(f, { tracking: true });
      expect(v).toBeInstanceOf(VhdVirtualDisk);
      expect(v.path).toBe(f);
      await v.close();
    }
  });

  it('refuses other formats with NOT_SUPPORTED naming them', async () => {
    const raw = path.join(dir, 'od.raw');
    await writeFile(raw, Buffer.alloc(MiB));
    await expect(openDisk(raw)).rejects.toMatchObject({ code: 'NOT_SUPPORTED', message: /raw image/ });
    const qcow = path.join(dir, 'od.qcow2');
    const head = Buffer.alloc(MiB);
    head.write('QFI\xfb', 0, 'latin1');
    head.writeUInt32BE(3, 4);
    await writeFile(qcow, head);
    await expect(openDisk(qcow)).rejects.toMatchObject({ code: 'NOT_SUPPORTED', message: /qcow2/ });
  });
});

describe(`checkpoints of a VHD under a live writer (seed ${SEED})`, () => {
  it('every cut freezes exactly the acknowledged view; the chain reads the same through us and the peers', async () => {
    const size = 48 * MiB;
    const base = path.join(dir, 'cp.vhd');
    await createVhd(base, { size, blockSize: 512 * KiB });
    const disk = await VhdVirtualDisk.open(base);
    const load = new Workload(disk, { seed: SEED + 300, concurrency: 2, flushEvery: 16 });
    const files = [base];
    const frozen: Buffer[] = [];
    try {
      for (let round = 0; round < 4; round++) {
        load.start();
        await sleep(120);
        const child = path.join(dir, `cp_${round}.avhd`);
        await disk.precreateChild(child);
        const t0 = performance.now();
        let t1 = t0;
        await disk.pause();
        let parentPath: string;
        try {
          const prepared = await disk.prepareChild(child, { precreated: true });
          expect(prepared.id).toBeUndefined();
          parentPath = prepared.parentPath;
          await disk.switchHead(child);
        } finally {
          disk.resume();
          t1 = performance.now();
        }
        await sleep(30);
        await load.stop();
        expect(parentPath).toBe(files.at(-1));
        expect(disk.path).toBe(child);
        expect(disk.file.chain().map((f) => f.path)).toEqual([child, ...files.slice().reverse()]);
        files.push(child);
        // The frozen parent holds exactly what the writer had acknowledged at the cut.
        const f = await VhdFile.open(parentPath);
        try {
          expect(f.writable).toBe(false);
          expect(await load.verifyCut((u) => f.readAt(u * load.unit, load.unit), t0, t1), `round ${round}`).toEqual([]);
          frozen.push(await f.readAt(0, size));
        } finally {
          await f.close();
        }
        // The retired head refuses writes from anyone else's open (read-only in the chain).
        expect(disk.file.parent!.writable).toBe(false);
      }
      expect(load.writes).toBeGreaterThan(0);
      expectSame(await disk.read(0, size), load.expectedImage(), 'head after the rounds');
    } finally {
      await load.stop().catch(() => undefined);
      await disk.close();
    }
    const want = load.expectedImage();
    const head = files.at(-1)!;
    expectSame(await readWholeVhd(head), want, 'engine, re-opened');
    // Each frozen point still reads its cut through a fresh open; every file checks clean.
    for (const [i, p] of files.slice(0, -1).entries()) expectSame(await readWholeVhd(p), frozen[i], `frozen ${p}`);
    for (const p of files) {
      const report = await checkVhd(p);
      expect(report.errors, p).toEqual([]);
      expect(report.warnings, p).toEqual([]);
    }

    if (!missingPeers('vhdiinfo', 'libvhdi')) {
      expect(await vhdiInfo(head)).toMatch(/Disk type\s*:\s*Differential/);
      const out = await vhdiRead(head, `${head}.vhdi.raw`);
      expectSame(await readFile(out), want, 'libvhdi');
    }
    if (!missingPeers('7zz')) {
      await sevenZipVhd(head, `${head}.7z.raw`);
      expectSame(await readFile(`${head}.7z.raw`), want, '7zz');
    }
    if (!missingPeers('qemu-img')) {
      // QEMU has no differencing VHDs: it reads the base (the first cut) and the chain flattened by us.
      await qemuReadVhd(base, `${base}.qemu.raw`);
      expectSame(await readFile(`${base}.qemu.raw`), frozen[0], 'qemu-img, the base');
      const flat = path.join(dir, 'cp-flat.vhd');
      await convertVhdImage(head, flat, {});
      await qemuReadVhd(flat, `${flat}.qemu.raw`);
      expectSame(await readFile(`${flat}.qemu.raw`), want, 'qemu-img, the chain flattened');
    }
  }, 300_000);

  it('mergeHeadOnline while writing: the parent holds the writer view, the child is gone', async () => {
    const size = 32 * MiB;
    for (const [k, type] of (['dynamic', 'fixed'] as const).entries()) {
      const base = path.join(dir, `mg-${type}.vhd`);
      await createVhd(base, { size, type, blockSize: 2 * MiB });
      const disk = await VhdVirtualDisk.open(base);
      const load = new Workload(disk, { seed: SEED + 400 + k, concurrency: 2, flushEvery: 8 });
      const child = path.join(dir, `mg-${type}_1.avhd`);
      let switchedTo: string | undefined;
      try {
        await load.run(150);
        await disk.pause();
        try {
          await disk.cutCheckpoint(child);
        } finally {
          disk.resume();
        }
        await load.run(150);
        load.start();
        await sleep(50);
        const progress: number[] = [];
        const res = await disk.mergeHeadOnline({
          beforeSwitch: async (p) => {
            expect(disk.isPaused).toBe(true);
            expect(await exists(child)).toBe(false);
            switchedTo = p;
          },
          onProgress: (p) => progress.push(p.pass),
        });
        await sleep(50);
        await load.stop();
        expect(switchedTo).toBe(base);
        expect(res.parentPath).toBe(base);
        expect(res.passes).toBeGreaterThanOrEqual(2);
        expect(progress.length).toBeGreaterThan(0);
        expect(disk.path).toBe(base);
        expect(disk.file.chain().length).toBe(1);
        expect(disk.file.writable).toBe(true);
        expect(await exists(child)).toBe(false);
        expectSame(await disk.read(0, size), load.expectedImage(), `${type}: head after the merge`);
        // The guest goes on writing into the merged parent.
        await load.run(50);
      } finally {
        await load.stop().catch(() => undefined);
        await disk.close();
      }
      const want = load.expectedImage();
      expectSame(await readWholeVhd(base), want, `${type}: the merged parent re-opened`);
      if (!missingPeers('qemu-img')) {
        await qemuReadVhd(base, `${base}.qemu.raw`);
        expectSame(await readFile(`${base}.qemu.raw`), want, `${type}: qemu-img`);
      }
    }
    // A disk without a parent has nothing to merge.
    const lone = await VhdVirtualDisk.open(path.join(dir, 'mg-fixed.vhd'));
    await expect(lone.mergeHeadOnline()).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await lone.close();
  }, 300_000);

  it('merges down a chain of checkpoints one head at a time, writing all along', async () => {
    const size = 16 * MiB;
    const base = path.join(dir, 'md.vhd');
    await createVhd(base, { size, blockSize: 512 * KiB });
    const disk = await VhdVirtualDisk.open(base);
    const load = new Workload(disk, { seed: SEED + 460, concurrency: 2, flushEvery: 8 });
    const chain = [base];
    try {
      for (let i = 1; i <= 3; i++) {
        await load.run(60);
        const child = path.join(dir, `md_${i}.avhd`);
        await disk.precreateChild(child);
        await disk.pause();
        try {
          await disk.prepareChild(child, { precreated: true });
          await disk.switchHead(child);
        } finally {
          disk.resume();
        }
        chain.unshift(child);
      }
      for (let i = 3; i >= 1; i--) {
        load.start();
        await sleep(20);
        const res = await disk.mergeHeadOnline();
        await load.stop();
        expect(await exists(chain.shift()!)).toBe(false);
        expect(res.parentPath).toBe(chain[0]);
        expect(disk.file.chain().map((f) => f.path)).toEqual(chain);
        expectSame(await disk.read(0, size), load.expectedImage(), `after merging level ${i}`);
      }
      await load.run(30);
    } finally {
      await load.stop().catch(() => undefined);
      await disk.close();
    }
    expectSame(await readWholeVhd(base), load.expectedImage(), 'the base after all merges');
  }, 120_000);

  it('a crash during an online merge: the chain re-opens, reads what was durable, and an offline merge finishes', async () => {
    const size = 16 * MiB;
    const base = path.join(dir, 'mgc.vhd');
    const child = path.join(dir, 'mgc_1.avhd');
    await createVhd(base, { size, blockSize: 512 * KiB });
    const disk = await VhdVirtualDisk.open(base);
    const before = new Workload(disk, { seed: SEED + 450, flushEvery: 8 });
    await before.run(80);
    await disk.pause();
    try {
      await disk.cutCheckpoint(child);
    } finally {
      disk.resume();
    }
    const frozen = await disk.read(0, size);
    const after = new Workload(disk, { seed: SEED + 451, concurrency: 2, flushEvery: 8 });
    await after.run(120);
    after.start();
    let crashedAt = 0;
    let crash: Promise<void> | undefined;
    const merging = disk.mergeHeadOnline({
      maxLivePasses: 8,
      onProgress: (p) => {
        if (p.pass === 1 && !crash) {
          crashedAt = performance.now();
          crash = disk.abandon();
        }
      },
    });
    await expect(merging).rejects.toBeDefined();
    await crash;
    await after.stop({ flush: false }).catch(() => undefined);
    expect(crashedAt).toBeGreaterThan(0);
    expect(await exists(child)).toBe(true);
    const re = await VhdVirtualDisk.open(child);
    let now: Buffer;
    try {
      expect(re.file.chain().map((f) => f.path)).toEqual([child, base]);
      now = await re.read(0, size);
      const problems = await after.verifyAfterCrash(
        async (u) => now.subarray(u * after.unit, (u + 1) * after.unit),
        crashedAt,
        (u) => frozen.subarray(u * after.unit, (u + 1) * after.unit),
      );
      expect(problems).toEqual([]);
    } finally {
      await re.close();
    }
    // Finished offline (as the host's recovery does): the parent reads what the chain read, the child is gone.
    await mergeVhd(child);
    expect(await exists(child)).toBe(false);
    expectSame(await readWholeVhd(base), now, 'the parent after the offline merge');
  }, 120_000);

  it('a child opens over a given open parent only when a locator names it with its time stamp', async () => {
    const a = path.join(dir, 'given-a.vhd');
    const b = path.join(dir, 'given-b.vhd');
    const c = path.join(dir, 'given-a_1.avhd');
    await createVhd(a, { size: 4 * MiB });
    await createVhd(b, { size: 4 * MiB });
    const head = await VhdFile.open(a, { writable: true });
    await head.write(Buffer.alloc(4096, 7), 0);
    await head.flush();
    await createVhd(c, { parent: a });
    const other = await VhdFile.open(b);
    await expect(VhdFile.open(c, { parent: other })).rejects.toMatchObject({ code: 'PARENT_NOT_FOUND' });
    expect((await other.readAt(0, 512)).every((x) => x === 0)).toBe(true);
    await other.close();
    const child = await VhdFile.open(c, { writable: true, parent: head });
    expect(child.parent).toBe(head);
    expect((await child.readAt(0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    await head.retire();
    expect(head.writable).toBe(false);
    await expect(head.write(Buffer.alloc(512, 1), 0)).rejects.toMatchObject({ code: 'READ_ONLY' });
    await child.write(Buffer.alloc(512, 9), 512);
    const want = Buffer.alloc(4096, 7);
    want.fill(9, 512, 1024);
    expect((await child.readAt(0, 4096)).equals(want)).toBe(true);
    await child.close();
    await expect(head.readAt(0, 512)).rejects.toMatchObject({ code: 'CLOSED' });
    // The parent changed after the child was made (a new time stamp): refused, and it stays its owner's.
    const moved = await VhdFile.open(a, { writable: true });
    await moved.write(Buffer.alloc(512, 3), 0);
    await expect(VhdFile.open(c, { parent: moved })).rejects.toMatchObject({ code: 'PARENT_MISMATCH' });
    expect((await moved.readAt(0, 512)).equals(Buffer.alloc(512, 3))).toBe(true);
    await moved.close();
  });
});

describe.skipIf(missingPeers('qemu-io', 'qemu-img'))('a VhdVirtualDisk served over NBD', () => {
  it('qemu-io writes, zeroes and discards; qemu-img compare agrees with the model', async () => {
    const size = 16 * MiB;
    const base = path.join(dir, 'nbd.vhd');
    await createVhd(base, { size, blockSize: 512 * KiB });
    const pre = await VhdFile.open(base, { writable: true });
    const model = Buffer.alloc(size);
    const r = rng(SEED + 500);
    const seedData = r.bytes(3 * MiB);
    await pre.write(seedData, 5 * MiB);
    seedData.copy(model, 5 * MiB);
    await pre.close();
    const child = path.join(dir, 'nbd_1.avhd');
    await createVhd(child, { parent: base });
    const disk = await VhdVirtualDisk.open(child);
    const server = new NbdServer();
    server.addExport('disk', disk);
    const socket = path.join(dir, 'nbd.sock');
    await server.listen({ socket });
    const uri = `nbd+unix:///disk?socket=${socket}`;
    try {
      const ops: string[] = [];
      const apply = (cmd: string, off: number, len: number, pattern?: number) => {
        ops.push(pattern === undefined ? `${cmd} ${off} ${len}` : `${cmd} -P 0x${pattern.toString(16)} ${off} ${len}`);
        model.fill(pattern ?? 0, off, off + len);
      };
      for (let i = 0; i < 24; i++) {
        const len = 512 * (1 + r.int(2048));
        const off = 512 * r.int((size - len) / 512);
        const k = r.int(8);
        if (k === 0) apply('write -z', off, len);
        else if (k === 1) apply('discard', off, len);
        else apply('write', off, len, 1 + r.int(254));
      }
      const w = await run('qemu-io', ['-f', 'raw', ...ops.flatMap((c) => ['-c', c]), uri], { allowFail: true });
      expect(w.code, w.stdout + w.stderr).toBe(0);
      expect(w.stdout + w.stderr).not.toMatch(/fail|error/i);
      // qemu-io reads back what it wrote last, unaligned over a block boundary, and zeros it wrote.
      apply('write', 512 * KiB - 4608, 9728, 0x5a);
      apply('write -z', 7 * MiB - 1536, 4096);
      const last = ops.splice(ops.length - 2);
      const l = await run('qemu-io', ['-f', 'raw', ...last.flatMap((c) => ['-c', c]), uri], { allowFail: true });
      expect(l.code, l.stdout + l.stderr).toBe(0);
      const checks = [`read -P 0x5a ${512 * KiB - 4608} 9728`, `read -P 0 ${7 * MiB - 1536} 4096`];
      const v = await run('qemu-io', ['-f', 'raw', ...checks.flatMap((c) => ['-c', c]), uri], { allowFail: true });
      expect(v.stdout + v.stderr).not.toMatch(/fail|error|mismatch/i);
      const modelFile = path.join(dir, 'nbd-model.raw');
      await writeFile(modelFile, model);
      const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri, modelFile], { allowFail: true });
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      // qemu-img map reads block status over NBD: the parent's data and the child's writes are data.
      const map = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'raw', uri])).stdout) as {
        start: number;
        length: number;
        data: boolean;
        zero: boolean;
      }[];
      for (const e of map) {
        if (!e.data)
          expect(
            model.subarray(e.start, e.start + e.length).every((b) => b === 0),
            `map hole at ${e.start}`,
          ).toBe(true);
      }
    } finally {
      await server.close();
      await disk.close();
    }
    expectSame(await readWholeVhd(child), model, 'the chain after NBD');
  }, 120_000);
});

describe(`a crash in the middle of a cut (seed ${SEED}, ${CRASH_TRIALS} trials)`, () => {
  const moments = ['precreated, writer running', 'prepared', 'switched, flushed writes', 'switched, writes in flight'];
  for (let trial = 0; trial < CRASH_TRIALS; trial++) {
    const moment = moments[trial % moments.length];
    it(`trial ${trial}: ${moment}: the chain re-opens and reads what was durable`, async () => {
      const size = 16 * MiB;
      const blockSize = trial % 2 === 0 ? 512 * KiB : 2 * MiB;
      const base = path.join(dir, `crash${trial}.vhd`);
      const child = path.join(dir, `crash${trial}_1.avhd`);
      await createVhd(base, { size, blockSize, type: trial % 3 === 2 ? 'fixed' : 'dynamic' });
      const disk = await VhdVirtualDisk.open(base);
      const before = new Workload(disk, { seed: SEED + 600 + trial, flushEvery: 8 });
      await before.run(100);
      let frozen = await disk.read(0, size);
      const after = new Workload(disk, { seed: SEED + 700 + trial, flushEvery: 8 });
      let head = child;
      if (moment.startsWith('precreated')) {
        // The child is made while the guest writes on into the head; the process dies before the cut.
        head = base;
        after.start();
        await sleep(20);
        await disk.precreateChild(child);
        await sleep(20);
      } else {
        await disk.precreateChild(child);
        await disk.pause();
        await disk.prepareChild(child, { precreated: true });
        if (moment.startsWith('switched')) {
          await disk.switchHead(child);
          disk.resume();
          await after.run(80);
          if (moment.endsWith('in flight')) {
            after.start();
            await sleep(30);
          }
        }
      }
      const crashedAt = performance.now();
      await disk.abandon();
      await after.stop({ flush: false }).catch(() => undefined);
      if (head === base) {
        // The head the host would open: every durable write, anything later issued before the crash.
        const re = await VhdVirtualDisk.open(base);
        try {
          const now = await re.read(0, size);
          const problems = await after.verifyAfterCrash(
            async (u) => now.subarray(u * after.unit, (u + 1) * after.unit),
            crashedAt,
            (u) => frozen.subarray(u * after.unit, (u + 1) * after.unit),
          );
          expect(problems).toEqual([]);
          frozen = now;
        } finally {
          await re.close();
        }
        // The orphan child still links to the head (its session time stamp) and reads the same.
        expectSame(await readWholeVhd(child), frozen, 'the orphan child');
        return;
      }
      // The frozen parent holds exactly the cut, through a fresh open.
      expectSame(await readWholeVhd(base), frozen, 'the frozen parent');
      const re = await VhdVirtualDisk.open(child);
      try {
        expect(re.file.chain().length).toBe(2);
        const now = await re.read(0, size);
        const problems = await after.verifyAfterCrash(
          async (u) => now.subarray(u * after.unit, (u + 1) * after.unit),
          crashedAt,
          (u) => frozen.subarray(u * after.unit, (u + 1) * after.unit),
        );
        expect(problems).toEqual([]);
        if (moment === 'prepared') expectSame(now, frozen, 'the child after a crash at the cut');
        // Writing on after the recovery works and lasts.
        await re.write(size - 4096, Buffer.alloc(4096, 0xa5));
      } finally {
        await re.close();
      }
      expect((await readWholeVhd(child)).subarray(size - 4096).equals(Buffer.alloc(4096, 0xa5))).toBe(true);
      expectSame(await readWholeVhd(base), frozen, 'the frozen parent after the recovery');
    }, 120_000);
  }
});
