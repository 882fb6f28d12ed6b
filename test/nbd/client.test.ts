/**
 * Tidemark's NBD client, as the backup reader uses it: structured replies (reads answered with data and
 * hole chunks land in the caller's buffer, holes counted), meta contexts and block status, simple replies
 * when asked for none, server errors as errors. Against Tidemark's server over a device in memory, and
 * against qemu-nbd serving a sparse raw file (an independent server).
 *
 * Seed: TIDEMARK_NBD_CLIENT_SEED (printed).
 */
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { open } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { CONTEXT_BASE_ALLOCATION, STATE_HOLE, STATE_ZERO } from '../../src/nbd/protocol.js';
import { requirePeers, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { startServer, type RunningServer } from './fixture.js';
import { CLUSTER, MemoryDevice } from './memory-device.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_NBD_CLIENT_SEED', 20261125);
console.log(`nbd client seed ${SEED} (set TIDEMARK_NBD_CLIENT_SEED to replay)`);

/** Expected allocation of `device` over [offset, offset+length) as (offset, length, zero) runs. */
function expectedRuns(device: MemoryDevice, offset: number, length: number) {
  const runs: { offset: number; length: number; zero: boolean }[] = [];
  for (let at = offset; at < offset + length; at += CLUSTER) {
    const zero = device.allocated[at / CLUSTER] === 0;
    const last = runs[runs.length - 1];
    if (last && last.zero === zero) last.length += CLUSTER;
    else runs.push({ offset: at, length: CLUSTER, zero });
  }
  return runs;
}

describe('NbdClient against Tidemark', () => {
  let device: MemoryDevice;
  let srv: RunningServer;
  const size = 16 * MiB;

  beforeAll(async () => {
    device = new MemoryDevice({ size });
    const r = rng(SEED);
    // Data in a seeded third of the clusters; the rest are holes.
    for (let c = 0; c < size / CLUSTER; c++) {
      if (r.int(3) === 0) await device.write(c * CLUSTER, r.bytes(CLUSTER));
    }
    srv = await startServer([{ name: 'disk', device }]);
  });
  afterAll(async () => srv.stop());

  it('reads into the caller buffer from data and hole chunks, counting the holes', async () => {
    const nbd = await NbdClient.connect({ socket: srv.socket, exportName: 'disk', structured: true });
    try {
      expect(nbd.structured).toBe(true);
      const dst = Buffer.alloc(4 * MiB, 0xee); // stale bytes a hole must overwrite
      const { holeBytes } = await nbd.readInto(dst, 2 * MiB);
      expect(dst.equals(device.data.subarray(2 * MiB, 6 * MiB))).toBe(true);
      const holes = expectedRuns(device, 2 * MiB, 4 * MiB).filter((x) => x.zero);
      expect(holeBytes).toBe(holes.reduce((n, x) => n + x.length, 0));
      expect(holeBytes).toBeGreaterThan(0);
    } finally {
      await nbd.close();
    }
  });

  it('answers base:allocation block status as the device holds it, from the offset asked', async () => {
    const nbd = await NbdClient.connect({
      socket: srv.socket,
      exportName: 'disk',
      contexts: [CONTEXT_BASE_ALLOCATION],
    });
    try {
      expect(nbd.hasContext(CONTEXT_BASE_ALLOCATION)).toBe(true);
      const got: { offset: number; length: number; zero: boolean }[] = [];
      for (let at = CLUSTER; at < size;) {
        const extents = await nbd.blockStatus(at, size - at, CONTEXT_BASE_ALLOCATION);
        expect(extents[0].offset).toBe(at);
        for (const e of extents) {
          const zero = (e.flags & STATE_ZERO) !== 0;
          expect(zero).toBe((e.flags & STATE_HOLE) !== 0);
          const last = got[got.length - 1];
          if (last && last.zero === zero && last.offset + last.length === e.offset) last.length += e.length;
          else got.push({ offset: e.offset, length: e.length, zero });
          at = e.offset + e.length;
        }
      }
      expect(got).toEqual(expectedRuns(device, CLUSTER, size - CLUSTER));
      await expect(nbd.blockStatus(0, CLUSTER, 'qemu:dirty-bitmap:nope')).rejects.toMatchObject({
        code: 'NOT_SUPPORTED',
      });
    } finally {
      await nbd.close();
    }
  });

  it('speaks simple replies when asked for nothing else, and reports server errors as errors', async () => {
    const nbd = await NbdClient.connect({ socket: srv.socket, exportName: 'disk' });
    try {
      expect(nbd.structured).toBe(false);
      const data = await nbd.read(0, MiB);
      expect(data.equals(device.data.subarray(0, MiB))).toBe(true);
      await expect(nbd.read(size - 512, 4096)).rejects.toMatchObject({ code: 'IO_ERROR' }); // past the end
      expect((await nbd.read(MiB, 4096)).equals(device.data.subarray(MiB, MiB + 4096))).toBe(true); // still usable
    } finally {
      await nbd.close();
    }
    const s = await NbdClient.connect({ socket: srv.socket, exportName: 'disk', structured: true });
    try {
      await expect(s.readInto(Buffer.alloc(4096), size - 512)).rejects.toMatchObject({ code: 'IO_ERROR' });
      const ok = Buffer.alloc(4096);
      await s.readInto(ok, 0);
      expect(ok.equals(device.data.subarray(0, 4096))).toBe(true);
    } finally {
      await s.close();
    }
  });
});

