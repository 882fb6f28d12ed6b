/**
 * Opening and creating a repository: its config read and checked, its keys unwrapped (encrypted) or this
 * machine's integrity key found (unencrypted), the codec workers started; and the integrity keys one machine
 * hands another (`repo key export` / `repo key import`).
 */
import { readdir, stat } from 'node:fs/promises';
import { randomUUID } from 'node:crypto';
import { TidemarkError, InvalidArgumentError } from '../errors.js';
import type { Backend } from './backend.js';
import {
  checkChunkSize,
  checkConfigMac,
  configMac,
  CONFIG_KEY,
  decodeConfig,
  DEFAULT_CHUNK_SIZE,
  encodeConfig,
  FORMAT_NAME,
  FORMAT_VERSION,
  integrityConfigMac,
  integrityMacMatches,
  type RepositoryConfig,
} from './config.js';
import { isUnreadableEntry } from './damage.js';
import {
  deriveIntegrityKeys,
  deriveKeys,
  makeSlot,
  newMasterKey,
  readKeyFile,
  unwrapMaster,
  type KeySlot,
  type RepositoryKeys,
  type Secret,
} from './keys.js';
import { LocalBackend } from './local-backend.js';
import { DEFAULT_PACK_SIZE, MAX_PACK_SIZE, MIN_PACK_SIZE } from './pack.js';
import { createCodec } from './pool.js';
import { ObjectStore, type IntegrityState } from './store.js';
import {
  defaultTrustDir,
  integrityKeyFor,
  integrityKeyOf,
  newIntegrityKey,
  trustEntry,
  trustFile,
  writeTrust,
  type TrustEntry,
} from './trust.js';

export interface InitOptions {
  /** power of two, 64 KiB–8 MiB; default 1 MiB */
  chunkSize?: number;
  /** encrypt, with this passphrase opening the repository */
  passphrase?: string;
  /** encrypt, with this key file opening the repository (both may be given: two key slots) */
  keyFile?: string;
  /** scrypt cost as log2(N), 15–20; default 17 */
  scryptLogN?: number;
}

export interface OpenOptions {
  passphrase?: string;
  keyFile?: string;
  /** codec worker threads (0: compress and encrypt on the calling thread); default one per core, up to 4 */
  workers?: number;
  /** zstd level for what this process writes; default 3 */
  compressionLevel?: number;
  /** close the packs this process writes at this many bytes (4 KiB–256 MiB); default 16 MiB */
  packSize?: number;
  /** where this machine keeps integrity keys and what it knows of repositories (trust.ts); default defaultTrustDir() */
  trustDir?: string;
}

