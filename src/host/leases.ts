/**
 * Per-VM leases: one backup run (or one checkpoint operation) at a time works on a VM's checkpoints and
 * snapshot sets. A run acquires the lease with a description of itself, renews it by heartbeat and releases
 * it at the end; a lease not renewed for its time-to-live has expired, and one whose owner was a process of
 * this machine that has ended is reclaimed at once. A second run gets BUSY naming the holder.
 *
 * Leases survive a host restart (`STORE/leases.json`, 0600): a run that was working while the host went away
 * must not find its VM handed to another run when the host is back. A restarted host cannot know how long it
 * was down, so each lease it reloads gets a fresh time-to-live from the restart (leases of ended local
 * processes are dropped at once).
 */
import { randomUUID } from 'node:crypto';
import { readFile } from 'node:fs/promises';
import os from 'node:os';
import { z } from 'zod';
import { TidemarkError } from '../errors.js';
import { writeFileAtomic } from '../util/atomic.js';
import { Mutex } from '../util/mutex.js';
import { pidAlive } from '../util/process.js';
import type { HostLog } from './log.js';

export const LeaseOwner = z
  .object({
    /** The run (a backup run's id): every lease of one run carries it. */
    runId: z.string().min(1).max(100),
    pid: z.number().int().positive(),
    hostname: z.string().min(1).max(255),
    /** What runs, for people (`tidemark backup web db`). */
    command: z.string().max(500),
  })
  .strict();
export type LeaseOwner = z.infer<typeof LeaseOwner>;

export const DEFAULT_LEASE_TTL_SECONDS = 60;
export const MAX_LEASE_TTL_SECONDS = 24 * 3600;

export interface LeaseInfo {
  id: string;
  vm: string;
  owner: LeaseOwner;
  acquiredAt: string;
  renewedAt: string;
  /** When it expires unless renewed (null while a host operation holds it: it ends with the operation). */
  expiresAt: string | null;
  ttlSeconds: number;
  /** Held by one operation of the host itself (a user's checkpoint command), for as long as it runs. */
  operation: boolean;
}

interface Lease {
  id: string;
  vm: string;
  owner: LeaseOwner;
  acquiredAt: number;
  renewedAt: number;
  ttlMs: number;
  operation: boolean;
}

const Stored = z.object({
  leases: z.array(
    z.object({
      id: z.string(),
      vm: z.string(),
      owner: LeaseOwner,
      acquiredAt: z.string(),
      ttlSeconds: z.number().positive(),
    }),
  ),
});

export class Leases {
  private byVm = new Map<string, Lease>();
  private writes = new Mutex();
  /** Check-then-take is one step: two acquirers never both see the VM free. */
  private taking = new Mutex();

  private constructor(
    private readonly file: string,
    private readonly log: HostLog,
  ) {}

  /** Loads the leases a previous host run left (see the header: fresh time-to-live, ended owners dropped). */
  static async load(file: string, log: HostLog): Promise<Leases> {
    const leases = new Leases(file, log);
    let raw: string | undefined;
    try {
      raw = await readFile(file, 'utf8');
    } catch {
      raw = undefined;
    }
    if (raw !== undefined) {
      let parsed: z.infer<typeof Stored> | undefined;
      try {
        parsed = Stored.parse(JSON.parse(raw));
      } catch (err) {
        log.warn(`ignoring unreadable ${file}: ${(err as Error).message}`);
      }
      const now = Date.now();
      for (const l of parsed?.leases ?? []) {
        if (isLocal(l.owner) && !pidAlive(l.owner.pid)) {
          log.warn(`dropped the lease of ${l.vm} held by ${describeOwner(l.owner)}: that process has ended`);
          continue;
        }
        const acquiredAt = Date.parse(l.acquiredAt);
        leases.byVm.set(l.vm, {
          id: l.id,
          vm: l.vm,
          owner: l.owner,
          acquiredAt: Number.isFinite(acquiredAt) ? acquiredAt : now,
          renewedAt: now,
          ttlMs: l.ttlSeconds * 1000,
          operation: false,
        });
      }
      await leases.persist();
    }
    return leases;
  }

  /** Every live lease (dead ones are reclaimed on the way). */
  async list(): Promise<LeaseInfo[]> {
    const out: LeaseInfo[] = [];
    for (const vm of [...this.byVm.keys()].sort()) {
      const l = await this.live(vm);
      if (l) out.push(info(l));
    }
    return out;
  }

  /** The live lease of a VM, if any. */
  async holder(vm: string): Promise<LeaseInfo | undefined> {
    const l = await this.live(vm);
    return l ? info(l) : undefined;
  }

  /** Acquires a VM's lease, or BUSY naming the holder (a dead holder's lease is reclaimed first). */
  async acquire(vm: string, owner: LeaseOwner, ttlSeconds = DEFAULT_LEASE_TTL_SECONDS): Promise<LeaseInfo> {
    checkTtl(ttlSeconds);
    return this.taking.run(() => this.take(vm, owner, ttlSeconds));
  }

