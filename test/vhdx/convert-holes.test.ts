/**
 * raw → VHDX/raw conversion with the hole map (native/fs, lseek SEEK_DATA/SEEK_HOLE) and without it:
 * the same disk either way, holes are not read when the map is there, and the background writeback
 * (an fdatasync every 64 MiB while converting) neither loses data nor hides a failure.
 *
 * The addon is required (a missing one fails every test here); with TIDEMARK_NO_SEEK_DATA=1 the hole tests
 * skip with one loud line, or fail with TIDEMARK_REQUIRE_PEERS=1 (CI).
 */
import { createCipheriv, createHash } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, readFileSync, writeSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { convertImage, roundExtents, Writeback } from '../../src/formats/vhdx/convert.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { dataExtents, seekAddon } from '../../src/util/holes.js';
import { missingPeers, qemuImgCompare, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';

const MiB = 2 ** 20;
const GRAIN = 64 * 1024;
const seed = seedFrom('TIDEMARK_HOLES_SEED', 0x5eed);

function noAddon(): boolean {
  if (seekAddon()) return false;
  const reason = 'SEEK_DATA OFF: TIDEMARK_NO_SEEK_DATA=1';
  if (process.env.TIDEMARK_REQUIRE_PEERS === '1')
    throw new Error(`${reason}; TIDEMARK_REQUIRE_PEERS=1 forbids skipping`);
  console.warn(reason);
  return true;
}

/** Runs `fn` with the hole map turned off (TIDEMARK_NO_SEEK_DATA=1). */
async function withoutHoleMap<T>(fn: () => Promise<T>): Promise<T> {
  process.env.TIDEMARK_NO_SEEK_DATA = '1';
  try {
    return await fn();
  } finally {
    delete process.env.TIDEMARK_NO_SEEK_DATA;
  }
}

/** Incompressible bytes from the seed, fast (AES-CTR over zeros). */
function stream(s: number, n: number): Buffer {
  const key = createHash('sha256').update(`holes ${s}`).digest();
  return createCipheriv('aes-128-ctr', key.subarray(0, 16), key.subarray(16)).update(Buffer.alloc(n));
}

/** Whole-disk SHA-256 of a VHDX read through the engine, in 4 MiB pieces. */
async function vhdxDigest(file: string): Promise<string> {
  const disk = await VhdxFile.open(file);
  try {
    const h = createHash('sha256');
    const buf = Buffer.alloc(4 * MiB);
    for (let at = 0; at < disk.virtualSize; at += buf.length) {
      const piece = buf.subarray(0, Math.min(buf.length, disk.virtualSize - at));
      await disk.read(piece, at);
      h.update(piece);
    }
    return h.digest('hex');
  } finally {
    await disk.close();
  }
}

describe('roundExtents', () => {
  it('widens to the grain, clips to the size and merges what then touches or overlaps', () => {
    const g = GRAIN;
    expect(roundExtents([], g, 10 * g)).toEqual([]);
    expect(
      roundExtents(
        [
          { offset: 100, length: 1 }, // → [0, g)
          { offset: g + 5, length: 10 }, // → [g, 2g): touches the first, merged
          { offset: 4 * g, length: g }, // aligned already
          { offset: 5 * g + 1, length: 1 }, // → [5g, 6g): touches, merged
          { offset: 8 * g + 3, length: 2 * g }, // → [8g, 10g + ...) clipped to the size
        ],
        g,
        10 * g - 512,
      ),
    ).toEqual([
      { offset: 0, length: 2 * g },
      { offset: 4 * g, length: 2 * g },
      { offset: 8 * g, length: 2 * g - 512 },
    ]);
  });
});

describe('Writeback', () => {
  it('starts one sync per interval, never two at once, and reports a failure at drain', async () => {
    let calls = 0;
    const releases: ((err?: Error) => void)[] = [];
    const wb = new Writeback(
      () =>
        new Promise<void>((resolve, reject) => {
          calls++;
          releases.push((err) => (err ? reject(err) : resolve()));
        }),
      100,
    );
    wb.wrote(99);
    expect(calls).toBe(0);
    wb.wrote(1);
    expect(calls).toBe(1);
    wb.wrote(500); // one in flight: no second
    expect(calls).toBe(1);
    releases[0]();
    await new Promise((r) => setImmediate(r));
    wb.wrote(0); // the 500 pending bytes start the next one
    expect(calls).toBe(2);
    releases[1](new Error('EIO on writeback'));
    await expect(wb.drain()).rejects.toThrow('EIO on writeback');
    wb.wrote(1000); // after a failure nothing more is started
    expect(calls).toBe(2);
  });
});

describe.skipIf(noAddon())(`raw sources with holes (seed ${seed})`, () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  let src: string;
  let size: number;
  /** [offset, length] of every write made to the source. */
  const written: [number, number][] = [];
  let expectedDigest: string;
  /** Bytes in the 64 KiB grains of the source that hold a non-zero byte. */
  let nonZeroBytes: number;

  beforeAll(async () => {
    ({ dir, cleanup } = await tempDir('holes'));
    src = path.join(dir, 'src.raw');
    const r = rng(seed);
    // 200 MiB + an odd tail (the VHDX pads it to a whole sector); 72 MiB of data in one run, so the
    // background writeback runs; small unaligned pieces; 1 MiB of written zeros; data at the very end.
    size = 200 * MiB + 777;
    const fd = openSync(src, 'wx');
    ftruncateSync(fd, size);
    const put = (buf: Buffer, at: number) => {
      writeSync(fd, buf, 0, buf.length, at);
      written.push([at, buf.length]);
    };
    put(stream(seed, 72 * MiB), 100 * MiB);
    put(Buffer.alloc(MiB), 10 * MiB); // allocated, but zeros: must not be written
    for (let i = 0; i < 40; i++) {
      const len = 1 + r.int(300_000);
      put(stream(seed + 1 + i, len), r.int(95 * MiB - len));
    }
    put(stream(seed - 1, 5000), size - 5000);
    closeSync(fd);

    const content = readFileSync(src);
    expectedDigest = createHash('sha256')
      .update(Buffer.concat([content, Buffer.alloc(512 - (size % 512))]))
      .digest('hex');
    nonZeroBytes = 0;
    for (let at = 0; at < size; at += GRAIN) {
      const grain = content.subarray(at, at + GRAIN);
      if (grain.some((b) => b !== 0)) nonZeroBytes += grain.length;
    }
  });
  afterAll(() => cleanup?.());

  it('dataExtents covers every written byte and leaves the large holes out', async () => {
    const extents = (await dataExtents(src, size))!;
    expect(extents).toBeDefined();
    for (let i = 1; i < extents.length; i++)
      expect(extents[i].offset).toBeGreaterThanOrEqual(extents[i - 1].offset + extents[i - 1].length);
    for (const [at, len] of written) {
      // Every written byte lies in one extent or in extents that follow each other without a gap.
      let pos = at;
      while (pos < at + len) {
        const e = extents.find((x) => x.offset <= pos && pos < x.offset + x.length);
        expect(e, `byte ${pos} of the write at ${at} (+${len}) is in no data extent`).toBeDefined();
        pos = e!.offset + e!.length;
      }
    }
    const total = extents.reduce((n, e) => n + e.length, 0);
    // The file system may allocate around writes, but 95–100 MiB and 172–200 MiB were never written.
    expect(total).toBeLessThan(size - 40 * MiB);
    expect(extents.every((e) => e.offset + e.length <= size)).toBe(true);
    // A size short of the file clips the answer.
    const last = (await dataExtents(src, 100 * MiB + 10))!.at(-1)!;
    expect(last.offset + last.length).toBe(100 * MiB + 10);
  });

  it('raw → VHDX: the same disk with and without the hole map; holes are not read', async () => {
    const a = path.join(dir, 'mapped.vhdx');
    const b = path.join(dir, 'unmapped.vhdx');
    const ra = await convertImage(src, a, { blockSize: 8 * MiB });
    const rb = await withoutHoleMap(() => convertImage(src, b, { blockSize: 8 * MiB }));
    expect(await vhdxDigest(a)).toBe(expectedDigest);
    expect(await vhdxDigest(b)).toBe(expectedDigest);
    expect(rb.bytesRead).toBe(size);
    expect(ra.bytesRead).toBeLessThan(size - 40 * MiB);
    // Both write exactly the 64 KiB grains holding a non-zero byte (the written zeros are skipped).
    expect(ra.bytesWritten).toBe(rb.bytesWritten);
    expect(ra.bytesWritten).toBe(nonZeroBytes);
    if (!missingPeers('qemu-img')) {
      const cmp = await qemuImgCompare(src, 'raw', a, 'vhdx');
      expect(cmp.identical, cmp.output).toBe(true);
    }
  });

  it('raw → raw: an identical copy with the hole map', async () => {
    const out = path.join(dir, 'copy.img');
    const r = await convertImage(src, out, { format: 'raw' });
    expect(r.bytesRead).toBeLessThan(size - 40 * MiB);
    const copy = readFileSync(out);
    expect(copy.length).toBe(size);
    expect(copy.equals(readFileSync(src))).toBe(true);
  });

  it('a file with no data at all converts to an empty disk without reading', async () => {
    const empty = path.join(dir, 'empty.raw');
    const fd = openSync(empty, 'wx');
    ftruncateSync(fd, 64 * MiB);
    closeSync(fd);
    const r = await convertImage(empty, path.join(dir, 'empty.vhdx'));
    expect(r).toMatchObject({ bytesRead: 0, bytesWritten: 0, bytesSkipped: 64 * MiB, virtualSize: 64 * MiB });
    expect(await vhdxDigest(path.join(dir, 'empty.vhdx'))).toBe(
      createHash('sha256')
        .update(Buffer.alloc(64 * MiB))
        .digest('hex'),
    );
  });
});
