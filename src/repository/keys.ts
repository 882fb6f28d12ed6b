/**
 * Key material of an encrypted repository (docs/formats/repository.md §6).
 *
 * A random 32-byte master key is wrapped (AES-256-GCM) once per key slot by a key derived from a passphrase
 * (scrypt, memory-hard, parameters stored in the slot) or from a key file's contents (HKDF-SHA-256). The master key
 * never encrypts anything itself: HKDF derives one subkey for chunk names (HMAC-SHA-256), one for object
 * encryption (AES-256-GCM) and one for the config's MAC. A wrong passphrase or key file fails the slot's GCM tag:
 * WRONG_KEY, never garbage.
 */
import { createCipheriv, createDecipheriv, createHmac, hkdfSync, randomBytes, scrypt } from 'node:crypto';
import { FileTypeError, readSmallFile } from '../util/safe-open.js';
import { TidemarkError, InvalidArgumentError, fromSystemError } from '../errors.js';

export const MASTER_KEY_SIZE = 32;
/** scrypt cost: N = 2^17 by default (about 128 MiB, ~0.3 s); never below 2^15; r = 8, p = 1. */
export const DEFAULT_SCRYPT_LOG_N = 17;
export const MIN_SCRYPT_LOG_N = 15;
export const MAX_SCRYPT_LOG_N = 20;
/** what a hostile config may make us allocate for scrypt */
const MAX_SCRYPT_MEMORY = 1024 * 2 ** 20;
const MIN_KEY_FILE = 32;
const MAX_KEY_FILE = 64 * 1024;

export type Secret = { passphrase: string } | { keyFile: Buffer };

export interface ScryptKdf {
  name: 'scrypt';
  logN: number;
  r: number;
  p: number;
  salt: string;
}
export interface HkdfKdf {
  name: 'hkdf-sha256';
  salt: string;
}

/** One way in: the master key wrapped by a key derived from a passphrase or a key file. */
export interface KeySlot {
  kind: 'passphrase' | 'key-file';
  kdf: ScryptKdf | HkdfKdf;
  /** base64 of nonce (12) | ciphertext (32) | tag (16) */
  wrapped: string;
}

export interface RepositoryKeys {
  /** HMAC-SHA-256 key naming chunks and indexes */
  idKey: Buffer;
  /** AES-256-GCM key of every object */
  encKey: Buffer;
  /** HMAC-SHA-256 key authenticating the config */
  configKey: Buffer;
}

export function deriveKeys(master: Buffer, repositoryId: string): RepositoryKeys {
  const salt = Buffer.from(repositoryId, 'utf8');
  const sub = (info: string) => Buffer.from(hkdfSync('sha256', master, salt, info, 32));
  return {
    idKey: sub('tidemark chunk id v1'),
    encKey: sub('tidemark object encryption v1'),
    configKey: sub('tidemark config mac v1'),
  };
}

/** What an unencrypted repository's integrity key (kept by the client, trust.ts) authenticates. */
export interface IntegrityKeys {
  /** HMAC-SHA-256 key of manifest envelopes (envelope.ts, flag bit 3) */
  manifestKey: Buffer;
  /** HMAC-SHA-256 key of the config's `integrity.mac` */
  configKey: Buffer;
}

export function deriveIntegrityKeys(integrityKey: Buffer, repositoryId: string): IntegrityKeys {
  const salt = Buffer.from(repositoryId, 'utf8');
  const sub = (info: string) => Buffer.from(hkdfSync('sha256', integrityKey, salt, info, 32));
  return { manifestKey: sub('tidemark manifest mac v1'), configKey: sub('tidemark integrity config mac v1') };
}

export function newMasterKey(): Buffer {
  return randomBytes(MASTER_KEY_SIZE);
}

function slotAad(repositoryId: string, kind: KeySlot['kind']): Buffer {
  return Buffer.from(`tidemark key slot v1 ${repositoryId} ${kind}`, 'utf8');
}

async function wrappingKey(secret: Secret, kdf: ScryptKdf | HkdfKdf): Promise<Buffer> {
  const salt = Buffer.from(kdf.salt, 'base64');
  if (kdf.name === 'hkdf-sha256') {
    if (!('keyFile' in secret)) throw new TidemarkError('INVALID_ARGUMENT', 'key-file slot needs a key file');
    return Buffer.from(hkdfSync('sha256', secret.keyFile, salt, 'tidemark key file v1', 32));
  }
  if (!('passphrase' in secret)) throw new TidemarkError('INVALID_ARGUMENT', 'passphrase slot needs a passphrase');
  const N = 2 ** kdf.logN;
  const maxmem = 128 * N * kdf.r * 2;
  return new Promise((resolve, reject) =>
    scrypt(secret.passphrase.normalize('NFC'), salt, 32, { N, r: kdf.r, p: kdf.p, maxmem }, (err, key) =>
      err ? reject(err) : resolve(key),
    ),
  );
}

