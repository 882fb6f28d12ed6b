/**
 * Restore-point manifests (docs/formats/repository.md §7): typed JSON, written last and atomically, naming every
 * VM and disk of the point and the index holding each disk's chunks. Objects are "loose": a reader keeps fields it
 * does not know, so later versions can add fields without breaking this one (a higher `version` is refused).
 */
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { TidemarkError } from '../errors.js';

export const MANIFEST_FORMAT = 'tidemark-point';
export const MANIFEST_VERSION = 1;
/** a manifest (VM definitions included) may be at most this large */
export const MAX_MANIFEST_BYTES = 16 * 2 ** 20;
export const POINT_ID = /^\d{8}-\d{6}-[0-9a-f]{8}$/;
const HEX_ID = /^[0-9a-f]{64}$/;

const count = z.number().int().nonnegative();
const ms = z.number().nonnegative();

export const indexRefSchema = z
  .object({
    /** the index object's name (hash of its encoding) */
    id: z.string().regex(HEX_ID),
    virtualSize: count,
    chunkSize: count,
    /** slots holding a chunk (the others are all zero) */
    storedSlots: count,
  })
  .loose();

export const diskStatsSchema = z
  .object({
    /** bytes read from the source and handed to the repository */
    bytesRead: count,
    /** bytes of chunks the repository did not have */
    bytesNew: count,
    /** bytes those new chunks take in the repository (compressed, sealed) */
    bytesStored: count,
  })
  .loose();

/** The tracking audit of an incremental disk (src/backup/audit.ts). */
export const diskAuditSchema = z
  .object({
    mode: z.enum(['sample', 'full']),
    /** the fraction of the disk's chunks asked for; null for a full audit */
    rate: z.number().positive().max(1).nullable(),
    /** the run's audit seed (each disk's sample derives from it and the disk's id) */
    seed: count,
    /** chunks change tracking called unchanged */
    unchanged: count,
    sampled: count,
    checked: count,
    bytesRead: count,
    mismatches: count,
    firstMismatchOffset: count.nullable(),
    /** after a mismatch and the full read: the chunks tracking called unchanged that differ (all, not sampled) */
    missedChunks: count.nullable(),
    timeMs: ms,
    /** null: no time bound */
    timeBudgetMs: ms.nullable(),
    stoppedEarly: z.boolean(),
  })
  .loose();

export const diskEntrySchema = z
  .object({
    /** the virtual disk's GUID */
    diskId: z.string().min(1),
    name: z.string(),
    controller: z.object({ bus: z.enum(['ide', 'scsi']), controller: count, location: count }).loose(),
    virtualSize: count,
    logicalSectorSize: z.number().int().positive(),
    blockSize: count,
    /** 'vhdx', 'vhd', 'vhds', ... */
    format: z.string().min(1),
    /** the sealed change-tracking id this point's data corresponds to, or null */
    rctId: z.string().nullable(),
    read: z.enum(['incremental', 'full']),
    /** why the disk was read in full (no id, id refused, ...), null for an incremental */
    fullReason: z.string().nullable(),
    index: indexRefSchema,
    stats: diskStatsSchema,
    /** the tracking audit of an incremental; null when none ran; absent from manifests written before audits */
    audit: diskAuditSchema.nullable().optional(),
  })
  .loose();

const jsonValue = z.json();

export const vmEntrySchema = z
  .object({
    name: z.string().min(1),
    id: z.string().min(1),
    /** the VM's definition as the host had it (opaque JSON) */
    definition: jsonValue,
    consistency: z.enum(['application', 'crash']),
    freezeWindowMs: ms.nullable(),
    ioPauseMs: ms.nullable(),
    disks: z.array(diskEntrySchema),
  })
  .loose();

export const statisticsSchema = z
  .object({ bytesRead: count, bytesNew: count, bytesStored: count, durationMs: ms })
  .loose();

