/**
 * The route table round trip: every route of src/api/routes.ts is called through the typed client against a
 * real host, and every answer (and every job's result) passes the route's schema, since the client checks it
 * and throws PROTOCOL_ERROR otherwise. The test fails if a route of the table is left uncalled, so a new route
 * needs a call here.
 */
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { ROUTES, type RouteDef, type RouteName } from '../../src/api/routes.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { missingPeers, tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;
/** The QEMU routes (save, pause, resume, console) need a running QEMU: a BIOS VM that boots nothing. */
const noQemu = missingPeers('qemu-system-x86_64');
const QEMU_ROUTES: RouteName[] = ['saveVm', 'pauseVm', 'resumeVm', 'readConsole'];

/** The client, noting every route it calls (the answers' schemas are checked by the client itself). */
function recording(client: HostClient): HostClient & { called: Set<RouteName> } {
  const called = new Set<RouteName>();
  const call = client.call.bind(client);
  client.call = ((route: RouteDef, ...input: unknown[]) => {
    const name = (Object.keys(ROUTES) as RouteName[]).find((n) => ROUTES[n] === route);
    if (name) called.add(name);
    return (call as (r: RouteDef, ...i: unknown[]) => Promise<unknown>)(route, ...input);
  }) as HostClient['call'];
  return Object.assign(client, { called });
}

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let running: RunningHost;
let api: HostClient & { called: Set<RouteName> };

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('api-routes'));
  store = path.join(dir, 'store');
  running = await startHost({ store, log: HostLog.silent() });
  api = recording(await HostClient.connect({ store }));
});
afterAll(async () => {
  await running?.close();
  await cleanup?.();
});

