/**
 * The interop matrix: {fixed, dynamic} × block sizes {1, 2, 32, 256} MiB × logical sector {512, 4096}.
 * Seeded random writes (unaligned offsets and lengths, many straddling block boundaries, some
 * write-zeroes and trims) plus a fixed list of edge cases go through the engine and are mirrored into
 * an expected raw image; then the engine, qemu-img (check and compare: 512-byte sectors only, QEMU
 * refuses the others and the test asserts exactly that), 7zz and libvhdi (vhdimount or pyvhdi) must
 * all give the expected bytes.
 *
 * The other way round: files qemu-img creates and qemu-io writes read identically through the engine,
 * our writes into them read identically in qemu-img, and qemu-io can keep writing after us.
 *
 * And disks big enough for a second sector-bitmap chunk (4 GiB with 512-byte sectors, 32 GiB with
 * 4096): the BAT interleaves a sector-bitmap entry after every chunk, so payload entries past the first
 * chunk move by one; compared in windows (the files are sparse, but reading them whole is slow).
 *
 * Seeds: TIDEMARK_INTEROP_SEED (printed).
 */
import { spawn, spawnSync } from 'node:child_process';
import {
  closeSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  readdirSync,
  rmSync,
  rmdirSync,
  writeFileSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checkVhdx } from '../../src/formats/vhdx/check.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import {
  qemuImgCheck,
  qemuImgCompare,
  qemuImgConvertToRaw,
  qemuImgCreateVhdx,
  qemuIoWrite,
  requirePeers,
  run,
  sevenZipExtract,
  tempDir,
  vhdiInfo,
  vhdiRead,
  vhdiReader,
} from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { scribble } from '../helpers/scribble.js';
import { readWholeVhdx } from '../helpers/vhdx.js';
import { sleep } from '../helpers/async.js';

