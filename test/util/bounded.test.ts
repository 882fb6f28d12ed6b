/** The memory budget verify and gc read disk indexes under: never more than the budget in flight, but never stuck. */
import { describe, expect, it } from 'vitest';
import { forEachBounded, MemoryBudget } from '../../src/util/bounded.js';
import { rng, seedFrom } from '../helpers/random.js';
import { sleep } from '../helpers/async.js';

const SEED = seedFrom('TIDEMARK_REPO_SEED', 4242);

describe('MemoryBudget', () => {
  it(`keeps what is in flight within the budget; an item larger than the budget runs alone (seed ${SEED})`, async () => {
    const r = rng(SEED);
    const budget = new MemoryBudget(100);
    let inFlight = 0;
    let peak = 0;
    let aloneOk = true;
    const sizes = Array.from({ length: 200 }, () => (r.int(10) === 0 ? 150 + r.int(100) : 1 + r.int(60)));
    let done = 0;
    await forEachBounded(sizes, 8, (size) =>
      budget.run(size, async () => {
        inFlight += size;
        if (size > 100 && inFlight !== size) aloneOk = false;
        if (size <= 100) peak = Math.max(peak, inFlight);
        await sleep(r.int(3));
        inFlight -= size;
        done++;
      }),
    );
    expect(done).toBe(sizes.length);
    expect(peak).toBeLessThanOrEqual(100);
    expect(aloneOk).toBe(true);
  });

  it('a failure inside frees its share', async () => {
    const budget = new MemoryBudget(10);
    await expect(budget.run(8, () => Promise.reject(new Error('boom')))).rejects.toThrow('boom');
    expect(await budget.run(10, async () => 'ran')).toBe('ran');
  });
});

describe('forEachBounded', () => {
  it(`keeps at most limit calls in flight, each runner's number in [0, limit) and never shared (seed ${SEED})`, async () => {
    const r = rng(SEED);
    const busy = new Set<number>();
    let peak = 0;
    let shared = false;
    const seen: number[] = [];
    await forEachBounded(
      Array.from({ length: 100 }, (_, i) => i),
      4,
      async (item, worker) => {
        if (busy.has(worker) || worker < 0 || worker >= 4) shared = true;
        busy.add(worker);
        peak = Math.max(peak, busy.size);
        await sleep(r.int(3));
        busy.delete(worker);
        seen.push(item);
      },
    );
    expect(shared).toBe(false);
    expect(peak).toBeLessThanOrEqual(4);
    expect([...seen].sort((a, b) => a - b)).toEqual(Array.from({ length: 100 }, (_, i) => i));
  });

  it('the first failure stops new calls, awaits the running ones, then is thrown', async () => {
    const started: number[] = [];
    let finished = 0;
    const run = forEachBounded([0, 1, 2, 3, 4, 5, 6, 7], 2, async (item) => {
      started.push(item);
      if (item === 1) throw new Error('boom');
      await sleep(5);
      finished++;
    });
    await expect(run).rejects.toThrow('boom');
    expect(started).toEqual([0, 1]);
    expect(finished).toBe(1);
  });

  it('a generator that returns ends the run early', async () => {
    const done: number[] = [];
    function* firstThree() {
      for (const i of [0, 1, 2, 3, 4]) {
        if (done.length >= 3) return;
        yield i;
      }
    }
    await forEachBounded(firstThree(), 1, async (i) => {
      done.push(i);
    });
    expect(done).toEqual([0, 1, 2]);
  });
});
