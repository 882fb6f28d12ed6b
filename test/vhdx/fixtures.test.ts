import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { fixturePath } from '../helpers/fixtures.js';
import { missingPeers, qemuImgToRaw, sha256File, tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;

async function contentHash(disk: VhdxFile): Promise<string> {
  const h = createHash('sha256');
  for (let at = 0; at < disk.virtualSize; at += 16 * MiB)
    h.update(await disk.readAt(at, Math.min(16 * MiB, disk.virtualSize - at)));
  return h.digest('hex');
}

describe('real files', () => {
  it('iotest-dynamic-1G (Hyper-V): properties, stale log entries ignored, exact content', async () => {
    const file = fixturePath('iotest-dynamic-1G.vhdx');
    expect(await sha256File(file)).toBe('a4fb24fa51fb4852d5a6bdc2b390a91b0a4e19b47696edc5a00c816067257402');
    const disk = await VhdxFile.open(file);
    try {
      expect(disk.identifier.creator).toBe('Microsoft Windows 6.2.9200.16384');
      expect(disk.diskType).toBe('dynamic');
      expect(disk.virtualSize).toBe(1024 * MiB);
      expect(disk.blockSize).toBe(32 * MiB);
      expect(disk.logicalSectorSize).toBe(512);
      expect(disk.physicalSectorSize).toBe(4096);
      expect(disk.replay).toBeUndefined(); // LogGuid is zero: stale entries are not replayed
      for (let at = 0; at < disk.virtualSize; at += 16 * MiB) {
        const buf = await disk.readAt(at, 16 * MiB);
        for (let i = 0; i < buf.length; i += 4096) {
          const v = at + i;
          const want = v < 33 * MiB ? 0xa5 : v < 66 * MiB ? 0x96 : 0;
          if (buf[i] !== want || buf[i + 4095] !== want) throw new Error(`byte at ${v} is ${buf[i]}, expected ${want}`);
        }
      }
    } finally {
      await disk.close();
    }
    expect(await sha256File(file)).toBe('a4fb24fa51fb4852d5a6bdc2b390a91b0a4e19b47696edc5a00c816067257402');
    const report = await checkVhdx(file);
    expect(report.errors).toEqual([]);
  });

  it('test-disk2vhd (Disk2vhd): identical headers with sequence 1, metadata before the BAT, MBR in block 0', async () => {
    const file = fixturePath('test-disk2vhd.vhdx');
    expect(await sha256File(file)).toBe('5b6721d4f26ef13d259c380a7327b794d1c6dd79e386737d77e8d88f43259812');
    const disk = await VhdxFile.open(file);
    try {
      expect(disk.virtualSize).toBe(256 * MiB);
      expect(disk.blockSize).toBe(2 * MiB);
      const [h1, h2] = disk.headerSlots;
      expect(
        typeof h1 === 'object' && typeof h2 === 'object' && h1.sequenceNumber === 1n && h2.sequenceNumber === 1n,
      ).toBe(true);
      const mbr = await disk.readAt(0, 512);
      expect([mbr[510], mbr[511]]).toEqual([0x55, 0xaa]);
      const hist = new Map<number, number>();
      for await (const { entry } of disk.ownBlocks()) hist.set(entry.state, (hist.get(entry.state) ?? 0) + 1);
      expect(hist.get(6)).toBe(128); // every block present
    } finally {
      await disk.close();
    }
    expect((await checkVhdx(file)).errors).toEqual([]);
  });

  it.skipIf(missingPeers('qemu-img'))('both read the same through qemu-img', async () => {
    const { dir, cleanup } = await tempDir('fixtures');
    try {
      for (const name of ['iotest-dynamic-1G.vhdx', 'test-disk2vhd.vhdx']) {
        const raw = `${dir}/${name}.raw`;
        await qemuImgToRaw(fixturePath(name), 'vhdx', raw);
        const disk = await VhdxFile.open(fixturePath(name));
        try {
          expect(await contentHash(disk)).toBe(await sha256File(raw));
        } finally {
          await disk.close();
        }
      }
    } finally {
      await cleanup();
    }
  });
});