const KiB = 1024;
const MiB = 2 ** 20;
const GiB = 2 ** 30;
const SEED = seedFrom('TIDEMARK_INTEROP_SEED', 20261124);
console.log(`interop seed ${SEED} (set TIDEMARK_INTEROP_SEED to replay)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('interop')));
afterAll(async () => cleanup());

/** First differing byte of two buffers, for failure messages that say where. */
function firstDiff(a: Buffer, b: Buffer): string {
  if (a.length !== b.length) return `lengths ${a.length} and ${b.length}`;
  for (let at = 0; at < a.length; at += MiB) {
    const end = Math.min(a.length, at + MiB);
    if (!a.subarray(at, end).equals(b.subarray(at, end))) {
      for (let i = at; i < end; i++) if (a[i] !== b[i]) return `first difference at byte ${i}: ${a[i]} vs ${b[i]}`;
    }
  }
  return 'equal';
}

function expectSame(actual: Buffer, expected: Buffer, what: string): void {
  const d = firstDiff(actual, expected);
  expect(d, what).toBe('equal');
}

/**
 * Edge cases the random writes may miss, mirrored into `expected`: a write straddling the first block
 * boundary, a sub-sector write crossing a 4 KiB boundary, partial trims and write-zeroes on both sides of
 * a boundary, a whole block zeroed and then partly rewritten, the last partial block trimmed, the last
 * sector and the very last byte written.
 */
async function edgeOps(disk: VhdxFile, expected: Buffer, seed: number): Promise<void> {
  const r = rng(seed);
  const size = expected.length;
  const bs = disk.blockSize;
  const put = async (offset: number, length: number) => {
    const data = r.bytes(length);
    await disk.write(data, offset);
    data.copy(expected, offset);
  };
  const zero = async (kind: 'zero' | 'trim', offset: number, length: number) => {
    if (kind === 'zero') await disk.writeZeroes(offset, length);
    else await disk.trim(offset, length);
    expected.fill(0, offset, offset + length);
  };
  await put(bs - 3 * 512 - 7, MiB + 123); // straddles block 0 → 1, unaligned at both ends
  await put(4093, 777); // crosses a 4 KiB sector boundary, sub-sector on both sides
  await put(bs + 5, 3); // inside one sector
  await zero('trim', bs - 1000, 3000); // partial on both sides of the boundary
  await zero('zero', 7, 100); // inside one sector
  await zero('zero', 0, bs); // block 0 whole: deallocated (dynamic) or zeroed in place (fixed)
  await put(3 * 512 + 1, 10); // ...and rewritten in part
  const last = Math.floor((size - 1) / bs) * bs;
  await put(last, size - last); // the last (partial) block in full
  await zero('trim', last, size - last); // ...trimmed whole
  await put(size - 4096, 4096); // the last 4 KiB
  await zero('zero', size - 3000, 1000);
  await put(size - 1, 1); // the very last byte
}

const allPeers = requirePeers('qemu-img', 'qemu-io', '7zz', 'libvhdi', 'vhdiinfo').skip;

describe.skipIf(allPeers)('files we write, read by the engine, qemu-img, 7zz and libvhdi', () => {
  const cases: ['fixed' | 'dynamic', number, 512 | 4096][] = [];
  for (const type of ['dynamic', 'fixed'] as const)
    for (const bs of [1, 2, 32, 256]) for (const lss of [512, 4096] as const) cases.push([type, bs, lss]);

  it.each(cases)('%s, %i MiB blocks, %i-byte logical sectors', async (type, bsMiB, lss) => {
    const blockSize = bsMiB * MiB;
    // At least one whole block and a partial last block (so block boundaries are crossed and the last
    // block is short); an even number of sectors, since 7zz opens no other sizes (see the quirk below).
    const size = Math.max(24 * MiB, blockSize + Math.min(blockSize, 24 * MiB)) + 64 * KiB;
    const seed = SEED + bsMiB * 10 + lss + (type === 'fixed' ? 1 : 0);
    const where = `(seed ${seed})`;
    const file = path.join(dir, `m-${type}-${bsMiB}-${lss}.vhdx`);
    const rawFile = `${file}.expected`;
    await createVhdx(file, { size, type, blockSize, logicalSectorSize: lss });
    const expected = Buffer.alloc(size);
    const disk = await VhdxFile.open(file, { writable: true });
    try {
      expect(disk.diskType).toBe(type);
      expect(disk.logicalSectorSize).toBe(lss);
      await scribble(disk, expected, seed, 60);
      await edgeOps(disk, expected, seed + 1);
    } finally {
      await disk.close();
    }
    expectSame(await readWholeVhdx(file), expected, `engine read-back ${where}`);
    const report = await checkVhdx(file);
    expect(report.errors, `checkVhdx ${where}`).toEqual([]);
    expect(report.warnings, `checkVhdx ${where}`).toEqual([]);
    writeFileSync(rawFile, expected);

    if (lss === 512) {
      const check = await qemuImgCheck(file);
      expect(check.ok, `qemu-img check ${where}: ${check.output}`).toBe(true);
      const cmp = await qemuImgCompare(file, 'vhdx', rawFile, 'raw');
      expect(cmp.identical, `qemu-img compare ${where}: ${cmp.output}`).toBe(true);
    } else {
      // QEMU implements 512-byte logical sectors only: it refuses to open the file at all.
      const check = await qemuImgCheck(file);
      expect(check.ok).toBe(false);
      expect(check.output).toMatch(/Operation not supported/);
    }

    // 7-Zip and libvhdi read 4096-byte logical sectors as well as 512: all eight combinations match.
    // (Streamed into memory: writing hundreds of MiB to scratch files is most of the time otherwise.)
    const whole = [{ offset: 0, length: size }];
    expectSame((await sevenZipWindows(file, whole))[0], expected, `7zz e -so ${where}`);
    expectSame((await vhdiWindows(file, whole))[0], expected, `libvhdi ${where}`);
    const info = await vhdiInfo(file);
    expect(info).toMatch(new RegExp(`Bytes per sector\\s*:\\s*${lss} bytes`));
    expect(info).toMatch(new RegExp(`Media size\\s*:.*\\(${size} bytes\\)`));
    rmSync(rawFile);

    if (lss === 512) {
      // And QEMU writes into our file (over our trimmed, zeroed and allocated blocks); we read its writes.
      const theirs = [
        { offset: blockSize - 5000, length: 9000, pattern: 0xa1 }, // across block 0 → 1 (trimmed above)
        { offset: 3 * 512, length: 700, pattern: 0xa2 }, // block 0, zeroed whole then rewritten above
        { offset: size - 64 * KiB - 512, length: 64 * KiB, pattern: 0xa3 }, // the last block
      ];
      await qemuIoWrite(file, theirs);
      for (const w of theirs) expected.fill(w.pattern, w.offset, w.offset + w.length);
      expectSame(await readWholeVhdx(file), expected, `engine reads qemu-io's writes into our file ${where}`);
      expect((await checkVhdx(file)).errors).toEqual([]);
      const again = await qemuImgCheck(file);
      expect(again.ok, again.output).toBe(true);
    }
  });
});

