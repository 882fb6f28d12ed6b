/**
 * The oracles checked against each other, with no Tidemark code: the real fixtures decompress to the
 * documented files, and qemu-img, 7zz and libvhdi read the same bytes from them; a qemu-img create +
 * qemu-io write round trip passes qemu-img check and compare. If this file fails, the interop tests'
 * verdicts mean nothing.
 */
import { open, stat, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { fixturePath } from './helpers/fixtures.js';
import {
  peer,
  qemuImgCheck,
  qemuImgCompare,
  qemuImgConvertToRaw,
  qemuImgCreateVhdx,
  qemuIoWrite,
  requirePeers,
  sevenZipExtract,
  sha256File,
  tempDir,
  vhdiInfo,
  vhdiRead,
  vhdiReader,
} from './helpers/peers.js';

const MiB = 2 ** 20;
const IOTEST = 'iotest-dynamic-1G.vhdx';
const DISK2VHD = 'test-disk2vhd.vhdx';

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('peers')));
afterAll(async () => cleanup());

async function bytesAt(file: string, offsets: number[]): Promise<number[]> {
  const fh = await open(file, 'r');
  try {
    const out: number[] = [];
    for (const at of offsets) {
      const b = Buffer.alloc(1);
      const { bytesRead } = await fh.read(b, 0, 1, at);
      out.push(bytesRead === 1 ? b[0] : -1);
    }
    return out;
  } finally {
    await fh.close();
  }
}

describe('requirePeers', () => {
  it('skips with one loud line, or throws when TIDEMARK_REQUIRE_PEERS=1', () => {
    const warn = vi.spyOn(console, 'warn').mockImplementation(() => {});
    const saved = process.env.TIDEMARK_REQUIRE_PEERS;
    try {
      delete process.env.TIDEMARK_REQUIRE_PEERS;
      const r = requirePeers('sh', 'no-such-peer-tidemark');
      expect(r.skip).toBe(true);
      expect(r.reason).toBe('PEER MISSING: no-such-peer-tidemark (install: sudo bash scripts/install-peers.sh)');
      expect(warn).toHaveBeenCalledTimes(1);
      expect(requirePeers('sh')).toEqual({ skip: false, reason: '' });
      process.env.TIDEMARK_REQUIRE_PEERS = '1';
      expect(() => requirePeers('no-such-peer-tidemark')).toThrow(/PEER MISSING: no-such-peer-tidemark/);
    } finally {
      if (saved === undefined) delete process.env.TIDEMARK_REQUIRE_PEERS;
      else process.env.TIDEMARK_REQUIRE_PEERS = saved;
      warn.mockRestore();
    }
  });
});

