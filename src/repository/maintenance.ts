/**
 * Maintenance, each under an exclusive lock (a dry-run prune takes none): prune (retention: which restore points
 * go), gc (mark and sweep, and the repacking of packs that hold unreferenced chunks, in a crash-safe order), and the
 * rebuilding of the pack indexes from the packs' own headers. docs/formats/repository.md §9 describes why gc is safe
 * against a backup.
 */
import { TidemarkError, InvalidArgumentError } from '../errors.js';
import type { ObjectInfo } from './backend.js';
import { forEachBounded, MemoryBudget } from '../util/bounded.js';
import { damaged, isDamage, unusableMessage } from './damage.js';
import { indexBodySize, slotCountFor } from './disk-index.js';
import { pointKey, type IndexRef, type PointManifest } from './manifest.js';
import { packKey, type PackContents, type PackEntry, type PackWriter } from './pack.js';
import { pointEntries, readPoint, type DamagedPoint, type PointStore } from './points.js';
import { applyRetention, checkPolicy, type RetentionDecision, type RetentionPolicy } from './retention.js';
import { HEX_ID, INDEX_MEMORY_BUDGET, type ObjectStore } from './store.js';

/** What maintenance needs of the repository: the backend itself (it deletes), packs and pack indexes. */
type MaintenanceStore = PointStore &
  Pick<
    ObjectStore,
    | 'hashId'
    | 'openChunk'
    | 'packIndexes'
    | 'packWriter'
    | 'readIndex'
    | 'readPackHeader'
    | 'replacePackIndexes'
    | 'storedPacks'
  >;

/** how long a temporary file of an interrupted put must lie untouched before gc removes it */
const TEMPORARY_GRACE_MS = 60 * 60 * 1000;

export interface PruneOptions extends RetentionPolicy {
  dryRun?: boolean;
}

export interface PruneEntry extends RetentionDecision {
  vms: string[];
}

export interface PruneReport {
  dryRun: boolean;
  kept: PruneEntry[];
  removed: PruneEntry[];
  /** points whose manifest cannot be read: never removed by prune */
  damaged: DamagedPoint[];
}

export interface GcReport {
  dryRun: boolean;
  points: number;
  indexesKept: number;
  indexesRemoved: number;
  chunksKept: number;
  /** chunks no restore point references, dropped from the packs (also those of packs no index lists) */
  chunksRemoved: number;
  packsKept: number;
  /** packs deleted: wholly unreferenced, repacked, or listed by no pack index (left by an interrupted backup) */
  packsRemoved: number;
  /** packs rewritten holding only their referenced chunks (the new packs are counted in packsWritten) */
  packsRepacked: number;
  packsWritten: number;
  /** bytes of packs and indexes deleted, less the bytes of the packs written */
  bytesRemoved: number;
  temporaryRemoved: number;
  /** indexes the manifests name that do not exist (their points are damaged; verify names them) */
  missingIndexes: string[];
}

/**
 * Applies a retention policy (per group of points with the same VMs) and removes the manifests it does not keep,
 * under an exclusive lock (none with dryRun). The chunks stay until gc().
 */
