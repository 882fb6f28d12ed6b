/**
 * Restore: every disk of a restore point (or one VM, or one disk) into a directory, as dynamic VHDX or raw
 * files, with chunks fetched and decompressed in parallel and all-zero chunks never written (the new file
 * already reads as zeros). `register` makes the restored VM a new VM of a host.
 */
import { mkdir, open, writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { HostClient } from '../api/client.js';
import { TidemarkError, fromSystemError } from '../errors.js';
import { createVhdx } from '../formats/vhdx/create.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import type { Repository, RestoreSink } from '../repository/index.js';
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

export async function restorePoint(repo: Repository, point: string, req: RestoreRequest): Promise<RestoreSummary> {
  const started = performance.now();
  const m = await repo.readPoint(point);
  const vms = m.vms.filter((v) => !req.vm || v.name === req.vm);
  if (vms.length === 0) throw new TidemarkError('NOT_FOUND', `restore point ${m.id} has no VM ${req.vm}`);
  const format = req.format ?? 'vhdx';
  const out: RestoredDisk[] = [];
  for (const vm of vms) {
    const disks = vm.disks.filter((d) => !req.disk || d.diskId === req.disk || d.name === req.disk);
    if (disks.length === 0) continue;
    const dir = path.join(req.to, vm.name);
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'vm.json'), JSON.stringify(vm.definition, null, 2) + '\n');
    for (const d of disks) {
      const t0 = performance.now();
      const file = path.join(dir, `${d.name}.${format}`);
      const progress = req.onProgress ? (done: number, total: number) => req.onProgress!(file, done, total) : undefined;
      const sink =
        format === 'raw'
          ? await rawSink(file, d.virtualSize)
          : await vhdxSink(file, d.virtualSize, d.logicalSectorSize);
      let bytes = 0;
      try {
        const r = await repo.restoreDisk(m.id, d.diskId, sink, {
          parallel: req.parallel ?? 16,
          assumeZeroed: true,
          onProgress: progress,
        });
        bytes = r.bytesWritten;
      } finally {
        await sink.close();
      }
      out.push({
        vm: vm.name,
        slot: d.name,
        diskId: d.diskId,
        file,
        virtualSize: d.virtualSize,
        bytesWritten: bytes,
        durationMs: performance.now() - t0,
      });
    }
  }
  if (out.length === 0) throw new TidemarkError('NOT_FOUND', `restore point ${m.id} has no disk ${req.disk}`);
  return { pointId: m.id, time: m.time, disks: out, durationMs: performance.now() - started };
}

/** Registers restored disks as a new VM of the host (named NAME-restored unless `name` is given). */
export async function registerRestored(
  host: HostClient,
  summary: RestoreSummary,
  opts: { name?: string } = {},
): Promise<string[]> {
  const names: string[] = [];
  const byVm = new Map<string, RestoredDisk[]>();
  for (const d of summary.disks) byVm.set(d.vm, [...(byVm.get(d.vm) ?? []), d]);
  for (const [vm, disks] of byVm) {
    if (disks.some((d) => !d.file.endsWith('.vhdx'))) {
      throw new TidemarkError('INVALID_ARGUMENT', 'only VHDX restores can be registered (use --format vhdx)');
    }
    const name = opts.name && byVm.size === 1 ? opts.name : `${vm}-restored`;
    await host.createVm({ name, disks: disks.map((d) => ({ slot: d.slot, path: path.resolve(d.file) })) });
    names.push(name);
  }
  return names;
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
  await fh.truncate(size);
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
