/**
 * Test helpers for the repository: disk images with every kind of chunk (random, all zero, repeated, mostly zero,
 * a short last chunk), a backup that does what the backup application does (full, or incremental from the
 * previous point's index with only changed chunks read), and a restore into memory.
 */
import { randomUUID } from 'node:crypto';
import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import type { IndexRef, PointInput, PointManifest, Repository } from '../../src/repository/index.js';
import type { rng as Rng } from '../helpers/random.js';

type R = ReturnType<typeof Rng>;

/** A disk image: random, zero, duplicated and mostly-zero chunks, and (when size is not a multiple) a short tail. */
export function makeDiskImage(r: R, size: number, chunkSize: number): Buffer {
  const img = Buffer.alloc(size);
  const slots = Math.ceil(size / chunkSize);
  for (let s = 0; s < slots; s++) {
    const off = s * chunkSize;
    const len = Math.min(chunkSize, size - off);
    const kind = r.int(5);
    if (kind === 0) continue; // all zero
    if (kind === 1 && s > 0) {
      // a copy of an earlier chunk (dedup within a disk)
      const from = r.int(s) * chunkSize;
      if (from + len <= size && Math.min(chunkSize, size - from) === len) img.copy(img, off, from, from + len);
      continue;
    }
    if (kind === 2) {
      // mostly zero, one small non-zero run (not an all-zero chunk)
      const at = r.int(len - 16);
      r.bytes(16).copy(img, off + at);
      continue;
    }
    if (kind === 3) {
      // compressible text-like data
      const word = r.bytes(8);
      for (let i = 0; i < len; i++) img[off + i] = 0x61 + (word[i % 8] % 26);
      continue;
    }
    r.bytes(len).copy(img, off);
  }
  return img;
}

/** Changes a few random chunks (returns the chunk offsets touched). */
export function mutate(r: R, img: Buffer, chunkSize: number, count: number): number[] {
  const slots = Math.ceil(img.length / chunkSize);
  const touched = new Set<number>();
  for (let i = 0; i < count; i++) {
    const s = r.int(slots);
    const off = s * chunkSize;
    const len = Math.min(chunkSize, img.length - off);
    const at = off + r.int(len - 1);
    const n = Math.min(1 + r.int(4096), off + len - at);
    r.bytes(n).copy(img, at);
    touched.add(off);
  }
  return [...touched].sort((a, b) => a - b);
}

export interface DiskSpec {
  /** the slot, e.g. scsi0-0 (a manifest's disk name) */
  name: string;
  diskId: string;
  data: Buffer;
  /** for an incremental: the previous point's index, and the chunk offsets that changed since */
  base?: IndexRef;
  changed?: number[];
}

export interface VmSpec {
  name: string;
  id: string;
  disks: DiskSpec[];
}

export function vmSpec(name: string, disks: { name: string; data: Buffer; diskId?: string }[]): VmSpec {
  return { name, id: randomUUID(), disks: disks.map((d) => ({ ...d, diskId: d.diskId ?? randomUUID() })) };
}

/** A backup as the backup application makes it: one session, one index per disk, the manifest last. */
export async function backup(
  repo: Repository,
  vms: VmSpec[],
  opts: { parentId?: string | null; time?: string; inFlight?: number } = {},
): Promise<PointManifest> {
  const session = await repo.startBackup();
  try {
    const input: PointInput = {
      flow: '2016',
      parentId: opts.parentId ?? null,
      time: opts.time,
      snapshots: 1,
      vms: [],
    };
    for (const vm of vms) {
      const disks: PointInput['vms'][number]['disks'] = [];
      for (const d of vm.disks) {
        const writer = await session.openIndex({ virtualSize: d.data.length, base: d.base ?? null });
        const cs = writer.chunkSize;
        const offsets = d.base
          ? (d.changed ?? [])
          : Array.from({ length: Math.ceil(d.data.length / cs) }, (_, i) => i * cs);
        // Several puts in flight, as a backup keeps the codec workers busy.
        let next = 0;
        const worker = async () => {
          while (next < offsets.length) {
            const off = offsets[next++];
            await writer.put(off, d.data.subarray(off, Math.min(off + cs, d.data.length)));
          }
        };
        await Promise.all(Array.from({ length: opts.inFlight ?? 4 }, worker));
        const index = await session.writeIndex(writer);
        const s = writer.stats();
        // The disk's name is its slot (scsi0-1): the controller says the same.
        const slot = /^(ide|scsi)(\d)-(\d+)$/.exec(d.name);
        if (!slot) throw new Error(`disk name ${d.name} is not a slot`);
        disks.push({
          diskId: d.diskId,
          name: d.name,
          controller: { bus: slot[1] as 'ide' | 'scsi', controller: Number(slot[2]), location: Number(slot[3]) },
          virtualSize: d.data.length,
          logicalSectorSize: 512,
          blockSize: 32 * 2 ** 20,
          format: 'vhdx',
          rctId: null,
          read: d.base ? 'incremental' : 'full',
          fullReason: d.base ? null : 'no previous restore point',
          index,
          stats: { bytesRead: s.bytesRead, bytesNew: s.bytesNew, bytesStored: s.bytesStored },
        });
      }
      input.vms.push({
        name: vm.name,
        id: vm.id,
        definition: { name: vm.name, generation: 2, configurationVersion: '9.0' },
        consistency: 'application',
        freezeWindowMs: 12,
        ioPauseMs: 3,
        disks,
      });
    }
    return await session.commit(input);
  } catch (err) {
    await session.abort();
    throw err;
  }
}

/** The next incremental's specs: each disk's base is its index in `prev`, with the given changed offsets. */
export function incremental(prev: PointManifest, vms: VmSpec[], changed: Map<string, number[]>): VmSpec[] {
  return vms.map((vm) => ({
    ...vm,
    disks: vm.disks.map((d) => {
      const entry = prev.vms.find((v) => v.id === vm.id)!.disks.find((x) => x.diskId === d.diskId)!;
      return { ...d, base: entry.index, changed: changed.get(d.diskId) ?? [] };
    }),
  }));
}

export async function restoreToBuffer(
  repo: Repository,
  pointId: string,
  diskId: string,
  opts: { parallel?: number } = {},
): Promise<Buffer> {
  const m = await repo.readPoint(pointId);
  const { disk } = repo.findDisk(m, diskId);
  // Filled with 0xEE so that a slot the restore forgets to write shows.
  const out = Buffer.alloc(disk.virtualSize, 0xee);
  await repo.restoreDisk(
    pointId,
    diskId,
    {
      async write(offset, data) {
        data.copy(out, offset);
      },
    },
    opts,
  );
  return out;
}

/**
 * The chunks physically in the repository's packs, read from each pack's own header (not from the pack indexes
 * the code under test keeps): one id per stored copy, sorted.
 */
export async function packedChunkIds(repo: Repository, root: string): Promise<string[]> {
  const ids: string[] = [];
  for (const p of await packFiles(root)) {
    for (const e of await repo.readPackHeader(path.basename(p), (await stat(p)).size)) ids.push(e.id);
  }
  return ids.sort();
}

/** The pack files under a local repository's root. */
export async function packFiles(root: string): Promise<string[]> {
  try {
    return (await readdir(path.join(root, 'packs'), { withFileTypes: true, recursive: true }))
      .filter((e) => e.isFile())
      .map((e) => path.join(e.parentPath, e.name))
      .sort();
  } catch {
    return [];
  }
}