/** Creates a repository (an empty or missing directory, or an empty backend) and opens it. */
export async function createStore(
  location: string | Backend,
  opts: InitOptions & OpenOptions = {},
): Promise<ObjectStore> {
  const packSize = checkPackSize(opts.packSize);
  const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK_SIZE;
  const sizeProblem = checkChunkSize(chunkSize);
  if (sizeProblem) throw new InvalidArgumentError(sizeProblem);
  if (opts.passphrase !== undefined && opts.passphrase.length === 0) {
    throw new InvalidArgumentError('the passphrase is empty');
  }
  if (typeof location === 'string') await checkEmptyDirectory(location);
  const backend = typeof location === 'string' ? new LocalBackend(location) : location;
  if (await backend.exists(CONFIG_KEY)) {
    throw new TidemarkError('ALREADY_EXISTS', `${backend.location} is already a repository`);
  }
  const id = randomUUID();
  const secrets: Secret[] = [];
  if (opts.passphrase !== undefined) secrets.push({ passphrase: opts.passphrase });
  if (opts.keyFile !== undefined) secrets.push({ keyFile: await readKeyFile(opts.keyFile) });
  const config: RepositoryConfig = {
    format: FORMAT_NAME,
    version: FORMAT_VERSION,
    id,
    createdAt: new Date().toISOString(),
    chunkSize,
    chunkId: secrets.length > 0 ? 'hmac-sha256' : 'sha256',
    compression: 'zstd',
    encryption: null,
  };
  let keys: RepositoryKeys | null = null;
  let integrityKey: Buffer | null = null;
  const trustDir = opts.trustDir ?? defaultTrustDir();
  if (secrets.length > 0) {
    const master = newMasterKey();
    const slots: KeySlot[] = [];
    for (const s of secrets) slots.push(await makeSlot(master, id, s, opts.scryptLogN));
    keys = deriveKeys(master, id);
    config.encryption = { cipher: 'aes-256-gcm', keys: slots, mac: '' };
    config.encryption.mac = configMac(config, keys.configKey);
    // Remembered so that a config rewritten to say "not encrypted" is refused here; not needed to open it.
    await writeTrust(trustDir, trustEntry({ repositoryId: id, location: backend.location, integrityKey: null })).catch(
      () => undefined,
    );
  } else {
    // Kept by this machine before the config names it: a repository whose key was lost is never made.
    integrityKey = newIntegrityKey();
    await writeTrust(trustDir, trustEntry({ repositoryId: id, location: backend.location, integrityKey }));
    const { configKey } = deriveIntegrityKeys(integrityKey, id);
    config.integrity = { algorithm: 'hmac-sha256', mac: integrityConfigMac(config, configKey) };
  }
  await backend.put(CONFIG_KEY, encodeConfig(config), { sync: true });
  // Opened with the keys in hand: no second key derivation.
  return withCodec(backend, config, keys, integrityKey, trustDir, opts, packSize);
}

async function withCodec(
  backend: Backend,
  config: RepositoryConfig,
  keys: RepositoryKeys | null,
  integrityKey: Buffer | null,
  trustDir: string,
  opts: OpenOptions,
  packSize: number,
): Promise<ObjectStore> {
  const macKey = integrityKey ? deriveIntegrityKeys(integrityKey, config.id).manifestKey : null;
  const codec = await createCodec({
    key: keys?.encKey ?? null,
    idKey: keys?.idKey ?? null,
    macKey,
    level: opts.compressionLevel,
    workers: opts.workers,
  });
  const integrity: IntegrityState = {
    mode: keys ? 'aes-256-gcm' : config.integrity ? 'hmac-sha256' : 'none',
    authenticated: keys !== null || integrityKey !== null,
    keyMissing: !keys && !!config.integrity && integrityKey === null,
    trustFile: trustFile(trustDir, config.id),
  };
  return new ObjectStore(backend, config, keys, codec, packSize, integrity, integrityKey, trustDir);
}

/** Opens a repository: NOT_FOUND when there is none, REPOSITORY_CORRUPT when its config cannot be read. */
export async function openStore(location: string | Backend, opts: OpenOptions = {}): Promise<ObjectStore> {
  const packSize = checkPackSize(opts.packSize);
  const backend = typeof location === 'string' ? new LocalBackend(location) : location;
  let raw: Buffer;
  try {
    raw = await backend.get(CONFIG_KEY, { maxBytes: 64 * 1024 });
  } catch (err) {
    if ((err as TidemarkError).code === 'NOT_FOUND') {
      // Something there that is not an object (a directory, a dangling link) is a damaged repository, not none.
      for await (const o of backend.list('config', { unusable: true })) {
        if (o.key === CONFIG_KEY && o.unusable) {
          throw new TidemarkError(
            'REPOSITORY_CORRUPT',
            `config of repository ${backend.location} cannot be read: it is ${o.unusable}, not an object`,
          );
        }
      }
      throw new TidemarkError(
        'NOT_FOUND',
        `no repository at ${backend.location} (create one with: tidemark repo init ${backend.location})`,
      );
    }
    if ((err as TidemarkError).code === 'LIMIT_EXCEEDED') {
      throw new TidemarkError('REPOSITORY_CORRUPT', `config of repository ${backend.location} is too large`);
    }
    if (isUnreadableEntry(err)) {
      throw new TidemarkError(
        'REPOSITORY_CORRUPT',
        `config of repository ${backend.location} cannot be read: ${(err as Error).message}`,
        {},
        { cause: err },
      );
    }
    throw err;
  }
  const config = decodeConfig(raw, backend.location);
  let keys: RepositoryKeys | null = null;
  if (config.encryption) {
    let secret: Secret;
    if (opts.keyFile !== undefined) secret = { keyFile: await readKeyFile(opts.keyFile) };
    else if (opts.passphrase !== undefined) secret = { passphrase: opts.passphrase };
    else {
      throw new InvalidArgumentError(
        `repository ${backend.location} is encrypted: give its passphrase (TIDEMARK_PASSPHRASE or --passphrase-file) or --key-file`,
      );
    }
    const master = await unwrapMaster(config.encryption.keys, config.id, secret, backend.location);
    keys = deriveKeys(master, config.id);
    checkConfigMac(config, keys.configKey, backend.location);
  }
  const trustDir = opts.trustDir ?? defaultTrustDir();
  const integrityKey = keys ? null : await integrityKeyFor(config, trustDir, backend.location);
  return withCodec(backend, config, keys, integrityKey, trustDir, opts, packSize);
}