export async function prune(store: MaintenanceStore, opts: PruneOptions): Promise<PruneReport> {
  const problem = checkPolicy(opts);
  if (problem) throw new InvalidArgumentError(problem);
  const dryRun = opts.dryRun === true;
  const lock = dryRun ? null : await store.lock('exclusive', 'prune');
  try {
    const { ids, unusable } = await pointEntries(store);
    // What retention needs of each manifest, no more (a manifest may be 16 MiB).
    const manifests: { id: string; time: string; vms: { name: string; id: string }[] }[] = [];
    const bad: DamagedPoint[] = [];
    await forEachBounded(ids, 8, async (id) => {
      const why = unusable.get(id);
      if (why !== undefined) {
        bad.push({ id, code: 'REPOSITORY_CORRUPT', message: why });
        return;
      }
      try {
        const m = await readPoint(store, id);
        manifests.push({ id: m.id, time: m.time, vms: m.vms.map((v) => ({ name: v.name, id: v.id })) });
      } catch (err) {
        if (!(err instanceof TidemarkError)) throw err;
        bad.push({ id, code: err.code, message: err.message });
      }
    });
    const vmsOf = new Map(manifests.map((m) => [m.id, m.vms.map((v) => v.name)]));
    const decisions = applyRetention(
      manifests.map((m) => ({
        id: m.id,
        time: new Date(m.time),
        group: m.vms
          .map((v) => v.id)
          .sort()
          .join(','),
      })),
      opts,
    );
    const entries = decisions.map((d) => ({ ...d, vms: vmsOf.get(d.id) ?? [] }));
    const removed = entries.filter((d) => !d.keep);
    if (!dryRun) {
      for (const d of removed) await store.backend.delete(pointKey(d.id));
      await store.backend.sync();
    }
    return {
      dryRun,
      kept: entries.filter((d) => d.keep),
      removed,
      damaged: bad.sort((a, b) => (a.id < b.id ? -1 : 1)),
    };
  } finally {
    await lock?.release();
  }
}

/**
 * Mark and sweep, under an exclusive lock: mark every index the manifests name and every chunk those indexes
 * name, then delete the indexes and chunks nobody marked. A backup holds a shared lock from before its first
 * chunk until after its manifest, so no backup runs while gc does, and nothing a future manifest will name can
 * be swept (docs/formats/repository.md §9). A manifest or index that cannot be read stops gc: it cannot know what
 * that point references.
 */