describe.skipIf(requirePeers('qemu-nbd').skip)('NbdClient against qemu-nbd', () => {
  let dir: string;
  let cleanup: () => Promise<void>;
  beforeAll(async () => ({ dir, cleanup } = await tempDir('nbd-client')));
  afterAll(async () => cleanup());

  it('reads holes and data of a sparse raw file and its base:allocation map', async () => {
    const file = path.join(dir, 'sparse.raw');
    const size = 8 * MiB;
    const expected = Buffer.alloc(size);
    writeFileSync(file, Buffer.alloc(0));
    const fh = await open(file, 'r+');
    await fh.truncate(size);
    const r = rng(SEED + 1);
    for (const at of [0, 3 * MiB, 5 * MiB + 64 * 1024]) {
      const piece = r.bytes(MiB);
      await fh.write(piece, 0, piece.length, at);
      piece.copy(expected, at);
    }
    await fh.close();
    const socket = path.join(dir, 'q.sock');
    const q = spawn('qemu-nbd', ['-f', 'raw', '-r', '-t', '-k', socket, '-x', 'sparse', file], { stdio: 'ignore' });
    try {
      for (let i = 0; i < 200 && !existsSync(socket); i++) await sleep(25);
      const nbd = await NbdClient.connect({ socket, exportName: 'sparse', contexts: [CONTEXT_BASE_ALLOCATION] });
      try {
        const dst = Buffer.alloc(size, 0xee);
        const { holeBytes } = await nbd.readInto(dst, 0);
        expect(dst.equals(expected)).toBe(true);
        expect(holeBytes).toBeGreaterThanOrEqual(4 * MiB); // qemu-nbd sends the file's holes as hole chunks
        const extents = await nbd.blockStatus(0, size, CONTEXT_BASE_ALLOCATION);
        // Everything qemu-nbd calls zero reads zeros, and the data pieces are not called zero.
        for (const e of extents) {
          if (e.flags & STATE_ZERO)
            expect(expected.subarray(e.offset, e.offset + e.length).every((b) => b === 0)).toBe(true);
        }
        const zeroAt = (o: number) =>
          extents.some((e) => e.flags & STATE_ZERO && e.offset <= o && o < e.offset + e.length);
        expect(zeroAt(0) || zeroAt(3 * MiB) || zeroAt(5 * MiB + 64 * 1024)).toBe(false);
        expect(zeroAt(2 * MiB)).toBe(true);
      } finally {
        await nbd.close();
      }
    } finally {
      q.kill('SIGTERM');
    }
  });
});
