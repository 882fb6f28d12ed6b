/**
 * Pack headers and pack indexes: encode/decode round trips, and hostile bodies (random damage, lying counts,
 * overlapping or oversized entries) that decode to PackFormatError, never to a crash or a huge allocation.
 */
import { describe, expect, it } from 'vitest';
import {
  decodePackHeader,
  decodePackIndex,
  encodePackHeader,
  encodePackIndexes,
  MAX_PACK_ENTRIES,
  PackFormatError,
  type PackContents,
  type PackEntry,
} from '../../src/repository/pack.js';
import { rng, seedFrom } from '../helpers/random.js';

const SEED = seedFrom('TIDEMARK_PACK_SEED', 99);
const TRIALS = Number(process.env.TIDEMARK_PACK_TRIALS ?? 300);
const MAX_OBJECT = 2 ** 20 + 48;

function entries(r: ReturnType<typeof rng>, n: number): PackEntry[] {
  const out: PackEntry[] = [];
  let at = 0;
  for (let i = 0; i < n; i++) {
    const length = 17 + r.int(MAX_OBJECT - 17);
    out.push({ id: r.bytes(32).toString('hex'), offset: at, length });
    at += length + (r.int(3) === 0 ? r.int(100) : 0);
  }
  return out;
}

function decodesOrRefuses(fn: () => unknown): void {
  try {
    fn();
  } catch (err) {
    expect(err).toBeInstanceOf(PackFormatError);
  }
}

describe(`packs (seed ${SEED}, ${TRIALS} trials)`, () => {
  it('a header round-trips and checks that every chunk lies before the header', () => {
    const r = rng(SEED);
    const list = entries(r, 40);
    const end = list.at(-1)!.offset + list.at(-1)!.length;
    expect(decodePackHeader(encodePackHeader(list), MAX_OBJECT, end)).toEqual(list);
    expect(() => decodePackHeader(encodePackHeader(list), MAX_OBJECT, end - 1)).toThrow(/outside the pack/);
    expect(() => decodePackHeader(encodePackHeader(list), list[0].length - 1, end)).toThrow(/bytes long/);
  });

  it('pack indexes round-trip, split when large', () => {
    const r = rng(SEED + 1);
    const packs: PackContents[] = Array.from({ length: 7 }, () => ({
      packId: r.bytes(32).toString('hex'),
      entries: entries(r, 1 + r.int(50)),
    }));
    const bodies = encodePackIndexes(packs);
    expect(bodies).toHaveLength(1);
    expect(decodePackIndex(bodies[0], MAX_OBJECT)).toEqual(packs);
    expect(encodePackIndexes([])).toEqual([]);
  });

  it('lying counts, overlaps and oversized entries are refused', () => {
    const r = rng(SEED + 2);
    const list = entries(r, 3);
    const header = encodePackHeader(list);
    const big = Buffer.from(header);
    big.writeUInt32LE(MAX_PACK_ENTRIES + 1, 8);
    expect(() => decodePackHeader(big, MAX_OBJECT, 2 ** 32)).toThrow(PackFormatError);
    const short = Buffer.from(header);
    short.writeUInt32LE(4, 8);
    expect(() => decodePackHeader(short, MAX_OBJECT, 2 ** 32)).toThrow(/truncated|bytes/);
    const overlap = encodePackHeader([list[0], { ...list[1], offset: list[0].offset + 1 }]);
    expect(() => decodePackHeader(overlap, MAX_OBJECT, 2 ** 32)).toThrow(/overlaps/);
    const index = encodePackIndexes([{ packId: 'ab'.repeat(32), entries: list }])[0];
    const lying = Buffer.from(index);
    lying.writeUInt32LE(1000, 8); // a thousand packs in a body that holds one
    expect(() => decodePackIndex(lying, MAX_OBJECT)).toThrow(/cut off/);
    const empty = encodePackIndexes([{ packId: 'ab'.repeat(32), entries: list }])[0];
    empty.writeUInt32LE(0, 16 + 32);
    expect(() => decodePackIndex(empty, MAX_OBJECT)).toThrow(PackFormatError);
  });

  it('random damage to headers and indexes decodes or is refused, never anything else', () => {
    const r = rng(SEED + 3);
    for (let t = 0; t < TRIALS; t++) {
      const list = entries(r, 1 + r.int(20));
      const header = encodePackHeader(list);
      const index = encodePackIndexes([{ packId: r.bytes(32).toString('hex'), entries: list }])[0];
      for (const body of [header, index]) {
        const bad = Buffer.from(body.subarray(0, r.int(3) === 0 ? r.int(body.length) : body.length));
        for (let k = 0; k < 1 + r.int(4); k++) if (bad.length > 0) bad[r.int(bad.length)] ^= 1 << r.int(8);
        decodesOrRefuses(() => decodePackHeader(bad, MAX_OBJECT, 2 ** 32));
        decodesOrRefuses(() => decodePackIndex(bad, MAX_OBJECT));
      }
    }
  });
});
