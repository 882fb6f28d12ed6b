/**
 * The framing and message layer of the guest channel, without sockets: line splitting with the 0xFF flush,
 * the agent-side object splitter, the caps that keep memory bounded, and the message parsers.
 */
import { describe, expect, it } from 'vitest';
import { parseRequest } from '../../src/guest/agent.js';
import { JsonObjectSplitter, LineDecoder, type LineEvent, type SplitEvent } from '../../src/guest/framing.js';
import { encodeRequest, errorFromAgent, parseResponse } from '../../src/guest/protocol.js';
import { rng, seedFrom } from '../helpers/random.js';

const SEED = seedFrom('TIDEMARK_GUEST_SEED', 4242);
const CASES = Number(process.env.TIDEMARK_GUEST_CASES ?? 200);

const b = (s: string) => Buffer.from(s, 'latin1');

function feed<E>(push: (c: Buffer) => E[], chunks: Buffer[]): E[] {
  return chunks.flatMap((c) => push(c));
}

/** Cuts `buf` at random points (some empty pieces, some single bytes). */
function randomChunks(buf: Buffer, r: ReturnType<typeof rng>): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  while (pos < buf.length) {
    const n = r.next() < 0.3 ? r.int(3) : r.int(40);
    out.push(buf.subarray(pos, pos + n));
    pos += n;
  }
  return out;
}

describe('LineDecoder', () => {
  it('splits lines, strips CR, skips blank lines, keeps a partial line for the next chunk', () => {
    const d = new LineDecoder();
    expect(d.push(b('{"return": 1}\n{"ret'))).toEqual([{ kind: 'line', text: '{"return": 1}' }]);
    expect(d.pendingBytes).toBe(5);
    expect(d.push(b('urn": 2}\r\n\n  \n'))).toEqual([{ kind: 'line', text: '{"return": 2}' }]);
    expect(d.pendingBytes).toBe(0);
  });

  it('0xFF drops the partial line before it and is reported with what it dropped', () => {
    const d = new LineDecoder();
    const ev = d.push(b('{"return": {"half\xff{"return": 7}\n'));
    expect(ev).toEqual([
      { kind: 'delimiter', discardedBytes: 17 },
      { kind: 'line', text: '{"return": 7}' },
    ]);
  });

  it('caps a line: reports overflow once when the cap is crossed, skips to the line end, then reads on', () => {
    const d = new LineDecoder(32);
    const ev = feed((c) => d.push(c), [b('x'.repeat(20)), b('y'.repeat(20)), b('z'.repeat(1000)), b('\nok\n')]);
    expect(ev).toEqual([
      { kind: 'overflow', discardedBytes: 40 },
      { kind: 'line', text: 'ok' },
    ]);
    expect(d.pendingBytes).toBe(0);
  });

  it('a 0xFF also ends the skipping of an over-long line', () => {
    const d = new LineDecoder(8);
    const ev = d.push(b('0123456789abc\xff{"a":1}\n'));
    expect(ev.map((e) => e.kind)).toEqual(['overflow', 'delimiter', 'line']);
    expect(ev[2]).toEqual({ kind: 'line', text: '{"a":1}' });
  });

  it('never holds more than the cap, whatever arrives (memory stays bounded)', () => {
    const d = new LineDecoder(1024);
    for (let i = 0; i < 100; i++) {
      d.push(Buffer.alloc(4096, 0x41));
      expect(d.pendingBytes).toBeLessThanOrEqual(1024);
    }
  });

  it(`gives the same events however the stream is cut (seed ${SEED}, ${CASES} cases)`, () => {
    const r = rng(SEED);
    const pieces = ['{"return": 1}\n', '{"error": {"class": "GenericError", "desc": "x"}}\r\n', '\xff', 'junk', '\n'];
    for (let c = 0; c < CASES; c++) {
      const stream = b(Array.from({ length: 1 + r.int(12) }, () => r.pick(pieces)).join(''));
      const whole = new LineDecoder(40).push(stream);
      const d = new LineDecoder(40);
      const cut = feed((x) => d.push(x), randomChunks(stream, r));
      // Overflow counts depend on where the cap is crossed; kinds and lines do not.
      const norm = (evs: LineEvent[]) => evs.map((e) => (e.kind === 'line' ? e.text : e.kind));
      expect(norm(cut), `case ${c}: ${JSON.stringify(stream.toString('latin1'))}`).toEqual(norm(whole));
    }
  });
});

