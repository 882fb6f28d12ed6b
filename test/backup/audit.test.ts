/**
 * The tracking audit's parts, without a host: option parsing, the sample (uniform over the unchanged slots,
 * distinct, deterministic in its seed, replayable), and the comparison of an export's chunks with an index over
 * a real NBD server (zero slots answered by block status, a changed byte found, the time bound).
 * Seed: TIDEMARK_AUDIT_UNIT_SEED (printed).
 */
import { createHash } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  auditSample,
  checkChunks,
  countDifferences,
  diskSeed,
  formatRate,
  parseAuditMode,
  parseAuditSeed,
  parseAuditTime,
  sampleSize,
  unchangedSlots,
  zeroSlots,
} from '../../src/backup/audit.js';
import { NbdClient } from '../../src/nbd/client.js';
import { CONTEXT_BASE_ALLOCATION, STATE_ZERO } from '../../src/nbd/protocol.js';
import { IndexBuilder } from '../../src/repository/index.js';
import { decodeManifest, encodeManifest, type PointManifest } from '../../src/repository/manifest.js';
import { TidemarkError } from '../../src/errors.js';
import { rng, seedFrom } from '../helpers/random.js';
import { startServer, type RunningServer } from '../nbd/fixture.js';
import { CLUSTER, MemoryDevice } from '../nbd/memory-device.js';

const SEED = seedFrom('TIDEMARK_AUDIT_UNIT_SEED', 20261206);
console.log(`audit unit seed ${SEED} (set TIDEMARK_AUDIT_UNIT_SEED to replay)`);

const sha = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

describe('audit options', () => {
  it('parses rates, percentages, off and full; refuses the rest with INVALID_ARGUMENT', () => {
    expect(parseAuditMode('off')).toEqual({ kind: 'off' });
    expect(parseAuditMode('FULL')).toEqual({ kind: 'full' });
    expect(parseAuditMode('0.01')).toEqual({ kind: 'sample', rate: 0.01 });
    expect(parseAuditMode('1%')).toEqual({ kind: 'sample', rate: 0.01 });
    expect(parseAuditMode('.5')).toEqual({ kind: 'sample', rate: 0.5 });
    expect(parseAuditMode('100%')).toEqual({ kind: 'sample', rate: 1 });
    expect(parseAuditMode('1')).toEqual({ kind: 'sample', rate: 1 });
    for (const bad of ['0', '0%', '1.5', '101%', '-0.1', 'abc', '', '1%%', 'NaN', 'Infinity', '0x10']) {
      const err = (() => {
        try {
          parseAuditMode(bad);
        } catch (e) {
          return e;
        }
      })();
      expect(err, bad).toBeInstanceOf(TidemarkError);
      expect((err as TidemarkError).code).toBe('INVALID_ARGUMENT');
    }
    expect(parseAuditTime('2')).toBe(2000);
    expect(parseAuditTime('0.25')).toBe(250);
    for (const bad of ['0', '-1', 'x', '', '1e3']) expect(() => parseAuditTime(bad), bad).toThrow(/--audit-time/);
    expect(parseAuditSeed('4294967295')).toBe(4294967295);
    expect(parseAuditSeed('0')).toBe(0);
    for (const bad of ['4294967296', '-1', '1.5', 'x']) expect(() => parseAuditSeed(bad), bad).toThrow(/--audit-seed/);
    expect(formatRate(0.01)).toBe('1%');
    expect(formatRate(0.07)).toBe('7%');
  });

  it('samples 1% of the disk, at least 16, at most what is unchanged; full takes every unchanged chunk', () => {
    const rate = (r: number) => ({ kind: 'sample' as const, rate: r });
    expect(sampleSize(rate(0.01), 4096, 4000)).toBe(41);
    expect(sampleSize(rate(0.01), 64, 60)).toBe(16);
    expect(sampleSize(rate(0.01), 64, 10)).toBe(10);
    expect(sampleSize(rate(0.5), 100, 100)).toBe(50);
    expect(sampleSize({ kind: 'full' }, 100, 77)).toBe(77);
    expect(sampleSize({ kind: 'off' }, 100, 77)).toBe(0);
  });
});

