/**
 * Jobs, as Hyper-V's management API returns them for every long operation: a client gets an id at once
 * and polls or waits. A job's state is honest: Completed only when the operation finished, Failed with
 * the error's code and message otherwise.
 */
import { randomUUID } from 'node:crypto';
import { TidemarkError, type ErrorCode } from '../errors.js';

export type JobState = 'New' | 'Running' | 'Completed' | 'Failed';

export interface JobInfo {
  id: string;
  type: string;
  /** What the job acts on (a VM name, a disk path). */
  target: string;
  state: JobState;
  createdAt: string;
  startedAt: string | null;
  endedAt: string | null;
  progress: number | null;
  result: unknown;
  error: { code: ErrorCode; message: string } | null;
}

interface Job extends JobInfo {
  done: Promise<void>;
}

/** Finished jobs kept for clients to collect. */
const KEEP_FINISHED = 500;

export class JobManager {
  private jobs = new Map<string, Job>();

  /** Starts `run` as a job and returns its info immediately (state New or Running). */
  start(type: string, target: string, run: (setProgress: (p: number) => void) => Promise<unknown>): JobInfo {
    const job = {
      id: randomUUID(),
      type,
      target,
      state: 'New',
      createdAt: new Date().toISOString(),
      startedAt: null,
      endedAt: null,
      progress: null,
      result: null,
      error: null,
    } as unknown as Job;
    job.done = (async () => {
      await Promise.resolve();
      job.state = 'Running';
      job.startedAt = new Date().toISOString();
      try {
        job.result = await run((p) => (job.progress = p));
        job.progress = 1;
        job.state = 'Completed';
      } catch (err) {
        job.state = 'Failed';
        job.error =
          err instanceof TidemarkError
            ? { code: err.code, message: err.message }
            : { code: 'INTERNAL', message: (err as Error)?.message ?? String(err) };
      } finally {
        job.endedAt = new Date().toISOString();
        this.trim();
      }
    })();
    this.jobs.set(job.id, job);
    return this.info(job.id);
  }

  info(id: string): JobInfo {
    const job = this.jobs.get(id);
    if (!job) throw new TidemarkError('NOT_FOUND', `no job ${id}`);
    const { done: _done, ...info } = job;
    return { ...info };
  }

  list(): JobInfo[] {
    return [...this.jobs.keys()].map((id) => this.info(id));
  }

  /** Waits until the job ends or `timeoutMs` passes; returns its info either way. */
  async wait(id: string, timeoutMs = 300_000): Promise<JobInfo> {
    const job = this.jobs.get(id);
    if (!job) throw new TidemarkError('NOT_FOUND', `no job ${id}`);
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([job.done, new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs)))]);
    clearTimeout(timer);
    return this.info(id);
  }

  /** Waits for every running job (host shutdown). */
  async drain(): Promise<void> {
    await Promise.all([...this.jobs.values()].map((j) => j.done));
  }

  private trim(): void {
    const finished = [...this.jobs.values()].filter((j) => j.state === 'Completed' || j.state === 'Failed');
    for (const j of finished.slice(0, Math.max(0, finished.length - KEEP_FINISHED))) this.jobs.delete(j.id);
  }
}
