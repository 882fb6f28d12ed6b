/**
 * Restore-point manifests (docs/formats/repository.md §7): typed JSON, written last and atomically, naming every
 * VM and disk of the point and the index holding each disk's chunks. Objects are "loose": a reader keeps fields it
 * does not know, so later versions can add fields without breaking this one (a higher `version` is refused).
 */
import { randomBytes } from 'node:crypto';
import { z } from 'zod';
import { TidemarkError } from '../errors.js';
import { hasControl, printable } from './text.js';

export const MANIFEST_FORMAT = 'tidemark-point';
export const MANIFEST_VERSION = 1;
/** a manifest (VM definitions included) may be at most this large */
export const MAX_MANIFEST_BYTES = 16 * 2 ** 20;
export const POINT_ID = /^\d{8}-\d{6}-[0-9a-f]{8}$/;
const HEX_ID = /^[0-9a-f]{64}$/;

// Names become paths on restore (TO/VM/SLOT.vhdx), so they are held to what the host allows (src/host/definition.ts
// keeps the same rules; the repository does not import the host): no separators, no `..`, no device names.
/**
 * A VM's name: 1–64 of A–Z a–z 0–9 . _ -, and not `.`, `..` or a device name (CON, NUL, COM1, … with or without an
 * extension: a restore target may be a file system that treats them as devices).
 */
export const VM_NAME = /^(?!\.{1,2}$)(?!(?:CON|PRN|AUX|NUL|COM[1-9]|LPT[1-9])(?:\.|$))[A-Za-z0-9._-]{1,64}$/i;
/** A disk's name is its slot: `ide0-1`, `scsi2-13` (IDE 0–1:0–1, SCSI 0–3:0–63). */
export const SLOT = /^(ide[01]-[01]|scsi[0-3]-([0-9]|[1-5][0-9]|6[0-3]))$/;
/** VM and virtual disk ids: GUIDs in text form. */
export const GUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
/**
 * A sealed change-tracking id (src/tracking/format.ts): the epoch GUID with colons, the counter, and (format 2)
 * the seal's nonce. Points written before format 2 hold `rct1` ids (tracking refuses them: a full read).
 */
export const RCT_ID =
  /^(rct2:[0-9a-f]{8}:[0-9a-f]{4}:[0-9a-f]{4}:[0-9a-f]{4}:[0-9a-f]{12}:[0-9a-f]{8}:[0-9a-f]{16}|rct1:[0-9a-f]{8}:[0-9a-f]{4}:[0-9a-f]{4}:[0-9a-f]{4}:[0-9a-f]{12}:[0-9a-f]{8})$/i;
/** Short words: a disk format (`vhdx`), a flow (`2016`, `per-vm`). */
const TOKEN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$/;
/** Text a person reads (`points show`): no control characters, which could rewrite a terminal. */
const TEXT = { test: (t: string) => t.length <= 4096 && !hasControl(t) };

/** The largest virtual disk there can be: VHDX's 64 TiB. */
export const MAX_VIRTUAL_SIZE = 64 * 2 ** 40;
/** Bounds checked before anything else is decoded, so a hostile manifest cannot make the reader work at will. */
export const MAX_VMS = 1024;
export const MAX_DISKS = 4096;
/** How deep a VM's (opaque) definition may nest: it is walked and written out on restore. */
export const MAX_DEFINITION_DEPTH = 64;
/** Slots an index may hold, and the chunk sizes there are (disk-index.ts, config.ts: not imported, kept equal). */
const MAX_INDEX_SLOTS = 2 ** 24;
const MIN_CHUNK = 64 * 1024;
const MAX_CHUNK = 8 * 2 ** 20;

const count = z.number().int().nonnegative();
const ms = z.number().nonnegative().max(1e12);
const regex = (re: RegExp, what: string) => z.string().regex(re, { message: `not ${what}` });

