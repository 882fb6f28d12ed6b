/**
 * The object envelope and the codec pool: round trips, and damaged or hostile envelopes (flipped bytes, cut
 * short, lying headers) always give a typed error — never a crash, never wrong bytes, never a big allocation.
 */
import { createHash, createHmac, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import {
  checkContentId,
  EnvelopeCodec,
  EnvelopeError,
  HEADER_SIZE,
  MAX_MANIFEST_OVERHEAD,
  MAX_OVERHEAD,
} from '../../src/repository/envelope.js';
import { CodecError, createCodec, loadZstd, workerEntry } from '../../src/repository/pool.js';
import { TidemarkError } from '../../src/errors.js';
import { IndexFormatError } from '../../src/repository/disk-index.js';
import { PackFormatError } from '../../src/repository/pack.js';
import { rng, seedFrom } from '../helpers/random.js';

const SEED = seedFrom('TIDEMARK_FUZZ_SEED', 99);
const CASES = Number(process.env.TIDEMARK_FUZZ_CASES ?? 300);
/** Long runs (TIDEMARK_FUZZ_CASES) get time in proportion. */
const LONG_RUN_TIMEOUT = Math.max(120_000, CASES * 20);
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

  // What an envelope promises (docs/formats/repository.md §3): a protected envelope (encrypted, or unencrypted with
  // the SHA-256 trailer) never opens after damage; an unprotected one (unencrypted chunks, indexes and pack indexes,
  // named by the hash of their plaintext) may open after damage — possibly to the original bytes, as when a flipped
  // bit lies in a part of the zstd frame that does not change its output — and the name check above it
  // (checkContentId) is what refuses any other bytes. Together they never hand back wrong bytes.
  it(
    `a flipped bit or a cut anywhere: a protected envelope fails; an unprotected one fails or, with its name check, yields exactly the original — ${CASES} cases, seed ${SEED}`,
    { timeout: LONG_RUN_TIMEOUT },
    () => {
      const r = rng(SEED + 1);
      let openedAfterDamage = 0;
      let openedToOriginal = 0;
      for (let i = 0; i < CASES; i++) {
        const codec = r.int(2) ? plain : sealed;
        const checksum = r.int(2) === 1;
        const data = r.int(2) ? compressible(r, 1 + r.int(20_000)) : r.bytes(1 + r.int(20_000));
        const id = createHash('sha256').update(data).digest('hex');
        const out = codec.seal(data, { type: 'index', name: 'indexes/x', checksum });
        const isProtected = codec === sealed || checksum;
        const bad = Buffer.from(out);
        let at = HEADER_SIZE;
        let damaged: Buffer;
        if (r.int(4) === 0) {
          damaged = bad.subarray(0, r.int(bad.length));
        } else {
          at = r.int(bad.length);
          bad[at] ^= 1 << r.int(8);
          damaged = bad;
        }
        let got: Buffer;
        try {
          got = codec.open(damaged, 'index', 'indexes/x', 1 << 20);
        } catch (err) {
          expect(err, `case ${i}`).toBeInstanceOf(EnvelopeError);
          continue;
        }
        expect(isProtected, `case ${i}: a protected envelope opened after damage at ${at}`).toBe(false);
        expect(at, `case ${i}: header damage at ${at} went unnoticed`).toBeGreaterThanOrEqual(HEADER_SIZE);
        openedAfterDamage++;
        if (got.equals(data)) openedToOriginal++;
        // The caller's check against the name: passes only for the original bytes.
        let checked = true;
        try {
          checkContentId(got, id, null);
        } catch (err) {
          expect(err, `case ${i}`).toBeInstanceOf(EnvelopeError);
          checked = false;
        }
        expect(checked, `case ${i}: the name check must pass exactly when the bytes are the original`).toBe(
          got.equals(data),
        );
      }
      console.log(
        `envelope fuzz: ${CASES} cases, seed ${SEED}; ${openedAfterDamage} unprotected envelopes opened after damage, ${openedToOriginal} of them to the original bytes`,
      );
    },
  );

  it('manifests with the MAC trailer: opened only under their key and name; a reader without the key still checks the checksum', () => {
    const macKey = randomBytes(32);
    const keyed = new EnvelopeCodec(zstd, null, 3, macKey);
    const data = Buffer.from(JSON.stringify({ format: 'tidemark-point', vms: ['x'.repeat(500)] }));
    const out = keyed.seal(data, { type: 'manifest', name: 'points/a' });
    expect(out[6] & 0b1100).toBe(0b1100);
    expect(out.length).toBeLessThanOrEqual(data.length + MAX_MANIFEST_OVERHEAD);
    expect(keyed.open(out, 'manifest', 'points/a', 1 << 20).equals(data)).toBe(true);
    expect(plain.open(out, 'manifest', 'points/a', 1 << 20).equals(data)).toBe(true); // keyless: MAC skipped
    expect(() => keyed.open(out, 'manifest', 'points/b', 1 << 20)).toThrow(/MAC does not match/);
    expect(() => new EnvelopeCodec(zstd, null, 3, randomBytes(32)).open(out, 'manifest', 'points/a', 1 << 20)).toThrow(
      /MAC does not match/,
    );
    const unkeyed = plain.seal(data, { type: 'manifest', name: 'points/a', checksum: true });
    expect(() => keyed.open(unkeyed, 'manifest', 'points/a', 1 << 20)).toThrow(/not authenticated/);
    // Only a manifest with the checksum may carry the flag.
    const wrongType = Buffer.from(out);
    wrongType[5] = 2;
    expect(() => keyed.open(wrongType, 'index', 'points/a', 1 << 20)).toThrow(/MAC flag on a index/);
    // Keyed readers catch any damage (checksum or MAC); keyless ones any damage but to the MAC itself, which they
    // cannot check — and which leaves them the original bytes.
    const r = rng(SEED + 6);
    const macAt = out.length - 32;
    for (let i = 0; i < CASES; i++) {
      const bad = Buffer.from(out);
      const at = r.int(bad.length);
      bad[at] ^= 1 << r.int(8);
      expect(() => keyed.open(bad, 'manifest', 'points/a', 1 << 20), `case ${i} at ${at}`).toThrow(EnvelopeError);
      if (at < macAt) {
        expect(() => plain.open(bad, 'manifest', 'points/a', 1 << 20), `case ${i} at ${at}`).toThrow(EnvelopeError);
      } else expect(plain.open(bad, 'manifest', 'points/a', 1 << 20).equals(data), `case ${i}`).toBe(true);
    }
  });

  it('a flipped bit the zstd frame ignores can open an unprotected envelope to the original bytes (the case the name check covers)', () => {
    // Found by the fuzz test (seed 99): look for such a bit deterministically, so the promise above is exercised.
    const r = rng(SEED + 5);
    let found = 0;
    for (let i = 0; i < 200 && found === 0; i++) {
      const data = compressible(r, 1 + r.int(20_000));
      const out = plain.seal(data, { type: 'index', name: 'indexes/x' });
      for (let at = HEADER_SIZE; at < out.length && found === 0; at++) {
        for (let bit = 0; bit < 8; bit++) {
          const bad = Buffer.from(out);
          bad[at] ^= 1 << bit;
          try {
            if (plain.open(bad, 'index', 'indexes/x', 1 << 20).equals(data)) found++;
          } catch {
            // damage detected by the envelope itself
          }
        }
      }
    }
    expect(found, 'no bit flip opened to the original: the test above would not need its name check').toBeGreaterThan(
      0,
    );
  });
});

