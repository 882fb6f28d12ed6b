/**
 * Restore: every disk of a restore point (or one VM, or one disk) into a directory, as dynamic VHDX or raw
 * files, with chunks fetched and decompressed in parallel and all-zero chunks never written (the new file
 * already reads as zeros). `restoreRegistered` makes each restored VM a new VM of a host, all or nothing.
 */
import { randomBytes } from 'node:crypto';
import { chmod, copyFile, lstat, mkdir, open, rename, rm, unlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { HostClient } from '../api/client.js';
import type { CommitImportBody, ImportInfo, VmSummary } from '../api/schemas.js';
import { TidemarkError, fromSystemError } from '../errors.js';
import { createVhdx } from '../formats/vhdx/create.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import type { DiskEntry, PointManifest, Repository, RestoreSink, VmEntry } from '../repository/index.js';
import { DIRECT_ALIGN, DIRECT_MIN_BYTES, DirectWriter, openDirect } from '../util/direct-io.js';
import { writeFully } from '../util/file.js';

export interface RestoreRequest {
  to: string;
  vm?: string;
  /** A virtual disk id, or a slot name (scsi0-0). */
  disk?: string;
  format?: 'vhdx' | 'raw';
  parallel?: number;
  onProgress?: (file: string, done: number, total: number) => void;
}

export interface RestoredDisk {
  vm: string;
  slot: string;
  diskId: string;
  file: string;
  virtualSize: number;
  bytesWritten: number;
  durationMs: number;
}

export interface RestoreSummary {
  pointId: string;
  time: string;
  disks: RestoredDisk[];
  durationMs: number;
}

/**
 * Where each selected VM and disk of a point goes. Every name comes from a manifest, which an attacker with write
 * access to an unencrypted repository may have forged: each is resolved against the target and must stay a single
 * entry inside it (the manifest's validation already refuses such names; this is the second check, before any
 * file is created).
 */
interface RestorePlan {
  vm: VmEntry;
  dir: string;
  disks: { disk: DiskEntry; file: string }[];
}

/** `root/name` (root absolute), refused (PATH_NOT_ALLOWED) unless it is one entry directly inside root. */
export function inside(root: string, name: string, what: string): string {
  const p = path.resolve(root, name);
  if (name.length === 0 || path.dirname(p) !== root || path.basename(p) !== name || name === '.' || name === '..') {
    throw new TidemarkError('PATH_NOT_ALLOWED', `${what} "${name}" would be written outside ${root}: refused`, {
      root,
      name,
    });
  }
  return p;
}

export async function restorePoint(repo: Repository, point: string, req: RestoreRequest): Promise<RestoreSummary> {
  const started = performance.now();
  const m = await repo.readPoint(point);
  const vms = m.vms.filter((v) => !req.vm || v.name === req.vm);
  if (vms.length === 0) throw new TidemarkError('NOT_FOUND', `restore point ${m.id} has no VM ${req.vm}`);
  const format = req.format ?? 'vhdx';
  const to = path.resolve(req.to);
  const plan: RestorePlan[] = [];
  for (const vm of vms) {
    const disks = vm.disks.filter((d) => !req.disk || d.diskId === req.disk || d.name === req.disk);
    if (disks.length === 0) continue;
    const dir = inside(to, vm.name, `restore point ${m.id}: VM`);
    plan.push({
      vm,
      dir,
      disks: disks.map((d) => ({ disk: d, file: inside(dir, `${d.name}.${format}`, `restore point ${m.id}: disk`) })),
    });
  }
  if (plan.length === 0) throw new TidemarkError('NOT_FOUND', `restore point ${m.id} has no disk ${req.disk}`);
  // Every disk's index read and checked against the disk (one at a time: an index can be large) before a file is
  // created: a disk claiming more than its index holds, or an index that cannot be read, fails with nothing written.
  for (const p of plan) {
    for (const { disk } of p.disks) {
      if (format === 'vhdx' && (disk.virtualSize === 0 || disk.virtualSize % disk.logicalSectorSize !== 0)) {
        throw new TidemarkError(
          'INVALID_ARGUMENT',
          `disk ${p.vm.name}/${disk.name} of restore point ${m.id} has ${disk.virtualSize} bytes, not a whole number of ${disk.logicalSectorSize}-byte sectors: restore it with --format raw`,
        );
      }
      await repo.readIndex(disk.index);
    }
  }

  await mkdir(to, { recursive: true });
  const out: RestoredDisk[] = [];
  for (const { vm, dir, disks } of plan) {
    await makeDirectory(dir);
    await writeDefinition(dir, vm.definition);
    for (const { disk: d, file } of disks) out.push(await restoreDiskTo(repo, m, vm.name, d, file, format, req));
  }
  return { pointId: m.id, time: m.time, disks: out, durationMs: performance.now() - started };
}

type PointDisk = PointManifest['vms'][number]['disks'][number];

/** One disk of a point into a new file (which must not exist). */
async function restoreDiskTo(
  repo: Repository,
  m: PointManifest,
  vm: string,
  d: PointDisk,
  file: string,
  format: 'vhdx' | 'raw',
  req: Pick<RestoreRequest, 'parallel' | 'onProgress'>,
  created?: string[],
): Promise<RestoredDisk> {
  const t0 = performance.now();
  const progress = req.onProgress ? (done: number, total: number) => req.onProgress!(file, done, total) : undefined;
  const sink =
    format === 'raw' ? await rawSink(file, d.virtualSize) : await vhdxSink(file, d.virtualSize, d.logicalSectorSize);
  created?.push(file);
  let bytes = 0;
  try {
    const r = await repo.restoreDisk(m.id, d.diskId, sink, {
      parallel: req.parallel ?? 16,
      assumeZeroed: true,
      onProgress: progress,
    });
    bytes = r.bytesWritten;
    await sink.close();
  } catch (err) {
    // A disk that did not restore whole is not left to look like one: the file was ours (created exclusively).
    await sink.close().catch(() => undefined);
    await unlink(file).catch(() => undefined);
    throw err;
  }
  return {
    vm,
    slot: d.name,
    diskId: d.diskId,
    file,
    virtualSize: d.virtualSize,
    bytesWritten: bytes,
    durationMs: performance.now() - t0,
  };
}

export interface RegisterRequest extends Omit<RestoreRequest, 'to' | 'format'> {
  /** Restore into DIR/VM/SLOT.vhdx first, then move the disks into the new VM's folder (default: straight there). */
  to?: string;
  /** The new VM's name (one VM only); default VM-restored. */
  name?: string;
  /** The holder's description in the host's import list (default `tidemark restore POINT --register`). */
  command?: string;
}

export interface RegisterSummary extends RestoreSummary {
  registered: string[];
}

/**
 * Restores VMs of a point as new VMs of a host, all or nothing: every name is checked and reserved (the host
 * makes each new VM's folder) before anything is written; the disks are written straight into those folders
 * (or, with `to`, there first and then moved in); the VMs are registered at the end. On any failure every file
 * and folder it made is removed, and VMs it had registered are deleted again.
 */
export async function restoreRegistered(
  repo: Repository,
  host: HostClient,
  point: string,
  req: RegisterRequest,
): Promise<RegisterSummary> {
  const started = performance.now();
  const m = await repo.readPoint(point);
  const vms = m.vms
    .filter((v) => !req.vm || v.name === req.vm)
    .map((v) => ({ vm: v, disks: v.disks.filter((d) => !req.disk || d.diskId === req.disk || d.name === req.disk) }))
    .filter((v) => v.disks.length > 0);
  if (vms.length === 0) {
    throw new TidemarkError(
      'NOT_FOUND',
      `restore point ${m.id} has no ${req.vm ? `VM ${req.vm}` : `disk ${req.disk}`}`,
    );
  }
  if (req.name !== undefined && vms.length > 1) {
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `--name names one VM, but restore point ${m.id} holds ${vms.length} (${vms.map((v) => v.vm.name).join(', ')}): add --vm`,
    );
  }
  const versions = (await host.hostInfo()).configVersions?.supported;
  const plans = vms.map(({ vm, disks }) => ({
    vm,
    disks,
    name: req.name ?? `${vm.name}-restored`,
    settings: definitionSettings(vm.definition, versions),
    files: [] as { slot: string; path: string }[],
  }));

  const reserved: ImportInfo[] = [];
  const created: string[] = [];
  const createdDirs: string[] = [];
  const registered: string[] = [];
  const out: RestoredDisk[] = [];
  const owner = {
    pid: process.pid,
    hostname: os.hostname(),
    command: req.command ?? `tidemark restore ${m.id} --register`,
  };
  try {
    // Every name is checked and reserved before a byte is written.
    for (const p of plans) reserved.push(await host.reserveImport({ name: p.name, owner }));
    for (const [i, p] of plans.entries()) {
      const into = reserved[i].disksDir;
      const staging =
        req.to === undefined ? undefined : inside(path.resolve(req.to), p.vm.name, `restore point ${m.id}: VM`);
      if (staging) {
        const made = await mkdir(staging, { recursive: true });
        if (made) createdDirs.push(made);
        const defFile = path.join(staging, 'vm.json');
        await writeFile(defFile, JSON.stringify(p.vm.definition, null, 2) + '\n', { flag: 'wx' }).catch((err) => {
          throw fromSystemError(err, 'create', defFile);
        });
        created.push(defFile);
      }
      for (const d of p.disks) {
        const final = inside(into, `${d.name}.vhdx`, `restore point ${m.id}: disk`);
        const first = staging ? inside(staging, `${d.name}.vhdx`, `restore point ${m.id}: disk`) : final;
        const r = await restoreDiskTo(repo, m, p.vm.name, d, first, 'vhdx', req, created);
        await chmod(first, 0o600);
        if (first !== final) {
          await move(first, final);
          created.push(final);
        }
        out.push({ ...r, file: final });
        p.files.push({ slot: d.name, path: final });
      }
    }
    for (const p of plans) {
      const vm: VmSummary = await host.commitImport(p.name, { ...p.settings, disks: p.files });
      registered.push(vm.name);
    }
  } catch (err) {
    for (const r of reserved) {
      if (!registered.includes(r.name)) await host.cancelImport(r.name).catch(() => undefined);
    }
    for (const name of registered) await host.deleteVm(name, true).catch(() => undefined);
    for (const f of created.reverse()) await unlink(f).catch(() => undefined);
    // Folders it made under `to` hold nothing but what it wrote.
    for (const d of createdDirs) await rm(d, { recursive: true, force: true }).catch(() => undefined);
    throw err;
  }
  return { pointId: m.id, time: m.time, disks: out, durationMs: performance.now() - started, registered };
}