export const indexRefSchema = z
  .object({
    /** the index object's name (hash of its encoding) */
    id: regex(HEX_ID, 'an index id (64 hex digits)'),
    virtualSize: count.max(MAX_VIRTUAL_SIZE),
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
    diskId: regex(GUID, 'a GUID'),
    /** its slot, e.g. scsi0-0: the restored file's name */
    name: regex(SLOT, 'a slot such as scsi0-0 or ide0-1'),
    controller: z.object({ bus: z.enum(['ide', 'scsi']), controller: count.max(3), location: count.max(63) }).loose(),
    virtualSize: count.max(MAX_VIRTUAL_SIZE, { message: `more than ${MAX_VIRTUAL_SIZE} bytes (64 TiB)` }),
    logicalSectorSize: z
      .number()
      .int()
      .refine((n) => [512, 4096].includes(n), { message: 'not 512 or 4096' }),
    blockSize: count.max(256 * 2 ** 20),
    /** 'vhdx', 'vhd', 'vhds', ... */
    format: regex(TOKEN, 'a disk format'),
    /** the sealed change-tracking id this point's data corresponds to, or null */
    rctId: regex(RCT_ID, 'a change-tracking id').nullable(),
    read: z.enum(['incremental', 'full']),
    /** why the disk was read in full (no id, id refused, ...), null for an incremental */
    fullReason: z
      .string()
      .refine((t) => TEXT.test(t), { message: 'not printable text of at most 4096 characters' })
      .nullable(),
    index: indexRefSchema,
    stats: diskStatsSchema,
    /** the tracking audit of an incremental; null when none ran; absent from manifests written before audits */
    audit: diskAuditSchema.nullable().optional(),
  })
  .loose();

const jsonValue = z.json();