describe.skipIf(allPeers)('peer quirks the matrix relies on', () => {
  it('7zz refuses a VHDX whose virtual size is an odd number of logical sectors, even one qemu-img made', async () => {
    // Not "a multiple of 4 KiB": 2 MiB + 1 KiB opens, 2 MiB + 1.5 KiB does not; with 4096-byte sectors
    // 2 MiB + 4 KiB does not. The size must be a multiple of twice the logical sector.
    const cases: [512 | 4096, number, boolean][] = [
      [512, 1, false],
      [512, 2, true],
      [512, 3, false],
      [512, 8, true],
      [4096, 1, false],
      [4096, 2, true],
      [4096, 3, false],
    ];
    for (const [lss, sectors, opens] of cases) {
      const size = 2 * MiB + sectors * lss;
      const files = [path.join(dir, `7z-ours-${lss}-${sectors}.vhdx`)];
      await createVhdx(files[0], { size, blockSize: MiB, logicalSectorSize: lss });
      if (lss === 512) {
        files.push(path.join(dir, `7z-qemu-${sectors}.vhdx`));
        await qemuImgCreateVhdx(files[1], size, { subformat: 'dynamic', blockSize: MiB });
      }
      for (const f of files) {
        const opened = await sevenZipExtract(f, `${f}.raw`).then(
          () => true,
          () => false,
        );
        expect(opened, `7zz on ${path.basename(f)} (${size} bytes)`).toBe(opens);
        if (opened) expect(readFileSync(`${f}.raw`).equals(Buffer.alloc(size))).toBe(true);
      }
      // libvhdi has no such limit.
      await vhdiRead(files[0], `${files[0]}.vhdi.raw`);
      expect(readFileSync(`${files[0]}.vhdi.raw`).equals(Buffer.alloc(size))).toBe(true);
    }
  });
});

/** Random patterned writes at byte granularity: qemu-io's `write -P` and `write -z`. */
function qemuWrites(
  seed: number,
  size: number,
  blockSize: number,
): { offset: number; length: number; pattern: number }[] {
  const r = rng(seed);
  const out: { offset: number; length: number; pattern: number }[] = [
    { offset: 0, length: 64 * KiB, pattern: 0x11 },
    { offset: 3 * MiB + 512, length: 5 * MiB, pattern: 0x22 },
    { offset: blockSize - 700, length: 1400, pattern: 0x33 }, // straddles block 0 → 1, unaligned
    { offset: size - MiB, length: MiB, pattern: 0x44 },
    { offset: 1000, length: 100, pattern: 0x55 }, // inside a sector
  ];
  for (let i = 0; i < 6; i++) {
    const length = 1 + r.int(3 * MiB);
    out.push({ offset: r.int(size - length), length, pattern: 0x60 + i });
  }
  return out;
}

async function qemuIoZero(file: string, offset: number, length: number): Promise<void> {
  await run('qemu-io', ['-f', 'vhdx', '-c', `write -z ${offset} ${length}`, file]);
}