describe('codec pool', () => {
  it('runs the built worker: beside the compiled module, or the build at the root when run from src/', () => {
    const root = new URL('../../', import.meta.url);
    expect(workerEntry(new URL('dist/repository/pool.js', root).href).href).toBe(
      new URL('dist/repository/envelope.js', root).href,
    );
    expect(workerEntry(new URL('src/repository/pool.ts', root).href).href).toBe(
      new URL('dist/repository/envelope.js', root).href,
    );
    // This run's workers (npm test builds first).
    expect(existsSync(fileURLToPath(workerEntry()))).toBe(true);
  });

  it("the repository's error classes are TidemarkErrors with a stable code", () => {
    const e = new CodecError('REPOSITORY_CORRUPT', 'corrupt', 'x');
    expect(e).toBeInstanceOf(TidemarkError);
    expect(e.code).toBe('REPOSITORY_CORRUPT');
    expect(new EnvelopeError('NOT_SUPPORTED', 'corrupt', 'y')).toBeInstanceOf(TidemarkError);
    for (const f of [new PackFormatError('truncated', 'p'), new IndexFormatError('corrupt', 'i')]) {
      expect(f).toBeInstanceOf(TidemarkError);
      expect(f.code).toBe('REPOSITORY_CORRUPT');
    }
  });

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