type Settings = Omit<CommitImportBody, 'disks' | 'guest'>;

/**
 * What the new VM keeps of the backed-up definition: its generation, version and checkpoint policy, and what
 * QEMU runs (memory, vCPUs, SCSI controllers, boot, image, accel), so a restored guest boots as it did. Not
 * its guest channel: that belongs to the original. The host validates each value again on commit.
 */
function definitionSettings(def: unknown, supported: string[] | undefined): Settings {
  const d = (typeof def === 'object' && def !== null ? def : {}) as Record<string, unknown>;
  const out: Settings = {};
  if (typeof d.memoryMiB === 'number') out.memoryMiB = d.memoryMiB;
  if (typeof d.cpus === 'number') out.cpus = d.cpus;
  if (typeof d.scsiControllers === 'number') out.scsiControllers = d.scsiControllers;
  if (d.boot === null || (typeof d.boot === 'object' && d.boot !== null)) out.boot = d.boot as Settings['boot'];
  if (typeof d.image === 'string' && d.image.length > 0) out.image = d.image;
  if (typeof d.accel === 'string' && ['auto', 'kvm', 'tcg'].includes(d.accel)) out.accel = d.accel as Settings['accel'];
  if (d.generation === 1 || d.generation === 2) out.generation = d.generation;
  if (typeof d.configVersion === 'string') {
    if (supported && !supported.includes(d.configVersion)) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `the VM was backed up at configuration version ${d.configVersion}, which this host does not support`,
      );
    }
    out.configVersion = d.configVersion;
  }
  const policies = ['production-fallback', 'production-only', 'standard-only', 'disabled'];
  if (typeof d.checkpointPolicy === 'string' && policies.includes(d.checkpointPolicy)) {
    out.checkpointPolicy = d.checkpointPolicy as VmSummary['checkpointPolicy'];
  }
  return out;
}

