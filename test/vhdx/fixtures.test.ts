/**
 * The two real VHDX files (Hyper-V and Disk2vhd, from QEMU's iotests) open read-only, read exactly what
 * they hold (known content for one, qemu-img's reading for the other), report the properties
 * VHDX-NOTES.md documents, and are not modified by a read-only open.
 */
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdtemp, open, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { guidToString } from '../../src/util/guid.js';
import { REGION_BAT, REGION_METADATA } from '../../src/formats/vhdx/constants.js';
import type { RegionTable } from '../../src/formats/vhdx/header.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { fixturePath } from '../helpers/fixtures.js';
import { missingPeers } from '../helpers/peers.js';

const MiB = 2 ** 20;
const CHUNK = 16 * MiB;
const execFileP = promisify(execFile);

const IOTEST = 'iotest-dynamic-1G.vhdx';
const DISK2VHD = 'test-disk2vhd.vhdx';
/** VHDX-NOTES.md §4: SHA-256 of the decompressed files. */
const FILE_SHA256: Record<string, string> = {
  [IOTEST]: 'a4fb24fa51fb4852d5a6bdc2b390a91b0a4e19b47696edc5a00c816067257402',
  [DISK2VHD]: '5b6721d4f26ef13d259c380a7327b794d1c6dd79e386737d77e8d88f43259812',
};

async function sha256File(file: string): Promise<string> {
  const h = createHash('sha256');
  for await (const chunk of createReadStream(file, { highWaterMark: 4 * MiB })) h.update(chunk as Buffer);
  return h.digest('hex');
}

/** SHA-256 of the whole virtual disk, read in 16 MiB chunks; `visit` sees each chunk. */
async function contentSha256(disk: VhdxFile, visit?: (at: number, buf: Buffer) => void): Promise<string> {
  const h = createHash('sha256');
  const buf = Buffer.alloc(CHUNK);
  for (let at = 0; at < disk.virtualSize; at += CHUNK) {
    const view = buf.subarray(0, Math.min(CHUNK, disk.virtualSize - at));
    await disk.read(view, at);
    visit?.(at, view);
    h.update(view);
  }
  return h.digest('hex');
}

let tmp: string;
const files: Record<string, string> = {};

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'tidemark-fixtures-test-'));
  for (const name of [IOTEST, DISK2VHD]) files[name] = fixturePath(name);
});

afterAll(async () => {
  if (tmp) await rm(tmp, { recursive: true, force: true });
});

