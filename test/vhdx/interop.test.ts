/**
 * The interop matrix: {fixed, dynamic} × block sizes {1, 2, 32, 256} MiB × logical sector {512, 4096},
 * seeded random writes mirrored into an expected raw image; then qemu-img check/compare (512-byte
 * sectors: QEMU reads no other), 7zz and vhdimount must all give the expected bytes. And the other way:
 * files qemu-img creates and qemu-io writes read identically through the engine, and our writes into
 * them read identically in qemu-img.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import {
  missingPeers,
  qemuImgCheck,
  qemuImgCompare,
  qemuImgCreateVhdx,
  qemuImgToRaw,
  qemuIoWrite,
  sevenZipExtract,
  tempDir,
  vhdiExtract,
} from '../helpers/peers.js';
import { seedFrom } from '../helpers/random.js';
import { scribble } from '../helpers/scribble.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_INTEROP_SEED', 20261124);
console.log(`interop seed ${SEED} (TIDEMARK_INTEROP_SEED)`);

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('interop')));
afterAll(async () => cleanup());

async function readAll(path: string): Promise<Buffer> {
  const disk = await VhdxFile.open(path);
  try {
    const out = Buffer.alloc(disk.virtualSize);
    for (let at = 0; at < out.length; at += 64 * MiB)
      await disk.read(out.subarray(at, Math.min(out.length, at + 64 * MiB)), at);
    return out;
  } finally {
    await disk.close();
  }
}

const peersMissing = missingPeers('qemu-img', 'qemu-io', '7zz', 'vhdimount');

describe.skipIf(peersMissing)('files we write', () => {
  const cases: ['fixed' | 'dynamic', number, 512 | 4096][] = [];
  for (const type of ['dynamic', 'fixed'] as const)
    for (const bs of [1, 2, 32, 256]) for (const lss of [512, 4096] as const) cases.push([type, bs, lss]);

  it.each(cases)('%s, %i MiB blocks, %i-byte sectors', async (type, bsMiB, lss) => {
    const blockSize = bsMiB * MiB;
    // Enough blocks to cross block boundaries; a size that is no multiple of the block size, so the
    // last block is partial (but a multiple of 64 KiB: 7zz opens no odd sizes, see below).
    const size = Math.max(24 * MiB, 2 * blockSize) + 64 * 1024;
    const file = `${dir}/m-${type}-${bsMiB}-${lss}.vhdx`;
    const rawFile = `${file}.expected`;
    await createVhdx(file, { size, type, blockSize, logicalSectorSize: lss });
    const expected = Buffer.alloc(size);
    const disk = await VhdxFile.open(file, { writable: true });
    try {
      await scribble(disk, expected, SEED + bsMiB * 10 + lss + (type === 'fixed' ? 1 : 0), 60);
    } finally {
      await disk.close();
    }
    expect((await readAll(file)).equals(expected)).toBe(true);
    writeFileSync(rawFile, expected);

    if (lss === 512) {
      const check = await qemuImgCheck(file);
      expect(check.ok, check.output).toBe(true);
      const cmp = await qemuImgCompare(file, 'vhdx', rawFile, 'raw');
      expect(cmp.identical, cmp.output).toBe(true);
    }
    await sevenZipExtract(file, `${file}.7z.raw`);
    expect(readFileSync(`${file}.7z.raw`).equals(expected), '7zz content').toBe(true);
    await vhdiExtract(file, `${file}.vhdi.raw`);
    expect(readFileSync(`${file}.vhdi.raw`).equals(expected), 'vhdimount content').toBe(true);
  });
});

describe.skipIf(peersMissing)('peer quirks we rely on knowing', () => {
  it('7zz refuses a VHDX whose virtual size is not a multiple of 4 KiB, even one qemu-img made', async () => {
    for (const [size, opens] of [
      [24 * MiB + 512, false],
      [24 * MiB + 4096, true],
    ] as const) {
      const ours = `${dir}/7z-ours-${size}.vhdx`;
      const theirs = `${dir}/7z-qemu-${size}.vhdx`;
      await createVhdx(ours, { size, blockSize: 2 * MiB });
      await qemuImgCreateVhdx(theirs, size, { subformat: 'dynamic', blockSize: 2 * MiB });
      for (const f of [ours, theirs]) {
        const opened = await sevenZipExtract(f, `${f}.raw`).then(
          () => true,
          () => false,
        );
        expect(opened, `${f}`).toBe(opens);
      }
      // libvhdi has no such limit
      await vhdiExtract(ours, `${ours}.vhdi.raw`);
      expect(readFileSync(`${ours}.vhdi.raw`).length).toBe(size);
    }
  });
});

describe.skipIf(peersMissing)('files qemu-img writes', () => {
  const cases: ['fixed' | 'dynamic', number][] = [
    ['dynamic', 1],
    ['dynamic', 32],
    ['fixed', 2],
    ['fixed', 8],
  ];
  it.each(cases)(
    'qemu-img %s, %i MiB blocks: we read what qemu-io wrote, qemu reads what we write',
    async (subformat, bsMiB) => {
      const size = 40 * MiB;
      const file = `${dir}/q-${subformat}-${bsMiB}.vhdx`;
      await qemuImgCreateVhdx(file, size, { subformat, blockSize: bsMiB * MiB });
      await qemuIoWrite(file, [
        { offset: 0, length: 64 * 1024, pattern: 0x11 },
        { offset: 3 * MiB + 512, length: 5 * MiB, pattern: 0x22 },
        { offset: 39 * MiB, length: MiB, pattern: 0x33 },
      ]);
      const viaQemu = `${file}.q.raw`;
      await qemuImgToRaw(file, 'vhdx', viaQemu);
      const expected = readFileSync(viaQemu);
      expect((await readAll(file)).equals(expected)).toBe(true);

      const disk = await VhdxFile.open(file, { writable: true });
      try {
        await scribble(disk, expected, SEED + bsMiB, 30);
      } finally {
        await disk.close();
      }
      writeFileSync(`${file}.expected`, expected);
      const check = await qemuImgCheck(file);
      expect(check.ok, check.output).toBe(true);
      const cmp = await qemuImgCompare(file, 'vhdx', `${file}.expected`, 'raw');
      expect(cmp.identical, cmp.output).toBe(true);
    },
  );
});