describe.skipIf(allPeers)('files qemu-img writes', () => {
  const cases: ['fixed' | 'dynamic', number][] = [
    ['dynamic', 1],
    ['dynamic', 32],
    ['fixed', 2],
    ['fixed', 8],
  ];
  it.each(cases)(
    'qemu-img %s, %i MiB blocks: we read what qemu-io wrote, qemu reads what we write, and back',
    async (subformat, bsMiB) => {
      const blockSize = bsMiB * MiB;
      const size = 40 * MiB;
      const seed = SEED + 1000 + bsMiB;
      const where = `(seed ${seed})`;
      const file = path.join(dir, `q-${subformat}-${bsMiB}.vhdx`);
      const viaQemu = `${file}.q.raw`;
      await qemuImgCreateVhdx(file, size, { subformat, blockSize });
      await qemuIoWrite(file, qemuWrites(seed, size, blockSize));
      await qemuIoZero(file, 3 * MiB + 4096, 2 * MiB + 512);
      await qemuImgConvertToRaw(file, 'vhdx', viaQemu);
      const expected = readFileSync(viaQemu);
      expectSame(await readWholeVhdx(file), expected, `engine reads qemu-io's writes ${where}`);
      expect((await checkVhdx(file)).errors).toEqual([]);

      // Our writes into QEMU's file (QEMU's fixed files have ZERO entries with preallocated offsets).
      const disk = await VhdxFile.open(file, { writable: true });
      try {
        expect(disk.diskType).toBe(subformat);
        await scribble(disk, expected, seed, 30);
        await edgeOps(disk, expected, seed + 1);
      } finally {
        await disk.close();
      }
      writeFileSync(`${file}.expected`, expected);
      const check = await qemuImgCheck(file);
      expect(check.ok, `qemu-img check after our writes ${where}: ${check.output}`).toBe(true);
      const cmp = await qemuImgCompare(file, 'vhdx', `${file}.expected`, 'raw');
      expect(cmp.identical, `qemu-img compare after our writes ${where}: ${cmp.output}`).toBe(true);

      // QEMU writes again over what we wrote; the engine still agrees with qemu-img convert.
      await qemuIoWrite(file, qemuWrites(seed + 2, size, blockSize));
      rmSync(viaQemu);
      await qemuImgConvertToRaw(file, 'vhdx', viaQemu);
      expectSame(await readWholeVhdx(file), readFileSync(viaQemu), `engine after qemu-io wrote again ${where}`);
      expect((await checkVhdx(file)).errors).toEqual([]);
    },
  );
});

// ------------------------------------------------------------------ past the first sector-bitmap chunk

interface Fill {
  offset: number;
  length: number;
  byte: number;
}

/** Expected bytes of [offset, offset+length) after constant fills applied in order (a sparse model). */
function window(fills: Fill[], offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  for (const f of fills) {
    const a = Math.max(offset, f.offset);
    const b = Math.min(offset + length, f.offset + f.length);
    if (a < b) out.fill(f.byte, a - offset, b - offset);
  }
  return out;
}

/** Runs of equal bytes of a window, as qemu-io `read -P` commands. */
function patternReads(buf: Buffer, offset: number): string[] {
  const cmds: string[] = [];
  for (let i = 0; i < buf.length;) {
    let j = i + 1;
    while (j < buf.length && buf[j] === buf[i]) j++;
    cmds.push(`read -P 0x${buf[i].toString(16)} ${offset + i} ${j - i}`);
    i = j;
  }
  return cmds;
}

/** qemu-io verifies every run of every window (exit status 1 and "Pattern verification failed" otherwise). */
async function qemuIoVerify(file: string, windows: { offset: number; data: Buffer }[]): Promise<void> {
  const args = ['-r', '-f', 'vhdx'];
  for (const w of windows) for (const c of patternReads(w.data, w.offset)) args.push('-c', c);
  args.push(file);
  const r = await run('qemu-io', args, { allowFail: true });
  expect(r.stdout + r.stderr).not.toMatch(/verification failed|error/i);
  expect(r.code).toBe(0);
}

