/**
 * Restore points: listing them, resolving an id or prefix, reading a manifest (checked against the repository),
 * summaries for `points list`, the base of the next incremental, and forgetting a damaged one.
 */
import { TidemarkError, InvalidArgumentError } from '../errors.js';
import { forEachBounded } from '../util/bounded.js';
import { damaged, unusableMessage } from './damage.js';
import {
  decodeManifest,
  MAX_MANIFEST_BYTES,
  pointKey,
  POINT_ID,
  type DiskEntry,
  type PointManifest,
  type PointStatistics,
} from './manifest.js';
import type { ObjectStore } from './store.js';

/** What reading restore points needs of the repository. */
export type PointStore = Pick<ObjectStore, 'backend' | 'chunkSize' | 'load' | 'location' | 'lock'>;

export interface PointSummary {
  id: string;
  time: string;
  flow: string;
  parentId: string | null;
  snapshots: number;
  statistics: PointStatistics;
  vms: {
    name: string;
    id: string;
    consistency: 'application' | 'crash';
    freezeWindowMs: number | null;
    disks: Pick<DiskEntry, 'diskId' | 'name' | 'virtualSize' | 'read' | 'fullReason' | 'rctId' | 'stats'>[];
  }[];
}

export interface DamagedPoint {
  id: string;
  code: string;
  message: string;
}

/** The id of every entry under points/ (oldest first), also those that are not objects (see pointEntries). */
export async function listPointIds(store: PointStore): Promise<string[]> {
  return (await pointEntries(store)).ids;
}

/**
 * Every entry under points/ named like a restore point, and of those, the ones that are not objects (a
 * symlink, a FIFO, a directory, …) with the message that reports them: damage, never skipped.
 */
export async function pointEntries(store: PointStore): Promise<{ ids: string[]; unusable: Map<string, string> }> {
  const ids: string[] = [];
  const unusable = new Map<string, string>();
  for await (const o of store.backend.list('points/', { unusable: true })) {
    const id = o.key.slice('points/'.length);
    if (!POINT_ID.test(id)) continue;
    ids.push(id);
    if (o.unusable) unusable.set(id, unusableMessage(`restore point ${id}`, o));
  }
  return { ids: ids.sort(), unusable };
}

/** A full point id from an id or a unique prefix of one. */
export async function resolvePoint(store: PointStore, idOrPrefix: string): Promise<string> {
  if (POINT_ID.test(idOrPrefix)) return idOrPrefix;
  if (!/^[0-9a-f-]+$/.test(idOrPrefix)) throw new InvalidArgumentError(`"${idOrPrefix}" is not a restore point id`);
  const matches = (await listPointIds(store)).filter((id) => id.startsWith(idOrPrefix));
  if (matches.length === 1) return matches[0];
  if (matches.length === 0) {
    throw new TidemarkError('NOT_FOUND', `no restore point ${idOrPrefix} in ${store.location}`);
  }
  throw new InvalidArgumentError(`"${idOrPrefix}" names ${matches.length} restore points: give more of the id`);
}

export async function readPoint(store: PointStore, idOrPrefix: string): Promise<PointManifest> {
  const id = await resolvePoint(store, idOrPrefix);
  const key = pointKey(id);
  let plain: Buffer;
  try {
    ({ plain } = await store.load('manifest', key, MAX_MANIFEST_BYTES, `manifest of restore point ${id}`, 'not-found'));
  } catch (err) {
    if ((err as TidemarkError).code === 'NOT_FOUND') {
      throw new TidemarkError('NOT_FOUND', `no restore point ${id} in ${store.location}`);
    }
    throw err;
  }
  try {
    const m = decodeManifest(plain, id);
    for (const [i, vm] of m.vms.entries()) {
      for (const [j, d] of vm.disks.entries()) {
        if (d.index.chunkSize !== store.chunkSize) {
          throw new TidemarkError(
            'REPOSITORY_CORRUPT',
            `manifest of restore point ${id} is damaged: vms.${i}.disks.${j}.index.chunkSize: ${d.index.chunkSize}, the repository's is ${store.chunkSize}`,
          );
        }
      }
    }
    return m;
  } catch (err) {
    if (err instanceof TidemarkError && err.code === 'REPOSITORY_CORRUPT') {
      throw damaged('manifest', key, 'corrupt', err.message, err);
    }
    throw err;
  }
}

