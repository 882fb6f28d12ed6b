/**
 * Shared by the VHD tests: seeded scribbles mirrored into an expected image, whole-disk reads through
 * the engine, and the peers' readings of a VHD (qemu-img with the current size, 7-Zip, libvhdi).
 */
import { spawn } from 'node:child_process';
import { createWriteStream } from 'node:fs';
import { rm } from 'node:fs/promises';
import { pipeline } from 'node:stream/promises';
import { expect } from 'vitest';
import { VhdFile, type VhdOpenOptions } from '../../src/formats/vhd/vhd.js';
import { run } from '../helpers/peers.js';
import { rng } from '../helpers/random.js';

export const KiB = 1024;
export const MiB = 2 ** 20;

/**
 * Seeded writes and write-zeroes through the engine, mirrored into `expected`: unaligned offsets and
 * lengths, half of them near a `blockSize` boundary, some of them flushed.
 */
export async function scribbleVhd(
  disk: VhdFile,
  expected: Buffer,
  seed: number,
  ops: number,
  blockSize = disk.blockSize ?? 2 * MiB,
): Promise<void> {
  const r = rng(seed);
  const size = expected.length;
  const blocks = Math.ceil(size / blockSize);
  for (let i = 0; i < ops; i++) {
    const kind = r.next();
    const len = 1 + r.int(r.next() < 0.3 ? 3 * MiB : 64 * KiB);
    const near = r.next() < 0.5 ? r.int(blocks) * blockSize - r.int(len) : r.int(size);
    const offset = Math.max(0, Math.min(size - 1, near));
    const n = Math.min(len, size - offset);
    if (kind < 0.8) {
      const data = r.bytes(n);
      await disk.write(data, offset);
      data.copy(expected, offset);
    } else if (kind < 0.9) {
      await disk.writeZeroes(offset, n);
      expected.fill(0, offset, offset + n);
    } else {
      await disk.trim(offset, n);
      expected.fill(0, offset, offset + n);
    }
    if (r.next() < 0.1) await disk.flush();
  }
}

/** The whole virtual disk of `file` (through its chain) as the engine reads it. */
export async function readWholeVhd(file: string, opts: VhdOpenOptions = {}): Promise<Buffer> {
  const disk = await VhdFile.open(file, opts);
  try {
    const out = Buffer.alloc(disk.virtualSize);
    for (let at = 0; at < out.length; at += 64 * MiB) {
      await disk.read(out.subarray(at, Math.min(out.length, at + 64 * MiB)), at);
    }
    return out;
  } finally {
    await disk.close();
  }
}

/** First differing byte of two buffers, for failure messages that say where. */
export function firstDiff(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `lengths ${a.length} and ${b.length}`;
  for (let at = 0; at < a.length; at += MiB) {
    const end = Math.min(a.length, at + MiB);
    if (!a.subarray(at, end).equals(b.subarray(at, end))) {
      for (let i = at; i < end; i++) if (a[i] !== b[i]) return `first difference at byte ${i}: ${a[i]} vs ${b[i]}`;
    }
  }
  return 'equal';
}

export function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  expect(firstDiff(actual, expected), what).toBe('equal');
}

/**
 * QEMU's view of a VHD as `--image-opts`: sized by the footer's current size (as Hyper-V does), not by
 * the CHS geometry QEMU uses for creators it does not know (Tidemark's "tdmk" among them).
 */
export function qemuVpc(file: string): string {
  return `driver=vpc,force_size_calc=current_size,file.filename=${file.replace(/,/g, ',,')}`;
}

/** `qemu-img convert` of a VHD (sized by its current size) to a raw file. */
export async function qemuReadVhd(file: string, dstRaw: string): Promise<void> {
  await run('qemu-img', ['convert', '--image-opts', qemuVpc(file), '-O', 'raw', dstRaw]);
}

/** `qemu-img info` of a VHD as QEMU sizes it by default (no force_size_calc). */
export async function qemuInfoVhd(file: string): Promise<{ 'virtual-size': number; 'backing-filename'?: string }> {
  return JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', 'vpc', file])).stdout);
}

/** `qemu-io` pattern writes into a VHD opened by its current size. */
export async function qemuIoWriteVhd(
  file: string,
  writes: { offset: number; length: number; pattern: number }[],
): Promise<void> {
  const args = ['--image-opts'];
  for (const w of writes) args.push('-c', `write -P 0x${w.pattern.toString(16)} ${w.offset} ${w.length}`);
  args.push(qemuVpc(file));
  const r = await run('qemu-io', args);
  if (/error|failed/i.test(r.stdout + r.stderr)) throw new Error(`qemu-io ${file}: ${r.stdout}${r.stderr}`);
}

/** 7-Zip's reading of a VHD (`7zz e -so -tvhd`), parents included, streamed into `dst`. */
export async function sevenZipVhd(file: string, dst: string): Promise<void> {
  const child = spawn('7zz', ['e', '-so', '-tvhd', '-bd', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', resolve);
  });
  try {
    const [, code] = await Promise.all([pipeline(child.stdout, createWriteStream(dst)), exited]);
    if (code !== 0) throw new Error(`7zz e -so -tvhd ${file} exited ${code}: ${stderr.trim()}`);
  } catch (err) {
    await rm(dst, { force: true });
    throw err;
  }
}
