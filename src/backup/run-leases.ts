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
    const owner = { runId: run.runId, pid: process.pid, hostname: os.hostname(), command: opts.command };
    // One request (one write of the host's leases file) for the whole set. A run that waits stops at the first
    // busy VM in name order and retries from it, so two waiting runs never each hold what the other waits for.
    let remaining = [...new Set(vms)].sort();
    let said = false;
    while (remaining.length > 0) {
      const waiting = deadline - performance.now() > 0;
      let r: Awaited<ReturnType<HostClient['acquireLeases']>>;
      try {
        r = await host.acquireLeases({ vms: remaining, owner, ttlSeconds: ttl, stopAtBusy: waiting });
      } catch (err) {
        for (const vm of remaining) run.refused.set(vm, err as Error);
        break;
      }
      for (const l of r.leases) run.held.set(l.vm, l);
      remaining = [];
      for (const f of r.refused) {
        if (waiting && f.code === 'BUSY') {
          remaining = [f.vm, ...r.untried];
          if (!said) opts.log?.(`${f.vm}: waiting for the lease: ${f.message}`);
          said = true;
          continue;
        }
        run.refused.set(f.vm, new TidemarkError(f.code as TidemarkError['code'], f.message));
      }
      if (remaining.length > 0)
        await new Promise((res) => setTimeout(res, Math.max(0, Math.min(POLL_MS, deadline - performance.now()))));
    }
    return run;
  }

  /** The id of the VM's lease this run holds. */
  lease(vm: string): string | undefined {
    return this.held.get(vm)?.id;
  }

  /** Renews every lease in one request; one the host no longer knows is recorded as lost (its use is refused anyway). */
  private async heartbeat(): Promise<void> {
    const ids = new Map([...this.held].map(([vm, l]) => [l.id, vm]));
    if (ids.size === 0) return;
    try {
      const { gone } = await this.host.renewLeases([...ids.keys()]);
      for (const id of gone) {
        const vm = ids.get(id);
        if (vm === undefined || !this.held.has(vm)) continue;
        this.held.delete(vm);
        const err = new TidemarkError('NOT_FOUND', `lease ${id} of ${vm} has expired or was reclaimed`);
        this.lost.set(vm, err);
        this.opts.log?.(`${vm}: lease lost: ${err.message}`);
      }
    } catch (err) {
      // The host may be restarting: it keeps the leases, and the next beat tries again.
      this.opts.log?.(`lease heartbeat failed: ${describeError(err)}`);
    }
  }

  /** Ends the run's hold on every VM (one request). */
  async release(): Promise<void> {
    clearInterval(this.timer);
    const ids = [...this.held.values()].map((l) => l.id);
    this.held.clear();
    if (ids.length === 0) return;
    await this.host
      .releaseLeases(ids)
      .catch((e) => this.opts.log?.(`releasing ${ids.length} lease(s): ${describeError(e)}`));
  }
}
