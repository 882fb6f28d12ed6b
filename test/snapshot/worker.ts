/**
 * Runs snapshot-worker.mjs (a separate process taking a snapshot through the built engine) from a private
 * copy of dist/, so a rebuild by someone else mid-run cannot change what the worker loads.
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll } from 'vitest';
import { copyEngine, copyWorkerScripts } from '../helpers/engine-copy.js';

const here = path.dirname(fileURLToPath(import.meta.url));
const DIST = path.resolve(process.env.TIDEMARK_SNAPSHOT_DIST ?? path.join(here, '../../dist'));

/** What snapshot-worker.mjs is told (JSON in argv). */
export interface WorkerConfig {
  provider: string;
  files: string[];
  root: string;
  seed: number;
  ops: number;
  /** Upper bound of file sizes the plan works with (worker-plan.mjs). */
  maxSize: number;
  extentSize?: number;
  /** The worker kills itself instead of issuing operation k (0-based). */
  killAtOp?: number;
  /** After the last operation, keep the snapshot and wait to be killed. */
  hold?: boolean;
}

export interface WorkerRun {
  readonly pid: number;
  /** Operations completed (OP lines seen). */
  readonly completed: number;
  /** The snapshot's stats() printed on DONE. */
  readonly stats: { diffAreaBytes: number; preservedExtents: number } | undefined;
  readonly crashedAt: number | undefined;
  /** Resolves when the worker has said `line` (a prefix), rejects if it exits first. */
  waitFor(prefix: string): Promise<string>;
  /** SIGKILL, then wait for the exit. */
  kill(): Promise<void>;
  /** Resolves with the exit once the worker is gone. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>;
}

let copy: string | undefined;
function workerPath(): string {
  if (!copy) {
    if (!existsSync(path.join(DIST, 'snapshot/index.js')))
      throw new Error(`${DIST}/snapshot is missing: run \`npm run build\` first (npm test does)`);
    copy = mkdtempSync(path.join(os.tmpdir(), 'tidemark-snapworker-'));
    copyEngine(DIST, copy);
    copyWorkerScripts(copy, ['test/snapshot/snapshot-worker.mjs', 'test/snapshot/worker-plan.mjs']);
  }
  return copy;
}
// Vitest ends its fork workers without an 'exit' event: remove the copy after each test file.
afterAll(() => {
  if (copy) rmSync(copy, { recursive: true, force: true });
  copy = undefined;
});

export function startWorker(cfg: WorkerConfig): WorkerRun {
  const dir = workerPath();
  const child = spawn(
    process.execPath,
    [path.join(dir, 'test/snapshot/snapshot-worker.mjs'), JSON.stringify({ ...cfg, dist: path.join(dir, 'dist') })],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let completed = 0;
  let stats: WorkerRun['stats'];
  let crashedAt: number | undefined;
  let stderr = '';
  let buf = '';
  const lines: string[] = [];
  const waiters: { prefix: string; resolve: (l: string) => void; reject: (e: Error) => void }[] = [];
  let closed = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null; stderr: string }>((resolve) => {
    child.on('close', (code, signal) => {
      closed = true;
      for (const w of waiters.splice(0))
        w.reject(new Error(`worker exited (${code ?? signal}) before "${w.prefix}": ${stderr}`));
      resolve({ code, signal, stderr });
    });
  });
  child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    buf += d;
    for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
      const line = buf.slice(0, nl);
      buf = buf.slice(nl + 1);
      lines.push(line);
      if (line.startsWith('OP ')) completed = Number(line.slice(3)) + 1;
      else if (line.startsWith('DONE ')) stats = JSON.parse(line.slice(5));
      else if (line.startsWith('CRASH ')) crashedAt = Number(line.slice(6));
      for (let i = waiters.length - 1; i >= 0; i--) {
        if (line.startsWith(waiters[i].prefix)) waiters.splice(i, 1)[0].resolve(line);
      }
    }
  });
  return {
    pid: child.pid!,
    get completed() {
      return completed;
    },
    get stats() {
      return stats;
    },
    get crashedAt() {
      return crashedAt;
    },
    waitFor(prefix) {
      const seen = lines.find((l) => l.startsWith(prefix));
      if (seen) return Promise.resolve(seen);
      if (closed) return Promise.reject(new Error(`worker exited before "${prefix}": ${stderr}`));
      return new Promise((resolve, reject) => waiters.push({ prefix, resolve, reject }));
    },
    async kill() {
      child.kill('SIGKILL');
      await exited;
    },
    exited,
  };
}
