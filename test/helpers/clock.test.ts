/** The ManualClock the time-limit tests drive: order of timers, advance, run, and sleep's abort. */
import { describe, expect, it } from 'vitest';
import { systemClock } from '../../src/util/clock.js';
import { ManualClock } from './clock.js';

describe('ManualClock', () => {
  it('fires timers in time order (ties in the order set) as advance passes them; cancelled ones never', async () => {
    const c = new ManualClock();
    const seen: string[] = [];
    c.setTimeout(() => seen.push(`b@${c.now()}`), 20);
    c.setTimeout(() => seen.push(`a@${c.now()}`), 10);
    c.setTimeout(() => seen.push(`c@${c.now()}`), 20);
    c.setTimeout(() => seen.push('never'), Infinity);
    c.setTimeout(() => seen.push('cancelled'), 5).cancel();
    await c.advance(15);
    expect(seen).toEqual(['a@10']);
    expect(c.now()).toBe(15);
    await c.advance(100);
    expect(seen).toEqual(['a@10', 'b@20', 'c@20']);
    expect(c.now()).toBe(115);
    expect(c.timers).toBe(0);
  });

  it('lets the code react to one timer before the next fires', async () => {
    const c = new ManualClock();
    const seen: number[] = [];
    void (async () => {
      await c.sleep(10);
      seen.push(c.now());
      await c.sleep(10); // set at 10, so due at 20, within the same advance
      seen.push(c.now());
    })();
    await c.advance(25);
    expect(seen).toEqual([10, 20]);
  });

  it('run drives a promise to its end and says so when it can never end', async () => {
    const c = new ManualClock();
    const work = (async () => {
      await c.sleep(1_000);
      await c.sleep(60_000);
      return 'done';
    })();
    expect(await c.run(work)).toBe('done');
    expect(c.now()).toBe(61_000);
    await expect(c.run(new Promise(() => undefined))).rejects.toThrow(/still waiting at 61000 ms/);
    await expect(c.run(Promise.reject(new Error('boom')))).rejects.toThrow('boom');
  });

  it('sleep rejects with an AbortError on its signal, as the system clock does', async () => {
    const c = new ManualClock();
    const ac = new AbortController();
    c.setTimeout(() => ac.abort(), 50);
    await expect(c.run(c.sleep(10_000, ac.signal))).rejects.toMatchObject({ name: 'AbortError' });
    expect(c.now()).toBe(50);
    expect(c.timers).toBe(0);
    await expect(c.sleep(1, ac.signal)).rejects.toMatchObject({ name: 'AbortError' });
    await expect(systemClock.sleep(10_000, ac.signal)).rejects.toMatchObject({ name: 'AbortError' });
  });
});
