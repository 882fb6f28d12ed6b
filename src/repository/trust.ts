/**
 * What this machine knows about repositories, kept outside them (as ssh keeps known hosts): for an unencrypted
 * repository, its integrity key, which authenticates its restore points (docs/formats/repository.md §6a); for an
 * encrypted one, that it is encrypted, so that a config rewritten to say otherwise is refused. Whoever can write a
 * repository cannot read or change this.
 *
 * One file per repository, `DIR/<repository id>.json` (mode 0600, the directory 0700), where DIR is
 * $TIDEMARK_CONFIG_DIR/repositories, else $XDG_CONFIG_HOME/tidemark/repositories, else ~/.config/tidemark/repositories.
 */
import { randomBytes } from 'node:crypto';
import { lstat, mkdir, open, readdir, rename, unlink, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { z } from 'zod';
import { TidemarkError, fromSystemError } from '../errors.js';
import { integrityMacMatches, type RepositoryConfig } from './config.js';
import { deriveIntegrityKeys } from './keys.js';

export const TRUST_FORMAT = 'tidemark-trusted-repository';
export const INTEGRITY_KEY_SIZE = 32;
const MAX_TRUST_FILE = 64 * 1024;
const REPOSITORY_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

const trustSchema = z
  .object({
    format: z.literal(TRUST_FORMAT),
    version: z.literal(1),
    repository: z.string().regex(REPOSITORY_ID),
    encrypted: z.boolean(),
    /** base64 of 32 bytes; null for an encrypted repository (its keys are in its config, wrapped) */
    integrityKey: z
      .string()
      .regex(/^[A-Za-z0-9+/]{43}=$/)
      .nullable(),
    /** where the repository was when this machine learned of it (for people; never used to find it) */
    location: z.string().max(4096),
    addedAt: z.string().max(64),
  })
  .loose();

export type TrustEntry = z.infer<typeof trustSchema>;

/** The directory of this machine's trust entries (see above). */
export function defaultTrustDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.TIDEMARK_CONFIG_DIR) return path.join(env.TIDEMARK_CONFIG_DIR, 'repositories');
  const base = env.XDG_CONFIG_HOME || path.join(os.homedir(), '.config');
  return path.join(base, 'tidemark', 'repositories');
}

export function newIntegrityKey(): Buffer {
  return randomBytes(INTEGRITY_KEY_SIZE);
}

export function trustFile(dir: string, repositoryId: string): string {
  if (!REPOSITORY_ID.test(repositoryId))
    throw new TidemarkError('INVALID_ARGUMENT', `"${repositoryId}" is not a repository id`);
  return path.join(dir, `${repositoryId}.json`);
}

/** Parses a trust entry (a file of this store, or one `repo key export` wrote): INVALID_ARGUMENT when malformed. */
export function parseTrustEntry(raw: Buffer, where: string): TrustEntry {
  let json: unknown;
  try {
    json = JSON.parse(raw.toString('utf8'));
  } catch {
    throw new TidemarkError('INVALID_ARGUMENT', `${where} is not a Tidemark repository key (not JSON)`);
  }
  const r = trustSchema.safeParse(json);
  if (!r.success) {
    const i = r.error.issues[0];
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `${where} is not a Tidemark repository key (${i.path.join('.') || '(top)'}: ${i.message})`,
    );
  }
  if (r.data.encrypted !== (r.data.integrityKey === null)) {
    throw new TidemarkError('INVALID_ARGUMENT', `${where}: an integrity key belongs to unencrypted repositories only`);
  }
  return r.data;
}

/** Reads a small regular file (never through a symlink, never a FIFO); null when there is none. */
export async function readSmallFile(file: string, what: string): Promise<Buffer | null> {
  let st;
  try {
    st = await lstat(file);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw fromSystemError(err, `read ${what}`, file);
  }
  if (!st.isFile()) throw new TidemarkError('INVALID_ARGUMENT', `${what} ${file} is not a regular file`);
  if (st.size > MAX_TRUST_FILE) throw new TidemarkError('INVALID_ARGUMENT', `${what} ${file} is larger than 64 KiB`);
  try {
    const fh = await open(file, 'r');
    try {
      return await fh.readFile();
    } finally {
      await fh.close();
    }
  } catch (err) {
    throw fromSystemError(err, `read ${what}`, file);
  }
}

/** This machine's entry for a repository, or null. */
export async function readTrust(dir: string, repositoryId: string): Promise<TrustEntry | null> {
  const file = trustFile(dir, repositoryId);
  const raw = await readSmallFile(file, 'repository key');
  return raw === null ? null : parseTrustEntry(raw, file);
}