/** Every restore point (oldest first), optionally only those holding a VM (by name or id). */
export async function listPoints(
  store: PointStore,
  opts: { vm?: string } = {},
): Promise<{ points: PointSummary[]; damaged: DamagedPoint[] }> {
  const { ids, unusable } = await pointEntries(store);
  // Summaries only are kept (a manifest's definitions may make it 16 MiB).
  const found = new Map<string, PointSummary | DamagedPoint>();
  await forEachBounded(ids, 8, async (id) => {
    const why = unusable.get(id);
    if (why !== undefined) {
      found.set(id, { id, code: 'REPOSITORY_CORRUPT', message: why });
      return;
    }
    try {
      found.set(id, summarize(await readPoint(store, id)));
    } catch (err) {
      if (!(err instanceof TidemarkError) || err.code === 'NOT_FOUND') {
        if (err instanceof TidemarkError) return;
        throw err;
      }
      found.set(id, { id, code: err.code, message: err.message });
    }
  });
  const points: PointSummary[] = [];
  const bad: DamagedPoint[] = [];
  for (const id of ids) {
    const m = found.get(id);
    if (!m) continue;
    if (!('vms' in m)) {
      bad.push(m);
      continue;
    }
    if (opts.vm !== undefined && !m.vms.some((v) => v.name === opts.vm || v.id === opts.vm)) continue;
    points.push(m);
  }
  points.sort((a, b) => (a.time < b.time ? -1 : a.time > b.time ? 1 : a.id < b.id ? -1 : 1));
  return { points, damaged: bad };
}

/** The newest restore point holding a VM (by name or id), or null: the base of the next incremental. */
export async function latestPoint(store: PointStore, vm: string): Promise<PointManifest | null> {
  const { points } = await listPoints(store, { vm });
  const last = points.at(-1);
  return last ? readPoint(store, last.id) : null;
}

/**
 * The newest restore point of each VM (by name or id), or null: the bases of a run's incrementals, found with
 * ONE pass over the points (a run of 800 VMs must not list the repository 800 times); a manifest several VMs
 * share is read once.
 */
export async function latestPoints(store: PointStore, vms: string[]): Promise<Map<string, PointManifest | null>> {
  const { points } = await listPoints(store);
  const newest = new Map<string, string>();
  for (const p of points) for (const vm of p.vms) for (const key of [vm.name, vm.id]) newest.set(key, p.id);
  const read = new Map<string, Promise<PointManifest>>();
  const out = new Map<string, PointManifest | null>();
  for (const vm of vms) {
    const id = newest.get(vm);
    if (id === undefined) {
      out.set(vm, null);
      continue;
    }
    if (!read.has(id)) read.set(id, readPoint(store, id));
    out.set(vm, await read.get(id)!);
  }
  return out;
}

/** Removes one restore point's manifest (exclusive lock): the way out for a point verify found damaged. */
export async function forgetPoint(store: PointStore, idOrPrefix: string): Promise<string> {
  const lock = await store.lock('exclusive', 'forget');
  try {
    const id = await resolvePoint(store, idOrPrefix);
    if (!(await store.backend.exists(pointKey(id)))) {
      throw new TidemarkError('NOT_FOUND', `no restore point ${id} in ${store.location}`);
    }
    await store.backend.delete(pointKey(id));
    await store.backend.sync();
    return id;
  } finally {
    await lock.release();
  }
}

/** Finds a disk of a point by its virtual disk id (or, failing that, its name). */
export function findDisk(m: PointManifest, disk: string): { vm: PointManifest['vms'][number]; disk: DiskEntry } {
  for (const vm of m.vms) for (const d of vm.disks) if (d.diskId === disk) return { vm, disk: d };
  const byName = m.vms.flatMap((vm) => vm.disks.filter((d) => d.name === disk).map((d) => ({ vm, disk: d })));
  if (byName.length === 1) return byName[0];
  const all = m.vms.flatMap((vm) => vm.disks.map((d) => `${d.diskId} (${vm.name}/${d.name})`));
  throw new TidemarkError('NOT_FOUND', `restore point ${m.id} has no disk ${disk}; it has: ${all.join(', ')}`);
}

function summarize(m: PointManifest): PointSummary {
  return {
    id: m.id,
    time: m.time,
    flow: m.flow,
    parentId: m.parentId,
    snapshots: m.snapshots,
    statistics: m.statistics,
    vms: m.vms.map((vm) => ({
      name: vm.name,
      id: vm.id,
      consistency: vm.consistency,
      freezeWindowMs: vm.freezeWindowMs,
      disks: vm.disks.map((d) => ({
        diskId: d.diskId,
        name: d.name,
        virtualSize: d.virtualSize,
        read: d.read,
        fullReason: d.fullReason,
        rctId: d.rctId,
        stats: d.stats,
      })),
    })),
  };
}
