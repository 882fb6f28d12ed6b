/**
 * The shared PRNG keeps the sequences the tests had before it was shared (values taken from the earlier
 * copies in random.ts, vhdx/crash-plan.mjs, snapshot/worker-plan.mjs and tracking/crash-plan.mjs), so a
 * seed printed by an older run still replays the same case.
 */
import { describe, expect, it } from 'vitest';
import { mulberry as snapshotMulberry, randomBytes } from '../snapshot/worker-plan.mjs';
import { words } from '../tracking/crash-plan.mjs';
import { prng } from '../tracking/model.js';
import { mulberry as crashMulberry } from '../vhdx/crash-plan.mjs';
import { mulberry32, mulberry32Words, rng } from './random.js';

describe('the shared PRNG replays the old sequences', () => {
  it('rng(12345): next, int, pick, bytes', () => {
    const r = rng(12345);
    expect([r.next(), r.next(), r.int(1000), r.int(1000), r.pick(['a', 'b', 'c', 'd'])]).toEqual([
      0.9797282677609473,
      0.3067522644996643,
      484,
      817,
      'c',
    ]);
    expect(r.bytes(7).toString('hex')).toBe('75eaf35812c4ff');
  });

  it('rng(0): the first three numbers', () => {
    const r = rng(0);
    expect([r.next(), r.next(), r.next()]).toEqual([0.26642920868471265, 0.0003297457005828619, 0.2232720274478197]);
    expect(mulberry32(0)()).toBe(0.26642920868471265);
  });

  it('the worker plans draw the same numbers', () => {
    const want = [0.9413696140982211, 0.26719574979506433, 0.772033357527107];
    for (const make of [crashMulberry, snapshotMulberry, mulberry32]) {
      const m = make(0xdeadbeef);
      expect([m(), m(), m()]).toEqual(want);
    }
  });

  it('words, and the byte layouts built on them', () => {
    for (const make of [words, mulberry32Words]) {
      const w = make(42);
      expect([w(), w(), w()]).toEqual([2581720956, 1925393290, 3661312704]);
    }
    // One draw per byte, the top byte of each word: 2581720956 >>> 24 = 0x99, ...
    expect(rng(42).bytesEach(3).toString('hex')).toBe('9972da');
    expect(randomBytes(42, 3).toString('hex')).toBe('9972da');
    // Whole words little-endian, then the low byte of a word per tail byte (tracking's model).
    expect(prng(42).bytes(5).toString('hex')).toBe('7cefe1998a');
  });
});