export async function makeSlot(
  master: Buffer,
  repositoryId: string,
  secret: Secret,
  scryptLogN = DEFAULT_SCRYPT_LOG_N,
): Promise<KeySlot> {
  if (!Number.isInteger(scryptLogN) || scryptLogN < MIN_SCRYPT_LOG_N || scryptLogN > MAX_SCRYPT_LOG_N) {
    throw new InvalidArgumentError(
      `scrypt cost 2^${scryptLogN} is outside 2^${MIN_SCRYPT_LOG_N}–2^${MAX_SCRYPT_LOG_N}`,
    );
  }
  const kind: KeySlot['kind'] = 'passphrase' in secret ? 'passphrase' : 'key-file';
  const salt = randomBytes(32).toString('base64');
  const kdf: ScryptKdf | HkdfKdf =
    kind === 'passphrase' ? { name: 'scrypt', logN: scryptLogN, r: 8, p: 1, salt } : { name: 'hkdf-sha256', salt };
  const key = await wrappingKey(secret, kdf);
  const nonce = randomBytes(12);
  const cipher = createCipheriv('aes-256-gcm', key, nonce);
  cipher.setAAD(slotAad(repositoryId, kind));
  const ct = Buffer.concat([cipher.update(master), cipher.final()]);
  return { kind, kdf, wrapped: Buffer.concat([nonce, ct, cipher.getAuthTag()]).toString('base64') };
}

/** Checks what a slot from a (possibly hostile) config asks for before spending memory on it. */
export function checkSlotParameters(slot: KeySlot): string | null {
  if (slot.kdf.name === 'scrypt') {
    const { logN, r, p } = slot.kdf;
    if (!Number.isInteger(logN) || logN < MIN_SCRYPT_LOG_N || logN > MAX_SCRYPT_LOG_N) return `scrypt N = 2^${logN}`;
    if (!Number.isInteger(r) || r < 8 || r > 32 || !Number.isInteger(p) || p < 1 || p > 4)
      return `scrypt r=${r} p=${p}`;
    if (128 * 2 ** logN * r > MAX_SCRYPT_MEMORY) return `scrypt needs ${(128 * 2 ** logN * r) / 2 ** 20} MiB`;
  }
  const wrapped = Buffer.from(slot.wrapped, 'base64');
  if (wrapped.length !== 12 + MASTER_KEY_SIZE + 16) return `wrapped key of ${wrapped.length} bytes`;
  return null;
}

/**
 * The master key from the first slot of the secret's kind that opens. WRONG_KEY when none does (or there is no
 * slot of that kind: a passphrase for a repository that only has a key file).
 */
export async function unwrapMaster(
  slots: KeySlot[],
  repositoryId: string,
  secret: Secret,
  where: string,
): Promise<Buffer> {
  const kind: KeySlot['kind'] = 'passphrase' in secret ? 'passphrase' : 'key-file';
  const candidates = slots.filter((s) => s.kind === kind);
  if (candidates.length === 0) {
    const has = [...new Set(slots.map((s) => s.kind))].join(' or ');
    throw new TidemarkError('WRONG_KEY', `repository ${where} is not opened by a ${kind} (it takes a ${has})`);
  }
  for (const slot of candidates) {
    const key = await wrappingKey(secret, slot.kdf);
    const blob = Buffer.from(slot.wrapped, 'base64');
    const decipher = createDecipheriv('aes-256-gcm', key, blob.subarray(0, 12));
    decipher.setAAD(slotAad(repositoryId, slot.kind));
    decipher.setAuthTag(blob.subarray(12 + MASTER_KEY_SIZE));
    try {
      return Buffer.concat([decipher.update(blob.subarray(12, 12 + MASTER_KEY_SIZE)), decipher.final()]);
    } catch {
      // not this slot
    }
  }
  throw new TidemarkError(
    'WRONG_KEY',
    kind === 'passphrase'
      ? `wrong passphrase for repository ${where}`
      : `the key file does not open repository ${where}`,
  );
}

export function hmac(key: Buffer, ...parts: (string | Uint8Array)[]): Buffer {
  const h = createHmac('sha256', key);
  for (const p of parts) h.update(p);
  return h.digest();
}

/** A key file's secret: its bytes without trailing white space (an editor's final newline does not matter). */
export async function readKeyFile(file: string): Promise<Buffer> {
  let raw: Buffer;
  try {
    raw = await readSmallFile(file, { maxBytes: MAX_KEY_FILE });
  } catch (err) {
    if (err instanceof FileTypeError)
      throw new InvalidArgumentError(`key file ${file} is not a regular file (a ${err.type})`);
    if (err instanceof TidemarkError && err.code === 'LIMIT_EXCEEDED')
      throw new InvalidArgumentError(`key file ${file} is larger than 64 KiB`);
    throw fromSystemError(err, 'read key file', file);
  }
  let end = raw.length;
  while (end > 0 && (raw[end - 1] === 0x0a || raw[end - 1] === 0x0d || raw[end - 1] === 0x20 || raw[end - 1] === 0x09))
    end--;
  if (end < MIN_KEY_FILE) {
    throw new InvalidArgumentError(`key file ${file} holds ${end} bytes; a key file needs at least ${MIN_KEY_FILE}`);
  }
  return raw.subarray(0, end);
}

/** Contents for a new key file: 32 random bytes in base64, one line. */
export function newKeyFileContents(): string {
  return `${randomBytes(32).toString('base64')}\n`;
}