export const vmEntrySchema = z
  .object({
    name: regex(VM_NAME, 'a VM name (1 to 64 of A-Z a-z 0-9 . _ -, not . or .. or a device name)'),
    id: regex(GUID, 'a GUID'),
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
    id: regex(POINT_ID, 'a restore point id'),
    /** when the point's data was frozen (ISO 8601, UTC) */
    time: z.iso.datetime(),
    /** '2016', 'per-vm', 'no-snapshot', ... */
    flow: regex(TOKEN, 'a flow name'),
    parentId: regex(POINT_ID, 'a restore point id').nullable(),
    vms: z.array(vmEntrySchema).min(1),
    statistics: statisticsSchema,
    /** storage snapshots the run took */
    snapshots: count.max(65536),
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

/**
 * What must hold before the schema runs (it would otherwise work through any number of entries and nest as deep
 * as the JSON does): at most MAX_VMS VMs and MAX_DISKS disks, definitions nested at most MAX_DEFINITION_DEPTH deep.
 */
function checkShape(json: unknown): string | null {
  const o = json as { vms?: unknown } | null;
  if (typeof o !== 'object' || o === null || !Array.isArray(o.vms)) return null; // the schema names it
  if (o.vms.length > MAX_VMS) return `vms: ${o.vms.length} VMs, more than ${MAX_VMS}`;
  let disks = 0;
  for (const [i, vm] of o.vms.entries()) {
    const v = vm as { disks?: unknown; definition?: unknown } | null;
    if (typeof v !== 'object' || v === null) continue;
    if (Array.isArray(v.disks)) disks += v.disks.length;
    if (disks > MAX_DISKS) return `vms: more than ${MAX_DISKS} disks`;
    if (depthOver(v.definition, MAX_DEFINITION_DEPTH)) {
      return `vms.${i}.definition: nested more than ${MAX_DEFINITION_DEPTH} deep`;
    }
  }
  return null;
}

/** Whether a parsed JSON value nests deeper than `limit` (walked with a stack of our own, not recursion). */
function depthOver(value: unknown, limit: number): boolean {
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (typeof v !== 'object' || v === null) continue;
    if (depth >= limit) return true;
    for (const child of Array.isArray(v) ? v : Object.values(v)) {
      if (typeof child === 'object' && child !== null) stack.push([child, depth + 1]);
    }
  }
  return false;
}

/** What the schema cannot say: names and ids unique, a disk's slot and controller agree, the index fits the disk. */
function checkConsistency(m: PointManifest): string | null {
  if (m.parentId === m.id) return 'parentId: the point is its own parent';
  const vmNames = new Set<string>();
  const vmIds = new Set<string>();
  const diskIds = new Set<string>();
  for (const [i, vm] of m.vms.entries()) {
    const at = `vms.${i}`;
    if (vmNames.has(vm.name)) return `${at}.name: a second VM named ${vm.name}`;
    if (vmIds.has(vm.id.toLowerCase())) return `${at}.id: a second VM with id ${vm.id}`;
    vmNames.add(vm.name);
    vmIds.add(vm.id.toLowerCase());
    const slots = new Set<string>();
    for (const [j, d] of vm.disks.entries()) {
      const where = `${at}.disks.${j}`;
      if (slots.has(d.name)) return `${where}.name: a second disk in slot ${d.name}`;
      slots.add(d.name);
      if (diskIds.has(d.diskId.toLowerCase())) return `${where}.diskId: a second disk with id ${d.diskId}`;
      diskIds.add(d.diskId.toLowerCase());
      const c = d.controller;
      if (`${c.bus}${c.controller}-${c.location}` !== d.name) {
        return `${where}.controller: ${c.bus} ${c.controller}:${c.location} is not slot ${d.name}`;
      }
      const ix = d.index;
      if (ix.virtualSize !== d.virtualSize) {
        return `${where}.index.virtualSize: ${ix.virtualSize}, the disk has ${d.virtualSize}`;
      }
      if (ix.chunkSize < MIN_CHUNK || ix.chunkSize > MAX_CHUNK || (ix.chunkSize & (ix.chunkSize - 1)) !== 0) {
        return `${where}.index.chunkSize: ${ix.chunkSize} is not a chunk size`;
      }
      const slotCount = Math.ceil(d.virtualSize / ix.chunkSize);
      if (slotCount > MAX_INDEX_SLOTS) {
        return `${where}.index: ${slotCount} chunks, more than an index holds (${MAX_INDEX_SLOTS})`;
      }
      if (ix.storedSlots > slotCount) {
        return `${where}.index.storedSlots: ${ix.storedSlots} of ${slotCount} slots`;
      }
    }
  }
  return null;
}

/** Validates a manifest about to be written: INVALID_ARGUMENT naming the first wrong field. */
export function checkManifest(m: unknown): PointManifest {
  const shape = checkShape(m);
  if (shape) throw new TidemarkError('INVALID_ARGUMENT', `manifest: ${shape}`);
  const r = manifestSchema.safeParse(m);
  if (!r.success) throw new TidemarkError('INVALID_ARGUMENT', `manifest: ${describeIssue(r.error.issues[0])}`);
  const problem = checkConsistency(r.data);
  if (problem) throw new TidemarkError('INVALID_ARGUMENT', `manifest: ${problem}`);
  return r.data;
}

export function encodeManifest(m: PointManifest): Buffer {
  return Buffer.from(JSON.stringify(m), 'utf8');
}

/**
 * Decodes a stored manifest: REPOSITORY_CORRUPT (or NOT_SUPPORTED for a newer version) naming the point and the
 * field. Every field is checked (docs/formats/repository.md §7): a name that would leave the restore target, a size
 * beyond the engine's, a count that would make the reader work at will are refused here, before anything uses them.
 */
export function decodeManifest(body: Buffer, id: string): PointManifest {
  const bad = (why: string) =>
    new TidemarkError('REPOSITORY_CORRUPT', `manifest of restore point ${id} is damaged: ${printable(why, 1000)}`, {
      pointId: id,
    });
  let json: unknown;
  try {
    json = JSON.parse(body.toString('utf8'));
  } catch (err) {
    throw bad(`not JSON (${printable((err as Error).message)})`);
  }
  const o = json as Partial<PointManifest> | null;
  if (o && o.format === MANIFEST_FORMAT && typeof o.version === 'number' && o.version > MANIFEST_VERSION) {
    throw new TidemarkError(
      'NOT_SUPPORTED',
      `restore point ${id} has manifest version ${o.version}; this Tidemark reads version ${MANIFEST_VERSION}`,
    );
  }
  const shape = checkShape(json);
  if (shape) throw bad(shape);
  const r = manifestSchema.safeParse(json);
  if (!r.success) throw bad(describeIssue(r.error.issues[0]));
  if (r.data.version !== MANIFEST_VERSION) throw bad(`version ${r.data.version}`);
  if (r.data.id !== id) throw bad(`it says it is point ${r.data.id}`);
  const problem = checkConsistency(r.data);
  if (problem) throw bad(problem);
  return r.data;
}