/** Renames within a file system; copies then removes across file systems. */
async function move(from: string, to: string): Promise<void> {
  try {
    await rename(from, to);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EXDEV') throw fromSystemError(err, 'move', from);
    await copyFile(from, to);
    await chmod(to, 0o600);
    await unlink(from);
  }
}

/** A VM's directory in the target: created, or one that exists as a real directory (never through a symlink). */
async function makeDirectory(dir: string): Promise<void> {
  try {
    await mkdir(dir);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw fromSystemError(err, 'create directory', dir);
    const st = await lstat(dir);
    if (!st.isDirectory()) {
      throw new TidemarkError('ALREADY_EXISTS', `cannot restore into ${dir}: it exists and is not a directory`);
    }
  }
}

/** vm.json: written to a new file and renamed into place, so an existing symlink there is replaced, not followed. */
async function writeDefinition(dir: string, definition: unknown): Promise<void> {
  const file = path.join(dir, 'vm.json');
  const tmp = path.join(dir, `.vm.json.${randomBytes(6).toString('hex')}.tmp`);
  try {
    await writeFile(tmp, JSON.stringify(definition, null, 2) + '\n', { flag: 'wx' });
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw fromSystemError(err, 'write', file);
  }
}

type ClosableSink = RestoreSink & { close(): Promise<void> };