export const manifestSchema = z
  .object({
    format: z.literal(MANIFEST_FORMAT),
    version: z.number().int(),
    id: z.string().regex(POINT_ID),
    /** when the point's data was frozen (ISO 8601, UTC) */
    time: z.iso.datetime(),
    /** '2016', 'per-vm', 'no-snapshot', ... */
    flow: z.string().min(1),
    parentId: z.string().regex(POINT_ID).nullable(),
    vms: z.array(vmEntrySchema).min(1),
    statistics: statisticsSchema,
    /** storage snapshots the run took */
    snapshots: count,
  })
  .loose();

export type IndexRef = z.infer<typeof indexRefSchema>;
export type DiskStats = z.infer<typeof diskStatsSchema>;
export type DiskAudit = z.infer<typeof diskAuditSchema>;
export type DiskEntry = z.infer<typeof diskEntrySchema>;
export type VmEntry = z.infer<typeof vmEntrySchema>;
export type PointStatistics = z.infer<typeof statisticsSchema>;
export type PointManifest = z.infer<typeof manifestSchema>;

export const pointInputSchema = manifestSchema
  .omit({ format: true, version: true, id: true, time: true, statistics: true })
  .extend({ time: z.iso.datetime().optional(), statistics: statisticsSchema.optional() });

/**
 * What a backup hands to commit(): the manifest without what the session fills in (format, version, id), with
 * `time` (default: when the session started) and `statistics` (default: the disks' sums) optional.
 */
export type PointInput = z.input<typeof pointInputSchema>;

/** `YYYYMMDD-HHMMSS-xxxxxxxx` (UTC, then 32 random bits): sorts by time, readable, unique. */
export function newPointId(time: Date): string {
  const iso = time.toISOString();
  const stamp = `${iso.slice(0, 4)}${iso.slice(5, 7)}${iso.slice(8, 10)}-${iso.slice(11, 13)}${iso.slice(14, 16)}${iso.slice(17, 19)}`;
  return `${stamp}-${randomBytes(4).toString('hex')}`;
}

export function pointKey(id: string): string {
  return `points/${id}`;
}

function describeIssue(issue: z.core.$ZodIssue): string {
  return `${issue.path.join('.') || '(top)'}: ${issue.message}`;
}

/** Validates a manifest about to be written: INVALID_ARGUMENT naming the first wrong field. */
export function checkManifest(m: unknown): PointManifest {
  const r = manifestSchema.safeParse(m);
  if (!r.success) throw new TidemarkError('INVALID_ARGUMENT', `manifest: ${describeIssue(r.error.issues[0])}`);
  return r.data;
}

export function encodeManifest(m: PointManifest): Buffer {
  return Buffer.from(JSON.stringify(m), 'utf8');
}

/** Decodes a stored manifest: REPOSITORY_CORRUPT (or NOT_SUPPORTED for a newer version) naming the point. */
export function decodeManifest(body: Buffer, id: string): PointManifest {
  const bad = (why: string) =>
    new TidemarkError('REPOSITORY_CORRUPT', `manifest of restore point ${id} is damaged: ${why}`, { pointId: id });
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw bad(`not JSON (${(err as Error).message})`);
  }
  const o = json as Partial<PointManifest> | null;
  if (o && o.format === MANIFEST_FORMAT && typeof o.version === 'number' && o.version > MANIFEST_VERSION) {
    throw new TidemarkError(
      'NOT_SUPPORTED',
      `restore point ${id} has manifest version ${o.version}; this Tidemark reads version ${MANIFEST_VERSION}`,
    );
  }
  const r = manifestSchema.safeParse(json);
  if (!r.success) throw bad(describeIssue(r.error.issues[0]));
  if (r.data.version !== MANIFEST_VERSION) throw bad(`version ${r.data.version}`);
  if (r.data.id !== id) throw bad(`it says it is point ${r.data.id}`);
  return r.data;
}
