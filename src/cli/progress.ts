/**
 * Progress for long commands: bars with throughput and time left on a terminal (cli-progress), nothing on
 * a pipe or in a log (where the command prints its quiet summary lines instead).
 */
import cliProgress from 'cli-progress';

export interface Progress {
  /** Reports `done` of `total` bytes for the item `key` (a disk). */
  update(key: string, done: number, total: number): void;
  stop(): void;
}

export function progressBars(enabled = process.stderr.isTTY === true): Progress {
  if (!enabled) return { update() {}, stop() {} };
  const multi = new cliProgress.MultiBar(
    {
      stream: process.stderr,
      format: ' {key} [{bar}] {percentage}% | {rate} MiB/s | {eta_formatted} left',
      hideCursor: true,
      clearOnComplete: false,
      etaBuffer: 50,
    },
    cliProgress.Presets.shades_classic,
  );
  const bars = new Map<string, { bar: cliProgress.SingleBar; start: number }>();
  return {
    update(key, done, total) {
      let b = bars.get(key);
      if (!b) bars.set(key, (b = { bar: multi.create(Math.max(total, 1), 0, { key, rate: '0' }), start: Date.now() }));
      const secs = (Date.now() - b.start) / 1000;
      b.bar.setTotal(Math.max(total, 1));
      b.bar.update(done, { key, rate: secs > 0 ? (done / secs / 2 ** 20).toFixed(0) : '0' });
    },
    stop() {
      multi.stop();
    },
  };
}
