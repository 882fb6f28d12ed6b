/**
 * `vm convert-disks NAME --to vhdx` (Convert-VHD + Set-VMHardDiskDrive, issue 17): a VM on a dynamic VHD with
 * seeded data is converted; the VHDX reads exactly what `qemu-img convert -f vpc` read of the VHD before, checks
 * clean with `qemu-img check`, is private (0600), the VHD is gone and the definition names the `.vhdx`; a disk
 * already VHDX is skipped; a fixed VHD stays fixed and, at configuration 9.0, is tracked at once. `vm upgrade` of
 * the 5.0 VM then makes its backups incremental after one full. Refusals (running, a checkpoint, a reference point,
 * `--to vhd`) change no file. Crash safety: the host is killed (SIGKILL, a child process) at each step of a
 * two-disk conversion in turn, and, in process, each step before the commit throws: after a restart the VM opens
 * with its content exact, nothing is pending and no stray file is left. The CLI once through bin/tidemark.js.
 *
 * Seed: TIDEMARK_CONVERT_DISKS_SEED.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { HostClient } from '../../src/api/client.js';
import { runBackupSet, type BackupSetSummary } from '../../src/backup/backup-set.js';
import { restorePoint } from '../../src/backup/restore.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { createVhd } from '../../src/formats/vhd/create.js';
import { VhdFile } from '../../src/formats/vhd/vhd.js';
import { VhdxFile } from '../../src/formats/vhdx/vhdx.js';
import { Host } from '../../src/host/host.js';
import { HostLog } from '../../src/host/log.js';
import { NbdClient } from '../../src/nbd/client.js';
import { Repository } from '../../src/repository/index.js';
import { REPO_ROOT } from '../helpers/fixtures.js';
import { runKilledAt } from '../helpers/kill-child.js';
import { missingPeers, qemuImgCheck, run, sha256File, tempDir } from '../helpers/peers.js';
import { rng, seedFrom, type Rng } from '../helpers/random.js';
import { expectSame, qemuVpc } from '../vhd/helpers.js';

const MiB = 2 ** 20;
const SEED = seedFrom('TIDEMARK_CONVERT_DISKS_SEED', 4242);
console.log(`convert-disks seed ${SEED} (TIDEMARK_CONVERT_DISKS_SEED)`);
const random = rng(SEED);
const SIZE = 8 * MiB;
const noQemu = missingPeers('qemu-img');

let dir: string;
let cleanup: () => Promise<void>;
beforeAll(async () => ({ dir, cleanup } = await tempDir('convert-disks')));
afterAll(async () => cleanup?.());

/** A VHD with seeded data written through the VHD engine; its content. */
async function seededVhd(file: string, r: Rng, type: 'dynamic' | 'fixed' = 'dynamic'): Promise<Buffer> {
  await createVhd(file, { size: SIZE, type, blockSize: 512 * 1024 });
  const image = Buffer.alloc(SIZE);
  const d = await VhdFile.open(file, { writable: true });
  try {
    for (let i = 0; i < 20; i++) {
      const len = (1 + r.int(32)) * 4096;
      const at = r.int((SIZE - len) / 4096) * 4096;
      const data = r.bytes(len);
      await d.write(data, at);
      data.copy(image, at);
    }
  } finally {
    await d.close();
  }
  return image;
}

async function readVhdx(file: string): Promise<Buffer> {
  const d = await VhdxFile.open(file);
  try {
    const out = Buffer.alloc(d.virtualSize);
    await d.read(out, 0);
    return out;
  } finally {
    await d.close();
  }
}

async function readExport(socket: string, exportName: string): Promise<Buffer> {
  const nbd = await NbdClient.connect({ socket, exportName });
  try {
    return await nbd.read(0, nbd.size);
  } finally {
    await nbd.close();
  }
}

/** sha256 of every file in `dirs` (by path). */
async function hashes(...dirs: string[]): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const d of dirs) {
    for (const f of (await readdir(d, { withFileTypes: true })).filter((e) => e.isFile())) {
      out[path.join(d, f.name)] = await sha256File(path.join(d, f.name));
    }
  }
  return out;
}

const diskLike = (files: string[]) => files.filter((f) => /\.(vhdx?|avhdx?|rct|mrt|converting)$/.test(f)).sort();

