/**
 * Who may reach a store's files, and where a host takes disks from:
 * - under `umask 000`, the store, its VM folders and disk folders are 0700, and disks, tracking files,
 *   checkpoint children, definitions, host.json and leases.json are 0600; a store left world-readable by an
 *   older Tidemark is tightened when a host opens it;
 * - a disk path outside the store and the allowed directories is PATH_NOT_ALLOWED through POST /v1/vms and
 *   PATCH attach, before any file is opened or written beside it (no .rct/.mrt appear), also when a symbolic
 *   link inside the store leads out; an allowed directory (`--allow-disk-dir`) works.
 */
import { chmod, copyFile, mkdir, readdir, stat, symlink } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { createVhdx } from '../../src/formats/vhdx/create.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { tempDir } from '../helpers/peers.js';

const MiB = 2 ** 20;

let dir: string;
let cleanup: () => Promise<void>;
let store: string;
let outside: string;
let allowed: string;
let running: RunningHost;
let api: HostClient;
let umask: number;

beforeAll(async () => {
  umask = process.umask(0o000);
  ({ dir, cleanup } = await tempDir('store-access'));
  store = path.join(dir, 'store');
  outside = path.join(dir, 'outside');
  allowed = path.join(dir, 'allowed');
  await mkdir(outside);
  await mkdir(allowed);
  running = await startHost({ store, allowDiskDirs: [allowed], log: HostLog.silent() });
  api = await HostClient.connect({ store });
});
afterAll(async () => {
  process.umask(umask);
  await running?.close();
  await cleanup?.();
});

async function mode(p: string): Promise<number> {
  return (await stat(p)).mode & 0o777;
}

/** Every file and folder under the store's vms/, with its mode. */
async function modes(): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  const vms = path.join(store, 'vms');
  for (const rel of await readdir(vms, { recursive: true })) {
    out[rel] = (await mode(path.join(vms, rel))).toString(8);
  }
  return out;
}

describe('store permissions and disk paths', () => {
  it('under umask 000: folders 0700, disks, tracking files, children and definitions 0600', async () => {
    expect(process.umask()).toBe(0);
    await api.createVm({ name: 'web', disks: [{ slot: 'scsi0-0', size: 8 * MiB }] });
    await api.startVm('web');
    const cp = await api.createCheckpoint('web', { type: 'standard', name: 'live' });
    await api.stopVm('web');
    await api.createCheckpoint('web', { type: 'standard', name: 'off' });
    await api.applyCheckpoint('web', cp.id);
    const lease = await api.acquireLease('web', {
      owner: { runId: 'r', pid: process.pid, hostname: os.hostname(), command: 'test' },
    });
    await api.releaseLease(lease.id);
    const got = await modes();
    expect(Object.keys(got).filter((f) => f.endsWith('.avhdx')).length).toBeGreaterThanOrEqual(2);
    for (const [f, m] of Object.entries(got)) {
      const isDir = f === 'web' || f === path.join('web', 'disks');
      expect(m, f).toBe(isDir ? '700' : '600');
    }
    expect(Object.keys(got)).toEqual(
      expect.arrayContaining([
        path.join('web', 'vm.json'),
        path.join('web', 'disks', 'scsi0-0.vhdx'),
        path.join('web', 'disks', 'scsi0-0.vhdx.rct'),
        path.join('web', 'disks', 'scsi0-0.vhdx.mrt'),
      ]),
    );
    expect(await mode(store)).toBe(0o700);
    expect(await mode(path.join(store, 'vms'))).toBe(0o700);
    expect(await mode(path.join(store, 'host.json'))).toBe(0o600);
    expect(await mode(path.join(store, 'leases.json'))).toBe(0o600);
    // A disk made through /v1/disks and one attached from an allowed directory (tracking files made beside it).
    const made = await api.createDisk('loose.vhdx', 4 * MiB);
    expect(await mode(made.path)).toBe(0o600);
    expect(await mode(`${made.path}.rct`)).toBe(0o600);
    const ext = path.join(allowed, 'data.vhdx');
    await createVhdx(ext, { size: 4 * MiB });
    await api.createVm({ name: 'ext', disks: [{ slot: 'scsi0-0', path: ext }] });
    expect(await mode(`${ext}.rct`)).toBe(0o600);
    expect(await mode(`${ext}.mrt`)).toBe(0o600);
  });

  it('a store an older Tidemark left readable is made private when a host opens it', async () => {
    await running.close();
    await chmod(store, 0o755);
    await chmod(path.join(store, 'vms', 'web'), 0o755);
    await chmod(path.join(store, 'vms', 'web', 'vm.json'), 0o644);
    await chmod(path.join(store, 'vms', 'web', 'disks', 'scsi0-0.vhdx'), 0o666);
    running = await startHost({ store, allowDiskDirs: [allowed], log: HostLog.silent() });
    api = await HostClient.connect({ store });
    expect(await mode(store)).toBe(0o700);
    for (const [f, m] of Object.entries(await modes())) {
      expect(m, f).toBe(/^(web|ext)(\/disks)?$/.test(f) ? '700' : '600');
    }
  });

  it('refuses disks outside the store and the allowed directories before touching them', async () => {
    const foreign = path.join(outside, 'foreign.vhdx');
    await createVhdx(foreign, { size: 4 * MiB });
    const before = (await readdir(outside)).sort();
    const e1 = await api.createVm({ name: 'evil', disks: [{ slot: 'scsi0-0', path: foreign }] }).catch((e) => e);
    expect(e1.code).toBe('PATH_NOT_ALLOWED');
    expect(e1.message).toContain(foreign);
    expect(e1.message).toContain('--allow-disk-dir');
    await expect(api.showVm('evil')).rejects.toMatchObject({ code: 'NOT_FOUND' });
    expect((await readdir(path.join(store, 'vms'))).includes('evil')).toBe(false);
    await expect(api.modifyVm('ext', { attach: [{ slot: 'scsi0-1', path: foreign }] })).rejects.toMatchObject({
      code: 'PATH_NOT_ALLOWED',
    });
    // Dot-dot out of the store, and a symbolic link in the store that leads out.
    const dotdot = path.join(store, '..', 'outside', 'foreign.vhdx');
    await expect(api.createVm({ name: 'evil', disks: [{ slot: 'scsi0-0', path: dotdot }] })).rejects.toMatchObject({
      code: 'PATH_NOT_ALLOWED',
    });
    await symlink(foreign, path.join(store, 'link.vhdx'));
    const e2 = await api
      .createVm({ name: 'evil', disks: [{ slot: 'scsi0-0', path: path.join(store, 'link.vhdx') }] })
      .catch((e) => e);
    expect(e2.code).toBe('PATH_NOT_ALLOWED');
    expect(e2.message).toMatch(/symbolic link/);
    // Nothing was written beside the refused disk.
    expect((await readdir(outside)).sort()).toEqual(before);
    // A missing file in the store is NOT_FOUND; a relative path is relative to the store.
    await expect(api.createVm({ name: 'evil', disks: [{ slot: 'scsi0-0', path: 'nope.vhdx' }] })).rejects.toMatchObject(
      { code: 'NOT_FOUND' },
    );
    await copyFile(foreign, path.join(store, 'copied.vhdx'));
    const ok = await api.createVm({ name: 'inside', disks: [{ slot: 'scsi0-0', path: 'copied.vhdx' }] });
    expect(ok.disks[0].base).toBe(path.join(store, 'copied.vhdx'));
    expect((await api.hostInfo()).allowedDiskDirs).toEqual([allowed]);
  });
});
