/**
 * The `config` object: what a repository is (id, chunk size, how chunks are named, compressed and sealed) and, when
 * encrypted, its key slots. Plain JSON so that a person can read it; in an encrypted repository a MAC under the
 * master key covers every field that matters, so a tampered config is refused, not obeyed.
 */
import { z } from 'zod';
import { TidemarkError } from '../errors.js';
import { checkSlotParameters, hmac, type KeySlot } from './keys.js';
import { printable } from './text.js';

export const CONFIG_KEY = 'config';
export const FORMAT_NAME = 'tidemark-repository';
/** 2: chunks in packs (version 1, one object per chunk, was written only by development builds) */
export const FORMAT_VERSION = 2;
export const DEFAULT_CHUNK_SIZE = 2 ** 20;
export const MIN_CHUNK_SIZE = 64 * 1024;
export const MAX_CHUNK_SIZE = 8 * 2 ** 20;
const MAX_CONFIG_BYTES = 64 * 1024;

const base64 = z.string().regex(/^[A-Za-z0-9+/]*={0,2}$/);
const slotSchema = z.object({
  kind: z.enum(['passphrase', 'key-file']),
  kdf: z.discriminatedUnion('name', [
    z.object({
      name: z.literal('scrypt'),
      logN: z.number().int(),
      r: z.number().int(),
      p: z.number().int(),
      salt: base64,
    }),
    z.object({ name: z.literal('hkdf-sha256'), salt: base64 }),
  ]),
  wrapped: base64,
});

const configSchema = z
  .object({
    format: z.literal(FORMAT_NAME),
    version: z.number().int(),
    id: z.string().regex(/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/),
    createdAt: z.string(),
    chunkSize: z.number().int(),
    chunkId: z.enum(['sha256', 'hmac-sha256']),
    compression: z.literal('zstd'),
    encryption: z.union([
      z.null(),
      z.object({ cipher: z.literal('aes-256-gcm'), keys: z.array(slotSchema).min(1).max(32), mac: base64 }),
    ]),
    /**
     * Unencrypted repositories made by this Tidemark: restore points are authenticated with a key the client keeps
     * outside the repository (trust.ts); `mac` authenticates this config under it. Absent: made before (no key).
     */
    integrity: z
      .object({ algorithm: z.literal('hmac-sha256'), mac: base64 })
      .nullable()
      .optional(),
  })
  .loose();

export type RepositoryConfig = z.infer<typeof configSchema> & {
  encryption: null | { cipher: 'aes-256-gcm'; keys: KeySlot[]; mac: string };
  integrity?: null | { algorithm: 'hmac-sha256'; mac: string };
};

export function checkChunkSize(size: number): string | null {
  if (!Number.isSafeInteger(size) || size < MIN_CHUNK_SIZE || size > MAX_CHUNK_SIZE || (size & (size - 1)) !== 0) {
    return `chunk size ${size} is not a power of two from 64 KiB to 8 MiB`;
  }
  return null;
}

/**
 * The fields a MAC covers, in a fixed order: everything but the key slots and the MACs themselves, then what
 * authenticates the repository ('aes-256-gcm': its encryption; 'hmac-sha256': its integrity key).
 */
function macInput(c: RepositoryConfig, kind: 'aes-256-gcm' | 'hmac-sha256' = 'aes-256-gcm'): string {
  return JSON.stringify([c.format, c.version, c.id, c.createdAt, c.chunkSize, c.chunkId, c.compression, kind]);
}

/** `integrity.mac` of an unencrypted repository's config, under the config key derived from its integrity key. */
export function integrityConfigMac(c: RepositoryConfig, configKey: Buffer): string {
  return hmac(configKey, macInput(c, 'hmac-sha256')).toString('base64');
}

/** Whether an integrity key (its derived config key) is this repository's: its config's MAC matches. */
export function integrityMacMatches(c: RepositoryConfig, configKey: Buffer): boolean {
  if (!c.integrity) return false;
  const want = Buffer.from(c.integrity.mac, 'base64');
  const got = hmac(configKey, macInput(c, 'hmac-sha256'));
  return want.length === got.length && got.equals(want);
}

export function configMac(c: RepositoryConfig, configKey: Buffer): string {
  return hmac(configKey, macInput(c)).toString('base64');
}

export function checkConfigMac(c: RepositoryConfig, configKey: Buffer, where: string): void {
  const want = Buffer.from(c.encryption!.mac, 'base64');
  const got = hmac(configKey, macInput(c));
  if (want.length !== got.length || !got.equals(want)) {
    throw new TidemarkError(
      'REPOSITORY_CORRUPT',
      `config of repository ${where} was modified (its MAC does not match)`,
    );
  }
}

export function encodeConfig(c: RepositoryConfig): Buffer {
  return Buffer.from(JSON.stringify(c, null, 2) + '\n', 'utf8');
}

export function decodeConfig(raw: Buffer, where: string): RepositoryConfig {
  const bad = (why: string) =>
    new TidemarkError('REPOSITORY_CORRUPT', `config of repository ${where} is damaged: ${printable(why, 1000)}`, {
      where,
    });
  if (raw.length > MAX_CONFIG_BYTES) throw bad(`${raw.length} bytes`);
  let json: unknown;
  try {
    json = JSON.parse(raw.toString('utf8'));
  } catch (err) {
    throw bad(`not JSON (${printable((err as Error).message)})`);
  }
  if (typeof json === 'object' && json !== null) {
    const o = json as Record<string, unknown>;
    if (o.format === FORMAT_NAME && typeof o.version === 'number' && o.version > FORMAT_VERSION) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `repository ${where} has format version ${o.version}; this Tidemark reads version ${FORMAT_VERSION}`,
      );
    }
    if (o.format === FORMAT_NAME && o.version === 1) {
      throw new TidemarkError(
        'NOT_SUPPORTED',
        `repository ${where} has format version 1 (a chunk per file, from a development build of Tidemark); this Tidemark reads version ${FORMAT_VERSION}: back up into a new repository`,
      );
    }
  }
  const r = configSchema.safeParse(json);
  if (!r.success) {
    const i = r.error.issues[0];
    throw bad(`${i.path.join('.') || '(top)'}: ${i.message}`);
  }
  const c = r.data as RepositoryConfig;
  if (c.version !== FORMAT_VERSION) throw bad(`version ${c.version}`);
  const sizeProblem = checkChunkSize(c.chunkSize);
  if (sizeProblem) throw bad(sizeProblem);
  if ((c.encryption === null) !== (c.chunkId === 'sha256')) throw bad('chunk naming does not match the encryption');
  if (c.encryption !== null && c.integrity) throw bad('an encrypted repository has no integrity key of its own');
  if (!/^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$/.test(c.createdAt)) throw bad('createdAt is not a UTC time');
  for (const slot of c.encryption?.keys ?? []) {
    const problem = checkSlotParameters(slot);
    if (problem) throw bad(`key slot: ${problem}`);
  }
  return c;
}