describe.skipIf(requirePeers('bzip2', 'qemu-img', '7zz', 'vhdiinfo', 'libvhdi').skip)('the real fixtures', () => {
  it.each([
    // VHDX-NOTES.md §4
    [IOTEST, 'a4fb24fa51fb4852d5a6bdc2b390a91b0a4e19b47696edc5a00c816067257402', 1024 * MiB],
    [DISK2VHD, '5b6721d4f26ef13d259c380a7327b794d1c6dd79e386737d77e8d88f43259812', 256 * MiB],
  ])(
    '%s: documented file; qemu-img, 7zz and libvhdi read the same bytes',
    { timeout: 300_000 },
    async (name, sha, size) => {
      const file = fixturePath(name);
      expect(fixturePath(name)).toBe(file); // decompressed once
      expect(await sha256File(file)).toBe(sha);

      const viaQemu = path.join(dir, `${name}.qemu.raw`);
      await qemuImgConvertToRaw(file, 'vhdx', viaQemu);
      const via7z = await sevenZipExtract(file, path.join(dir, `${name}.7z.raw`));
      const viaVhdi = await vhdiRead(file, path.join(dir, `${name}.vhdi.raw`));
      for (const f of [viaQemu, via7z, viaVhdi]) expect((await stat(f)).size, f).toBe(size);
      const want = await sha256File(viaQemu);
      expect(await sha256File(via7z), '7zz').toBe(want);
      expect(await sha256File(viaVhdi), `libvhdi via ${vhdiReader()}`).toBe(want);

      const info = await vhdiInfo(file);
      expect(info).toMatch(/Disk type\s*: Dynamic/);
      expect(info).toContain(`(${size} bytes)`);

      if (name === IOTEST) {
        // 0xa5 for [0, 33 MiB), 0x96 for [33 MiB, 66 MiB), zeros after
        const at = [0, 33 * MiB - 1, 33 * MiB, 66 * MiB - 1, 66 * MiB, size - 1];
        expect(await bytesAt(viaQemu, at)).toEqual([0xa5, 0xa5, 0x96, 0x96, 0, 0]);
      } else {
        expect(await bytesAt(viaQemu, [510, 511])).toEqual([0x55, 0xaa]); // block 0 holds an MBR
      }
    },
  );

  // Both libvhdi routes where both work here: vhdimount (FUSE) and pyvhdi must agree.
  it.each(['vhdimount', 'pyvhdi'] as const)('libvhdi via %s reads Disk2vhd like qemu-img', async (via) => {
    if (!peer(via)) return; // the other route covers libvhdi
    const file = fixturePath(DISK2VHD);
    const raw = await vhdiRead(file, path.join(dir, `d2v.${via}.raw`), { via });
    expect(await sha256File(raw)).toBe('96d964042be9b58dda1725567abfb0cf9fd8380e2118754afa979c2ad445938a');
    const q = await qemuImgCompare(file, 'vhdx', raw, 'raw');
    expect(q.identical, q.output).toBe(true);
  });
});

describe.skipIf(requirePeers('qemu-img', 'qemu-io', '7zz', 'libvhdi').skip)('qemu-img create + qemu-io write', () => {
  it.each(['dynamic', 'fixed'] as const)('%s: check is clean, compare and every reader agree', async (subformat) => {
    const size = 24 * MiB;
    const file = path.join(dir, `rt-${subformat}.vhdx`);
    await qemuImgCreateVhdx(file, size, { subformat, blockSizeBytes: 2 * MiB });
    const writes = [
      { offset: 0, length: 64 * 1024, pattern: 0x11 },
      { offset: 3 * MiB + 512, length: 5 * MiB, pattern: 0x22 }, // unaligned, across blocks
      { offset: size - MiB, length: MiB, pattern: 0xff },
    ];
    await qemuIoWrite(file, 'vhdx', writes);
    await expect(qemuIoWrite(file, 'vhdx', [{ offset: 1024 * MiB, length: 512, pattern: 1 }])).rejects.toThrow(
      /failed/,
    );

    const check = await qemuImgCheck(file);
    expect(check.ok, check.output).toBe(true);

    const expected = Buffer.alloc(size);
    for (const w of writes) expected.fill(w.pattern, w.offset, w.offset + w.length);
    const rawFile = path.join(dir, `rt-${subformat}.expected`);
    await writeFile(rawFile, expected);
    const cmp = await qemuImgCompare(file, 'vhdx', rawFile, 'raw');
    expect(cmp.identical, cmp.output).toBe(true);

    const want = await sha256File(rawFile);
    expect(await sha256File(await sevenZipExtract(file)), '7zz').toBe(want);
    expect(await sha256File(await vhdiRead(file)), 'libvhdi').toBe(want);
    const viaQemu = path.join(dir, `rt-${subformat}.qemu.raw`);
    await qemuImgConvertToRaw(file, 'vhdx', viaQemu);
    expect(await sha256File(viaQemu)).toBe(want);

    // and compare does notice a one-byte difference
    expected[5 * MiB] ^= 1;
    await writeFile(rawFile, expected);
    const differ = await qemuImgCompare(file, 'vhdx', rawFile, 'raw');
    expect(differ.identical).toBe(false);
    expect(differ.output).toMatch(/mismatch at offset 5242880/i);
  });
});