describe(`audit sample (seed ${SEED})`, () => {
  it('is distinct, outside the changed slots, replayable from its seed, and different for other seeds or disks', () => {
    const r = rng(SEED);
    for (let t = 0; t < 200; t++) {
      const slots = 1 + r.int(3000);
      const changed = Array.from({ length: slots }, (_, i) => i).filter(() => r.int(4) === 0);
      const unchanged = slots - changed.length;
      const n = r.int(unchanged + 2); // both the sparse and the dense way, and more than there is
      const seed = r.int(2 ** 32);
      const s = auditSample(seed, slots, changed, n);
      expect(s.length).toBe(Math.min(n, unchanged));
      expect(new Set(s).size).toBe(s.length);
      const isChanged = new Set(changed);
      const bad = s.filter((x) => !Number.isInteger(x) || x < 0 || x >= slots || isChanged.has(x));
      expect(bad, `trial ${t}`).toEqual([]);
      expect(auditSample(seed, slots, changed, n).join()).toBe(s.join());
    }
    const changed = [3, 4, 5];
    expect(auditSample(1, 10_000, changed, 50)).not.toEqual(auditSample(2, 10_000, changed, 50));
    expect(diskSeed(7, 'disk-a')).not.toBe(diskSeed(7, 'disk-b'));
    expect(diskSeed(7, 'disk-a')).toBe(diskSeed(7, 'disk-a'));
  });

  it('picks every unchanged slot equally often (chi-square), sparse and dense', () => {
    const r = rng(SEED + 1);
    for (const [slots, n] of [
      [200, 16], // sparse: drawn one by one
      [40, 16], // dense: a partial shuffle
    ]) {
      const changed = Array.from({ length: slots }, (_, i) => i).filter(() => r.int(5) === 0);
      const unchanged = unchangedSlots(slots, changed);
      const counts = new Map<number, number>(unchanged.map((s) => [s, 0]));
      const trials = 4000;
      for (let t = 0; t < trials; t++) {
        for (const s of auditSample(r.int(2 ** 32), slots, changed, n)) counts.set(s, counts.get(s)! + 1);
      }
      const expected = (trials * n) / unchanged.length;
      let chi = 0;
      for (const c of counts.values()) chi += (c - expected) ** 2 / expected;
      // Degrees of freedom k = unchanged - 1 (≤ 199): mean k, sd √(2k); 6 sd above the mean is far beyond chance.
      const k = unchanged.length - 1;
      expect(chi, `${slots} slots, n ${n}: chi-square ${chi.toFixed(1)} for ${k} degrees of freedom`).toBeLessThan(
        k + 6 * Math.sqrt(2 * k),
      );
    }
  });

  it('lists unchanged slots and counts differing slots outside the changed ones', () => {
    expect(unchangedSlots(8, [0, 3, 7])).toEqual([1, 2, 4, 5, 6]);
    expect(unchangedSlots(3, [])).toEqual([0, 1, 2]);
    const a = IndexBuilder.empty(4096, 4096 * 6);
    const b = IndexBuilder.empty(4096, 4096 * 6);
    a.set(1, sha(Buffer.from('x')));
    a.set(2, sha(Buffer.from('y')));
    b.set(2, sha(Buffer.from('z')));
    a.set(4, sha(Buffer.from('w')));
    b.set(4, sha(Buffer.from('w')));
    expect(countDifferences(a, b, [])).toBe(2);
    expect(countDifferences(a, b, [2])).toBe(1);
    expect(countDifferences(a, b, [1, 2])).toBe(0);
  });
});