/**
 * A raw image. Whole aligned pieces (the chunks, at chunk-aligned offsets) are copied into aligned memory and
 * written past the page cache (util/direct-io.ts): a restore writes gigabytes nobody reads back at once, and
 * copying them into the page cache was most of its CPU time. Anything else, or where direct I/O is refused, is
 * written as usual.
 */
async function rawSink(file: string, size: number): Promise<ClosableSink> {
  let fh;
  try {
    fh = await open(file, 'wx');
  } catch (err) {
    throw fromSystemError(err, 'create', file);
  }
  try {
    await fh.truncate(size);
  } catch (err) {
    // Larger than the file system takes: the file was ours, created just now.
    await fh.close();
    await unlink(file).catch(() => undefined);
    throw fromSystemError(err, 'size', file);
  }
  const direct = await openDirect(file).catch(() => null);
  const memory = new DirectWriter(path.dirname(file));
  const spare: Buffer[] = [];
  let directOk = direct !== null;
  const buffered = (data: Buffer, offset: number) => writeFully(fh, data, offset);
  return {
    async write(offset, data) {
      if (
        !directOk ||
        offset % DIRECT_ALIGN !== 0 ||
        data.length % DIRECT_ALIGN !== 0 ||
        data.length < DIRECT_MIN_BYTES
      ) {
        return buffered(data, offset);
      }
      let bounce = spare.pop();
      if (!bounce || bounce.length < data.length) bounce = await memory.buffer(data.length);
      if (!memory.isAligned(bounce)) {
        directOk = false; // no aligned memory here: the rest goes through the page cache
        return buffered(data, offset);
      }
      try {
        data.copy(bounce);
        await writeFully(direct!, bounce.subarray(0, data.length), offset);
      } catch (err) {
        const code = (err as NodeJS.ErrnoException).code;
        if (code !== 'EINVAL') throw err;
        directOk = false; // refused after all: the rest goes through the page cache
        await buffered(data, offset);
      } finally {
        spare.push(bounce);
      }
    },
    async close() {
      await direct?.close();
      await memory.close();
      await fh.datasync();
      await fh.close();
    },
  };
}

async function vhdxSink(file: string, size: number, sector: number): Promise<ClosableSink> {
  await createVhdx(file, { size, logicalSectorSize: sector === 4096 ? 4096 : 512 });
  const disk = await VhdxFile.open(file, { writable: true });
  return {
    write: (offset, data) => disk.write(data, offset),
    async close() {
      await disk.close();
    },
  };
}