describe(`vm convert-disks (seed ${SEED})`, () => {
  let store: string;
  let host: RunningHost;
  let api: HostClient;
  let repo: Repository;
  const images = new Map<string, Buffer>();

  beforeAll(async () => {
    store = path.join(dir, 'store');
    host = await startHost({ store, log: HostLog.silent() });
    api = await HostClient.connect({ store });
    repo = await Repository.init(path.join(dir, 'repo'), { chunkSize: 256 * 1024 });
  });
  afterAll(async () => {
    await repo?.close();
    await host?.close();
  });

  async function backup(vm: string): Promise<BackupSetSummary> {
    const log: string[] = [];
    const s = await runBackupSet({
      host: api,
      repo,
      vms: [vm],
      flow: '2016',
      consistency: 'crash',
      events: { log: (l) => log.push(l) },
    });
    expect(s.errors, log.join('\n')).toEqual([]);
    expect(s.ok).toBe(true);
    return s;
  }

  async function writeThroughNbd(vm: string, slot: string, n = 10): Promise<void> {
    const s = await api.showVm(vm);
    const d = s.disks.find((x) => x.slot === slot)!;
    const nbd = await NbdClient.connect({ socket: host.host.nbdSocket, exportName: d.export! });
    const image = images.get(`${vm}/${slot}`)!;
    try {
      for (let i = 0; i < n; i++) {
        const len = (1 + random.int(8)) * 4096;
        const at = random.int((image.length - len) / 4096) * 4096;
        const data = random.bytes(len);
        await nbd.write(at, data);
        data.copy(image, at);
      }
      await nbd.flush();
    } finally {
      await nbd.close();
    }
  }

  it('converts a dynamic VHD disk to VHDX beside it: exact content, qemu-img check clean, VHD gone, 0600', async () => {
    const vhd = path.join(store, 'legacy.vhd');
    images.set('legacy/scsi0-0', await seededVhd(vhd, random));
    const vm = await api.createVm({
      name: 'legacy',
      configVersion: '5.0',
      disks: [
        { slot: 'scsi0-0', path: vhd },
        { slot: 'scsi0-1', size: 4 * MiB },
      ],
    });
    images.set('legacy/scsi0-1', Buffer.alloc(4 * MiB));
    expect(vm.disks.map((d) => d.tracking)).toEqual(['none', 'none']);
    // What QEMU's vpc driver reads of the VHD before: the reference the VHDX must match.
    let qemuRaw: Buffer | null = null;
    if (!noQemu) {
      const raw = path.join(dir, 'legacy.qemu.raw');
      await run('qemu-img', ['convert', '--image-opts', qemuVpc(vhd), '-O', 'raw', raw]);
      qemuRaw = await readFile(raw);
      expectSame(qemuRaw, images.get('legacy/scsi0-0')!, 'qemu-img -f vpc of the VHD');
    }

    const r = await api.convertDisks('legacy', { to: 'vhdx' });
    const vhdx = path.join(store, 'legacy.vhdx');
    expect(r.converted).toEqual([
      { slot: 'scsi0-0', from: vhd, to: vhdx, virtualSize: SIZE, bytesWritten: expect.any(Number) },
    ]);
    expect(r.converted[0].bytesWritten).toBeGreaterThan(0);
    expect(r.skipped).toEqual([
      { slot: 'scsi0-1', file: path.join(store, 'vms', 'legacy', 'disks', 'scsi0-1.vhdx'), reason: 'already VHDX' },
    ]);
    expect(r.tracking).toBe(false); // 5.0: no RCT until vm upgrade
    expect(diskLike(await readdir(store))).toEqual(['legacy.vhdx']);
    expect((await stat(vhdx)).mode & 0o777).toBe(0o600);
    const shown = await api.showVm('legacy');
    expect(shown.definition.disks[0]).toMatchObject({ slot: 'scsi0-0', base: vhdx, head: vhdx, virtualSize: SIZE });
    expect(shown.definition.pending).toBeNull();
    expect(shown.disks[0].trackingReason).toBeNull();
    expectSame(await readVhdx(vhdx), images.get('legacy/scsi0-0')!, 'the VHDX');
    if (qemuRaw) {
      const check = await qemuImgCheck(vhdx);
      expect(check.ok, check.output).toBe(true);
      const raw = path.join(dir, 'legacy.vhdx.raw');
      await run('qemu-img', ['convert', '-f', 'vhdx', vhdx, '-O', 'raw', raw]);
      expectSame(await readFile(raw), qemuRaw, 'qemu-img -f vhdx of the VHDX against -f vpc of the VHD');
    }
    // It runs on the VHDX: the export reads the same.
    const s = await api.startVm('legacy');
    expectSame(await readExport(host.host.nbdSocket, s.disks[0].export!), images.get('legacy/scsi0-0')!, 'NBD');
    await api.stopVm('legacy');
    // Nothing left to convert: an answer, not an error.
    const again = await api.convertDisks('legacy', { to: 'vhdx' });
    expect(again.converted).toEqual([]);
    expect(again.skipped.map((x) => x.reason)).toEqual(['already VHDX', 'already VHDX']);
  }, 120_000);

  it('vm upgrade then backups: the first full, the next incremental, restores exact', async () => {
    const up = await api.upgradeVm('legacy');
    expect(up.disks.map((d) => d.tracking)).toEqual(['enabled', 'enabled']);
    await api.startVm('legacy');
    await writeThroughNbd('legacy', 'scsi0-0');
    const first = await backup('legacy');
    const d1 = first.vms[0].disks.find((d) => d.slot === 'scsi0-0')!;
    expect(d1.read).toBe('full');
    await writeThroughNbd('legacy', 'scsi0-0');
    await writeThroughNbd('legacy', 'scsi0-1', 3);
    const second = await backup('legacy');
    for (const d of second.vms[0].disks) {
      expect(d.read, `${d.slot}: ${d.fullReason}`).toBe('incremental');
      expect(d.rctId).not.toBeNull();
    }
    const restored = await restorePoint(repo, second.pointId!, { to: path.join(dir, 'restore'), format: 'raw' });
    for (const d of restored.disks) expectSame(await readFile(d.file), images.get(`legacy/${d.slot}`)!, d.slot);
    await api.stopVm('legacy');
  }, 300_000);

  it('a fixed VHD at configuration 9.0 becomes a fixed VHDX, tracked at once', async () => {
    const vhd = path.join(store, 'fixed.vhd');
    const image = await seededVhd(vhd, random, 'fixed');
    await api.createVm({ name: 'fixed', disks: [{ slot: 'ide0-0', path: vhd }] });
    const r = await api.convertDisks('fixed', { to: 'vhdx' });
    expect(r.tracking).toBe(true);
    expect(r.vm.disks[0].tracking).toBe('enabled');
    const vhdx = path.join(store, 'fixed.vhdx');
    expect(diskLike(await readdir(store)).filter((f) => f.startsWith('fixed'))).toEqual([
      'fixed.vhdx',
      'fixed.vhdx.mrt',
      'fixed.vhdx.rct',
    ]);
    for (const f of ['fixed.vhdx.mrt', 'fixed.vhdx.rct'])
      expect((await stat(path.join(store, f))).mode & 0o777).toBe(0o600);
    const d = await VhdxFile.open(vhdx);
    try {
      expect(d.diskType).toBe('fixed');
    } finally {
      await d.close();
    }
    expectSame(await readVhdx(vhdx), image, 'the fixed VHDX');
  }, 60_000);

  it('refuses a running VM, a checkpoint, a reference point and --to vhd, changing no file', async () => {
    const vhd = path.join(store, 'refused.vhd');
    await seededVhd(vhd, random);
    await api.createVm({ name: 'refused', disks: [{ slot: 'scsi0-0', path: vhd }] });
    const folders = [store, path.join(store, 'vms', 'refused', 'disks')];
    const before = await hashes(...folders);
    const refused = async (code: string, message: RegExp) => {
      await expect(api.convertDisks('refused', { to: 'vhdx' })).rejects.toMatchObject({ code, message });
      expect(await hashes(...folders)).toEqual(before);
      expect((await api.showVm('refused')).definition.pending).toBeNull();
    };
    await api.startVm('refused');
    await refused('CONFLICT', /refused is Running: stop it to convert its disks/);
    await api.stopVm('refused');
    const cp = await api.createCheckpoint('refused', { name: 'keep', type: 'standard' });
    const withCp = await hashes(...folders); // the checkpoint made its .avhd
    await expect(api.convertDisks('refused', { to: 'vhdx' })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(
        /has 1 checkpoint\(s\): delete them first .*Convert-VHD needs a disk without children/,
      ),
    });
    expect(await hashes(...folders)).toEqual(withCp);
    await api.deleteCheckpoint('refused', cp.id);
    const afterCp = await hashes(...folders);
    const rp = await api.createReferencePoint('refused', {});
    await expect(api.convertDisks('refused', { to: 'vhdx' })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/has 1 reference point\(s\): destroy them first/),
    });
    expect(await hashes(...folders)).toEqual(afterCp);
    await api.destroyReferencePoint('refused', rp.id);
    await expect(api.convertDisks('refused', { to: 'vhd' as 'vhdx' })).rejects.toMatchObject({
      code: 'INVALID_ARGUMENT',
      message: expect.stringMatching(/disks convert to vhdx only, not "vhd"/),
    });
    // A file where the VHDX would go: refused before anything is made.
    await createVhd(path.join(store, 'refused.vhdx.converting'), { size: MiB });
    await expect(api.convertDisks('refused', { to: 'vhdx' })).rejects.toMatchObject({
      code: 'CONFLICT',
      message: expect.stringMatching(/refused\.vhdx\.converting exists.*move it away first/),
    });
    expect((await api.showVm('refused')).definition.pending).toBeNull();
  }, 120_000);

  it('the CLI: vm convert-disks NAME --to vhdx prints what it converted; --to vhd is refused', async () => {
    const vhd = path.join(store, 'cli.vhd');
    await seededVhd(vhd, random);
    await api.createVm({ name: 'cli', configVersion: '5.0', disks: [{ slot: 'scsi0-0', path: vhd }] });
    const cli = (...args: string[]) =>
      run(process.execPath, [path.join(REPO_ROOT, 'bin', 'tidemark.js'), ...args, '--store', store], {
        allowFail: true,
      });
    const bad = await cli('vm', 'convert-disks', 'cli', '--to', 'vhd');
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/INVALID_ARGUMENT: --to vhd: disks convert to vhdx only/);
    const ok = await cli('vm', 'convert-disks', 'cli', '--to', 'vhdx');
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toMatch(
      new RegExp(`cli scsi0-0: ${vhd} → ${path.join(store, 'cli.vhdx')} \\(8(\\.0)? MiB virtual`),
    );
    expect(ok.stdout).toMatch(/configuration version 5\.0 has no change tracking: tidemark vm upgrade cli turns it on/);
    const again = await cli('vm', 'convert-disks', 'cli', '--to', 'vhdx');
    expect(again.code).toBe(0);
    expect(again.stdout).toMatch(/skipped \(already VHDX\)\ncli: no VHD disk to convert/);
  }, 60_000);
});