describe('iotest-dynamic-1G.vhdx (Hyper-V, Windows 6.2)', () => {
  it('file SHA-256 matches VHDX-NOTES.md', async () => {
    expect(await sha256File(files[IOTEST])).toBe(FILE_SHA256[IOTEST]);
  });

  it('properties: dynamic, 1 GiB, 32 MiB blocks, LSS 512 / PSS 4096, Hyper-V creator, BAT listed first', async () => {
    const disk = await VhdxFile.open(files[IOTEST]);
    try {
      expect(disk.writable).toBe(false);
      expect(disk.identifier.creator).toBe('Microsoft Windows 6.2.9200.16384');
      expect(disk.diskType).toBe('dynamic');
      expect(disk.virtualSize).toBe(1024 * MiB);
      expect(disk.blockSize).toBe(32 * MiB);
      expect(disk.logicalSectorSize).toBe(512);
      expect(disk.physicalSectorSize).toBe(4096);
      expect(disk.params.hasParent).toBe(false);
      expect(disk.parent).toBeUndefined();
      expect(disk.warnings).toEqual([]);
      // LogGuid is zero: the stale entries Windows left behind are not replayed.
      expect(guidToString(disk.header.logGuid)).toBe('00000000-0000-0000-0000-000000000000');
      expect(disk.replay).toBeUndefined();
      // Both headers valid; the higher sequence number is current.
      const [h1, h2] = disk.headerSlots;
      expect(typeof h1).toBe('object');
      expect(typeof h2).toBe('object');
      const seqs = [h1, h2].map((h) => (typeof h === 'string' ? -1n : h.sequenceNumber));
      expect(disk.header.sequenceNumber).toBe(seqs[0] > seqs[1] ? seqs[0] : seqs[1]);
      // Region table: both copies valid, BAT at 3 MiB listed first.
      expect(disk.regionTableInUse).toBe(0);
      const t = disk.regionTables[0] as RegionTable;
      expect(typeof disk.regionTables[1]).toBe('object');
      expect(t.entries[0].guid.equals(REGION_BAT)).toBe(true);
      expect(t.entries[0].fileOffset).toBe(3 * MiB);
      expect(disk.batRegion.fileOffset).toBe(3 * MiB);
      expect(disk.metadataRegion.guid.equals(REGION_METADATA)).toBe(true);
    } finally {
      await disk.close();
    }
  });

  it('the log region does hold stale entries (which must not be replayed)', async () => {
    const disk = await VhdxFile.open(files[IOTEST]);
    const { logOffset, logLength } = disk.header;
    await disk.close();
    const fh = await open(files[IOTEST], 'r');
    try {
      const log = Buffer.alloc(logLength);
      await fh.read(log, 0, logLength, logOffset);
      let entries = 0;
      for (let at = 0; at < log.length; at += 4096) if (log.toString('latin1', at, at + 4) === 'loge') entries++;
      expect(entries).toBeGreaterThan(0);
    } finally {
      await fh.close();
    }
  });

  it('reads 0xa5 for [0, 33 MiB), 0x96 for [33 MiB, 66 MiB), zeros after; read-only open changes nothing', async () => {
    const before = await sha256File(files[IOTEST]);
    const disk = await VhdxFile.open(files[IOTEST]);
    let hash: string;
    try {
      const want = Buffer.alloc(CHUNK);
      hash = await contentSha256(disk, (at, buf) => {
        const clip = (v: number) => Math.max(0, Math.min(buf.length, v - at));
        want.fill(0);
        want.fill(0xa5, clip(0), clip(33 * MiB));
        want.fill(0x96, clip(33 * MiB), clip(66 * MiB));
        if (!buf.equals(want.subarray(0, buf.length))) {
          let i = 0;
          while (buf[i] === want[i]) i++;
          throw new Error(`virtual byte ${at + i} is 0x${buf[i].toString(16)}, expected 0x${want[i].toString(16)}`);
        }
      });
      // Unaligned reads across the 33 MiB and 66 MiB boundaries.
      const edge = await disk.readAt(33 * MiB - 3, 7);
      expect([...edge]).toEqual([0xa5, 0xa5, 0xa5, 0x96, 0x96, 0x96, 0x96]);
      const edge2 = await disk.readAt(66 * MiB - 1, 2);
      expect([...edge2]).toEqual([0x96, 0]);
      const last = await disk.readAt(disk.virtualSize - 512, 512);
      expect(last.equals(Buffer.alloc(512))).toBe(true);
    } finally {
      await disk.close();
    }
    // The expected content, hashed independently.
    const h = createHash('sha256');
    h.update(Buffer.alloc(33 * MiB, 0xa5));
    h.update(Buffer.alloc(33 * MiB, 0x96));
    const zeros = Buffer.alloc(CHUNK);
    let left = 1024 * MiB - 66 * MiB;
    for (; left > 0; left -= Math.min(left, CHUNK)) h.update(zeros.subarray(0, Math.min(left, CHUNK)));
    expect(hash).toBe(h.digest('hex'));
    console.log(`${IOTEST}: content SHA-256 ${hash}`);
    expect(await sha256File(files[IOTEST])).toBe(before);
    expect(before).toBe(FILE_SHA256[IOTEST]);
  });

  it.skipIf(missingPeers('qemu-img'))('reads the same as qemu-img convert -O raw', async () => {
    const raw = path.join(tmp, `${IOTEST}.raw`);
    await execFileP('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', files[IOTEST], raw]);
    const disk = await VhdxFile.open(files[IOTEST]);
    try {
      expect(await contentSha256(disk)).toBe(await sha256File(raw));
    } finally {
      await disk.close();
      await rm(raw, { force: true });
    }
  });
});