  private async take(vm: string, owner: LeaseOwner, ttlSeconds: number): Promise<LeaseInfo> {
    const lease = await this.claim(vm, owner, ttlSeconds);
    try {
      await this.persist();
    } catch (err) {
      if (this.byVm.get(vm) === lease) this.byVm.delete(vm);
      throw err;
    }
    this.log.info(`lease ${lease.id.slice(0, 8)} of ${vm} to ${describeOwner(owner)} (${ttlSeconds} s)`);
    return info(lease);
  }

  /** Takes the VM's lease in memory (BUSY when it is held); the caller persists. */
  private async claim(vm: string, owner: LeaseOwner, ttlSeconds: number): Promise<Lease> {
    const held = await this.live(vm);
    if (held) throw busy(held);
    const now = Date.now();
    const lease: Lease = {
      id: randomUUID(),
      vm,
      owner,
      acquiredAt: now,
      renewedAt: now,
      ttlMs: ttlSeconds * 1000,
      operation: false,
    };
    this.byVm.set(vm, lease);
    return lease;
  }

  /**
   * The leases of many VMs for one run, in name order, with ONE write of the leases file (a run of 800 VMs
   * must not write it 800 times). A VM held by another run is refused (BUSY naming the holder), the others are
   * taken; with `stopAtBusy` (a run that waits for the busy one) nothing after the first busy VM is tried, so
   * two waiting runs never each hold what the other waits for. Each VM must exist (`exists` throws otherwise).
   */
  async acquireMany(
    vms: string[],
    owner: LeaseOwner,
    ttlSeconds = DEFAULT_LEASE_TTL_SECONDS,
    opts: { stopAtBusy?: boolean; exists?: (vm: string) => void } = {},
  ): Promise<{ leases: LeaseInfo[]; refused: { vm: string; code: string; message: string }[]; untried: string[] }> {
    checkTtl(ttlSeconds);
    return this.taking.run(async () => {
      const taken: Lease[] = [];
      const refused: { vm: string; code: string; message: string }[] = [];
      const order = [...new Set(vms)].sort();
      let i = 0;
      for (; i < order.length; i++) {
        const vm = order[i];
        try {
          opts.exists?.(vm);
          taken.push(await this.claim(vm, owner, ttlSeconds));
        } catch (err) {
          const e = err instanceof TidemarkError ? err : new TidemarkError('IO_ERROR', String(err));
          refused.push({ vm, code: e.code, message: e.message });
          if (opts.stopAtBusy && e.code === 'BUSY') {
            i++;
            break;
          }
        }
      }
      if (taken.length > 0) {
        try {
          await this.persist();
        } catch (err) {
          for (const l of taken) if (this.byVm.get(l.vm) === l) this.byVm.delete(l.vm);
          throw err;
        }
        this.log.info(
          `${taken.length} lease(s) to ${describeOwner(owner)} (${ttlSeconds} s): ${taken.map((l) => l.vm).join(', ')}`,
        );
      }
      return { leases: taken.map(info), refused, untried: order.slice(i) };
    });
  }

  /** The heartbeat: the lease lives another time-to-live. NOT_FOUND when it has expired or was reclaimed. */
  async renew(id: string): Promise<LeaseInfo> {
    const l = await this.byId(id);
    l.renewedAt = Date.now();
    return info(l);
  }

  async release(id: string): Promise<void> {
    const l = await this.byId(id);
    this.byVm.delete(l.vm);
    await this.persist();
    this.log.info(`lease ${l.id.slice(0, 8)} of ${l.vm} released`);
  }

  /** Renews many leases at once (a run's heartbeat): the ids no longer live are returned as `gone`. */
  async renewMany(ids: string[]): Promise<{ renewed: LeaseInfo[]; gone: string[] }> {
    const renewed: LeaseInfo[] = [];
    const gone: string[] = [];
    for (const id of new Set(ids)) {
      try {
        renewed.push(await this.renew(id));
      } catch (err) {
        if (!(err instanceof TidemarkError && err.code === 'NOT_FOUND')) throw err;
        gone.push(id);
      }
    }
    return { renewed, gone };
  }

  /** Releases many leases with one write of the leases file; ids not live (any more) are skipped. */
  async releaseMany(ids: string[]): Promise<{ released: string[] }> {
    const released: string[] = [];
    for (const id of new Set(ids)) {
      const l = this.find(id);
      if (!l) continue;
      this.byVm.delete(l.vm);
      released.push(id);
    }
    if (released.length > 0) {
      await this.persist();
      this.log.info(`${released.length} lease(s) released`);
    }
    return { released };
  }

  /** Whether `id` is a live lease (of `vm` when given). */
  async isLive(id: string, vm?: string): Promise<boolean> {
    const name = vm ?? this.find(id)?.vm;
    return name !== undefined && (await this.live(name))?.id === id;
  }

  /**
   * Whether an operation on a VM may go on: with `lease`, it must be the VM's live lease (the caller's run);
   * without, no lease may be live (BUSY naming the holder). Returns the live lease, if any.
   */
  async check(vm: string, lease: string | undefined): Promise<LeaseInfo | undefined> {
    const held = await this.live(vm);
    if (lease !== undefined) {
      if (held?.id === lease) return info(held);
      if (held) throw busy(held, `lease ${lease} of ${vm} is not held any more`);
      throw gone(lease, vm);
    }
    if (held) throw busy(held);
    return undefined;
  }

