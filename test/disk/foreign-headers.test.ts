/**
 * A writer that ignores image locks (`qemu-io` with `file.locking=off`) rewrites the headers of a disk
 * the host has open and writes into it (issue 13's known issue). The open disk must take the headers on
 * disk as its own before a checkpoint links a child to them: the checkpoint succeeds, the tracker refuses
 * every earlier id with the reason, blocks the other writer allocated are not handed out again, and every
 * byte (the guest's and the other writer's) reads back, through us and through qemu-img. A child made
 * before the other writer came is made again. A live log of the other writer, or headers that are no
 * longer valid, are refused and nothing is written.
 */
import { execFile } from 'node:child_process';
import { open, readFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { VirtualDisk } from '../../src/disk/virtual-disk.js';
import { TidemarkError } from '../../src/errors.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { HEADER_OFFSETS, HEADER_SIZE } from '../../src/formats/vhdx/constants.js';
import { decodeHeader, encodeHeader, pickCurrentHeader } from '../../src/formats/vhdx/header.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { ChangeTracker } from '../../src/tracking/tracker.js';
import { newGuid } from '../../src/util/guid.js';
import { missingPeers, qemuImgCheck, tempDir } from '../helpers/peers.js';

const execFileP = promisify(execFile);
const MiB = 2 ** 20;
const KiB = 1024;
const SIZE = 32 * MiB;

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('foreign-headers')));
afterAll(async () => cleanup?.());

/** A tracked disk with 0x5a in its first 4 MiB; the expected content beside it. */
async function trackedDisk(name: string): Promise<{ file: string; model: Buffer }> {
  const file = path.join(dir, `${name}.vhdx`);
  await createVhdx(file, { size: SIZE, blockSize: MiB });
  const d = await VhdxFile.open(file, { writable: true });
  await d.write(Buffer.alloc(4 * MiB, 0x5a), 0);
  await ChangeTracker.enable(d, 64 * KiB);
  await d.close();
  const model = Buffer.alloc(SIZE);
  model.fill(0x5a, 0, 4 * MiB);
  return { file, model };
}

async function guestWrite(disk: VirtualDisk, model: Buffer, offset: number, length: number, byte: number) {
  const data = Buffer.alloc(length, byte);
  await disk.write(offset, data);
  data.copy(model, offset);
}

/** What `qemu-io -U`-style writers do: write through QEMU's VHDX driver with the locks off. */
async function foreignWrite(file: string, model: Buffer, offset: number, length: number, byte: number) {
  await execFileP('qemu-io', [
    '--image-opts',
    `driver=vhdx,file.driver=file,file.filename=${file},file.locking=off`,
    '-c',
    `write -P ${byte} ${offset} ${length}`,
  ]);
  model.fill(byte, offset, offset + length);
}

async function checkpoint(disk: VirtualDisk, child: string, precreate: boolean, between?: () => Promise<void>) {
  if (precreate) await disk.precreateChild(child);
  await between?.();
  await disk.pause();
  try {
    const { id } = await disk.prepareChild(child, { precreated: precreate });
    await disk.switchHead(child);
    return id!;
  } finally {
    disk.resume();
  }
}

async function refusal(p: Promise<unknown>): Promise<TidemarkError> {
  try {
    await p;
  } catch (err) {
    if (err instanceof TidemarkError) return err;
    throw err;
  }
  throw new Error('expected a refusal');
}

/** Installs a header in the file's other slot with a higher sequence number (what a foreign writer leaves). */
async function plantHeader(file: string, changes: { logGuid?: Buffer; corrupt?: boolean }) {
  const fh = await open(file, 'r+');
  try {
    const both = Buffer.alloc(2 * HEADER_SIZE);
    await fh.read(both, 0, HEADER_SIZE, HEADER_OFFSETS[0]);
    await fh.read(both, HEADER_SIZE, HEADER_SIZE, HEADER_OFFSETS[1]);
    const picked = pickCurrentHeader(
      decodeHeader(both.subarray(0, HEADER_SIZE), HEADER_OFFSETS[0]),
      decodeHeader(both.subarray(HEADER_SIZE), HEADER_OFFSETS[1]),
    )!;
    const other = picked.slot === 0 ? 1 : 0;
    const next = {
      ...picked.header,
      sequenceNumber: picked.header.sequenceNumber + 5n,
      fileWriteGuid: newGuid(),
      ...(changes.logGuid ? { logGuid: changes.logGuid } : {}),
    };
    await fh.write(encodeHeader(next), 0, HEADER_SIZE, HEADER_OFFSETS[other]);
    if (changes.corrupt) {
      // Both slots torn: neither checksum holds.
      await fh.write(Buffer.alloc(64, 0xee), 0, 64, HEADER_OFFSETS[0] + 100);
      await fh.write(Buffer.alloc(64, 0xee), 0, 64, HEADER_OFFSETS[1] + 100);
    }
  } finally {
    await fh.close();
  }
}

