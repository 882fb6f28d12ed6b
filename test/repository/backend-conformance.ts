/**
 * The contract every repository backend keeps (src/repository/backend.ts), as one suite each backend runs:
 * `testBackend('local directory', async () => ({ backend, cleanup }))`. An S3 backend adds one line.
 */
import { describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import type { Backend } from '../../src/repository/backend.js';
import { rng } from '../helpers/random.js';

export interface BackendFixture {
  backend: Backend;
  cleanup: () => Promise<void>;
}

async function collect(b: Backend, prefix: string): Promise<Map<string, number>> {
  const out = new Map<string, number>();
  for await (const o of b.list(prefix)) {
    expect(out.has(o.key), `list yields ${o.key} once`).toBe(false);
    out.set(o.key, o.size);
  }
  return out;
}

async function codeOf(p: Promise<unknown>): Promise<string | null> {
  try {
    await p;
    return null;
  } catch (err) {
    expect(err).toBeInstanceOf(TidemarkError);
    return (err as TidemarkError).code;
  }
}

export function testBackend(name: string, make: () => Promise<BackendFixture>): void {
  const withBackend = (fn: (b: Backend) => Promise<void>) => async () => {
    const { backend, cleanup } = await make();
    try {
      await fn(backend);
    } finally {
      await backend.close();
      await cleanup();
    }
  };

  describe(`backend conformance: ${name}`, () => {
    it(
      'put then get returns the same bytes; empty and multi-MiB objects too',
      withBackend(async (b) => {
        const r = rng(1);
        for (const [key, size] of [
          ['a', 0],
          ['b/c', 1],
          ['chunks/ab/abcdef', 4096],
          ['big/one', 5 * 2 ** 20 + 3],
        ] as const) {
          const data = r.bytes(size);
          await b.put(key, data);
          expect((await b.get(key)).equals(data), key).toBe(true);
        }
      }),
    );

    it(
      'get of a missing key is NOT_FOUND; exists and stat say so too',
      withBackend(async (b) => {
        expect(await codeOf(b.get('nothing/here'))).toBe('NOT_FOUND');
        expect(await b.exists('nothing/here')).toBe(false);
        expect(await b.stat('nothing/here')).toBeNull();
        await b.put('x/y', Buffer.from('hello'));
        expect(await b.exists('x/y')).toBe(true);
        // A "directory" of keys is not an object.
        expect(await b.exists('x')).toBe(false);
        expect(await codeOf(b.get('x'))).toBe('NOT_FOUND');
        const st = await b.stat('x/y');
        expect(st?.size).toBe(5);
        expect(st?.key).toBe('x/y');
        expect(Math.abs((st?.mtimeMs ?? 0) - Date.now())).toBeLessThan(60_000);
      }),
    );

    it(
      'put replaces an object; delete removes it and is idempotent',
      withBackend(async (b) => {
        await b.put('k', Buffer.from('one'));
        await b.put('k', Buffer.from('second'));
        expect((await b.get('k')).toString()).toBe('second');
        await b.delete('k');
        expect(await b.exists('k')).toBe(false);
        await b.delete('k');
        await b.delete('never/was');
      }),
    );

    it(
      'get with maxBytes refuses a larger object with LIMIT_EXCEEDED (and allows one of exactly that size)',
      withBackend(async (b) => {
        await b.put('sized', Buffer.alloc(1000, 1));
        expect(await codeOf(b.get('sized', { maxBytes: 999 }))).toBe('LIMIT_EXCEEDED');
        expect((await b.get('sized', { maxBytes: 1000 })).length).toBe(1000);
      }),
    );

    it(
      'get with a range reads exactly those bytes, fewer at the end of the object; maxBytes bounds the range',
      withBackend(async (b) => {
        const data = Buffer.from(Array.from({ length: 5000 }, (_, i) => (i * 7) & 0xff));
        await b.put('ranged', data);
        expect(
          (await b.get('ranged', { range: { offset: 1234, length: 100 } })).equals(data.subarray(1234, 1334)),
        ).toBe(true);
        expect((await b.get('ranged', { range: { offset: 4990, length: 100 } })).equals(data.subarray(4990))).toBe(
          true,
        );
        expect((await b.get('ranged', { range: { offset: 6000, length: 10 } })).length).toBe(0);
        expect(await codeOf(b.get('ranged', { range: { offset: 0, length: 100 }, maxBytes: 99 }))).toBe(
          'LIMIT_EXCEEDED',
        );
        expect(await codeOf(b.get('not/there', { range: { offset: 0, length: 1 } }))).toBe('NOT_FOUND');
      }),
    );

    it(
      'list yields every key under a prefix with its size, and nothing else',
      withBackend(async (b) => {
        const keys = [
          'chunks/00/0011',
          'chunks/00/0022',
          'chunks/ff/ff33',
          'indexes/aa',
          'points/p1',
          'config',
          'chunksx',
        ];
        for (const [i, k] of keys.entries()) await b.put(k, Buffer.alloc(i + 1));
        const chunks = await collect(b, 'chunks/');
        expect([...chunks.keys()].sort()).toEqual(['chunks/00/0011', 'chunks/00/0022', 'chunks/ff/ff33']);
        expect(chunks.get('chunks/ff/ff33')).toBe(3);
        expect([...(await collect(b, 'chunks/00/')).keys()].sort()).toEqual(['chunks/00/0011', 'chunks/00/0022']);
        expect([...(await collect(b, 'chunks/00/002')).keys()]).toEqual(['chunks/00/0022']);
        expect([...(await collect(b, 'chunks')).keys()].sort()).toEqual([
          'chunks/00/0011',
          'chunks/00/0022',
          'chunks/ff/ff33',
          'chunksx',
        ]);
        expect([...(await collect(b, '')).keys()].sort()).toEqual([...keys].sort());
        expect((await collect(b, 'nothing/')).size).toBe(0);
        await b.delete('chunks/00/0011');
        expect([...(await collect(b, 'chunks/00/')).keys()]).toEqual(['chunks/00/0022']);
      }),
    );

    it(
      'refuses keys that could leave the backend or hide: absolute, dot segments, empty segments, hidden names',
      withBackend(async (b) => {
        for (const bad of [
          '',
          '/abs',
          '../up',
          'a/../b',
          'a//b',
          'a/',
          '.hidden',
          'a/.tmp',
          'a/./b',
          'sp ace',
          'a\\b',
        ]) {
          expect(await codeOf(b.put(bad, Buffer.from('x'))), JSON.stringify(bad)).toBe('INVALID_ARGUMENT');
          expect(await codeOf(b.get(bad)), JSON.stringify(bad)).toBe('INVALID_ARGUMENT');
        }
        for (const bad of ['/', '../', '.t', 'a//']) {
          expect(await codeOf(collect(b, bad)), JSON.stringify(bad)).toBe('INVALID_ARGUMENT');
        }
      }),
    );

    it(
      'put is atomic: concurrent readers of a key being replaced see one whole version or the other',
      withBackend(async (b) => {
        const size = 512 * 1024;
        const versions = [0x11, 0x22, 0x33, 0x44].map((v) => Buffer.alloc(size, v));
        await b.put('hot', versions[0]);
        let stop = false;
        let reads = 0;
        const reader = async () => {
          while (!stop) {
            const got = await b.get('hot');
            const whole = versions.find((v) => v[0] === got[0]);
            expect(whole !== undefined && got.equals(whole), 'one whole version').toBe(true);
            reads++;
          }
        };
        const writer = async () => {
          for (let i = 0; i < 24; i++) await b.put('hot', versions[i % versions.length]);
          stop = true;
        };
        await Promise.all([reader(), reader(), writer()]);
        expect(reads).toBeGreaterThan(0);
        // Leftovers of puts are not objects.
        expect([...(await collect(b, '')).keys()]).toEqual(['hot']);
      }),
    );

    it(
      'concurrent puts of different keys all land; sync() succeeds after them',
      withBackend(async (b) => {
        const r = rng(2);
        const objs = Array.from(
          { length: 64 },
          (_, i) => [`chunks/${(i % 16).toString(16).padStart(2, '0')}/${i}`, r.bytes(100 + i)] as const,
        );
        await Promise.all(objs.map(([k, d]) => b.put(k, d)));
        await b.sync();
        for (const [k, d] of objs) expect((await b.get(k)).equals(d)).toBe(true);
        expect((await collect(b, 'chunks/')).size).toBe(64);
        await b.put('durable', Buffer.from('now'), { sync: true });
        expect((await b.get('durable')).toString()).toBe('now');
      }),
    );
  });
}
