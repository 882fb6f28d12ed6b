/**
 * Admission control for a disk's I/O: operations run freely until someone pauses the gate; then new
 * operations wait, and `pause` resolves once the ones already running have finished. The host pauses a
 * VM's disks to cut a checkpoint (switch onto new children) and resumes them a few milliseconds later,
 * without the NBD clients noticing more than a delay.
 */
export class IoGate {
  private inFlight = 0;
  private paused = 0;
  private drained: (() => void)[] = [];
  private waiting: (() => void)[] = [];

  /** Runs `fn` as one I/O operation. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    while (this.paused > 0) await new Promise<void>((resolve) => this.waiting.push(resolve));
    this.inFlight++;
    try {
      return await fn();
    } finally {
      this.inFlight--;
      if (this.inFlight === 0 && this.drained.length > 0) {
        for (const wake of this.drained.splice(0)) wake();
      }
    }
  }

  /** Stops admitting new I/O and waits for the running operations to finish. Pauses nest. */
  async pause(): Promise<void> {
    this.paused++;
    if (this.inFlight > 0) await new Promise<void>((resolve) => this.drained.push(resolve));
  }

  resume(): void {
    if (this.paused === 0) return;
    this.paused--;
    if (this.paused === 0) for (const wake of this.waiting.splice(0)) wake();
  }

  get isPaused(): boolean {
    return this.paused > 0;
  }

  get running(): number {
    return this.inFlight;
  }
}
