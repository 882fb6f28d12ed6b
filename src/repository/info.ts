/**
 * What a repository is and holds (`repo info`), and its locks (`repo unlock`).
 */
import type { Damage, EntryDamage } from './damage.js';
import { unusableMessage } from './damage.js';
import type { IntegrityState, ObjectStore } from './store.js';
import { breakStaleLocks, listLocks, type LockEntry } from './lock.js';
import type { KeySlot } from './keys.js';

/** What `repo info` and `repo unlock` need of the repository. */
type InfoStore = Pick<ObjectStore, 'backend' | 'checkOpen' | 'config' | 'integrity' | 'location' | 'packIndexes'>;

export interface RepositoryInfo {
  location: string;
  id: string;
  formatVersion: number;
  createdAt: string;
  chunkSize: number;
  chunkId: 'sha256' | 'hmac-sha256';
  compression: 'zstd';
  encryption: null | { cipher: 'aes-256-gcm'; keySlots: KeySlot['kind'][] };
  /** how restore points are authenticated on this machine */
  integrity: { mode: IntegrityState['mode']; authenticated: boolean; keyMissing: boolean };
  points: number;
  indexes: { count: number; bytes: number };
  /** chunks the pack indexes list, and the bytes of their envelopes */
  chunks: { count: number; bytes: number };
  packs: { count: number; bytes: number };
  packIndexes: { count: number; bytes: number };
  locks: LockEntry[];
  /** entries under points/, indexes/, packs/ and packindex/ that are not objects, and pack indexes that do not read */
  damage: EntryDamage[];
}

/**
 * What the repository is and holds. Reads the config, lists every prefix and reads the pack indexes (for the
 * chunk counts): entries among them that cannot be read are reported in `damage`, not left out silently.
 */
export async function info(store: InfoStore): Promise<RepositoryInfo> {
  store.checkOpen();
  const damage: EntryDamage[] = [];
  const count = async (prefix: string, shape: RegExp, object: Damage['object'], what: string) => {
    let n = 0;
    let bytes = 0;
    for await (const o of store.backend.list(prefix, { unusable: true })) {
      const m = shape.exec(o.key);
      if (o.unusable) {
        if (m)
          damage.push({ object, key: o.key, problem: 'unreadable', message: unusableMessage(`${what} ${m[1]}`, o) });
        continue;
      }
      n++;
      bytes += o.size;
    }
    return { count: n, bytes };
  };
  const c = store.config;
  const points = await count('points/', /^points\/(\d{8}-\d{6}-[0-9a-f]{8})$/, 'manifest', 'restore point');
  const indexes = await count('indexes/', /^indexes\/([0-9a-f]{64})$/, 'index', 'index');
  const packs = await count('packs/', /^packs\/[0-9a-f]{2}\/([0-9a-f]{64})$/, 'pack', 'pack');
  const packIndexes = await count('packindex/', /^packindex\/([0-9a-f]{64})$/, 'pack-index', 'pack index');
  const { map, damaged: badPackIndexes } = await store.packIndexes();
  for (const err of badPackIndexes) {
    // Entries that are not objects were counted above already.
    if (err.details.problem === 'unreadable' && damage.some((d) => d.key === err.details.key)) continue;
    damage.push({
      object: 'pack-index',
      key: err.details.key,
      problem: err.details.problem as Damage['problem'],
      message: `${err.message} (rebuild the pack indexes with \`tidemark repo repair-index\`)`,
    });
  }
  damage.sort((a, b) => (a.key < b.key ? -1 : 1));
  return {
    location: store.location,
    id: c.id,
    formatVersion: c.version,
    createdAt: c.createdAt,
    chunkSize: c.chunkSize,
    chunkId: c.chunkId,
    compression: c.compression,
    encryption: c.encryption ? { cipher: c.encryption.cipher, keySlots: c.encryption.keys.map((k) => k.kind) } : null,
    integrity: {
      mode: store.integrity.mode,
      authenticated: store.integrity.authenticated,
      keyMissing: store.integrity.keyMissing,
    },
    points: points.count,
    indexes,
    chunks: { count: map.chunkCount, bytes: map.storedBytes() },
    packs,
    packIndexes,
    locks: await listLocks(store.backend),
    damage,
  };
}

export async function listRepositoryLocks(store: InfoStore): Promise<LockEntry[]> {
  return listLocks(store.backend);
}

/** Removes the locks of dead local processes; with force, every lock (only when no holder is alive!). */
export async function unlock(store: InfoStore, opts: { force?: boolean } = {}): Promise<LockEntry[]> {
  if (!opts.force) return breakStaleLocks(store.backend);
  const all = await listLocks(store.backend);
  for (const l of all) await store.backend.delete(l.key);
  return all;
}