/**
 * What another machine needs to authenticate this repository's restore points: this machine's entry for it
 * (its integrity key). NOT_FOUND when this machine holds no key (encrypted repositories need none).
 */
export function exportTrust(store: ObjectStore): TrustEntry {
  if (store.integrityKey === null) {
    throw new TidemarkError(
      'NOT_FOUND',
      store.keys
        ? `repository ${store.location} is encrypted: its passphrase or key file is all another machine needs`
        : `this machine holds no integrity key for repository ${store.location}`,
    );
  }
  return trustEntry({ repositoryId: store.config.id, location: store.location, integrityKey: store.integrityKey });
}

/**
 * Keeps an integrity key (from `repo key export` on another machine) for this repository on this machine, once
 * it is shown to be this repository's (its config's MAC matches). The file it was stored in.
 */
export async function importTrust(store: ObjectStore, entry: TrustEntry): Promise<string> {
  if (entry.repository !== store.config.id) {
    throw new InvalidArgumentError(
      `that key is for repository ${entry.repository}; ${store.location} is repository ${store.config.id}`,
    );
  }
  const key = integrityKeyOf(entry);
  if (store.keys || key === null) {
    throw new InvalidArgumentError(`repository ${store.location} is encrypted: it has no integrity key to import`);
  }
  if (!store.config.integrity) {
    throw new InvalidArgumentError(`repository ${store.location} was made without an integrity key`);
  }
  if (!integrityMacMatches(store.config, deriveIntegrityKeys(key, store.config.id).configKey)) {
    throw new TidemarkError(
      'WRONG_KEY',
      `that key is not repository ${store.location}'s integrity key (the config's MAC does not match)`,
    );
  }
  return writeTrust(
    store.trustDir,
    trustEntry({ repositoryId: entry.repository, location: store.location, integrityKey: key }),
  );
}

function checkPackSize(size: number | undefined): number {
  if (size === undefined) return DEFAULT_PACK_SIZE;
  if (!Number.isSafeInteger(size) || size < MIN_PACK_SIZE || size > MAX_PACK_SIZE) {
    throw new InvalidArgumentError(`pack size ${size} is not a byte count from ${MIN_PACK_SIZE} to ${MAX_PACK_SIZE}`);
  }
  return size;
}

async function checkEmptyDirectory(dir: string): Promise<void> {
  try {
    const st = await stat(dir);
    if (!st.isDirectory()) throw new TidemarkError('ALREADY_EXISTS', `${dir} exists and is not a directory`);
    const entries = await readdir(dir);
    if (entries.includes(CONFIG_KEY)) throw new TidemarkError('ALREADY_EXISTS', `${dir} is already a repository`);
    if (entries.length > 0) {
      throw new TidemarkError('ALREADY_EXISTS', `${dir} is not empty: a repository needs a new or empty directory`);
    }
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return;
    throw err;
  }
}
