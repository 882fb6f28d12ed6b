/**
 * The leases of one backup run: one per VM, acquired before anything is done to the VM (in name order, so two
 * runs waiting for each other's VMs cannot deadlock), renewed by a heartbeat while the run lives, released at
 * its end. A VM another run holds is BUSY, or, with a wait, retried until it is free or the wait is over.
 */
import { randomUUID } from 'node:crypto';
import os from 'node:os';
import type { HostClient } from '../api/client.js';
import type { LeaseInfo } from '../api/schemas.js';
import { describeError } from '../util/describe-error.js';
import { TidemarkError } from '../errors.js';

export interface RunLeaseOptions {
  /** What runs, for the holder's description (`tidemark backup web db`). */
  command: string;
  /** Seconds a lease lives without a heartbeat (default 60; the heartbeat renews every third of it). */
  ttlSeconds?: number;
  /** Seconds to wait for a VM another run holds (undefined: do not wait; Infinity: until it is free). */
  waitSeconds?: number;
  log?: (line: string) => void;
}

const POLL_MS = 500;

export class RunLeases {
  readonly runId = randomUUID();
  private held = new Map<string, LeaseInfo>();
  /** VMs whose lease could not be had, and why. */
  readonly refused = new Map<string, Error>();
  /** VMs whose lease was lost while the run went on (a heartbeat came too late). */
  readonly lost = new Map<string, Error>();
  private timer: NodeJS.Timeout | undefined;

  private constructor(
    private readonly host: HostClient,
    private readonly opts: RunLeaseOptions,
  ) {}

  static async acquire(host: HostClient, vms: string[], opts: RunLeaseOptions): Promise<RunLeases> {
    const run = new RunLeases(host, opts);
    const ttl = opts.ttlSeconds ?? 60;
    run.timer = setInterval(() => void run.heartbeat(), Math.max(250, (ttl * 1000) / 3));
    run.timer.unref();
    const deadline = opts.waitSeconds === undefined ? 0 : performance.now() + opts.waitSeconds * 1000;
    for (const vm of [...new Set(vms)].sort()) {
      let said = false;
      for (;;) {
        try {
          const lease = await host.acquireLease(vm, {
            owner: { runId: run.runId, pid: process.pid, hostname: os.hostname(), command: opts.command },
            ttlSeconds: ttl,
          });
          run.held.set(vm, lease);
          break;
        } catch (err) {
          const busy = err instanceof TidemarkError && err.code === 'BUSY';
          const left = deadline - performance.now();
          if (!busy || left <= 0) {
            run.refused.set(vm, err as Error);
            break;
          }
          if (!said) opts.log?.(`${vm}: waiting for the lease: ${(err as Error).message}`);
          said = true;
          await new Promise((r) => setTimeout(r, Math.min(POLL_MS, left)));
        }
      }
    }
    return run;
  }

  /** The id of the VM's lease this run holds. */
  lease(vm: string): string | undefined {
    return this.held.get(vm)?.id;
  }

  /** Renews every lease; one the host no longer knows is recorded as lost (the host refuses its use anyway). */
  private async heartbeat(): Promise<void> {
    for (const [vm, lease] of [...this.held]) {
      try {
        await this.host.renewLease(lease.id);
      } catch (err) {
        const code = (err as TidemarkError).code;
        if (code === 'NOT_FOUND') {
          this.held.delete(vm);
          this.lost.set(vm, err as Error);
          this.opts.log?.(`${vm}: lease lost: ${(err as Error).message}`);
        } else {
          // The host may be restarting: it keeps the lease, and the next beat tries again.
          this.opts.log?.(`${vm}: lease heartbeat failed: ${(err as Error).message}`);
        }
      }
    }
  }

  /** Ends the run's hold on every VM. */
  async release(): Promise<void> {
    clearInterval(this.timer);
    for (const [vm, lease] of [...this.held]) {
      this.held.delete(vm);
      await this.host
        .releaseLease(lease.id)
        .catch((e) => this.opts.log?.(`${vm}: releasing the lease: ${describeError(e)}`));
    }
  }
}
