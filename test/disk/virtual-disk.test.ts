/**
 * The disk layer: the I/O gate holds new I/O and drains what is in flight; a checkpoint cut freezes exactly
 * the content acknowledged before the pause; an online merge while a writer keeps writing ends with the
 * parent as head holding exactly the writer's view, the child deleted, qemu-img agreeing, and change
 * tracking still answering for ids sealed before the merge (no reset, no missed change).
 *
 * Seed: TIDEMARK_DISK_SEED.
 */
import { access } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IoGate } from '../../src/disk/io-gate.js';
import { VirtualDisk } from '../../src/disk/virtual-disk.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { ChangeTracker } from '../../src/tracking/tracker.js';
import { Workload } from '../../src/workload/generator.js';
import { qemuImgCheck, requirePeers, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { readWholeVhdx } from '../helpers/vhdx.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const SIZE = 64 * MiB;
const SEED = seedFrom('TIDEMARK_DISK_SEED', 4242);
console.log(`virtual-disk seed ${SEED} (TIDEMARK_DISK_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('vdisk')));
afterAll(async () => cleanup?.());

/** Applies a random unaligned write to both the disk and the model. */
async function randomWrite(disk: VirtualDisk, model: Buffer, r: ReturnType<typeof rng>): Promise<void> {
  const len = 1 + r.int(3 * MiB);
  const off = r.int(SIZE - len);
  const kind = r.int(10);
  if (kind === 0) {
    await disk.writeZeroes(off, len);
    model.fill(0, off, off + len);
  } else if (kind === 1) {
    await disk.trim(off, len);
    model.fill(0, off, off + len);
  } else {
    const data = r.bytes(len);
    await disk.write(off, data);
    data.copy(model, off);
  }
}

describe('IoGate', () => {
  it('pause waits for in-flight operations and holds new ones until resume', async () => {
    const gate = new IoGate();
    const log: string[] = [];
    const slow = gate.run(async () => {
      await sleep(30);
      log.push('slow done');
    });
    const paused = gate.pause().then(() => log.push('paused'));
    const late = gate.run(async () => log.push('late ran'));
    await paused;
    expect(log).toEqual(['slow done', 'paused']);
    await sleep(10);
    expect(log).not.toContain('late ran');
    gate.resume();
    await Promise.all([slow, late]);
    expect(log).toEqual(['slow done', 'paused', 'late ran']);
  });
});

describe(`VirtualDisk (seed ${SEED})`, () => {
  it('a checkpoint cut freezes exactly what was acknowledged before the pause', async () => {
    const base = path.join(dir, 'cp.vhdx');
    await createVhdx(base, { size: SIZE, blockSize: MiB });
    const probe = await VhdxFile.open(base);
    await ChangeTracker.enable(probe);
    await probe.close();
    const disk = await VirtualDisk.open(base);
    const r = rng(SEED);
    const model = Buffer.alloc(SIZE);
    for (let i = 0; i < 40; i++) await randomWrite(disk, model, r);
    // Writers keep going while the pause is requested; what they got acknowledged before it is in the parent.
    const child = path.join(dir, 'cp-1.avhdx');
    let stop = false;
    const writer = (async () => {
      const wr = rng(SEED + 1);
      while (!stop) await randomWrite(disk, model, wr);
    })();
    await sleep(20);
    await disk.pause();
    const frozen = Buffer.from(model);
    const { id, parentPath } = await disk.cutCheckpoint(child);
    disk.resume();
    await sleep(20);
    stop = true;
    await writer;
    expect(id).toMatch(/^rct2:/);
    expect(parentPath).toBe(base);
    expect(disk.path).toBe(child);
    const after = Buffer.from(model);
    await disk.close();
    expect((await readWholeVhdx(base)).equals(frozen)).toBe(true);
    expect((await readWholeVhdx(child)).equals(after)).toBe(true);
    // The changes since the checkpoint's id cover everything written after it.
    const reopened = await VirtualDisk.open(child);
    const res = await reopened.changes(id!);
    for (let off = 0; off < SIZE; off += 64 * 1024) {
      if (!frozen.subarray(off, off + 65536).equals(after.subarray(off, off + 65536))) {
        expect(res.ranges.some((x) => x.offset <= off && off < x.offset + x.length)).toBe(true);
      }
    }
    await reopened.close();
  });

  it('an online merge under a continuous writer keeps every write and tracking valid', async () => {
    const base = path.join(dir, 'm.vhdx');
    await createVhdx(base, { size: SIZE, blockSize: MiB });
    const probe = await VhdxFile.open(base);
    await ChangeTracker.enable(probe);
    await probe.close();
    const disk = await VirtualDisk.open(base);
    const r = rng(SEED + 2);
    const model = Buffer.alloc(SIZE);
    for (let i = 0; i < 30; i++) await randomWrite(disk, model, r);
    await disk.pause();
    const { id } = await disk.cutCheckpoint(path.join(dir, 'm-1.avhdx'));
    disk.resume();
    const atId = Buffer.from(model);
    for (let i = 0; i < 30; i++) await randomWrite(disk, model, r);
    let stop = false;
    let writes = 0;
    const writer = (async () => {
      const wr = rng(SEED + 3);
      while (!stop) {
        await randomWrite(disk, model, wr);
        writes++;
      }
    })();
    const result = await disk.mergeHeadOnline({ maxLivePasses: 3 });
    await sleep(20);
    stop = true;
    await writer;
    expect(writes).toBeGreaterThan(0);
    expect(result.parentPath).toBe(base);
    expect(disk.path).toBe(base);
    await expect(access(path.join(dir, 'm-1.avhdx'))).rejects.toThrow();
    expect((await disk.read(0, SIZE)).equals(model)).toBe(true);
    const res = await disk.changes(id!);
    for (let off = 0; off < SIZE; off += 64 * 1024) {
      if (!atId.subarray(off, off + 65536).equals(model.subarray(off, off + 65536))) {
        expect(res.ranges.some((x) => x.offset <= off && off < x.offset + x.length)).toBe(true);
      }
    }
    expect(disk.changeTracker!.status().state).toBe('valid');
    await disk.close();
    expect((await readWholeVhdx(base)).equals(model)).toBe(true);
    if (!requirePeers('qemu-img').skip) expect((await qemuImgCheck(base)).ok).toBe(true);
  });

  it("checkpoint + online merge rounds under 4 concurrent writers leave exactly the client's view", async () => {
    const base = path.join(dir, 'rounds.vhdx');
    await createVhdx(base, { size: 48 * MiB });
    const probe = await VhdxFile.open(base);
    await ChangeTracker.enable(probe);
    await probe.close();
    const disk = await VirtualDisk.open(base);
    const w = new Workload(disk, { seed: SEED + 9, concurrency: 4, flushEvery: 16 });
    w.start();
    for (let round = 0; round < 5; round++) {
      await sleep(30);
      await disk.pause();
      await disk.cutCheckpoint(path.join(dir, `rounds-${round}.avhdx`));
      disk.resume();
      await sleep(30);
      await disk.mergeHeadOnline();
      await w.stop();
      const img = await disk.read(0, w.units * w.unit);
      const want = w.expectedImage();
      const wrong: string[] = [];
      for (let u = 0; u < w.units && wrong.length < 5; u++) {
        const a = img.subarray(u * w.unit, (u + 1) * w.unit);
        const b = want.subarray(u * w.unit, (u + 1) * w.unit);
        if (!a.equals(b))
          wrong.push(`round ${round} unit ${u}: holds write ${a.readUInt32LE(0)}, client wrote ${b.readUInt32LE(0)}`);
      }
      expect(wrong).toEqual([]);
      w.start();
    }
    await w.stop();
    await disk.close();
  });

  it('refuses I/O out of range, writes to read-only disks and use after close', async () => {
    const base = path.join(dir, 'ro.vhdx');
    await createVhdx(base, { size: 8 * MiB, blockSize: MiB });
    const ro = await VirtualDisk.open(base, { readOnly: true });
    await expect(ro.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'READ_ONLY' });
    await expect(ro.read(8 * MiB - 512, 1024)).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    expect(await ro.blockStatus(0, 8 * MiB)).toEqual([{ offset: 0, length: 8 * MiB, hole: true, zero: true }]);
    await expect(ro.changes('rct1:x')).rejects.toMatchObject({ code: 'MISSING_CHANGE_TRACKING_INFORMATION' });
    await ro.close();
    await expect(ro.read(0, 512)).rejects.toMatchObject({ code: 'CLOSED' });
  });
});