describe('checking chunks against an index over NBD', () => {
  const CHUNK = 4 * CLUSTER;
  const SLOTS = 48;
  const SIZE = SLOTS * CHUNK - CLUSTER; // the last chunk is short
  let device: MemoryDevice;
  let srv: RunningServer;
  let nbd: NbdClient;
  let index: IndexBuilder;
  const slotData = (s: number) => device.data.subarray(s * CHUNK, Math.min(SIZE, (s + 1) * CHUNK));

  beforeAll(async () => {
    device = new MemoryDevice({ size: SIZE });
    const r = rng(SEED + 2);
    index = IndexBuilder.empty(CHUNK, SIZE);
    for (let s = 0; s < SLOTS; s++) {
      // A third of the slots hold data, some slots are allocated but zero (read, then called zero).
      if (s % 3 === 0) await device.write(s * CHUNK, r.bytes(slotData(s).length));
      else if (s % 3 === 1 && s % 2 === 0) await device.write(s * CHUNK, Buffer.alloc(CLUSTER));
      index.set(s, s % 3 === 0 ? sha(slotData(s)) : null);
    }
    srv = await startServer([{ name: 'disk', device }]);
    nbd = await NbdClient.connect({ socket: srv.socket, exportName: 'disk', contexts: [CONTEXT_BASE_ALLOCATION] });
  });
  afterAll(async () => {
    await nbd?.close();
    await srv?.stop();
  });

  const all = () => Array.from({ length: SLOTS }, (_, i) => i);

  it('finds nothing on an honest index, reading only the slots block status cannot answer', async () => {
    const before = srv.server.stats();
    const r = await checkChunks(nbd, index, all(), { size: SIZE, hashId: sha, parallel: 4, batch: 7 });
    expect(r).toEqual({
      checked: SLOTS,
      bytesRead: expect.any(Number),
      mismatches: 0,
      firstMismatchOffset: null,
      stoppedEarly: false,
    });
    const after = srv.server.stats();
    // The data slots and the allocated-zero ones are read; the holes are answered by block status.
    const expectRead = all().filter((s) => s % 3 === 0 || (s % 3 === 1 && s % 2 === 0));
    expect((after.requests.NBD_CMD_READ ?? 0) - (before.requests.NBD_CMD_READ ?? 0)).toBe(expectRead.length);
    expect(r.bytesRead).toBe(expectRead.reduce((n, s) => n + slotData(s).length, 0));
    expect(after.bytesRead - before.bytesRead).toBe(r.bytesRead);
  });

  it('finds one changed byte, a zero slot that holds data, and data that became zeros', async () => {
    for (const s of [0, 2, SLOTS - 1, 21]) {
      const at = s * CHUNK + 777;
      const old = device.data[at];
      device.data[at] = old ^ 0x5a;
      device.allocated[Math.floor(at / CLUSTER)] = 1;
      const r = await checkChunks(nbd, index, all(), { size: SIZE, hashId: sha, parallel: 3 });
      expect(r.mismatches, `slot ${s}`).toBe(1);
      expect(r.firstMismatchOffset).toBe(s * CHUNK);
      expect(r.stoppedEarly).toBe(false);
      // In batches: the audit ends with the batch that holds the mismatch.
      const batched = await checkChunks(nbd, index, all(), { size: SIZE, hashId: sha, batch: 5 });
      expect(batched).toMatchObject({ mismatches: 1, firstMismatchOffset: s * CHUNK, stoppedEarly: false });
      expect(batched.checked).toBe(Math.min(SLOTS, (Math.floor(s / 5) + 1) * 5));
      // Not sampled: not found.
      const others = all().filter((x) => x !== s);
      expect((await checkChunks(nbd, index, others, { size: SIZE, hashId: sha })).mismatches).toBe(0);
      device.data[at] = old;
    }
    // A data slot whose content is now all zeros (read as zeros: its id is null, the index says otherwise).
    const keep = Buffer.from(slotData(3));
    slotData(3).fill(0);
    const r = await checkChunks(nbd, index, [5, 3, 7], { size: SIZE, hashId: sha });
    expect(r.firstMismatchOffset).toBe(3 * CHUNK);
    keep.copy(slotData(3));
    // The repository's naming matters: another hash finds every data slot different.
    const keyed = await checkChunks(nbd, index, [0], { size: SIZE, hashId: (b) => sha(Buffer.concat([b, keep])) });
    expect(keyed.mismatches).toBe(1);
  });

  it('zero status of scattered slots: exactly those zero all through, whatever the shares, in few requests', async () => {
    const isZero = (s: number) => {
      for (let at = s * CHUNK; at < Math.min(SIZE, (s + 1) * CHUNK); at += CLUSTER) {
        if (device.allocated[at / CLUSTER]) return false;
      }
      return true;
    };
    const r = rng(SEED + 3);
    for (let round = 0; round < 30; round++) {
      const slots = all().filter(() => r.int(3) === 0);
      if (round === 0) slots.splice(0, slots.length, ...all());
      for (const parallel of [1, 3, 8]) {
        const before = srv.server.stats().requests.NBD_CMD_BLOCK_STATUS ?? 0;
        const got = await zeroSlots(nbd, slots, CHUNK, SIZE, parallel);
        const asked = (srv.server.stats().requests.NBD_CMD_BLOCK_STATUS ?? 0) - before;
        expect(
          [...got].sort((a, b) => a - b),
          `round ${round}, parallel ${parallel}`,
        ).toEqual(slots.filter(isZero));
        // One request per share here (the whole disk is within one request's reach): shares of ⌈n/parallel⌉.
        const n = slots.length;
        expect(asked).toBe(n === 0 ? 0 : Math.ceil(n / Math.ceil(n / Math.min(parallel, n))));
      }
    }
    expect((await zeroSlots(nbd, [], CHUNK, SIZE)).size).toBe(0);
    const plain = await NbdClient.connect({ socket: srv.socket, exportName: 'disk' });
    try {
      expect((await zeroSlots(plain, [1, 2, 3], CHUNK, SIZE)).size).toBe(0); // no context: every slot is read
    } finally {
      await plain.close();
    }
  });

  it('zero status when answers stop short (the protocol allows it): asked on from the first slot not reached', async () => {
    // A server may answer block status for less than asked; ours does only past 64 Ki descriptors, so this
    // client stands in for one that answers one 64 KiB extent at a time, over the same device.
    const asked: number[] = [];
    const short = {
      hasContext: () => true,
      blockStatus: async (offset: number, length: number) => {
        asked.push(offset);
        const n = Math.min(length, CLUSTER - (offset % CLUSTER));
        return [{ offset, length: n, flags: device.allocated[Math.floor(offset / CLUSTER)] ? 0 : STATE_ZERO }];
      },
    } as unknown as NbdClient;
    const slots = [1, 2, 5, 9, 10, 11, 30, SLOTS - 1];
    const got = await zeroSlots(short, slots, CHUNK, SIZE, 1);
    const expected = await zeroSlots(nbd, slots, CHUNK, SIZE, 1);
    // Each answer covers less than a slot: every slot is left to be read (never called zero wrongly).
    expect([...got]).toEqual([]);
    expect(asked.length).toBe(slots.length);
    expect(expected.size).toBeGreaterThan(0);
  });

  it('stops at the time bound and says so; what it checked before is counted', async () => {
    const release = device.holdWhere((e) => e.startsWith('read'));
    const dataSlots = all().filter((s) => s % 3 === 0);
    // The deadline passes while two reads are held (no wall-clock race: the test moves it).
    let past = false;
    const deadline = () => (past ? 0 : Infinity);
    const running = checkChunks(nbd, index, dataSlots, { size: SIZE, hashId: sha, parallel: 2, deadline });
    await device.untilRunning(2);
    past = true;
    release();
    const r = await running;
    expect(r.stoppedEarly).toBe(true);
    expect(r.checked).toBe(2); // the two reads in flight finish; nothing new starts
    expect(r.mismatches).toBe(0);
    // A deadline already past checks nothing.
    const none = await checkChunks(nbd, index, dataSlots, { size: SIZE, hashId: sha, deadline: 0 });
    expect(none).toMatchObject({ checked: 0, bytesRead: 0, stoppedEarly: true });
  });
});