/** Windows of the virtual disk as libvhdi reads them: pyvhdi when that is the reader here, else vhdimount. */
async function vhdiWindows(file: string, windows: { offset: number; length: number }[]): Promise<Buffer[]> {
  if (vhdiReader() === 'pyvhdi') {
    const script = [
      'import sys, pyvhdi',
      'f = pyvhdi.file()',
      'f.open(sys.argv[1])',
      'for w in sys.argv[2:]:',
      '    o, n = map(int, w.split(":"))',
      '    b = f.read_buffer_at_offset(n, o)',
      '    sys.stdout.buffer.write(b + bytes(n - len(b)))',
    ].join('\n');
    const args = ['-c', script, file, ...windows.map((w) => `${w.offset}:${w.length}`)];
    const r = spawnSync('/usr/bin/python3', args, { maxBuffer: 1024 * MiB });
    if (r.status !== 0) throw new Error(`pyvhdi ${file}: ${r.stderr}`);
    let at = 0;
    return windows.map((w) => r.stdout.subarray(at, (at += w.length)));
  }
  const mnt = mkdtempSync(path.join(os.tmpdir(), 'vhdimnt-'));
  try {
    await run('vhdimount', [file, mnt]);
    try {
      const levels = readdirSync(mnt).filter((n) => /^vhdi\d+$/.test(n));
      const top = levels.sort((a, b) => Number(a.slice(4)) - Number(b.slice(4))).at(-1)!;
      const fd = openSync(path.join(mnt, top), 'r');
      try {
        return windows.map((w) => {
          const b = Buffer.alloc(w.length);
          for (let got = 0; got < w.length;) {
            const n = readSync(fd, b, got, w.length - got, w.offset + got);
            if (n === 0) break;
            got += n;
          }
          return b;
        });
      } finally {
        closeSync(fd);
      }
    } finally {
      // fusermount for non-root, umount for root without it; EBUSY right after the last read: retry.
      for (let i = 0; i < 10; i++) {
        const r = await run('fusermount', ['-u', mnt], { allowFail: true }).catch(() =>
          run('umount', [mnt], { allowFail: true }),
        );
        if (r.code === 0) break;
        await sleep(200);
      }
    }
  } finally {
    rmdirSync(mnt); // never rm -r: if the unmount failed this is still a mount
  }
}

/** Windows of 7-Zip's view, picked out of `7zz e -so -tvhdx` as it streams (nothing is stored). */
async function sevenZipWindows(file: string, windows: { offset: number; length: number }[]): Promise<Buffer[]> {
  const out = windows.map((w) => Buffer.alloc(w.length));
  const child = spawn('7zz', ['e', '-so', '-tvhdx', '-bd', file], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => (stderr += d));
  const exited = new Promise<number | null>((resolve, reject) => {
    child.on('error', reject);
    child.on('close', resolve);
  });
  let pos = 0;
  for await (const chunk of child.stdout as AsyncIterable<Buffer>) {
    windows.forEach((w, i) => {
      const a = Math.max(pos, w.offset);
      const b = Math.min(pos + chunk.length, w.offset + w.length);
      if (a < b) chunk.copy(out[i], a - w.offset, a - pos, b - pos);
    });
    pos += chunk.length;
  }
  const code = await exited;
  if (code !== 0) throw new Error(`7zz e -so ${file} exited ${code}: ${stderr.trim()}`);
  return out;
}

async function engineWindows(file: string, windows: { offset: number; length: number }[]): Promise<Buffer[]> {
  const disk = await VhdxFile.open(file);
  try {
    const out: Buffer[] = [];
    for (const w of windows) out.push(await disk.readAt(w.offset, w.length));
    return out;
  } finally {
    await disk.close();
  }
}