export async function gc(store: MaintenanceStore, opts: { dryRun?: boolean } = {}): Promise<GcReport> {
  const dryRun = opts.dryRun === true;
  const lock = await store.lock('exclusive', 'gc');
  try {
    // Listed before anything is read: an entry that is not an object stops gc here, never opened (a FIFO would
    // block the read).
    const listedIndexes: ObjectInfo[] = [];
    for await (const o of store.backend.list('indexes/', { unusable: true })) {
      const id = o.key.slice('indexes/'.length);
      if (!HEX_ID.test(id)) continue;
      if (o.unusable) throw gcStopsAt(unusableMessage(`index ${id}`, o), o.key);
      listedIndexes.push(o);
    }
    const { packs: stored, unusable: unusablePacks } = await store.storedPacks();
    const firstUnusable = unusablePacks.values().next().value;
    if (firstUnusable) throw gcStopsAt(firstUnusable.message, firstUnusable.key);
    const { ids, unusable: unusablePoints } = await pointEntries(store);
    const markedIndexes = new Map<string, IndexRef>();
    await forEachBounded(ids, 8, async (id) => {
      let m: PointManifest;
      try {
        const why = unusablePoints.get(id);
        if (why !== undefined) throw new TidemarkError('REPOSITORY_CORRUPT', why);
        m = await readPoint(store, id);
      } catch (err) {
        if (err instanceof TidemarkError && err.code === 'NOT_FOUND') return;
        throw new TidemarkError(
          'REPOSITORY_CORRUPT',
          `gc stopped: restore point ${id} cannot be read (${(err as Error).message}); gc cannot know what it references — check with \`tidemark verify\`, then remove the point with \`tidemark points forget ${id}\``,
          { pointId: id },
        );
      }
      for (const vm of m.vms) for (const d of vm.disks) markedIndexes.set(d.index.id, d.index);
    });
    const markedChunks = new Set<string>();
    const missingIndexes: string[] = [];
    const budget = new MemoryBudget(INDEX_MEMORY_BUDGET);
    await forEachBounded(markedIndexes.values(), 4, async (ref) => {
      try {
        // Its chunks marked within the memory budget; the index itself is not kept.
        await budget.run(indexBodySize(slotCountFor(ref.virtualSize, store.chunkSize)), async () => {
          for (const c of (await store.readIndex(ref)).chunks()) markedChunks.add(c.id);
        });
      } catch (err) {
        if (isDamage(err) && err.details.problem === 'missing') {
          missingIndexes.push(ref.id);
          return;
        }
        throw new TidemarkError(
          'REPOSITORY_CORRUPT',
          `gc stopped: index ${ref.id} cannot be read (${(err as Error).message}); check with \`tidemark verify\` and forget the points it names`,
          { indexId: ref.id },
        );
      }
    });

    const { map, indexCount, damaged: badPackIndexes } = await store.packIndexes({ reread: true });
    if (badPackIndexes.length > 0) {
      // Its packs would look unindexed, and unindexed packs are deleted: stop instead.
      throw new TidemarkError(
        'REPOSITORY_CORRUPT',
        `gc stopped: ${badPackIndexes[0].message}; gc cannot know which packs it lists — rebuild the pack indexes from the packs with \`tidemark repo repair-index\``,
        { key: badPackIndexes[0].details.key },
      );
    }

    const report: GcReport = {
      dryRun,
      points: ids.length,
      indexesKept: 0,
      indexesRemoved: 0,
      chunksKept: 0,
      chunksRemoved: 0,
      packsKept: 0,
      packsRemoved: 0,
      packsRepacked: 0,
      packsWritten: 0,
      bytesRemoved: 0,
      temporaryRemoved: 0,
      missingIndexes: missingIndexes.sort(),
    };
    const sweep: { key: string; size: number }[] = [];
    for (const o of listedIndexes) {
      const id = o.key.slice('indexes/'.length);
      if (markedIndexes.has(id)) report.indexesKept++;
      else {
        report.indexesRemoved++;
        sweep.push(o);
      }
    }

    // Each pack: kept whole (every chunk in it is referenced and found there), removed (none is), or repacked.
    const keep: PackContents[] = [];
    const repack: { packId: string; live: PackEntry[] }[] = [];
    for (const packId of map.packIds()) {
      const entries = map.entriesOf(packId);
      const live = entries.filter((e) => markedChunks.has(e.id) && map.get(e.id)!.pack === packId);
      const info = stored.get(packId);
      stored.delete(packId);
      report.chunksKept += live.length;
      if (!info) {
        // Damage (verify names it): keep the index's word for where the chunks were.
        if (live.length > 0) keep.push({ packId, entries: [...live] });
        continue;
      }
      report.chunksRemoved += entries.length - live.length;
      if (live.length === entries.length) {
        report.packsKept++;
        keep.push({ packId, entries: [...entries] });
      } else {
        sweep.push(info);
        report.packsRemoved++;
        if (live.length > 0) {
          report.packsRepacked++;
          repack.push({ packId, live });
        }
      }
    }
    // What no pack index lists: packs of interrupted backups (no backup runs now: we hold the exclusive lock).
    for (const [packId, info] of stored) {
      sweep.push(info);
      report.packsRemoved++;
      report.chunksRemoved += await store.readPackHeader(packId, info.size).then(
        (e) => e.length,
        () => 0,
      );
    }
    for (const o of sweep) report.bytesRemoved += o.size;

    const changed = repack.length > 0 || report.packsRemoved > 0 || indexCount > 1;
    if (!dryRun && changed) {
      // 1. The referenced chunks of the packs to repack, checked, into new packs.
      const writer = store.packWriter();
      for (const { packId, live } of repack) await copyChunks(store, packId, live, writer);
      const written = await writer.finish();
      await store.backend.sync(); // in place before an index names them
      report.packsWritten = written.length;
      for (const p of written) report.bytesRemoved -= p.entries.reduce((n, e) => n + e.length, 0);
      // 2. One set of pack indexes for everything kept instead of the old ones; 3. (below) the old packs: a crash
      // in between leaves packs no index lists.
      await store.replacePackIndexes([...keep, ...written]);
    }
    if (!dryRun) {
      await forEachBounded(sweep, 16, (o) => store.backend.delete(o.key));
      report.temporaryRemoved = (await store.backend.sweepTemporary?.(TEMPORARY_GRACE_MS)) ?? 0;
      await store.backend.sync();
    }
    return report;
  } finally {
    await lock.release();
  }
}

