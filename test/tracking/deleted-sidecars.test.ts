/**
 * Tracking files deleted under Tidemark (found by the adversarial lineage suite, test/backup/adversary.test.ts):
 * - while a session writes, a deleted `.rct` or `.mrt` restarts the epoch (every earlier id refused, the reason
 *   says so) and seals and the clean close go on: no raw ENOENT that would fail every later checkpoint;
 * - a `.rct` deleted while closed, its `.mrt` left behind: tracking can be enabled again (the lone coarse map
 *   is replaced), so the host can open the disk again.
 */
import { rm } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { ChangeTracker, trackingPaths } from '../../src/tracking/tracker.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('rct-deleted'));
});
afterAll(async () => cleanup?.());

async function trackedDisk(name: string): Promise<string> {
  const file = path.join(dir, name);
  await createVhdx(file, { size: 16 * MiB, blockSize: MiB });
  const disk = await VhdxFile.open(file);
  try {
    await ChangeTracker.enable(disk, 64 * 1024);
  } finally {
    await disk.close();
  }
  return file;
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

describe('tracking files deleted under Tidemark', () => {
  for (const ext of ['rct', 'mrt'] as const) {
    it(`.${ext} deleted while a session writes: the epoch restarts, seals and the close go on`, async () => {
      const file = await trackedDisk(`running-${ext}.vhdx`);
      const disk = await VhdxFile.open(file, { writable: true });
      try {
        const t = (await ChangeTracker.attach(disk, { writable: true }))!;
        const id1 = await t.seal();
        await disk.write(Buffer.alloc(4096, 1), 2 * MiB);
        await rm(trackingPaths(file)[ext]);
        await t.seal(); // threw ENOENT before
        const e = await refusal(t.changes(id1));
        expect(e?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
        expect(t.status().reason).toMatch(new RegExp(`\\.${ext} was replaced, renamed or removed while open`));
        // Until the disk is opened again, nothing this session seals is vouched for (its files are gone).
        await disk.write(Buffer.alloc(4096, 2), 5 * MiB);
        const id3 = await t.seal();
        expect((await refusal(t.changes(id3)))?.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
      } finally {
        await disk.close(); // a clean close, no error
      }
      // Opened again: tracked again (the .rct made anew, or the .mrt), and a new id answers.
      if (ext === 'rct') {
        const probe = await VhdxFile.open(file);
        await ChangeTracker.enable(probe, 64 * 1024).finally(() => probe.close());
      }
      const again = await VhdxFile.open(file, { writable: true });
      try {
        const t = (await ChangeTracker.attach(again, { writable: true }))!;
        const id = await t.seal();
        await again.write(Buffer.alloc(4096, 3), 7 * MiB);
        expect((await t.changes(id)).ranges).toEqual([{ offset: 7 * MiB, length: 64 * 1024 }]);
      } finally {
        await again.close();
      }
    });
  }

  it('.rct deleted while closed, its .mrt left: tracking is enabled again', async () => {
    const file = await trackedDisk('closed.vhdx');
    await rm(trackingPaths(file).rct);
    expect(await ChangeTracker.inspect(file)).toEqual({ state: 'none' });
    const disk = await VhdxFile.open(file);
    try {
      await ChangeTracker.enable(disk, 64 * 1024, { reason: 'the tracking files were missing' }); // ALREADY_EXISTS before
    } finally {
      await disk.close();
    }
    expect(await ChangeTracker.inspect(file)).toEqual({ state: 'ours' });
    const again = await VhdxFile.open(file);
    try {
      const t = (await ChangeTracker.attach(again, { writable: false }))!;
      expect(t.status()).toMatchObject({ state: 'reset', reason: 'the tracking files were missing' });
    } finally {
      await again.close();
    }
  });
});
