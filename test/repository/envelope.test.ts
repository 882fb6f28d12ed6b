/**
 * The object envelope and the codec pool: round trips, and damaged or hostile envelopes (flipped bytes, cut
 * short, lying headers) always give a typed error — never a crash, never wrong bytes, never a big allocation.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { EnvelopeCodec, EnvelopeError, HEADER_SIZE, MAX_OVERHEAD } from '../../src/repository/envelope.js';
import { CodecError, createCodec, loadZstd } from '../../src/repository/pool.js';
import { rng, seedFrom } from '../helpers/random.js';

const SEED = seedFrom('TIDEMARK_FUZZ_SEED', 99);
const CASES = Number(process.env.TIDEMARK_FUZZ_CASES ?? 300);
const KEY = randomBytes(32);

function compressible(r: ReturnType<typeof rng>, n: number): Buffer {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = 0x61 + (r.int(4) === 0 ? r.int(26) : i % 7);
  return b;
}

describe('envelope', () => {
  const zstd = loadZstd();
  const plain = new EnvelopeCodec(zstd, null, 3);
  const sealed = new EnvelopeCodec(zstd, KEY, 3);

  it('round trips compressible, incompressible and empty data, plain and encrypted', () => {
    const r = rng(SEED);
    for (const data of [compressible(r, 70_000), r.bytes(70_000), Buffer.alloc(0), Buffer.alloc(1 << 20)]) {
      for (const codec of [plain, sealed]) {
        const out = codec.seal(data, { type: 'chunk', name: 'chunks/ab/x' });
        // Never longer than the data plus the fixed overhead: incompressible data is stored as it is.
        expect(out.length).toBeLessThanOrEqual(data.length + MAX_OVERHEAD);
        expect(codec.open(out, 'chunk', 'chunks/ab/x', data.length).equals(data)).toBe(true);
      }
    }
    const c = plain.seal(compressible(r, 100_000), { type: 'chunk', name: 'n' });
    expect(c.length).toBeLessThan(60_000);
    expect(c[6] & 1).toBe(1);
  });

  it('encrypted objects are bound to their name and type; the plaintext does not show', () => {
    const data = Buffer.from('secret VM definition '.repeat(100));
    const out = sealed.seal(data, { type: 'manifest', name: 'points/a' });
    expect(out.includes(Buffer.from('secret VM'))).toBe(false);
    expect(() => sealed.open(out, 'manifest', 'points/b', 1 << 20)).toThrow(/authentication failed/);
    expect(() => sealed.open(out, 'chunk', 'points/a', 1 << 20)).toThrow(/type/);
    // Another key: authentication fails, no garbage.
    expect(() => new EnvelopeCodec(zstd, randomBytes(32), 3).open(out, 'manifest', 'points/a', 1 << 20)).toThrow(
      EnvelopeError,
    );
    // An unencrypted object slipped into an encrypted repository is refused (no downgrade).
    const p = plain.seal(data, { type: 'manifest', name: 'points/a', checksum: true });
    expect(() => sealed.open(p, 'manifest', 'points/a', 1 << 20)).toThrow(/unencrypted object/);
  });

  it('checks lengths before allocating: a header claiming 4 GiB, a body longer than the header says', () => {
    const out = plain.seal(Buffer.alloc(1000, 1), { type: 'chunk', name: 'n' });
    const lying = Buffer.from(out);
    lying.writeUInt32LE(0xffffffff, 8);
    expect(() => plain.open(lying, 'chunk', 'n', 1 << 20)).toThrow(/more than the 1048576 allowed/);
    const longer = Buffer.concat([out, Buffer.alloc(5)]);
    expect(() => plain.open(longer, 'chunk', 'n', 1 << 20)).toThrow(/after the end/);
    try {
      plain.open(out.subarray(0, out.length - 1), 'chunk', 'n', 1 << 20);
      expect.unreachable();
    } catch (err) {
      expect((err as EnvelopeError).problem).toBe('truncated');
    }
    const future = Buffer.from(out);
    future[4] = 2;
    expect(() => plain.open(future, 'chunk', 'n', 1 << 20)).toThrow(expect.objectContaining({ code: 'NOT_SUPPORTED' }));
  });

  it(`a flipped byte or a cut anywhere gives EnvelopeError or (unencrypted, unchecksummed) different bytes — ${CASES} cases, seed ${SEED}`, () => {
    const r = rng(SEED + 1);
    for (let i = 0; i < CASES; i++) {
      const codec = r.int(2) ? plain : sealed;
      const checksum = r.int(2) === 1;
      const data = r.int(2) ? compressible(r, 1 + r.int(20_000)) : r.bytes(1 + r.int(20_000));
      const out = codec.seal(data, { type: 'index', name: 'indexes/x', checksum });
      const bad = Buffer.from(out);
      if (r.int(4) === 0) {
        const cut = bad.subarray(0, r.int(bad.length));
        expect(() => codec.open(cut, 'index', 'indexes/x', 1 << 20)).toThrow(EnvelopeError);
        continue;
      }
      const at = r.int(bad.length);
      bad[at] ^= 1 << r.int(8);
      let got: Buffer | null = null;
      try {
        got = codec.open(bad, 'index', 'indexes/x', 1 << 20);
      } catch (err) {
        expect(err, `case ${i}`).toBeInstanceOf(EnvelopeError);
        continue;
      }
      // Only an unprotected payload can open after damage; the caller's hash check catches it then.
      expect(codec === plain && !checksum && at >= HEADER_SIZE, `case ${i}: damage at ${at} went unnoticed`).toBe(true);
      expect(got.equals(data)).toBe(false);
    }
  });
});

describe('codec pool', () => {
  it('worker threads seal what the inline codec opens, and pass damage back as CodecError', async () => {
    const r = rng(SEED + 2);
    const pool = await createCodec({ key: KEY, workers: 2 });
    const inline = await createCodec({ key: KEY, workers: 0 });
    try {
      expect(pool.workers).toBe(2);
      const datas = Array.from({ length: 12 }, (_, i) => (i % 2 ? compressible(r, 65536) : r.bytes(65536)));
      // A view into a larger buffer: only the view's bytes travel.
      const big = Buffer.concat(datas);
      const views = datas.map((_, i) => big.subarray(i * 65536, (i + 1) * 65536));
      const outs = await Promise.all(views.map((d, i) => pool.seal(d, { type: 'chunk', name: `c${i}` })));
      for (const [i, o] of outs.entries()) {
        expect((await inline.open(o, 'chunk', `c${i}`, 65536)).equals(datas[i])).toBe(true);
        expect((await pool.open(o, 'chunk', `c${i}`, 65536)).equals(datas[i])).toBe(true);
      }
      const bad = Buffer.from(outs[0]);
      bad[bad.length - 1] ^= 0x80;
      await expect(pool.open(bad, 'chunk', 'c0', 65536)).rejects.toBeInstanceOf(CodecError);
      await expect(inline.open(bad, 'chunk', 'c0', 65536)).rejects.toBeInstanceOf(CodecError);
      // The content check against the name happens where the object is opened: HMAC under the id key.
      const idKey = Buffer.alloc(32, 9);
      const keyed = await createCodec({ key: KEY, idKey, workers: 1 });
      const keyedInline = await createCodec({ key: KEY, idKey, workers: 0 });
      try {
        const right = createHmac('sha256', idKey).update(datas[1]).digest('hex');
        const plainId = createHash('sha256').update(datas[1]).digest('hex');
        for (const c of [keyed, keyedInline]) {
          expect((await c.open(outs[1], 'chunk', 'c1', 65536, right)).equals(datas[1])).toBe(true);
          await expect(c.open(outs[1], 'chunk', 'c1', 65536, plainId)).rejects.toMatchObject({
            problem: 'corrupt',
            message: expect.stringMatching(/does not hash to its name/),
          });
        }
        expect((await pool.open(outs[1], 'chunk', 'c1', 65536, plainId)).equals(datas[1])).toBe(true);
        await expect(inline.open(outs[1], 'chunk', 'c1', 65536, right)).rejects.toBeInstanceOf(CodecError);
      } finally {
        await keyed.close();
        await keyedInline.close();
      }
    } finally {
      await pool.close();
      await inline.close();
    }
    await expect(pool.seal(Buffer.alloc(1), { type: 'chunk', name: 'x' })).rejects.toMatchObject({ code: 'CLOSED' });
  });

  it('results handed back for reuse serve later seals, and results still in use are never overwritten', async () => {
    const r = rng(SEED + 3);
    const pool = await createCodec({ key: KEY, workers: 2 });
    const inline = await createCodec({ key: KEY, workers: 0 });
    try {
      const kept: { data: Buffer; sealed: Buffer; copy: Buffer; name: string }[] = [];
      for (let round = 0; round < 6; round++) {
        const datas = Array.from({ length: 8 }, (_, i) => (i % 3 ? r.bytes(300_000) : compressible(r, 300_000)));
        const sealed = await Promise.all(datas.map((d, i) => pool.seal(d, { type: 'chunk', name: `r${round}-${i}` })));
        sealed.forEach((s, i) => {
          kept.push({ data: datas[i], sealed: s, copy: Buffer.from(s), name: `r${round}-${i}` });
        });
        // Half go back for reuse (as a backend is done with them); the others stay in use.
        for (const k of kept.splice(-8).filter((_, i) => i % 2 === 0)) pool.recycle(k.sealed);
        pool.recycle(Buffer.alloc(1 << 20)); // not the pool's: ignored
      }
      // Without reuse every seal would allocate an input and an output buffer: 96.
      expect(pool.buffersAllocated).toBeGreaterThanOrEqual(16);
      expect(pool.buffersAllocated).toBeLessThan(60);
      for (const k of kept) {
        expect(k.sealed.equals(k.copy), `${k.name} was overwritten while in use`).toBe(true);
        expect((await inline.open(k.sealed, 'chunk', k.name, 300_000)).equals(k.data)).toBe(true);
      }
    } finally {
      await pool.close();
      await inline.close();
    }
  });
});
