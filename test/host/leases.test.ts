/**
 * Per-VM leases through the management API: one holder at a time (BUSY naming it, with its pid and since
 * when), renew and release, expiry of a lease nobody renews, immediate reclaim when the owner was a process
 * of this machine that has ended, checkpoint operations refused while another run holds the VM and allowed
 * again once its lease is gone, checkpoints and snapshot sets recording the run that made them (a live run's
 * set cannot be released by anyone else), and leases surviving a host restart with a fresh time-to-live.
 */
import { spawnSync } from 'node:child_process';
import { stat } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import type { TidemarkError } from '../../src/errors.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { tempDir } from '../helpers/peers.js';
import { sleep } from '../helpers/async.js';

const MiB = 2 ** 20;

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let running: RunningHost;
let api: HostClient;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('leases'));
  store = path.join(dir, 'store');
  running = await startHost({ store, log: HostLog.silent() });
  api = await HostClient.connect({ store });
  await api.createVm({ name: 'web', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
  await api.createVm({ name: 'db', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
});
afterAll(async () => {
  await running?.close();
  await cleanup?.();
});

const me = (runId: string, command = 'test run') => ({ runId, pid: process.pid, hostname: os.hostname(), command });

/** The pid of a process that has ended (it existed a moment ago; nothing reuses a pid that fast here). */
function deadPid(): number {
  const r = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  return Number(r.stdout);
}

describe('leases', () => {
  it('one holder at a time: BUSY names it; renew, release; the VM summary shows the holder', async () => {
    const a = await api.acquireLease('web', { owner: me('run-a', 'tidemark backup web'), ttlSeconds: 30 });
    expect(a.vm).toBe('web');
    expect(a.expiresAt).not.toBeNull();
    const err = await api.acquireLease('web', { owner: me('run-b') }).catch((e) => e);
    expect(err.code).toBe('BUSY');
    expect(err.message).toContain('run-a');
    expect(err.message).toContain(`pid ${process.pid}`);
    expect(err.message).toContain(a.acquiredAt);
    expect((await api.showVm('web')).lease?.id).toBe(a.id);
    // Another VM is free.
    const d = await api.acquireLease('db', { owner: me('run-b') });
    await api.releaseLease(d.id);
    const renewed = await api.renewLease(a.id);
    expect(Date.parse(renewed.expiresAt!)).toBeGreaterThanOrEqual(Date.parse(a.expiresAt!));
    expect((await api.listLeases()).map((l) => l.id)).toEqual([a.id]);
    await api.releaseLease(a.id);
    expect((await api.showVm('web')).lease).toBeNull();
    await expect(api.renewLease(a.id)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(api.releaseLease(a.id)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await expect(api.acquireLease('nope', { owner: me('x') })).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('checkpoint operations of no run are refused while a run holds the VM; the run itself proceeds', async () => {
    const lease = await api.acquireLease('web', { owner: me('run-c', 'tidemark backup web') });
    const busy = await api.createCheckpoint('web', { type: 'standard', name: 'mine' }).catch((e) => e);
    expect(busy.code).toBe('BUSY');
    expect(busy.message).toContain('run-c');
    expect(await api.listCheckpoints('web')).toEqual([]);
    // The run's own checkpoint records the run.
    const cp = await api.createCheckpoint('web', { type: 'recovery', name: 'run-c cp', lease: lease.id });
    expect(cp.run).toEqual({ lease: lease.id, runId: 'run-c', command: 'tidemark backup web' });
    await expect(api.deleteCheckpoint('web', cp.id)).rejects.toMatchObject({ code: 'BUSY' });
    await expect(api.upgradeVm('web')).rejects.toMatchObject({ code: 'BUSY' });
    await expect(api.deleteVm('web')).rejects.toMatchObject({ code: 'BUSY' });
    // A lease of another VM is not this VM's.
    const other = await api.acquireLease('db', { owner: me('run-d') });
    await expect(api.deleteCheckpoint('web', cp.id, { lease: other.id })).rejects.toMatchObject({ code: 'BUSY' });
    await api.releaseLease(other.id);
    await api.deleteCheckpoint('web', cp.id, { lease: lease.id });
    await api.releaseLease(lease.id);
    // Gone: its id no longer works, and people's operations do.
    await expect(api.createCheckpoint('web', { type: 'standard', lease: lease.id })).rejects.toMatchObject({
      code: 'NOT_FOUND',
    });
    const mine = await api.createCheckpoint('web', { type: 'standard', name: 'mine' });
    expect(mine.run).toBeNull();
    await api.deleteCheckpoint('web', mine.id);
  });

  it('a run leases many VMs in one request, in name order; a waiting run stops at the first busy VM', async () => {
    await api.createVm({ name: 'app', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
    const other = await api.acquireLease('db', { owner: me('run-x') });
    // Without waiting: every free VM is taken, the held one refused naming its holder.
    const all = await api.acquireLeases({ vms: ['web', 'db', 'app'], owner: me('run-m'), ttlSeconds: 30 });
    expect(all.leases.map((l) => l.vm)).toEqual(['app', 'web']);
    expect(all.refused).toMatchObject([{ vm: 'db', code: 'BUSY' }]);
    expect(all.refused[0].message).toContain('run-x');
    expect(all.untried).toEqual([]);
    // The leases file holds them all (one write for the batch), as the restart test below relies on.
    expect((await api.listLeases()).map((l) => l.vm).sort()).toEqual(['app', 'db', 'web']);
    // The heartbeat renews all at once; a released one is gone.
    await api.releaseLeases([all.leases[0].id]);
    const beat = await api.renewLeases(all.leases.map((l) => l.id));
    expect(beat.renewed.map((l) => l.vm)).toEqual(['web']);
    expect(beat.gone).toEqual([all.leases[0].id]);
    expect((await api.releaseLeases(all.leases.map((l) => l.id))).released).toEqual([all.leases[1].id]);
    // A waiting run: 'app' taken, stops at 'db' (held), 'web' after it not tried, so it holds nothing past it.
    const waiting = await api.acquireLeases({ vms: ['web', 'db', 'app'], owner: me('run-w'), stopAtBusy: true });
    expect(waiting.leases.map((l) => l.vm)).toEqual(['app']);
    expect(waiting.refused.map((r) => r.vm)).toEqual(['db']);
    expect(waiting.untried).toEqual(['web']);
    expect((await api.showVm('web')).lease).toBeNull();
    await api.releaseLeases([...waiting.leases.map((l) => l.id), other.id]);
    expect(await api.listLeases()).toEqual([]);
    await api.deleteVm('app');
  });

  it('a lease nobody renews expires, and a user is not blocked by it any longer', async () => {
    // Another machine's run: only expiry can end it (its pid means nothing here).
    const remote = { runId: 'remote-run', pid: 1, hostname: `not-${os.hostname()}`, command: 'tidemark backup web' };
    const lease = await api.acquireLease('web', { owner: remote, ttlSeconds: 1 });
    await expect(api.createCheckpoint('web', { type: 'standard' })).rejects.toMatchObject({ code: 'BUSY' });
    await sleep(1400);
    const cp = await api.createCheckpoint('web', { type: 'standard', name: 'after expiry' });
    await api.deleteCheckpoint('web', cp.id);
    await expect(api.renewLease(lease.id)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    // Renewed in time, it outlives its time-to-live several times over.
    const kept = await api.acquireLease('web', { owner: remote, ttlSeconds: 3 });
    for (let i = 0; i < 8; i++) {
      await sleep(500);
      await api.renewLease(kept.id);
    }
    await expect(api.createCheckpoint('web', { type: 'standard' })).rejects.toMatchObject({ code: 'BUSY' });
    await api.releaseLease(kept.id);
  });

  it('the lease of an ended process of this machine is reclaimed at once', async () => {
    const pid = deadPid();
    const lease = await api.acquireLease('web', {
      owner: { runId: 'dead-run', pid, hostname: os.hostname(), command: 'tidemark backup web' },
      ttlSeconds: 3600,
    });
    const next = await api.acquireLease('web', { owner: me('run-e') });
    expect(next.id).not.toBe(lease.id);
    await expect(api.renewLease(lease.id)).rejects.toMatchObject({ code: 'NOT_FOUND' });
    await api.releaseLease(next.id);
  });

  it("a live run's snapshot set is released only by that run", async () => {
    const lease = await api.acquireLease('db', { owner: me('run-f') });
    const cp = await api.createCheckpoint('db', { type: 'recovery', lease: lease.id });
    // Without the lease, the leased VM is not snapshotted for someone else.
    await expect(
      api.createSnapshotSet({ vms: [{ name: 'db', checkpoint: cp.id }], provider: 'none' }),
    ).rejects.toMatchObject({ code: 'BUSY' });
    const set = await api.createSnapshotSet({
      vms: [{ name: 'db', checkpoint: cp.id, lease: lease.id }],
      provider: 'none',
    });
    expect(set.runId).toBe('run-f');
    expect(set.vms[0].lease).toBe(lease.id);
    const refused = (await api.releaseSnapshotSet(set.id, false).catch((e) => e)) as TidemarkError;
    expect(refused.code).toBe('BUSY');
    expect(refused.message).toContain('run-f');
    expect((await api.listSnapshotSets()).map((s) => s.id)).toContain(set.id);
    await api.releaseSnapshotSet(set.id, true, lease.id);
    expect(await api.listSnapshotSets()).toEqual([]);
    await api.deleteCheckpoint('db', cp.id, { lease: lease.id });
    await api.releaseLease(lease.id);
  });

  it('leases survive a host restart with a fresh time-to-live; those of ended processes do not', async () => {
    const kept = await api.acquireLease('web', { owner: me('run-g', 'tidemark backup web'), ttlSeconds: 5 });
    await api.acquireLease('db', {
      owner: { runId: 'dead-run', pid: deadPid(), hostname: os.hostname(), command: 'x' },
      ttlSeconds: 3600,
    });
    expect((await stat(path.join(store, 'leases.json'))).mode & 0o777).toBe(0o600);
    await running.close();
    await sleep(1500);
    running = await startHost({ store, log: HostLog.silent() });
    api = await HostClient.connect({ store });
    const leases = await api.listLeases();
    expect(leases.map((l) => [l.vm, l.id])).toEqual([['web', kept.id]]);
    // The fresh time-to-live counts from the restart, not from the last renewal before it.
    expect(Date.parse(leases[0].expiresAt!)).toBeGreaterThan(Date.parse(kept.expiresAt!) + 1000);
    await expect(api.createCheckpoint('web', { type: 'standard' })).rejects.toMatchObject({ code: 'BUSY' });
    await api.renewLease(kept.id);
    await api.releaseLease(kept.id);
    const cp = await api.createCheckpoint('db', { type: 'standard' });
    await api.deleteCheckpoint('db', cp.id);
  });
});
