/**
 * VMs on legacy VHD disks through every per-VM flow (issue 17): a set of a VM on a dynamic VHD and a VM on a VHDX,
 * both disk-only (their disks served by one host for the whole file, written through NBD with seeded data between
 * runs), backed up with `per-vm`, `2012r2`, `2008r2` and then `2016`. Each run: the storage snapshots the flow takes
 * (one per VM, then one for the set); the VHD disk read in full with the VHD reason, the VHDX disk incremental after
 * its first full; the restore point recording each disk's format (`vhd`, `vhdx`); the restore byte-exact against
 * what the disks held at the checkpoint; the checkpoint's `.avhd` merged away (the VM's head is its `.vhd` again, no
 * `.avhd` left) and the VHD clean (Tidemark's check, QEMU's `vpc` driver reading what the guest wrote, and
 * `qemu-img check` where QEMU's vpc driver has one). In the 2012 R2 flow the writer's GUID names are of each disk's
 * format: `.avhd` for the VHD disk, `.avhdx` for the VHDX one; a name whose format the checkpoint's file does not
 * match is an error.
 *
 * Seed: TIDEMARK_FLOWS_SEED.
 */
import { readdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { VmSummary } from '../../src/api/schemas.js';
import type { BackupSetSummary, Flow } from '../../src/backup/backup-set.js';
import { lineUpFiles } from '../../src/backup/phases-2012r2.js';
import type { BatchState, RunState, VmState } from '../../src/backup/run-types.js';
import { restorePoint } from '../../src/backup/restore.js';
import { VHD_TRACKING_UNAVAILABLE } from '../../src/disk/vhd-disk.js';
import { checkVhd } from '../../src/formats/vhd/check.js';
import { cleanRun, startDiskOnlyVms, type DiskOnlyVms } from '../helpers/disk-only-vms.js';
import { requirePeers, run, tempDir } from '../helpers/peers.js';
import { rng, seedFrom } from '../helpers/random.js';
import { expectSame, qemuVpc } from '../vhd/helpers.js';

const SEED = seedFrom('TIDEMARK_FLOWS_SEED', 1717);
console.log(`flows-vhd seed ${SEED} (TIDEMARK_FLOWS_SEED)`);
const random = rng(SEED);

/** name → disk sizes in MiB; `legacy` runs on a dynamic VHD, `modern` on a VHDX. */
const VMS: Record<string, number[]> = { legacy: [8], modern: [8] };
const SLOT = 'scsi0-0';
const GUID = '[0-9A-F]{8}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{4}-[0-9A-F]{12}';

let dir: string;
let cleanup: () => Promise<void>;
let set: DiskOnlyVms;
/** The VHD the legacy VM runs on. */
let vhd: string;
/** How many runs backed the VHDX disk up so far (its first is full, the others incremental). */
let runs = 0;

const peers = requirePeers('qemu-img', 'qemu-storage-daemon');

beforeAll(async () => {
  if (peers.skip) return;
  ({ dir, cleanup } = await tempDir('flows-vhd'));
  set = await startDiskOnlyVms(dir, VMS, [SLOT], { vhd: ['legacy'] });
  vhd = path.join(set.store, `legacy-${SLOT}.vhd`);
}, 60_000);

afterAll(async () => {
  await set?.close();
  await cleanup?.();
});

/** Every file under `root`, recursively. */
async function filesUnder(root: string): Promise<string[]> {
  const out: string[] = [];
  for (const e of await readdir(root, { withFileTypes: true })) {
    const p = path.join(root, e.name);
    if (e.isDirectory()) out.push(...(await filesUnder(p)));
    else if (e.isFile()) out.push(p);
  }
  return out;
}

/** One run of the whole set through `flow`, checked as the file's header says. */
async function backup(flow: Flow, storageSnapshots: number): Promise<BackupSetSummary> {
  await set.seededWrites(random);
  const before = (await set.api.hostInfo()).snapshotsTaken;
  const s = await cleanRun({ host: set.api, repo: set.repo, vms: Object.keys(VMS), flow });
  runs++;

  // The storage snapshots the flow takes, by the run's count and the host's.
  expect(s.snapshots).toBe(storageSnapshots);
  expect((await set.api.hostInfo()).snapshotsTaken - before).toBe(storageSnapshots);

  // The VHD disk is read in full every run, saying why; the VHDX disk is incremental after its first full.
  const legacy = s.vms.find((v) => v.name === 'legacy')!.disks[0];
  expect(legacy.read).toBe('full');
  expect(legacy.fullReason).toBe(VHD_TRACKING_UNAVAILABLE);
  expect(legacy.fullReason).toMatch(/^VHD disk: /);
  expect(legacy.rctId).toBeNull();
  const modern = s.vms.find((v) => v.name === 'modern')!.disks[0];
  if (runs === 1) {
    expect(modern.read).toBe('full');
    expect(modern.fullReason).toBe('first backup');
  } else {
    expect(modern.read, `${flow}: ${modern.fullReason}`).toBe('incremental');
  }
  expect(modern.rctId).not.toBeNull();
  // The restore point records each disk's own format.
  const manifest = await set.repo.readPoint(s.pointId!);
  const formats = Object.fromEntries(manifest.vms.map((v) => [v.name, v.disks.map((d) => d.format)]));
  expect(formats).toEqual({ legacy: ['vhd'], modern: ['vhdx'] });

  // Restored byte-exact against what each disk held at the checkpoint (nothing writes them during the run).
  const r = await restorePoint(set.repo, s.pointId!, { to: path.join(dir, `restore-${flow}`), format: 'raw' });
  expect(r.disks.map((d) => d.vm).sort()).toEqual(['legacy', 'modern']);
  for (const d of r.disks)
    expectSame(await readFile(d.file), set.images.get(`${d.vm}/${d.slot}`)!.image, `${flow}: ${d.vm} byte-exact`);

  await expectMergedAway(flow);
  return s;
}

/** The checkpoints' children merged away: each VM back on its base, no `.avhd`/`.avhdx` left; the VHD clean. */
async function expectMergedAway(flow: Flow): Promise<void> {
  const legacy = await set.api.showVm('legacy');
  expect(legacy.disks[0].format).toBe('vhd');
  expect(legacy.disks[0].head, flow).toBe(vhd);
  expect(legacy.disks[0].base).toBe(vhd);
  const modern = await set.api.showVm('modern');
  expect(modern.disks[0].format).toBe('vhdx');
  expect(modern.disks[0].head, flow).toBe(modern.disks[0].base);
  // Nowhere in the store: the VMs' directories nor beside the VHD (whose listing holds both bases).
  const files = await filesUnder(set.store);
  expect(files).toContain(vhd);
  expect(files).toContain(modern.disks[0].base);
  expect(
    files.filter((f) => /\.avhdx?$/i.test(f)),
    flow,
  ).toEqual([]);

  // The VHD alone is the disk now: Tidemark's check, and QEMU's vpc driver reads what the guest wrote.
  const image = set.images.get(`legacy/${SLOT}`)!.image;
  expect((await checkVhd(vhd)).errors, `${flow}: checkVhd`).toEqual([]);
  const raw = path.join(dir, `legacy-${flow}.qemu.raw`);
  await run('qemu-img', ['convert', '-U', '--image-opts', qemuVpc(vhd), '-O', 'raw', raw]);
  expectSame(await readFile(raw), image, `${flow}: qemu-img -f vpc reads the VHD`);
  // `qemu-img check -f vpc` where QEMU's vpc driver has a check (7.2's has none: it says so, exit 63).
  const check = await run('qemu-img', ['check', '-U', '-f', 'vpc', vhd], { allowFail: true });
  if (!(check.code === 63 && /does not support checks/.test(check.stderr)))
    expect(check.code, `${flow}: qemu-img check -f vpc: ${check.stdout}${check.stderr}`).toBe(0);
}

describe.skipIf(peers.skip)(`a VHD VM beside a VHDX VM through every flow (seed ${SEED})`, () => {
  it('the VM summary says each disk format', async () => {
    const legacy = await set.api.showVm('legacy');
    expect(legacy.disks[0]).toMatchObject({ format: 'vhd', base: vhd, tracking: 'none' });
    expect(legacy.disks[0].trackingReason).toBe(VHD_TRACKING_UNAVAILABLE);
    const modern = await set.api.showVm('modern');
    expect(modern.disks[0]).toMatchObject({ format: 'vhdx', tracking: 'enabled', trackingReason: null });
  });

  it('per-vm: a storage snapshot per VM; the VHD read in full, the .avhd merged away', async () => {
    await backup('per-vm', 2);
  });

  it('2012r2: the GUID names are of each disk format (.avhd for the VHD), lined up with the files made', async () => {
    const s = await backup('2012r2', 2);
    for (const v of s.vms) {
      expect(v.autoRecovery, v.name).toMatch(/modelled: the VM has no guest/);
      expect(v.guidNames).toHaveLength(1);
      const [g] = v.guidNames!;
      const ext = v.name === 'legacy' ? 'avhd' : 'avhdx';
      expect(g.name, v.name).toMatch(new RegExp(`^${GUID}\\.${ext}$`));
      expect(g.file, v.name).toMatch(new RegExp(`\\.${ext}$`));
    }
  });

  it('2008r2: a storage snapshot per VM, every disk recovered on the host; the VHD read in full', async () => {
    const s = await backup('2008r2', 2);
    for (const v of s.vms) expect(v.autoRecovery, v.name).toMatch(/no file system on the disk: nothing to replay/);
  });

  it('2016: one storage snapshot for the mixed set', async () => {
    await backup('2016', 1);
  });
});

describe('2012r2 line-up: the checkpoint file must be of the format the writer named', () => {
  /** The checkpoints `lineUp` deleted, and whether the batch went on. */
  let deleted: string[];
  let goesOn: boolean | void;
  let left: VmState[];

  /** `lineUpFiles` over one VM whose named file is `named` and whose head the host says is `head`. */
  async function lineUp(named: string, head: string): Promise<VmState> {
    deleted = [];
    const s = {
      name: 'vm',
      checkpoint: { id: 'cp1' },
      summary: { status: 'ok', guidNames: [{ slot: SLOT, name: named, file: null }] },
    } as unknown as VmState;
    const runState = {
      opts: {
        host: {
          showVm: async () => ({ disks: [{ slot: SLOT, head }] }) as unknown as VmSummary,
          deleteCheckpoint: async (vm: string, id: string, o: { lease?: string }) => {
            deleted.push(`${vm} ${id} ${o.lease}`);
          },
        },
      },
      leases: { lease: () => 'lease1' },
      log: () => undefined,
      fail: (vm: VmState, err: unknown) => {
        Object.assign(vm.summary, { status: 'failed', error: (err as Error).message });
      },
    } as unknown as RunState;
    const batch = { ready: [s], cleanups: [] } as BatchState;
    goesOn = await lineUpFiles(runState, batch);
    left = batch.ready;
    return s;
  }

  it('lines up a name with a file of its format', async () => {
    const avhd = await lineUp('11111111-2222-3333-4444-555555555555.avhd', '/s/vms/vm/disks/x.avhd');
    expect(avhd.summary.status).toBe('ok');
    expect(avhd.summary.guidNames![0].file).toBe('/s/vms/vm/disks/x.avhd');
    const avhdx = await lineUp('11111111-2222-3333-4444-555555555555.avhdx', '/s/vms/vm/disks/x.avhdx');
    expect(avhdx.summary.status).toBe('ok');
    expect(goesOn).toBe(true);
    expect(left).toEqual([avhdx]);
    expect(deleted).toEqual([]);
  });

  it('refuses a file of the other format, naming both', async () => {
    const s = await lineUp('11111111-2222-3333-4444-555555555555.avhdx', '/s/vms/vm/disks/x.avhd');
    expect(s.summary.status).toBe('failed');
    expect(s.summary.guidNames![0].file).toBeNull();
    expect(s.summary.error).toMatch(/named 11111111-.*\.avhdx \(a \.avhdx file\), but the checkpoint made x\.avhd/);
    // The VM leaves the batch before its storage snapshot, its recovery checkpoint deleted under the run's lease.
    expect(goesOn).toBe(false);
    expect(left).toEqual([]);
    expect(deleted).toEqual(['vm cp1 lease1']);
    const t = await lineUp('11111111-2222-3333-4444-555555555555.avhd', '/s/vms/vm/disks/x.avhdx');
    expect(t.summary.status).toBe('failed');
    expect(deleted).toEqual(['vm cp1 lease1']);
  });
});
