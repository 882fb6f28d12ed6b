/** The memory budget verify and gc read disk indexes under: never more than the budget in flight, but never stuck. */
import { describe, expect, it } from 'vitest';
import { forEachBounded, MemoryBudget } from '../../src/repository/bounded.js';
import { rng, seedFrom } from '../helpers/random.js';

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
        await new Promise((resolve) => setTimeout(resolve, r.int(3)));
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