describe('test-disk2vhd.vhdx (Disk2vhd)', () => {
  it('file SHA-256 matches VHDX-NOTES.md', async () => {
    expect(await sha256File(files[DISK2VHD])).toBe(FILE_SHA256[DISK2VHD]);
  });

  it('properties: identical headers with sequence 1 accepted, metadata region listed first, 256 MiB in 2 MiB blocks', async () => {
    const disk = await VhdxFile.open(files[DISK2VHD]);
    try {
      expect(disk.writable).toBe(false);
      expect(disk.identifier.creator).toBe('d2v');
      expect(disk.diskType).toBe('dynamic');
      expect(disk.virtualSize).toBe(256 * MiB);
      expect(disk.blockSize).toBe(2 * MiB);
      expect(disk.logicalSectorSize).toBe(512);
      expect(disk.physicalSectorSize).toBe(512);
      expect(disk.replay).toBeUndefined();
      expect(disk.warnings).toEqual([]); // identical headers are not worth a warning
      const [h1, h2] = disk.headerSlots;
      if (typeof h1 === 'string' || typeof h2 === 'string') throw new Error(`header invalid: ${h1} / ${h2}`);
      expect(h1.sequenceNumber).toBe(1n);
      expect(h2.sequenceNumber).toBe(1n);
      expect(h1.checksum).toBe(h2.checksum);
      expect(disk.header.sequenceNumber).toBe(1n);
      const t = disk.regionTables[disk.regionTableInUse] as RegionTable;
      expect(t.entries[0].guid.equals(REGION_METADATA)).toBe(true); // listed before the BAT
      expect(t.entries[1].guid.equals(REGION_BAT)).toBe(true);
      // "2 MiB blocks all present"
      const states = new Map<number, number>();
      for await (const { entry } of disk.ownBlocks()) states.set(entry.state, (states.get(entry.state) ?? 0) + 1);
      expect([...states]).toEqual([[6, 128]]);
    } finally {
      await disk.close();
    }
  });

  it('block 0 holds an MBR (0x55 0xAA at bytes 510-511); reading all is stable; read-only open changes nothing', async () => {
    const before = await sha256File(files[DISK2VHD]);
    const disk = await VhdxFile.open(files[DISK2VHD]);
    try {
      const block0 = await disk.readAt(0, disk.blockSize);
      expect(block0[510]).toBe(0x55);
      expect(block0[511]).toBe(0xaa);
      const a = await contentSha256(disk);
      const b = await contentSha256(disk);
      expect(a).toBe(b);
      console.log(`${DISK2VHD}: content SHA-256 ${a}`);
    } finally {
      await disk.close();
    }
    expect(await sha256File(files[DISK2VHD])).toBe(before);
    expect(before).toBe(FILE_SHA256[DISK2VHD]);
  });

  it.skipIf(missingPeers('qemu-img'))('reads the same as qemu-img convert -O raw', async () => {
    const raw = path.join(tmp, `${DISK2VHD}.raw`);
    await execFileP('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', files[DISK2VHD], raw]);
    const disk = await VhdxFile.open(files[DISK2VHD]);
    try {
      const ours = await contentSha256(disk);
      const theirs = await sha256File(raw);
      expect(ours).toBe(theirs);
      // Not all zeros: the oracle comparison means something.
      expect(ours).not.toBe(
        createHash('sha256')
          .update(Buffer.alloc(256 * MiB))
          .digest('hex'),
      );
    } finally {
      await disk.close();
      await rm(raw, { force: true });
    }
  });
});
