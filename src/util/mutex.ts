/** A FIFO async mutex: operations on one object run one after another, never interleaved. */
export class Mutex {
  private tail: Promise<unknown> = Promise.resolve();

  run<T>(fn: () => Promise<T>): Promise<T> {
    const result = this.tail.then(fn, fn);
    this.tail = result.catch(() => undefined);
    return result;
  }
}

/** One mutex per key (per VM). */
export class KeyedMutex {
  private locks = new Map<string, Mutex>();

  run<T>(key: string, fn: () => Promise<T>): Promise<T> {
    let m = this.locks.get(key);
    if (!m) this.locks.set(key, (m = new Mutex()));
    return m.run(fn);
  }
}