// ---------------------------------------------------------------- crash safety

/** A host in a child process converting `vm`'s disks, killed (SIGKILL) at its `killAt`-th step. */
const CHILD = `
const [store, vm, killAt] = process.argv.slice(1);
const { Host } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist', 'host', 'host.js'))});
const { HostLog } = await import(${JSON.stringify(path.join(REPO_ROOT, 'dist', 'host', 'log.js'))});
let n = 0;
const { writeSync } = await import('node:fs');
const hook = (step, slot) => {
  if (++n === Number(killAt)) {
    writeSync(1, step + ' ' + (slot ?? '') + '\\n');
    process.kill(process.pid, 'SIGKILL');
  }
};
const host = await Host.open({ store, log: HostLog.silent(), nbd: { socket: store + '/nbd.sock' }, hooks: { convertDisks: hook } });
await host.convertDisks(vm, { to: 'vhdx' });
await host.close();
process.stdout.write('done\\n');
`;

const runChild = (store: string, vm: string, killAt: number) => runKilledAt(CHILD, [store, vm, String(killAt)]);

describe(`vm convert-disks, crash safety (seed ${SEED})`, () => {
  const VM = 'crashy';
  const SLOTS = ['scsi0-0', 'scsi0-1'];

  /** A fresh store with a VM on two seeded VHDs (in the store's root, as an attached disk). */
  async function prepare(store: string, r: Rng): Promise<Map<string, Buffer>> {
    const host = await Host.open({ store, log: HostLog.silent(), nbd: { socket: path.join(store, 'nbd.sock') } });
    const content = new Map<string, Buffer>();
    try {
      const disks = [];
      for (const slot of SLOTS) {
        const file = path.join(store, `${slot}.vhd`);
        content.set(slot, await seededVhd(file, r));
        disks.push({ slot, path: file });
      }
      await host.createVm({ name: VM, disks });
    } finally {
      await host.close();
    }
    return content;
  }

  /** After a restart: nothing pending, all VHD or all VHDX, exact through NBD, no stray file. */
  async function verify(
    store: string,
    content: Map<string, Buffer>,
    vhdHashes: Record<string, string>,
    label: string,
  ): Promise<'rolled back' | 'finished'> {
    const host = await Host.open({ store, log: HostLog.silent(), nbd: { socket: path.join(store, 'nbd.sock') } });
    try {
      const def = host.getVm(VM);
      expect(def.pending, label).toBeNull();
      const heads = def.disks.map((d) => path.basename(d.head));
      const files = diskLike([...(await readdir(store)), ...(await readdir(path.join(store, 'vms', VM, 'disks')))]);
      let outcome: 'rolled back' | 'finished';
      if (heads.every((h) => h.endsWith('.vhd'))) {
        outcome = 'rolled back';
        expect(files, label).toEqual(['scsi0-0.vhd', 'scsi0-1.vhd']);
        expect(
          await hashes(store).then((h) => Object.fromEntries(Object.entries(h).filter(([f]) => f.endsWith('.vhd')))),
          label,
        ).toEqual(vhdHashes);
      } else {
        outcome = 'finished';
        expect(heads, label).toEqual(['scsi0-0.vhdx', 'scsi0-1.vhdx']);
        expect(files, label).toEqual([
          'scsi0-0.vhdx',
          'scsi0-0.vhdx.mrt',
          'scsi0-0.vhdx.rct',
          'scsi0-1.vhdx',
          'scsi0-1.vhdx.mrt',
          'scsi0-1.vhdx.rct',
        ]);
        if (!noQemu) {
          for (const h of heads) {
            const check = await qemuImgCheck(path.join(store, h));
            expect(check.ok, `${label} ${h}: ${check.output}`).toBe(true);
          }
        }
      }
      const s = await host.startVm(VM);
      for (const d of s.disks)
        expectSame(await readExport(host.nbdSocket, d.export!), content.get(d.slot)!, `${label} ${d.slot}`);
      await host.stopVm(VM);
      return outcome;
    } finally {
      await host.close();
    }
  }

  it('killed at each step, the restarted host rolls back or finishes: exact content, no stray file', async () => {
    const outcomes: string[] = [];
    for (let killAt = 1; ; killAt++) {
      const store = path.join(dir, `crash-${killAt}`);
      const content = await prepare(store, rng(SEED + killAt));
      const vhdHashes = await hashes(store).then((h) =>
        Object.fromEntries(Object.entries(h).filter(([f]) => f.endsWith('.vhd'))),
      );
      const { killed, step } = await runChild(store, VM, killAt);
      const label = killed ? `killed at step ${killAt} (${step})` : 'not killed';
      const outcome = await verify(store, content, vhdHashes, label);
      outcomes.push(`${label}: ${outcome}`);
      if (!killed) break;
      expect(killAt).toBeLessThan(30);
    }
    console.log(outcomes.join('\n'));
    // journaled, 4 per disk (copying, written, renamed, tracked), committed, unlinked; then a run to the end.
    expect(outcomes).toHaveLength(1 + 4 * SLOTS.length + 2 + 1);
    expect(outcomes.filter((o) => o.endsWith('rolled back'))).toHaveLength(1 + 4 * SLOTS.length);
    expect(outcomes.at(-1)).toBe('not killed: finished');
  }, 600_000);

  it('a failure at each step before the commit (in process) leaves the VM as it was', async () => {
    for (let failAt = 1; failAt <= 1 + 4 * SLOTS.length; failAt++) {
      const store = path.join(dir, `fail-${failAt}`);
      const content = await prepare(store, rng(SEED + 100 + failAt));
      const vhdHashes = await hashes(store).then((h) =>
        Object.fromEntries(Object.entries(h).filter(([f]) => f.endsWith('.vhd'))),
      );
      let n = 0;
      let at = '';
      const host = await Host.open({
        store,
        log: HostLog.silent(),
        nbd: { socket: path.join(store, 'nbd.sock') },
        hooks: {
          convertDisks: (step, slot) => {
            if (++n === failAt) {
              at = `${step} ${slot ?? ''}`;
              throw new Error(`injected failure at ${at}`);
            }
          },
        },
      });
      try {
        await expect(host.convertDisks(VM, { to: 'vhdx' })).rejects.toThrow(/injected failure/);
        // Already rolled back in process: nothing pending, the VM as it was.
        expect(host.getVm(VM).pending).toBeNull();
      } finally {
        await host.close();
      }
      expect(await verify(store, content, vhdHashes, `failed at ${failAt} (${at})`)).toBe('rolled back');
    }
  }, 600_000);
});
