/**
 * Runs `fn` over `items` with at most `limit` calls in flight. The first failure stops new calls from starting;
 * the ones running are awaited, then that failure is thrown.
 */
export async function forEachBounded<T>(
  items: Iterable<T> | AsyncIterable<T>,
  limit: number,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  const it =
    Symbol.asyncIterator in items
      ? (items as AsyncIterable<T>)[Symbol.asyncIterator]()
      : (items as Iterable<T>)[Symbol.iterator]();
  let failed = false;
  let failure: unknown;
  const runner = async () => {
    while (!failed) {
      const next = await it.next();
      if (next.done) return;
      try {
        await fn(next.value);
      } catch (err) {
        if (!failed) {
          failed = true;
          failure = err;
        }
      }
    }
  };
  await Promise.all(Array.from({ length: Math.max(1, Math.floor(limit)) }, runner));
  if (failed) throw failure;
}