/** What libvhdi reads from a fixed disk with more than one chunk (see the comment where it is used). */
function libvhdiFixedView(fills: Fill[], offset: number, length: number, bs: number, chunk: number): Buffer {
  const out = Buffer.alloc(length);
  for (let pos = offset; pos < offset + length;) {
    const block = Math.floor(pos / bs);
    const n = Math.min((block + 1) * bs, offset + length) - pos;
    const firstOfChunk1 = chunk / bs;
    if (block < firstOfChunk1) window(fills, pos, n).copy(out, pos - offset);
    else if (block > firstOfChunk1) window(fills, pos - bs, n).copy(out, pos - offset);
    pos += n;
  }
  return out;
}

describe.skipIf(allPeers)('disks with more than one sector-bitmap chunk (BAT entries interleaved)', () => {
  // A chunk is 2^23 logical sectors: 4 GiB with 512-byte sectors, 32 GiB with 4096-byte sectors.
  const cases: ['fixed' | 'dynamic', 512 | 4096, number][] = [
    ['dynamic', 512, 1],
    ['fixed', 512, 2],
    ['dynamic', 4096, 32],
  ];
  it.each(cases)(
    '%s, %i-byte sectors, %i MiB blocks, writes on both sides of the chunk boundary',
    async (type, lss, bsMiB) => {
      const chunk = lss * 2 ** 23;
      const bs = bsMiB * MiB;
      const size = chunk + 3 * bs + 64 * KiB;
      const file = path.join(dir, `big-${type}-${lss}.vhdx`);
      await createVhdx(file, { size, type, blockSize: bs, logicalSectorSize: lss });
      const fills: Fill[] = [
        { offset: chunk - bs - 700, length: 2 * bs + 1400, byte: 0x41 }, // last block of chunk 0 → first of chunk 1
        { offset: chunk - 3 * 512, length: 4096, byte: 0x42 }, // across the chunk boundary
        { offset: chunk + bs + 3, length: 77, byte: 0x43 }, // second block of chunk 1
        { offset: size - 5000, length: 5000, byte: 0x44 }, // the end of the disk
        { offset: 1000, length: 10, byte: 0x45 }, // block 0
        { offset: chunk - bs + 4096, length: 8192, byte: 0 }, // zeroed inside the first fill
      ];
      const disk = await VhdxFile.open(file, { writable: true });
      try {
        expect(disk.geometry.bitmapBlocks).toBe(2);
        for (const f of fills) {
          if (f.byte === 0) await disk.writeZeroes(f.offset, f.length);
          else await disk.write(Buffer.alloc(f.length, f.byte), f.offset);
        }
      } finally {
        await disk.close();
      }
      expect((await checkVhdx(file)).errors).toEqual([]);
      const wins = [
        { offset: 0, length: 64 * KiB },
        { offset: chunk - bs - 64 * KiB, length: 3 * bs + 128 * KiB },
        { offset: size - 2 * bs, length: 2 * bs },
      ];
      const expected = wins.map((w) => window(fills, w.offset, w.length));
      const ours = await engineWindows(file, wins);
      ours.forEach((b, i) => expectSame(b, expected[i], `engine window ${i}`));
      const vhdi = await vhdiWindows(file, wins);
      if (type === 'dynamic') vhdi.forEach((b, i) => expectSame(b, expected[i], `libvhdi window ${i}`));
      else {
        // libvhdi 20210425 misreads FIXED disks past the first chunk: it skips the interleaved
        // sector-bitmap entries for dynamic disks but not for fixed ones, so block b ≥ ChunkRatio is read
        // through BAT index b (block b−1's entry) and block ChunkRatio reads as zeros. qemu-img (below)
        // and the engine read the data where MS-VHDX puts it; the next test shows libvhdi does the same
        // with a fixed disk qemu-img made, so the file is right and the reader is wrong.
        vhdi.forEach((b, i) =>
          expectSame(b, libvhdiFixedView(fills, wins[i].offset, wins[i].length, bs, chunk), `libvhdi window ${i}`),
        );
        expect(vhdi[1].equals(expected[1])).toBe(false);
      }
      if (lss === 512) {
        if (type === 'dynamic') {
          // 7zz has no range reads: it streams the whole disk, seconds per 4 GiB of a sparse dynamic file
          // but tens of seconds for a fixed one (read from the file) or for the 32 GiB disk, left out.
          // (Checked by hand: 7zz reads fixed disks past the first chunk correctly, unlike libvhdi.)
          const sz = await sevenZipWindows(file, wins);
          sz.forEach((b, i) => expectSame(b, expected[i], `7zz window ${i}`));
        }
        const check = await qemuImgCheck(file);
        expect(check.ok, check.output).toBe(true);
        await qemuIoVerify(
          file,
          wins.map((w, i) => ({ offset: w.offset, data: expected[i] })),
        );
      }
    },
  );

  it('libvhdi misreads a fixed disk qemu-img made the same way: the quirk is in the reader', async () => {
    const chunk = 4 * GiB;
    const bs = 2 * MiB;
    const size = chunk + 3 * bs;
    const file = path.join(dir, 'big-qemu-fixed.vhdx');
    await qemuImgCreateVhdx(file, size, { subformat: 'fixed', blockSize: bs });
    const fills: Fill[] = [
      { offset: chunk - 4096, length: 4096, byte: 0x60 },
      { offset: chunk, length: 4096, byte: 0x61 },
      { offset: chunk + bs, length: 4096, byte: 0x62 },
      { offset: chunk + 2 * bs, length: 4096, byte: 0x63 },
    ];
    await qemuIoWrite(
      file,
      fills.map((f) => ({ offset: f.offset, length: f.length, pattern: f.byte })),
    );
    const wins = [{ offset: chunk - bs, length: 4 * bs }];
    const expected = window(fills, wins[0].offset, wins[0].length);
    expectSame((await engineWindows(file, wins))[0], expected, 'engine reads qemu-io');
    const vhdi = (await vhdiWindows(file, wins))[0];
    expectSame(vhdi, libvhdiFixedView(fills, wins[0].offset, wins[0].length, bs, chunk), 'libvhdi');
    expect(vhdi.subarray(bs, bs + 4096).equals(Buffer.alloc(4096)), 'block 2048 reads zeros in libvhdi').toBe(true);
  });

  it('qemu-img makes a 5 GiB dynamic disk: its writes past 4 GiB read here, ours read there', async () => {
    const chunk = 4 * GiB;
    const size = 5 * GiB;
    const file = path.join(dir, 'big-qemu.vhdx');
    await qemuImgCreateVhdx(file, size, { subformat: 'dynamic', blockSize: MiB });
    const fills: Fill[] = [
      { offset: chunk - MiB + 512, length: 2 * MiB, byte: 0x51 },
      { offset: chunk + 7 * MiB, length: 4096, byte: 0x52 },
    ];
    await qemuIoWrite(
      file,
      fills.map((f) => ({ offset: f.offset, length: f.length, pattern: f.byte })),
    );
    const wins = [{ offset: chunk - 2 * MiB, length: 12 * MiB }];
    expectSame(
      (await engineWindows(file, wins))[0],
      window(fills, wins[0].offset, wins[0].length),
      'engine reads qemu',
    );
    const disk = await VhdxFile.open(file, { writable: true });
    try {
      const ours: Fill[] = [
        { offset: chunk + MiB - 300, length: 600, byte: 0x53 },
        { offset: chunk + 7 * MiB + 1024, length: MiB, byte: 0x54 },
        { offset: chunk - 5 * 512, length: 4 * 512, byte: 0x55 },
      ];
      for (const f of ours) {
        await disk.write(Buffer.alloc(f.length, f.byte), f.offset);
        fills.push(f);
      }
    } finally {
      await disk.close();
    }
    const check = await qemuImgCheck(file);
    expect(check.ok, check.output).toBe(true);
    await qemuIoVerify(file, [{ offset: wins[0].offset, data: window(fills, wins[0].offset, wins[0].length) }]);
  });
});
