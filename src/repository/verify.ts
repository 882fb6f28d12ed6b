/**
 * Verify: re-reads and re-hashes every chunk of one restore point (or of all) and reports each damaged or missing
 * chunk, index, pack, pack index and manifest with every restore point it affects.
 */
import { TidemarkError } from '../errors.js';
import { forEachBounded, MemoryBudget } from '../util/bounded.js';
import { damaged, isDamage, type Affected, type Damage } from './damage.js';
import { indexBodySize, slotCountFor, type DiskIndex } from './disk-index.js';
import { pointKey, type IndexRef } from './manifest.js';
import { pointEntries, readPoint, resolvePoint, type PointStore } from './points.js';
import { INDEX_MEMORY_BUDGET, indexKey, type ObjectStore } from './store.js';

/** What verify needs of the repository: it reads, and writes nothing. */
type VerifyStore = PointStore &
  Pick<ObjectStore, 'integrity' | 'packIndexes' | 'readChunkIn' | 'readIndex' | 'unusableEntries'>;

export interface VerifyOptions {
  /** chunks read and checked at once; default 8 */
  parallel?: number;
  /**
   * After each chunk: the stored bytes read so far of those the pack indexes list for the chunks to check (a
   * throughput, for a progress bar), and the chunks done of all.
   */
  onProgress?: (p: { doneBytes: number; totalBytes: number; doneChunks: number; totalChunks: number }) => void;
}

export interface VerifyReport {
  ok: boolean;
  /** restore points are authenticated on this machine (false: a forged one would pass as real; see repo info) */
  authenticated: boolean;
  /** 'all', or the point verified */
  scope: string;
  checked: { points: number; indexes: number; chunks: number; packs: number; storedBytes: number };
  damage: Damage[];
  /** every restore point some damage affects, oldest first */
  affectedPoints: string[];
}

/**
 * Re-reads and re-hashes every chunk of one point (or of all), and reports each damaged or missing chunk, index
 * and manifest with every restore point it affects — those outside the scope too.
 */
export async function verify(store: VerifyStore, pointId?: string, opts: VerifyOptions = {}): Promise<VerifyReport> {
  // Shared, like a backup's: gc (which moves chunks between packs) must not run meanwhile.
  const lock = await store.lock('shared', 'verify');
  try {
    return await verifyLocked(store, pointId, opts);
  } finally {
    await lock.release();
  }
}

