/**
 * A readers-writer lock for async code: many readers at once, or one writer. Writers are not starved:
 * once a writer waits, new readers queue behind it.
 */
export class RwLock {
  private readers = 0;
  private writer = false;
  private queue: { exclusive: boolean; grant: () => void }[] = [];

  async shared<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(false);
    try {
      return await fn();
    } finally {
      this.release(false);
    }
  }

  async exclusive<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire(true);
    try {
      return await fn();
    } finally {
      this.release(true);
    }
  }

  private acquire(exclusive: boolean): Promise<void> {
    if (this.queue.length === 0 && !this.writer && (!exclusive || this.readers === 0)) {
      if (exclusive) this.writer = true;
      else this.readers++;
      return Promise.resolve();
    }
    return new Promise((grant) => this.queue.push({ exclusive, grant }));
  }

  private release(exclusive: boolean): void {
    if (exclusive) this.writer = false;
    else this.readers--;
    while (this.queue.length > 0 && !this.writer) {
      const next = this.queue[0];
      if (next.exclusive) {
        if (this.readers > 0) break;
        this.writer = true;
      } else {
        this.readers++;
      }
      this.queue.shift();
      next.grant();
    }
  }
}