  /**
   * Runs a VM operation under the VM's lease: the run's own (`lease`), or, for an operation of no run, one it
   * holds itself while it runs (so a backup starting meanwhile gets BUSY).
   */
  async during<T>(vm: string, lease: string | undefined, command: string, fn: () => Promise<T>): Promise<T> {
    const op = await this.taking.run(async () => {
      if ((await this.check(vm, lease)) !== undefined) return undefined;
      const now = Date.now();
      const taken: Lease = {
        id: randomUUID(),
        vm,
        owner: { runId: `operation-${randomUUID().slice(0, 8)}`, pid: process.pid, hostname: os.hostname(), command },
        acquiredAt: now,
        renewedAt: now,
        ttlMs: 0,
        operation: true,
      };
      this.byVm.set(vm, taken);
      return taken;
    });
    if (!op) return fn();
    try {
      return await fn();
    } finally {
      if (this.byVm.get(vm) === op) this.byVm.delete(vm);
    }
  }

  private async byId(id: string): Promise<Lease> {
    const found = this.find(id);
    const l = found && (await this.live(found.vm));
    if (l?.id === id && !l.operation) return l;
    throw gone(id);
  }

  /** The run lease with this id, live or not (no system calls: the caller checks liveness). */
  private find(id: string): Lease | undefined {
    for (const l of this.byVm.values()) if (l.id === id && !l.operation) return l;
    return undefined;
  }

  /** The VM's lease if it is live; an expired one, or one of an ended local process, is removed. */
  private async live(vm: string): Promise<Lease | undefined> {
    const l = this.byVm.get(vm);
    if (!l || l.operation) return l;
    const why =
      Date.now() - l.renewedAt > l.ttlMs
        ? `not renewed for ${Math.round((Date.now() - l.renewedAt) / 1000)} s`
        : isLocal(l.owner) && !pidAlive(l.owner.pid)
          ? `process ${l.owner.pid} has ended`
          : null;
    if (!why) return l;
    this.byVm.delete(vm);
    this.log.warn(`reclaimed lease ${l.id.slice(0, 8)} of ${vm} from ${describeOwner(l.owner)}: ${why}`);
    await this.persist().catch((err) => this.log.warn(`cannot write ${this.file}: ${(err as Error).message}`));
    return undefined;
  }

  private persist(): Promise<void> {
    return this.writes.run(async () => {
      const leases = [...this.byVm.values()]
        .filter((l) => !l.operation)
        .map((l) => ({
          id: l.id,
          vm: l.vm,
          owner: l.owner,
          acquiredAt: new Date(l.acquiredAt).toISOString(),
          ttlSeconds: l.ttlMs / 1000,
        }));
      await writeFileAtomic(this.file, JSON.stringify({ leases }, null, 2) + '\n', 0o600);
    });
  }
}

// The hostname, read at most once a second: the lease checks of a large run ask it thousands of times.
let hostname = { name: os.hostname(), at: Date.now() };
function isLocal(owner: LeaseOwner): boolean {
  if (Date.now() - hostname.at > 1000) hostname = { name: os.hostname(), at: Date.now() };
  return owner.hostname === hostname.name;
}

function checkTtl(ttlSeconds: number): void {
  if (!Number.isFinite(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > MAX_LEASE_TTL_SECONDS) {
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `a lease lives 1 to ${MAX_LEASE_TTL_SECONDS} seconds, not ${ttlSeconds}`,
    );
  }
}

export function describeOwner(owner: LeaseOwner): string {
  return `run ${owner.runId} ("${owner.command}", pid ${owner.pid} on ${owner.hostname})`;
}

function info(l: Lease): LeaseInfo {
  return {
    id: l.id,
    vm: l.vm,
    owner: { ...l.owner },
    acquiredAt: new Date(l.acquiredAt).toISOString(),
    renewedAt: new Date(l.renewedAt).toISOString(),
    expiresAt: l.operation ? null : new Date(l.renewedAt + l.ttlMs).toISOString(),
    ttlSeconds: l.ttlMs / 1000,
    operation: l.operation,
  };
}

function busy(l: Lease, prefix?: string): TidemarkError {
  const until = l.operation
    ? 'until that operation ends'
    : `until ${new Date(l.renewedAt + l.ttlMs).toISOString()} unless renewed`;
  return new TidemarkError(
    'BUSY',
    `${prefix ? `${prefix}: ` : ''}${l.vm} is leased by ${describeOwner(l.owner)} since ${new Date(l.acquiredAt).toISOString()}, ${until}`,
    { holder: info(l) },
  );
}

function gone(id: string, vm?: string): TidemarkError {
  return new TidemarkError(
    'NOT_FOUND',
    `lease ${id}${vm ? ` of ${vm}` : ''} is not held any more (expired, released, or reclaimed after its process ended)`,
  );
}