async function verifyLocked(
  store: VerifyStore,
  pointId: string | undefined,
  opts: VerifyOptions,
): Promise<VerifyReport> {
  const { ids: allIds, unusable: unusablePoints } = await pointEntries(store);
  const scopeIds = pointId === undefined ? allIds : [await resolvePoint(store, pointId)];
  if (pointId !== undefined && !allIds.includes(scopeIds[0])) {
    throw new TidemarkError('NOT_FOUND', `no restore point ${scopeIds[0]} in ${store.location}`);
  }
  const all = pointId === undefined;
  const inScope = new Set(scopeIds);
  const damage: Damage[] = [];
  // Who uses each index: every point, so that damage names all the points it affects. Only this is kept of a
  // manifest (not its definitions: a manifest may be 16 MiB).
  interface Use {
    pointId: string;
    vm: string;
    diskId: string;
    disk: string;
    index: IndexRef;
  }
  const users = new Map<string, Use[]>();
  const manifestDamage = (id: string, problem: Damage['problem'], message: string) =>
    damage.push({ object: 'manifest', key: pointKey(id), id, problem, message, affects: [{ pointId: id }] });
  await forEachBounded(allIds, 8, async (id) => {
    const why = unusablePoints.get(id);
    if (why !== undefined) {
      if (inScope.has(id)) manifestDamage(id, 'unreadable', why);
      return;
    }
    try {
      const m = await readPoint(store, id);
      for (const vm of m.vms) {
        for (const d of vm.disks) {
          const u = users.get(d.index.id) ?? [];
          u.push({ pointId: id, vm: vm.name, diskId: d.diskId, disk: d.name, index: d.index });
          users.set(d.index.id, u);
        }
      }
    } catch (err) {
      if (!(err instanceof TidemarkError) || err.code === 'CLOSED') throw err;
      if (!inScope.has(id)) return;
      // A manifest this Tidemark cannot read (a newer version, say) is reported too: verify never stops at one.
      const problem = isDamage(err) ? (err.details.problem as Damage['problem']) : 'unreadable';
      manifestDamage(id, err.code === 'NOT_FOUND' ? 'missing' : problem, err.message);
    }
  });
  // Entries that stand where an index or a pack belongs but are not objects: reported, never opened.
  const unusableIndexes = await store.unusableEntries('indexes/', /^indexes\/([0-9a-f]{64})$/, 'index', 'index');
  const unusablePacks = await store.unusableEntries('packs/', /^packs\/[0-9a-f]{2}\/([0-9a-f]{64})$/, 'pack', 'pack');

  const scopeIndexes = new Set<string>();
  for (const [indexId, us] of users) if (us.some((u) => inScope.has(u.pointId))) scopeIndexes.add(indexId);

  const badIndexes = new Set<string>();
  const indexDamage = (indexId: string, problem: Damage['problem'], message: string) =>
    damage.push({
      object: 'index',
      key: indexKey(indexId),
      id: indexId,
      problem,
      message,
      affects: (users.get(indexId) ?? []).map((u) => ({
        pointId: u.pointId,
        vm: u.vm,
        diskId: u.diskId,
        disk: u.disk,
      })),
    });
  // Indexes are read, used and dropped, a few at a time within a memory budget: never all held at once.
  const budget = new MemoryBudget(INDEX_MEMORY_BUDGET);
  const withIndex = async (indexId: string, report: boolean, use: (index: DiskIndex) => void) => {
    const ref = users.get(indexId)![0].index;
    const unusable = unusableIndexes.get(indexId);
    if (unusable) {
      badIndexes.add(indexId);
      if (report) indexDamage(indexId, 'unreadable', unusable.message);
      return;
    }
    await budget.run(indexBodySize(slotCountFor(ref.virtualSize, store.chunkSize)), async () => {
      let index: DiskIndex;
      try {
        index = await store.readIndex(ref);
      } catch (err) {
        if (!isDamage(err)) throw err;
        badIndexes.add(indexId);
        if (report) indexDamage(indexId, err.details.problem as Damage['problem'], err.message);
        return;
      }
      use(index);
    });
  };
  const chunkIds = new Set<string>();
  await forEachBounded(scopeIndexes, 4, (id) =>
    withIndex(id, true, (index) => {
      for (const c of index.chunks()) chunkIds.add(c.id);
    }),
  );
  // An unusable entry no point names is damage too (when verifying everything).
  if (all) for (const [id, e] of unusableIndexes) if (!users.has(id)) indexDamage(id, e.problem, e.message);

  const { map, damaged: badPackIndexes } = await store.packIndexes({ reread: true });
  for (const err of badPackIndexes) {
    // Its chunks are reported below as missing (no other index lists them), with the points they affect.
    damage.push({
      object: 'pack-index',
      key: err.details.key,
      id: err.details.key.slice('packindex/'.length),
      problem: err.details.problem as Damage['problem'],
      message: `${err.message} (rebuild the pack indexes with \`tidemark repo repair-index\`)`,
      affects: [],
    });
  }
  // In pack order, so that each pack is read from start to end.
  const ordered = [...chunkIds].sort((a, b) => {
    const la = map.get(a);
    const lb = map.get(b);
    if (!la || !lb) return la ? 1 : lb ? -1 : 0;
    return la.pack < lb.pack ? -1 : la.pack > lb.pack ? 1 : la.offset - lb.offset;
  });
  const packs = new Set<string>();
  for (const id of ordered) {
    const loc = map.get(id);
    if (loc) packs.add(loc.pack);
  }
  const badChunks = new Map<string, { key: string; problem: Damage['problem']; message: string }>();
  let totalBytes = 0;
  for (const id of ordered) totalBytes += map.get(id)?.length ?? 0;
  let storedBytes = 0;
  let doneBytes = 0;
  let doneChunks = 0;
  await forEachBounded(ordered, Math.max(1, opts.parallel ?? 8), async (id) => {
    const loc = map.get(id);
    const unusable = loc ? unusablePacks.get(loc.pack) : undefined;
    try {
      if (unusable) throw damaged('chunk', unusable.key, 'unreadable', `chunk ${id}: ${unusable.message}`);
      // Added after the await: `storedBytes += await …` would read storedBytes before it and lose the other
      // workers' additions.
      const { storedBytes: n } = await store.readChunkIn(map, id);
      storedBytes += n;
    } catch (err) {
      if (!isDamage(err)) throw err;
      badChunks.set(id, {
        key: err.details.key,
        problem: err.details.problem as Damage['problem'],
        message: err.message,
      });
    }
    doneBytes += loc?.length ?? 0;
    opts.onProgress?.({ doneBytes, totalBytes, doneChunks: ++doneChunks, totalChunks: chunkIds.size });
  });

  if (badChunks.size > 0) {
    // Every index that reads (those outside the scope too) is read again to say where the damaged chunks are used.
    const affects = new Map<string, Affected[]>();
    const readable = [...users.keys()].filter((id) => !badIndexes.has(id));
    await forEachBounded(readable, 4, (indexId) =>
      withIndex(indexId, false, (index) => {
        const hits = new Map<string, number[]>();
        for (const c of index.chunks()) {
          if (!badChunks.has(c.id)) continue;
          const h = hits.get(c.id) ?? [];
          h.push(c.offset);
          hits.set(c.id, h);
        }
        for (const [chunkId, offsets] of hits) {
          const list = affects.get(chunkId) ?? [];
          for (const u of users.get(indexId)!) {
            list.push({
              pointId: u.pointId,
              vm: u.vm,
              diskId: u.diskId,
              disk: u.disk,
              slots: offsets.length,
              offsets: offsets.slice(0, 8),
            });
          }
          affects.set(chunkId, list);
        }
      }),
    );
    for (const [id, bad] of badChunks) {
      const list = (affects.get(id) ?? []).sort((a, b) => (a.pointId < b.pointId ? -1 : 1));
      const loc = map.get(id);
      damage.push({
        object: 'chunk',
        key: bad.key,
        ...(loc ? { range: { offset: loc.offset, length: loc.length } } : {}),
        id,
        problem: bad.problem,
        message: bad.message,
        affects: list,
      });
    }
  }

  if (all) {
    // Unusable packs none of the chunks above lie in.
    for (const [id, e] of unusablePacks) {
      if (!packs.has(id)) damage.push({ ...e, affects: [] });
    }
  }

  const affected = new Set<string>();
  for (const d of damage) for (const a of d.affects) affected.add(a.pointId);
  const order = { manifest: 0, index: 1, 'pack-index': 2, pack: 3, chunk: 4 };
  damage.sort((a, b) => order[a.object] - order[b.object] || (a.id < b.id ? -1 : 1));
  return {
    ok: damage.length === 0,
    authenticated: store.integrity.authenticated,
    scope: pointId === undefined ? 'all' : scopeIds[0],
    checked: {
      points: scopeIds.length,
      indexes: scopeIndexes.size,
      chunks: chunkIds.size,
      packs: packs.size,
      storedBytes,
    },
    damage,
    affectedPoints: [...affected].sort(),
  };
}
