/**
 * The checkpoint cut as the host makes it, for a VM with 4 disks of 4 GiB under live writers: how long
 * guest I/O is held (printed, never asserted: timings are not tests), and that every cut still freezes
 * exactly the writers' acknowledged view. Then a crash at each moment of the cut (after the seal with
 * either head recorded, right after the switch, with flushed or in-flight writes into the child; the disk
 * abandoned, not closed): the frozen parent needs no log replay and holds the cut, the recorded head
 * opens and reads what was made durable, and the tracker answers changes since the checkpoint's id
 * completely (every granule that differs from the cut is reported), before and after a clean close.
 * Last, the pieces: a child opened over a given open parent, and a head retired into a read-only parent.
 *
 * Rounds: TIDEMARK_PAUSE_ROUNDS (default 7). Seed: TIDEMARK_DISK_SEED. */
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VirtualDisk } from '../../src/disk/virtual-disk.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { ChangeTracker } from '../../src/tracking/tracker.js';
import { writeFileAtomic } from '../../src/util/atomic.js';
import { Workload } from '../../src/workload/generator.js';
import { qemuImgCheck, requirePeers, tempDir } from '../helpers/peers.js';
import { seedFrom } from '../helpers/random.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const GiB = 2 ** 30;
const SEED = seedFrom('TIDEMARK_DISK_SEED', 4242);
const ROUNDS = Number(process.env.TIDEMARK_PAUSE_ROUNDS ?? 7);
console.log(`checkpoint pause: ${ROUNDS} rounds, seed ${SEED} (TIDEMARK_PAUSE_ROUNDS, TIDEMARK_DISK_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('cp-pause')));
afterAll(async () => cleanup?.());

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

async function trackedDisk(file: string, size: number): Promise<void> {
  await createVhdx(file, { size });
  const probe = await VhdxFile.open(file, { writable: true });
  await ChangeTracker.enable(probe);
  await probe.close();
}

describe(`checkpoint I/O pause (seed ${SEED})`, () => {
  it('4 disks of 4 GiB under writers: the pause is measured and every cut holds the acknowledged view', async () => {
    const disks: VirtualDisk[] = [];
    for (let i = 0; i < 4; i++) {
      const base = path.join(dir, `d${i}.vhdx`);
      await trackedDisk(base, 4 * GiB);
      disks.push(await VirtualDisk.open(base));
    }
    const def = path.join(dir, 'vm.json');
    const loads = disks.map((d, i) => new Workload(d, { seed: SEED + i, concurrency: 2, flushEvery: 16 }));
    const rows: { total: number; drain: number; prepare: number; def: number; switch: number }[] = [];
    try {
      for (let round = 0; round < ROUNDS; round++) {
        for (const w of loads) w.start();
        await sleep(150);
        const children = disks.map((_, i) => path.join(dir, `d${i}_${round}.avhdx`));
        // As the host does it: children made while the writers run, then one pause for all disks.
        await Promise.all(disks.map((d, i) => d.precreateChild(children[i])));
        const parents = disks.map((d) => d.path);
        const t0 = performance.now();
        let t1 = t0;
        let ids: (string | undefined)[] = [];
        const at: number[] = [];
        await Promise.all(disks.map((d) => d.pause()));
        try {
          at.push(performance.now());
          ids = await Promise.all(
            disks.map(async (d, i) => (await d.prepareChild(children[i], { precreated: true })).id),
          );
          at.push(performance.now());
          await writeFileAtomic(def, JSON.stringify({ round, heads: children, ids }));
          at.push(performance.now());
          await Promise.all(disks.map((d, i) => d.switchHead(children[i])));
          at.push(performance.now());
        } finally {
          for (const d of disks) d.resume();
          t1 = performance.now();
        }
        rows.push({
          total: t1 - t0,
          drain: at[0] - t0,
          prepare: at[1] - at[0],
          def: at[2] - at[1],
          switch: at[3] - at[2],
        });
        // The writers stop between rounds only so checking the cut stays cheap (the log grows otherwise).
        await sleep(20);
        await Promise.all(loads.map((w) => w.stop()));
        expect(ids.every((id) => id?.startsWith('rct2:'))).toBe(true);
        expect(disks.map((d) => d.path)).toEqual(children);
        // Each frozen parent holds exactly what its writer had acknowledged at the cut.
        for (const [i, p] of parents.entries()) {
          const f = await VhdxFile.open(p);
          try {
            const w = loads[i];
            expect(await w.verifyCut((u) => f.readAt(u * w.unit, w.unit), t0, t1), `round ${round} disk ${i}`).toEqual(
              [],
            );
          } finally {
            await f.close();
          }
        }
      }
    } finally {
      await Promise.all(loads.map((w) => w.stop()));
    }
    for (const [i, d] of disks.entries()) {
      const w = loads[i];
      expect(w.writes).toBeGreaterThan(0);
      // Every touched unit holds its last write (unit by unit: a 4 GiB image is too big to hold at once).
      const last = new Map<number, number>();
      for (const x of w.log) if (x.seq > (last.get(x.unit) ?? -1)) last.set(x.unit, x.seq);
      const wrong: number[] = [];
      for (const [u, seq] of last) if (!(await d.read(u * w.unit, w.unit)).equals(w.data(seq, u))) wrong.push(u);
      expect(wrong, `disk ${i}`).toEqual([]);
    }
    for (const d of disks) await d.close();
    const fmt = (k: keyof (typeof rows)[number]) => `${k} ${median(rows.map((r) => r[k])).toFixed(1)}`;
    console.log(
      `checkpoint pause, 4 disks of 4 GiB, ${ROUNDS} rounds, ${loads.reduce((n, w) => n + w.writes, 0)} writes: ` +
        `per round total (drain/prepare/definition/switch) ${rows.map((r) => `${r.total.toFixed(1)} (${r.drain.toFixed(1)}/${r.prepare.toFixed(1)}/${r.def.toFixed(1)}/${r.switch.toFixed(1)})`).join(', ')} ms; medians (ms): ` +
        (['total', 'drain', 'prepare', 'def', 'switch'] as const).map(fmt).join(', '),
    );
  }, 600_000);

  const moments = [
    'prepared, old head recorded',
    'prepared, child recorded',
    'switched',
    'switched, flushed writes',
    'switched, writes in flight',
    // Without prepareChild the tracker records the child at the switch itself (its own persist).
    'switched unprepared, flushed writes',
  ] as const;
  for (const [k, moment] of moments.entries()) {
    it(`a crash ${moment}: the chain opens, reads what was durable, and changes since the checkpoint are complete`, async () => {
      const size = 64 * MiB;
      const base = path.join(dir, `crash${k}.vhdx`);
      const child = path.join(dir, `crash${k}_1.avhdx`);
      await trackedDisk(base, size);
      const disk = await VirtualDisk.open(base);
      const before = new Workload(disk, { seed: SEED + 100 + k, flushEvery: 8 });
      await before.run(300);
      // Nothing writes from here to the cut (the gate holds reads too once paused).
      const frozen = await disk.read(0, size);
      let id: string | undefined;
      if (moment.includes('unprepared')) id = await disk.seal();
      await disk.precreateChild(child);
      await disk.pause();
      if (!moment.includes('unprepared')) ({ id } = await disk.prepareChild(child, { precreated: true }));
      expect(id).toMatch(/^rct2:/);
      const after = new Workload(disk, { seed: SEED + 200 + k, flushEvery: 8 });
      let crashedAt = performance.now();
      if (moment.startsWith('switched')) {
        await disk.switchHead(child);
        disk.resume();
        if (moment.endsWith('flushed writes')) await after.run(200);
        if (moment === 'switched, writes in flight') {
          await after.run(100);
          after.start();
          await sleep(30);
        }
      }
      // The process dies: nothing is flushed or closed.
      crashedAt = performance.now();
      await disk.abandon();
      await after.stop({ flush: false }).catch(() => undefined);
      expect(moment !== 'switched, writes in flight' || after.log.length > 100).toBe(true);

      // The frozen parent needs no log replay and holds exactly the cut.
      const parent = await VhdxFile.open(base);
      try {
        expect(parent.replay).toBeUndefined();
        expect((await parent.readAt(0, size)).equals(frozen)).toBe(true);
      } finally {
        await parent.close();
      }
      if (!requirePeers('qemu-img').skip) expect((await qemuImgCheck(base)).ok).toBe(true);

      // The host opens whichever head its definition names.
      const head = moment === 'prepared, old head recorded' ? base : child;
      const reopened = await VirtualDisk.open(head);
      try {
        expect(reopened.file.chain().length).toBe(head === base ? 1 : 2);
        const now = await reopened.read(0, size);
        const unit = after.unit;
        const problems = await after.verifyAfterCrash(
          async (u) => now.subarray(u * unit, (u + 1) * unit),
          crashedAt,
          (u) => frozen.subarray(u * unit, (u + 1) * unit),
        );
        expect(problems).toEqual([]);
        const touched = new Set(after.log.map((x) => x.unit));
        const changedUntouched: number[] = [];
        for (let u = 0; u < size / unit; u++) {
          if (
            !touched.has(u) &&
            !now.subarray(u * unit, (u + 1) * unit).equals(frozen.subarray(u * unit, (u + 1) * unit))
          )
            changedUntouched.push(u);
        }
        expect(changedUntouched).toEqual([]);
        if (moment.endsWith('flushed writes')) {
          // Every write was made durable: the disk reads exactly the writer's view.
          for (const x of after.log) expect(x.durableAt).not.toBeNull();
        }
        // The id is answered (no reset), and every granule that differs from the cut is reported.
        const tracker = reopened.changeTracker!;
        expect(tracker.status().reason).toBeNull();
        const { ranges } = await reopened.changes(id!);
        const g = tracker.granularity;
        const missed: number[] = [];
        for (let off = 0; off < size; off += g) {
          if (frozen.subarray(off, off + g).equals(now.subarray(off, off + g))) continue;
          if (!ranges.some((r) => r.offset <= off && off + g <= r.offset + r.length)) missed.push(off);
        }
        expect(missed).toEqual([]);
        if (after.log.some((x) => x.durableAt !== null)) expect(ranges.length).toBeGreaterThan(0);
        // Tracking goes on from there: a write after the recovery is reported too, across a clean close.
        await reopened.write(size - 4096, Buffer.alloc(4096, 0xa5));
        await reopened.close();
        const again = await VirtualDisk.open(head);
        try {
          const res = await again.changes(id!);
          expect(res.ranges.at(-1)!.offset + res.ranges.at(-1)!.length).toBe(size);
          for (const r of ranges)
            expect(res.ranges.some((x) => x.offset <= r.offset && r.offset + r.length <= x.offset + x.length)).toBe(
              true,
            );
        } finally {
          await again.close();
        }
      } finally {
        await reopened.close();
      }
    }, 120_000);
  }

  it('a child opens over a given open parent only when it is that file at that DataWriteGuid; a retired head reads on, refuses writes and needs no replay', async () => {
    const a = path.join(dir, 'given-a.vhdx');
    const b = path.join(dir, 'given-b.vhdx');
    const c = path.join(dir, 'given-a_1.avhdx');
    await createVhdx(a, { size: 8 * MiB, blockSize: MiB });
    await createVhdx(b, { size: 8 * MiB, blockSize: MiB });
    const head = await VhdxFile.open(a, { writable: true });
    await head.write(Buffer.alloc(4096, 7), 0);
    await createVhdx(c, { parent: a });
    // Another file than the one the locator names is refused, and stays open for its owner.
    const other = await VhdxFile.open(b);
    await expect(VhdxFile.open(c, { writable: true, parent: other })).rejects.toMatchObject({
      code: 'PARENT_NOT_FOUND',
    });
    expect((await other.readAt(0, 512)).every((x) => x === 0)).toBe(true);
    await other.close();
    const child = await VhdxFile.open(c, { writable: true, parent: head });
    expect(child.parent).toBe(head);
    expect(child.linksToParent()).toBe(true);
    expect((await child.readAt(0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    // Retired, the head refuses writes but reads on (through the child too); its file needs no replay.
    await head.retire();
    expect(head.writable).toBe(false);
    await expect(head.write(Buffer.alloc(512, 1), 0)).rejects.toMatchObject({ code: 'READ_ONLY' });
    await child.write(Buffer.alloc(512, 9), 512);
    const want = Buffer.alloc(4096, 7);
    want.fill(9, 512, 1024);
    expect((await child.readAt(0, 4096)).equals(want)).toBe(true);
    expect((await head.readAt(0, 4096)).equals(Buffer.alloc(4096, 7))).toBe(true);
    const look = await VhdxFile.open(a);
    expect(look.replay).toBeUndefined();
    await look.close();
    // Closing the child closes its parent (the parent is not closed twice by anyone else).
    await child.close();
    await expect(head.readAt(0, 512)).rejects.toMatchObject({ code: 'CLOSED' });

    // A parent whose DataWriteGuid moved after the child was made is refused, and stays its owner's.
    const moved = await VhdxFile.open(a, { writable: true });
    await moved.write(Buffer.alloc(512, 3), 0);
    await expect(VhdxFile.open(c, { parent: moved })).rejects.toMatchObject({ code: 'PARENT_MISMATCH' });
    expect((await moved.readAt(0, 512)).equals(Buffer.alloc(512, 3))).toBe(true);
    await moved.close();
  });
});