describe.skipIf(missingPeers('qemu-io', 'qemu-img'))('headers another program rewrote while the disk is open', () => {
  for (const precreate of [false, true]) {
    it(`the next checkpoint adopts them (${precreate ? 'child made before the other writer came' : 'child made after'})`, async () => {
      const { file, model } = await trackedDisk(`adopt-${precreate}`);
      const disk = await VirtualDisk.open(file);
      try {
        // The head is the base disk, as a VM's is between backups (QEMU writes no differencing VHDX).
        const id1 = (await disk.seal())!;
        // A block we allocated and the guest flushed (committed: the other writer sees it), and one not yet
        // committed when the other writer comes, whose BAT entry shares a sector with the one it sets.
        // (Two writers allocating the same block at once lose one's data, as with any two writers.)
        await guestWrite(disk, model, 9 * MiB, 64 * KiB, 0x11);
        await disk.flush();
        await guestWrite(disk, model, 12 * MiB, 64 * KiB, 0x12);
        const foreign = async () => {
          // Into the block we allocated, and into a new block the other writer allocates at the file's end.
          await foreignWrite(file, model, 9 * MiB + 128 * KiB, 4 * KiB, 0xcd);
          await foreignWrite(file, model, 6 * MiB, 64 * KiB, 0xce);
        };
        if (!precreate) await foreign();
        const child = path.join(dir, `a${precreate}-1.avhdx`);
        const id2 = await checkpoint(disk, child, precreate, precreate ? foreign : undefined);
        expect(disk.path).toBe(child);
        expect(id2).toMatch(/^rct2:/);
        // Every id sealed before the other writer is refused, saying why; the new one answers.
        const e = await refusal(disk.changes(id1));
        expect(e.code).toBe('MISSING_CHANGE_TRACKING_INFORMATION');
        expect(e.message).toMatch(/another program rewrote the headers|qemu-io|wrote/);
        expect((await disk.changes(id2)).ranges).toEqual([]);
        // The guest goes on in the child; then, merged back, in the base: new blocks must not land on the other
        // writer's (the base was rescanned when its headers were adopted).
        await guestWrite(disk, model, 20 * MiB, 256 * KiB, 0x22);
        await guestWrite(disk, model, 6 * MiB + 512 * KiB, 4 * KiB, 0x23);
        expect((await disk.read(0, SIZE)).equals(model)).toBe(true);
        expect((await disk.changes(id2)).ranges.length).toBeGreaterThan(0);
        // Merged back into the base, which takes more blocks.
        await disk.mergeHeadOnline();
        expect(disk.path).toBe(file);
        await guestWrite(disk, model, 28 * MiB, 64 * KiB, 0x24);
        expect((await disk.read(0, SIZE)).equals(model)).toBe(true);
      } finally {
        await disk.close();
      }
      // Closed: the chain opens from disk, reads the same, and qemu-img agrees on every file.
      const head = await VhdxFile.open(disk.path);
      try {
        expect((await head.readAt(0, SIZE)).equals(model)).toBe(true);
      } finally {
        await head.close();
      }
      const c = await qemuImgCheck(file);
      expect(c.ok, c.output).toBe(true);
      const raw = path.join(dir, `adopt-${precreate}.raw`);
      await execFileP('qemu-img', ['convert', '-f', 'vhdx', '-O', 'raw', file, raw]);
      expect((await readFile(raw)).equals(model)).toBe(true);
    });
  }

  it('a live log of the other writer, or headers no longer valid: the checkpoint is refused and nothing written', async () => {
    for (const kind of ['live log', 'invalid'] as const) {
      const { file } = await trackedDisk(`refuse-${kind.replace(' ', '-')}`);
      const disk = await VirtualDisk.open(file);
      const child = path.join(dir, `refuse-${kind.replace(' ', '-')}.avhdx`);
      try {
        await disk.write(0, Buffer.alloc(4 * KiB, 0x33));
        await disk.flush();
        await plantHeader(file, kind === 'live log' ? { logGuid: newGuid() } : { corrupt: true });
        const before = await execFileP('sha256sum', [file]);
        const e = await refusal(checkpoint(disk, child, false));
        expect(e.code).toBe('CONFLICT');
        expect(e.message).toMatch(kind === 'live log' ? /its log is active/ : /no longer valid/);
        expect(e.message).toMatch(/stop the VM/);
        expect((await execFileP('sha256sum', [file])).stdout).toBe(before.stdout);
        expect(disk.path).toBe(file);
      } finally {
        await disk.abandon();
      }
    }
  });
});