describe('audit figures in the manifest', () => {
  const point = '20261206-120000-0badcafe';
  const manifest = (audit?: unknown): PointManifest =>
    ({
      format: 'tidemark-point',
      version: 1,
      id: point,
      time: '2026-12-06T12:00:00.000Z',
      flow: '2016',
      parentId: null,
      snapshots: 1,
      statistics: { bytesRead: 0, bytesNew: 0, bytesStored: 0, durationMs: 1 },
      vms: [
        {
          name: 'v',
          id: '6f1c3f4e-2a7b-4c1d-9e3f-0a1b2c3d4e5f',
          definition: {},
          consistency: 'crash',
          freezeWindowMs: null,
          ioPauseMs: null,
          disks: [
            {
              diskId: '0d8c2a31-5b6e-4f70-8a9b-1c2d3e4f5a6b',
              name: 'scsi0-0',
              controller: { bus: 'scsi', controller: 0, location: 0 },
              virtualSize: 65536,
              logicalSectorSize: 512,
              blockSize: 65536,
              format: 'vhdx',
              rctId: null,
              read: 'incremental',
              fullReason: null,
              index: { id: 'a'.repeat(64), virtualSize: 65536, chunkSize: 65536, storedSlots: 1 },
              stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0 },
              ...(audit === undefined ? {} : { audit }),
            },
          ],
        },
      ],
    }) as PointManifest;
  const figures = {
    mode: 'sample',
    rate: 0.01,
    seed: 42,
    unchanged: 60,
    sampled: 16,
    checked: 16,
    bytesRead: 4096,
    mismatches: 0,
    firstMismatchOffset: null,
    missedChunks: null,
    timeMs: 3.5,
    timeBudgetMs: 2000,
    stoppedEarly: false,
  };
  const decode = (m: PointManifest) => decodeManifest(encodeManifest(m), point);

  it('keeps the audit, reads manifests written before audits, and refuses damaged figures', () => {
    expect(decode(manifest(figures)).vms[0].disks[0].audit).toEqual(figures);
    expect(decode(manifest(null)).vms[0].disks[0].audit).toBeNull();
    expect(decode(manifest()).vms[0].disks[0].audit).toBeUndefined();
    for (const bad of [
      { ...figures, checked: -1 },
      { ...figures, mode: 'off' },
      { ...figures, rate: 2 },
      { ...figures, seed: 'x' },
    ]) {
      let err: unknown;
      try {
        decode(manifest(bad));
      } catch (e) {
        err = e;
      }
      expect((err as TidemarkError).code, JSON.stringify(bad)).toBe('REPOSITORY_CORRUPT');
      expect((err as TidemarkError).message).toMatch(/is damaged: vms\.0\.disks\.0\.audit\./);
    }
  });
});