describe('the route table round trip', () => {
  it('every route answers data that passes its schema', async () => {
    const owner = { runId: 'run-1', pid: process.pid, hostname: os.hostname(), command: 'routes test' };

    const info = await api.hostInfo();
    expect(info.store).toBe(store);
    expect(info.nbd?.type).toBe('unix');

    const made = await api.createVm({ name: 'web', configVersion: '9.0', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
    expect(made.disks[0].tracking).toBe('enabled');
    expect((await api.listVms()).map((v) => v.name)).toEqual(['web']);
    expect((await api.modifyVm('web', { checkpointPolicy: 'standard-only' })).checkpointPolicy).toBe('standard-only');
    expect((await api.upgradeVm('web', { version: '10.0' })).configVersion).toBe('10.0');
    expect((await api.showVm('web')).definition.configVersion).toBe('10.0');
    // Its disk is VHDX already: nothing to convert, said so (test/host/convert-disks.test.ts converts VHDs).
    const conv = await api.convertDisks('web', { to: 'vhdx' });
    expect(conv.converted).toEqual([]);
    expect(conv.skipped.map((d) => d.reason)).toEqual(['already VHDX']);

    const started = await api.startVm('web');
    expect(started.state).toBe('Running');
    expect(started.disks[0].export).not.toBeNull();

    // A run: lease, recovery checkpoint, one snapshot set, reference point.
    const lease = await api.acquireLease('web', { owner, ttlSeconds: 60 });
    expect((await api.listLeases()).map((l) => l.id)).toEqual([lease.id]);
    expect((await api.renewLease(lease.id)).id).toBe(lease.id);
    const cp = await api.createCheckpoint('web', { type: 'recovery', name: 'r1', lease: lease.id });
    expect(cp.run?.runId).toBe('run-1');
    expect((await api.listCheckpoints('web')).find((c) => c.id === cp.id)?.current).toBe(true);
    const all = await api.changes({ vm: 'web', slot: 'scsi0-0', limitId: '*', length: 8 * MiB });
    expect(all.virtualDiskId).toBe(made.disks[0].virtualDiskId);
    const set = await api.createSnapshotSet({
      vms: [{ name: 'web', checkpoint: cp.id, lease: lease.id }],
      provider: 'cow',
    });
    expect(set.storageSnapshots).toBe(1);
    expect((await api.listSnapshotSets()).map((s) => s.id)).toEqual([set.id]);
    expect(await api.releaseSnapshotSet(set.id, true, lease.id)).toEqual({ released: set.id });
    const rp = await api.convertToReferencePoint('web', cp.id, {
      lease: lease.id,
      owner: { kind: 'repository', id: 'repo-1' },
    });
    expect(rp.owner).toEqual({ kind: 'repository', id: 'repo-1' });
    expect(rp.resilientChangeTrackingIdentifiers[0]).toMatch(/^rct2:/);
    expect(await api.releaseLease(lease.id)).toEqual({ released: lease.id });

    // The batch forms a run of many VMs uses: one request (one write) each; a VM held or unknown is refused.
    const other = await api.acquireLease('web', { owner: { ...owner, runId: 'run-0' }, ttlSeconds: 60 });
    const batch = await api.acquireLeases({ vms: ['web', 'nosuch'], owner, ttlSeconds: 60 });
    expect(batch.leases).toEqual([]);
    expect(batch.refused.map((r) => [r.vm, r.code])).toEqual([
      ['nosuch', 'NOT_FOUND'],
      ['web', 'BUSY'],
    ]);
    expect(await api.releaseLeases([other.id, 'no-such-lease'])).toEqual({ released: [other.id] });
    const taken = await api.acquireLeases({ vms: ['web'], owner, ttlSeconds: 60, stopAtBusy: true });
    expect(taken.leases.map((l) => l.vm)).toEqual(['web']);
    expect(await api.renewLeases([taken.leases[0].id, other.id])).toMatchObject({ gone: [other.id] });
    expect((await api.releaseLeases([taken.leases[0].id])).released).toEqual([taken.leases[0].id]);
    expect(await api.listLeases()).toEqual([]);

    const direct = await api.createReferencePoint('web', { owner: { kind: 'user', name: 'alice' } });
    expect((await api.listReferencePoints('web')).map((r) => r.id)).toEqual([rp.id, direct.id]);
    expect(await api.destroyReferencePoint('web', direct.id)).toEqual({ destroyed: direct.id });

    // Standard checkpoints with the VM off: apply one, delete another.
    expect((await api.stopVm('web')).state).toBe('Off');
    const a = await api.createCheckpoint('web', { type: 'standard', name: 'a' });
    const b = await api.createCheckpoint('web', { type: 'standard', name: 'b' });
    expect(await api.applyCheckpoint('web', a.id)).toBeUndefined();
    expect(await api.deleteCheckpoint('web', b.id)).toBeUndefined();
    expect((await api.listCheckpoints('web')).map((c) => c.id)).toEqual([a.id]);
    // Hot-plug (the 2012 R2 flow): web has no QEMU process, so the hot-add is modelled and said so.
    const plug = await api.hotPlug('web', { source: { socket: path.join(dir, 'none.sock'), export: 'x' } });
    expect(plug).toMatchObject({ vm: 'web', attached: false, slot: null, guestDevice: null, recovery: null });
    expect(plug.note).toMatch(/^modelled: the VM has no guest/);
    expect((await api.hotUnplug('web', plug.id)).id).toBe(plug.id);
    await expect(api.hotUnplug('web', plug.id)).rejects.toMatchObject({ code: 'NOT_FOUND' });

    // Image management on files of the store.
    const loose = await api.createDisk('loose.vhdx', 4 * MiB);
    expect(path.dirname(loose.path)).toBe(store);
    const child = path.join(store, 'loose-child.vhdx');
    await createVhdx(child, { parent: loose.path });
    const di = await api.diskInfo('loose-child.vhdx');
    expect(di.hasParent).toBe(true);
    expect(di.chain.map((l) => l.path)).toEqual([child, loose.path]);
    expect((await api.mergeDisk('loose-child.vhdx')).parentPath).toBe(loose.path);

    // Imports: one cancelled, one committed.
    const importer = { pid: process.pid, hostname: os.hostname(), command: 'routes test' };
    const imp = await api.reserveImport({ name: 'gone', owner: importer });
    expect((await api.listImports()).map((i) => i.name)).toEqual(['gone']);
    expect(await api.cancelImport('gone')).toEqual({ cancelled: 'gone' });
    const reg = await api.reserveImport({ name: 'restored', owner: importer });
    expect(reg.dir).not.toBe(imp.dir);
    await createVhdx(path.join(reg.disksDir, 'scsi0-0.vhdx'), { size: 4 * MiB });
    const restored = await api.commitImport('restored', {
      configVersion: '9.0',
      disks: [{ slot: 'scsi0-0', path: path.join(reg.disksDir, 'scsi0-0.vhdx') }],
    });
    expect(restored.name).toBe('restored');

    // A QEMU under the host (TCG): SeaBIOS with nothing to boot is enough for the VM routes.
    if (!noQemu) {
      await api.createVm({
        name: 'bios',
        generation: 1,
        boot: { kind: 'firmware' },
        memoryMiB: 32,
        accel: 'tcg',
        disks: [{ slot: 'ide0-0', size: 4 * MiB }],
      });
      const up = await api.startVm('bios');
      expect(up.state).toBe('Running');
      expect(up.qemu?.pid).toBeGreaterThan(0);
      console.log(`routes: QEMU pid ${up.qemu?.pid} (${up.qemu?.accel}) runs VM bios`);
      expect((await api.pauseVm('bios')).state).toBe('Paused');
      expect((await api.resumeVm('bios')).state).toBe('Running');
      const serial = await api.readConsole('bios', 0, 4096);
      expect(serial.offset).toBeLessThanOrEqual(serial.size);
      expect((await api.saveVm('bios')).state).toBe('Saved');
      expect((await api.startVm('bios')).state).toBe('Running');
      // Another NBD client on its disk (besides QEMU's own connection): stop refuses without force.
      const foreign = await NbdClient.connect({ socket: running.host.nbdSocket, exportName: 'bios/ide0-0' });
      await expect(api.stopVm('bios', true)).rejects.toMatchObject({
        code: 'CONFLICT',
        message: expect.stringMatching(/NBD clients besides its QEMU have its disks open \(bios\/ide0-0: 1\)/),
      });
      expect((await api.showVm('bios')).state).toBe('Running');
      await foreign.close();
      const off = await api.stopVm('bios', true);
      expect(off.state).toBe('Off');
      expect(off.lastExit?.reason).toBeDefined();
      expect(await api.deleteVm('bios', true)).toEqual({ deleted: 'bios' });
    }

    // Jobs and the document.
    const jobs = await api.listJobs();
    expect(jobs.length).toBeGreaterThan(5);
    // Every job completed but the stop refused for the foreign NBD client.
    const failed = jobs.filter((j) => j.state !== 'Completed').map((j) => `${j.type} ${j.target} ${j.error?.code}`);
    expect(failed).toEqual(noQemu ? [] : ['stop bios CONFLICT']);
    expect((await api.jobInfo(jobs[0].id)).id).toBe(jobs[0].id);
    expect((await api.openApi()).openapi).toBe('3.1.0');

    expect(await api.deleteVm('restored', true)).toEqual({ deleted: 'restored' });
    expect(await api.deleteVm('web')).toEqual({ deleted: 'web' });

    const uncalled = (Object.keys(ROUTES) as RouteName[]).filter(
      (n) => !api.called.has(n) && !(noQemu && QEMU_ROUTES.includes(n)),
    );
    expect(uncalled, 'routes of the table this test does not call').toEqual([]);
  });
});