/** gc's refusal to go on past an entry it cannot read (before it deletes anything). */
function gcStopsAt(why: string, key: string): TidemarkError {
  return new TidemarkError(
    'REPOSITORY_CORRUPT',
    `gc stopped before deleting anything: ${why}; check with \`tidemark verify\`, then move it out of the repository`,
    { key },
  );
}

/** Copies the referenced chunks of a pack into `writer`, each opened and checked on the way (damage stops gc). */
async function copyChunks(
  store: MaintenanceStore,
  packId: string,
  live: readonly PackEntry[],
  writer: PackWriter,
): Promise<void> {
  const key = packKey(packId);
  const first = live[0].offset;
  const last = live[live.length - 1];
  const span = await store.backend.get(key, { range: { offset: first, length: last.offset + last.length - first } });
  for (const e of live) {
    const raw = span.subarray(e.offset - first, e.offset - first + e.length);
    try {
      if (raw.length < e.length) throw damaged('chunk', key, 'truncated', `chunk ${e.id} is cut off in ${key}`);
      const plain = await store.openChunk(raw, e.id);
      if (store.hashId(plain) !== e.id)
        throw damaged('chunk', key, 'corrupt', `chunk ${e.id} does not hash to its name`);
    } catch (err) {
      throw new TidemarkError(
        'REPOSITORY_CORRUPT',
        `gc stopped before deleting anything: chunk ${e.id} in ${key} is damaged (${(err as Error).message}); run \`tidemark verify\` and forget the points it names`,
        { key, chunk: e.id },
        { cause: err },
      );
    }
    await writer.add(e.id, raw);
  }
}

/**
 * Rebuilds the pack indexes from the packs' own headers (exclusive lock): the way out when a pack index is
 * damaged or lost. Every readable pack is listed again; a pack whose header cannot be read is reported and left.
 */
export async function repairPackIndexes(store: MaintenanceStore): Promise<{
  packs: number;
  chunks: number;
  unreadable: { key: string; message: string }[];
}> {
  const lock = await store.lock('exclusive', 'repair-index');
  try {
    // What the current pack indexes say still serves for a pack whose own header cannot be read.
    const { map: before } = await store.packIndexes({ reread: true });
    const packs: PackContents[] = [];
    const stored = await store.storedPacks();
    // An entry that is not a pack cannot be read; the current pack indexes' word for it, if any, is kept.
    const unreadable: { key: string; message: string }[] = [...stored.unusable.values()];
    for (const packId of stored.unusable.keys()) {
      if (before.hasPack(packId)) packs.push({ packId, entries: [...before.entriesOf(packId)] });
    }
    await forEachBounded(stored.packs, 8, async ([packId, o]) => {
      try {
        packs.push({ packId, entries: await store.readPackHeader(packId, o.size) });
      } catch (err) {
        if (!isDamage(err)) throw err;
        unreadable.push({ key: o.key, message: err.message });
        if (before.hasPack(packId)) packs.push({ packId, entries: [...before.entriesOf(packId)] });
      }
    });
    packs.sort((a, b) => (a.packId < b.packId ? -1 : 1));
    await store.replacePackIndexes(packs.filter((p) => p.entries.length > 0));
    return {
      packs: packs.length,
      chunks: packs.reduce((n, p) => n + p.entries.length, 0),
      unreadable: unreadable.sort((a, b) => (a.key < b.key ? -1 : 1)),
    };
  } finally {
    await lock.release();
  }
}
