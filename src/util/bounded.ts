/**
 * The one bounded-concurrency helper: runs `fn` over `items` with at most `limit` calls in flight, items taken in
 * order as runners free up (an iterable is pulled lazily, so a generator can end the run early). `worker` is the
 * runner's number (0 to limit-1), for state a runner reuses across its items, such as a read buffer. The first
 * failure stops new calls from starting; the ones running are awaited, then that failure is thrown.
 */
export async function forEachBounded<T>(
  items: Iterable<T> | AsyncIterable<T>,
  limit: number,
  fn: (item: T, worker: number) => Promise<void>,
): Promise<void> {
  const it =
    Symbol.asyncIterator in items
      ? (items as AsyncIterable<T>)[Symbol.asyncIterator]()
      : (items as Iterable<T>)[Symbol.iterator]();
  let failed = false;
  let failure: unknown;
  const runner = async (worker: number) => {
    while (!failed) {
      const next = await it.next();
      if (next.done) return;
      try {
        await fn(next.value, worker);
      } catch (err) {
        if (!failed) {
          failed = true;
          failure = err;
        }
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.floor(limit)) }, (_, worker) => runner(worker)));
  if (failed) throw failure;
}

/**
 * `fn` over `items` as `forEachBounded` runs it, the results in the items' order. On a failure, `done` (when given)
 * gets each result that was made, so a caller can undo them (close what was opened), and the failure is thrown.
 */
export async function mapBounded<T, R>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<R>,
  done?: (made: R[]) => Promise<void>,
): Promise<R[]> {
  const out: R[] = new Array(items.length);
  const made = new Set<number>();
  try {
    await forEachBounded(items.keys(), limit, async (i) => {
      out[i] = await fn(items[i]);
      made.add(i);
    });
  } catch (err) {
    await done?.([...made].map((i) => out[i]));
    throw err;
  }
  return out;
}

/**
 * At most `budget` bytes of work in flight at once (an oversized item runs alone): for reading disk indexes, whose
 * slot tables reach 512 MiB, side by side without holding several such at once.
 */
export class MemoryBudget {
  private inFlight = 0;
  private readonly waiting: (() => void)[] = [];

  constructor(private readonly budget: number) {}

  async run<T>(bytes: number, fn: () => Promise<T>): Promise<T> {
    while (this.inFlight > 0 && this.inFlight + bytes > this.budget) {
      await new Promise<void>((resolve) => this.waiting.push(resolve));
    }
    this.inFlight += bytes;
    try {
      return await fn();
    } finally {
      this.inFlight -= bytes;
      for (const w of this.waiting.splice(0)) w();
    }
  }
}