/**
 * The entry this machine keeps for whatever repository it knew at `location` (as ssh knows a host by its name):
 * with it, a repository whose config now gives another id is recognised as a replaced config, not a new
 * repository. Null when none (malformed entries are passed over: this is a lookup, not a check of them).
 */
export async function findTrustByLocation(dir: string, location: string): Promise<TrustEntry | null> {
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return null;
  }
  for (const name of names.slice(0, 100_000)) {
    if (!name.endsWith('.json') || name.startsWith('.')) continue;
    const raw = await readSmallFile(path.join(dir, name), 'repository key').catch(() => null);
    if (raw === null) continue;
    let entry: TrustEntry;
    try {
      entry = parseTrustEntry(raw, name);
    } catch {
      continue;
    }
    if (entry.location === location) return entry;
  }
  return null;
}

/** The integrity key of an entry (null for an encrypted repository's). */
export function integrityKeyOf(entry: TrustEntry): Buffer | null {
  return entry.integrityKey === null ? null : Buffer.from(entry.integrityKey, 'base64');
}

export function trustEntry(opts: { repositoryId: string; location: string; integrityKey: Buffer | null }): TrustEntry {
  return {
    format: TRUST_FORMAT,
    version: 1,
    repository: opts.repositoryId,
    encrypted: opts.integrityKey === null,
    integrityKey: opts.integrityKey === null ? null : opts.integrityKey.toString('base64'),
    location: opts.location,
    addedAt: new Date().toISOString(),
  };
}

/**
 * Stores an entry (atomically, mode 0600). An entry that is already there with the same key is kept; one with
 * another key (or another kind) is never replaced: ALREADY_EXISTS.
 */
export async function writeTrust(dir: string, entry: TrustEntry): Promise<string> {
  const file = trustFile(dir, entry.repository);
  const existing = await readTrust(dir, entry.repository);
  if (existing) {
    if (existing.encrypted === entry.encrypted && existing.integrityKey === entry.integrityKey) return file;
    throw new TidemarkError(
      'ALREADY_EXISTS',
      `this machine already holds another key for repository ${entry.repository} (${file}); remove that file first if the repository was really re-keyed`,
    );
  }
  try {
    await mkdir(dir, { recursive: true, mode: 0o700 });
  } catch (err) {
    throw fromSystemError(err, 'create directory', dir);
  }
  const tmp = path.join(dir, `.${entry.repository}.${randomBytes(6).toString('hex')}.tmp`);
  try {
    await writeFile(tmp, JSON.stringify(entry, null, 2) + '\n', { flag: 'wx', mode: 0o600 });
    const fh = await open(tmp, 'r+');
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, file);
  } catch (err) {
    await unlink(tmp).catch(() => undefined);
    throw fromSystemError(err, 'write repository key', file);
  }
  return file;
}

/**
 * The integrity key this machine holds for an unencrypted repository (null: none), checked against its config:
 * a config that no longer matches what this machine knows of the repository is refused (REPOSITORY_CORRUPT).
 */
export async function integrityKeyFor(
  config: RepositoryConfig,
  trustDir: string,
  location: string,
): Promise<Buffer | null> {
  const trust = await readTrust(trustDir, config.id);
  const file = trustFile(trustDir, config.id);
  if (trust?.encrypted) {
    throw new TidemarkError(
      'REPOSITORY_CORRUPT',
      `repository ${location} (${config.id}) was encrypted when this machine made it (${file}), but its config now says it is not: refused — someone rewrote the config`,
    );
  }
  if (!trust) {
    const known = await findTrustByLocation(trustDir, location);
    if (known && known.repository !== config.id) {
      throw new TidemarkError(
        'REPOSITORY_CORRUPT',
        `this machine knows the repository at ${location} as ${known.repository} (${trustFile(trustDir, known.repository)}), but its config now says ${config.id}: refused — someone replaced the config (if a new repository really was made there elsewhere, remove that file)`,
      );
    }
  }
  const key = trust ? integrityKeyOf(trust) : null;
  if (key === null) return null;
  if (!config.integrity) {
    throw new TidemarkError(
      'REPOSITORY_CORRUPT',
      `this machine holds an integrity key for repository ${location} (${file}), but its config names none: refused — someone rewrote the config`,
    );
  }
  if (!integrityMacMatches(config, deriveIntegrityKeys(key, config.id).configKey)) {
    throw new TidemarkError(
      'REPOSITORY_CORRUPT',
      `config of repository ${location} does not match the integrity key this machine holds for it (${file}): the config was modified`,
    );
  }
  return key;
}