describe('JsonObjectSplitter (what an agent reads)', () => {
  const values = (evs: SplitEvent[]) => evs.map((e) => (e.kind === 'value' || e.kind === 'garbage' ? e.text : e.kind));

  it('finds objects back to back, across lines, and with braces and escapes inside strings', () => {
    const s = new JsonObjectSplitter();
    const input =
      '{"execute":"guest-ping"}{"execute":"guest-ping"}\n{\n "execute"\n:\n"guest-info"\n}' +
      '{"execute":"x","arguments":{"s":"}{][\\"\\\\"}}';
    expect(values(s.push(b(input)))).toEqual([
      '{"execute":"guest-ping"}',
      '{"execute":"guest-ping"}',
      '{\n "execute"\n:\n"guest-info"\n}',
      '{"execute":"x","arguments":{"s":"}{][\\"\\\\"}}',
    ]);
  });

  it('reports top-level noise as garbage tokens and resumes at the next object', () => {
    const s = new JsonObjectSplitter();
    expect(values(s.push(b('garbage here "str" 12 ] {"a":1}\n')))).toEqual([
      'garbage',
      'here',
      '"str"',
      '12',
      ']',
      '{"a":1}',
    ]);
  });

  it('0xFF flushes a partial object (the client resync) and the next object is read cleanly', () => {
    const s = new JsonObjectSplitter();
    const ev = s.push(b('{"execute":"guest-ping"\n\xff{"execute":"guest-sync","arguments":{"id":5}}'));
    expect(ev).toEqual([
      { kind: 'flush', discardedBytes: 24 },
      { kind: 'value', text: '{"execute":"guest-sync","arguments":{"id":5}}' },
    ]);
  });

  it('without 0xFF a partial object swallows what follows (as in qemu-ga: why clients send 0xFF)', () => {
    const s = new JsonObjectSplitter();
    expect(s.push(b('{"execute":"guest-ping"\n{"execute":"guest-ping"}\n'))).toEqual([]);
    expect(s.pendingBytes).toBeGreaterThan(0);
  });

  it('an object over the cap is reported and skipped to the end of its line', () => {
    const s = new JsonObjectSplitter(64);
    const ev = s.push(b(`{"execute":"${'a'.repeat(100)}"}\n{"execute":"guest-ping"}`));
    expect(values(ev)).toEqual(['overflow', '{"execute":"guest-ping"}']);
    expect(s.pendingBytes).toBe(0);
  });

  it('refuses nesting deeper than the limit before buffering it', () => {
    const s = new JsonObjectSplitter(1 << 20, 16);
    const ev = s.push(b('['.repeat(100_000) + '\n{"a":1}'));
    expect(values(ev)).toEqual(['overflow', '{"a":1}']);
  });

  it(`gives the same values however the stream is cut (seed ${SEED}, ${CASES} cases)`, () => {
    const r = rng(SEED + 1);
    const pieces = ['{"execute":"guest-ping"}', '{"a":{"b":"}\\""}}', ' ', '\n', 'noise', '\xff', '[1,[2]]', '"s"'];
    for (let c = 0; c < CASES; c++) {
      const stream = b(Array.from({ length: 1 + r.int(12) }, () => r.pick(pieces)).join(''));
      const whole = values(new JsonObjectSplitter().push(stream)).filter((v) => v !== 'flush');
      const s = new JsonObjectSplitter();
      const cut = values(feed((x) => s.push(x), randomChunks(stream, r))).filter((v) => v !== 'flush');
      expect(cut, `case ${c}: ${JSON.stringify(stream.toString('latin1'))}`).toEqual(whole);
    }
  });

  it('survives random bytes without throwing and without holding more than the cap', () => {
    const r = rng(SEED + 2);
    const s = new JsonObjectSplitter(4096, 64);
    for (let i = 0; i < 200; i++) {
      s.push(r.bytes(1 + r.int(2048)));
      expect(s.pendingBytes).toBeLessThanOrEqual(4096);
    }
  });
});

describe('messages', () => {
  it('parses answers and tells garbage apart, with a reason', () => {
    expect(parseResponse('{"return": {}, "id": "tidemark-3"}')).toEqual({
      kind: 'return',
      value: {},
      id: 'tidemark-3',
    });
    expect(parseResponse('{"error": {"class": "CommandNotFound", "desc": "d"}}')).toEqual({
      kind: 'error',
      error: { class: 'CommandNotFound', desc: 'd' },
      id: undefined,
    });
    expect(parseResponse('{"return": 1').kind).toBe('garbage');
    expect(parseResponse('[1]')).toEqual({ kind: 'garbage', reason: 'not a JSON object' });
    expect(parseResponse('{"error": "x"}').kind).toBe('garbage');
    expect(parseResponse('{"event": "X"}').kind).toBe('garbage');
  });

  it('encodes one request per line', () => {
    expect(encodeRequest('guest-sync', { id: 9 }, 'a').toString()).toBe(
      '{"execute":"guest-sync","arguments":{"id":9},"id":"a"}\n',
    );
  });

  it('maps the agent error classes to codes, with a cannotFreeze reason for freeze', () => {
    const disabled = errorFromAgent('guest-fsfreeze-freeze', {
      class: 'CommandNotFound',
      desc: 'Command guest-fsfreeze-freeze has been disabled',
    });
    expect(disabled.code).toBe('NOT_SUPPORTED');
    expect(disabled.agentClass).toBe('CommandNotFound');
    expect(disabled.cannotFreeze).toMatch(/has guest-fsfreeze-freeze disabled/);
    const failed = errorFromAgent('guest-fsfreeze-thaw', { class: 'GenericError', desc: 'hook failed' });
    expect(failed.code).toBe('GUEST_AGENT_ERROR');
    expect(failed.cannotFreeze).toBeUndefined();
    expect(failed.message).toBe('the guest agent failed guest-fsfreeze-thaw: hook failed (GenericError)');
  });

  it('checks requests the way QEMU does', () => {
    expect(parseRequest('{"execute":"guest-ping","id":1}')).toEqual({ execute: 'guest-ping', args: undefined, id: 1 });
    expect(parseRequest('{}')).toMatchObject({ error: { desc: "QMP input lacks member 'execute'" } });
    expect(parseRequest('{"execute":5}')).toMatchObject({
      error: { desc: "QMP input member 'execute' must be a string" },
    });
    expect(parseRequest('{"execute":"x","arguments":null}')).toMatchObject({
      error: { desc: "QMP input member 'arguments' must be an object" },
    });
    expect(parseRequest('{"exec-oob":"x"}')).toMatchObject({
      error: { desc: "QMP input member 'exec-oob' is unexpected" },
    });
    expect(parseRequest('[1]')).toMatchObject({ error: { desc: 'QMP input must be a JSON object' } });
  });
});
