import net from 'node:net';
import { describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { describeError } from '../../src/util/describe-error.js';

describe('describeError: never an empty line', () => {
  it('messages as they are, on one line', () => {
    expect(describeError(new TidemarkError('CONFLICT', 'vm v is busy'))).toBe('vm v is busy');
    expect(describeError(new Error('a\n  b'))).toBe('a b');
    expect(describeError('plain')).toBe('plain');
  });

  it('errors without a message say what they are', () => {
    expect(describeError(new Error())).toBe('Error (no message)');
    expect(describeError(Object.assign(new Error(''), { code: 'ECONNRESET' }))).toBe('Error ECONNRESET (no message)');
    expect(describeError(undefined)).toBe('unknown error (no message)');
    expect(describeError('')).toBe('unknown error (no message)');
  });

  it('an AggregateError with no message of its own: its errors, once each', () => {
    const e = new AggregateError([
      new Error('connect ECONNREFUSED ::1:9'),
      new Error('connect ECONNREFUSED 127.0.0.1:9'),
    ]);
    expect(e.message).toBe('');
    expect(describeError(e)).toBe('connect ECONNREFUSED ::1:9; connect ECONNREFUSED 127.0.0.1:9');
    expect(describeError(new AggregateError([new Error('x'), new Error('x')]))).toBe('x');
  });

  it('a real failed connect to localhost is described', async () => {
    // A port nothing listens on: Node tries every address of localhost and may report them together.
    const server = net.createServer();
    await new Promise<void>((r) => server.listen(0, '127.0.0.1', r));
    const port = (server.address() as net.AddressInfo).port;
    await new Promise<void>((r) => server.close(() => r()));
    const err = await new Promise<unknown>((resolve) => {
      const s = net.connect({ host: 'localhost', port, autoSelectFamily: true });
      s.on('error', resolve);
      s.on('connect', () => resolve(undefined));
    });
    expect(err).toBeInstanceOf(Error);
    expect(describeError(err)).toMatch(/ECONNREFUSED/);
  });
});
