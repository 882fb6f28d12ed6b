/**
 * A VM's definition: versioned JSON in the store (`vms/NAME/vm.json`), written atomically, validated with
 * zod on every read so a damaged or hand-edited file gives a clear error instead of a half-loaded VM.
 * It also carries the journal of the one multi-file operation in progress (`pending`), so a host killed
 * mid-checkpoint or mid-merge finishes or rolls it back on restart.
 */
import { z } from 'zod';
import { TidemarkError } from '../errors.js';
import { writeFileAtomic } from '../util/atomic.js';
import { readSmallFile } from '../util/safe-open.js';
export { supportsRct } from './config-version.js';

/** 2: memory, vCPUs, SCSI controllers, boot source, image, accelerator, state Saved (1 is migrated on read). */
export const DEFINITION_VERSION = 2;
export const DEFAULT_MEMORY_MIB = 512;
export const MAX_MEMORY_MIB = 1024 * 1024;

export const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** `ide0-1`, `scsi2-13`: controller kind, controller number, location. */
export const SLOT = /^(ide[01]-[01]|scsi[0-3]-([0-9]|[1-5][0-9]|6[0-3]))$/;

export const CheckpointPolicy = z.enum(['production-fallback', 'production-only', 'standard-only', 'disabled']);
export type CheckpointPolicy = z.infer<typeof CheckpointPolicy>;
export const CheckpointType = z.enum(['standard', 'production', 'recovery']);
export type CheckpointType = z.infer<typeof CheckpointType>;
export const Consistency = z.enum(['application', 'crash']);
export type Consistency = z.infer<typeof Consistency>;

export const DiskAttachment = z.object({
  slot: z.string().regex(SLOT),
  /** The base disk (where tracking files live); relative paths are relative to the VM's directory. */
  base: z.string().min(1),
  /** The file the VM writes (the base, or the newest .avhdx). */
  head: z.string().min(1),
  virtualDiskId: z.string(),
  virtualSize: z.number().int().positive(),
});
export type DiskAttachment = z.infer<typeof DiskAttachment>;

export const CheckpointDisk = z.object({
  slot: z.string().regex(SLOT),
  virtualDiskId: z.string(),
  /** The frozen file holding the disk as it was at the checkpoint. */
  file: z.string(),
  rctId: z.string().nullable(),
});

/** The backup run (lease) that made a checkpoint: leftover clean-up touches only checkpoints of ended runs. */
export const CheckpointRun = z.object({ lease: z.string(), runId: z.string(), command: z.string() });
export type CheckpointRun = z.infer<typeof CheckpointRun>;

export const Checkpoint = z.object({
  id: z.string(),
  name: z.string(),
  type: CheckpointType,
  parentId: z.string().nullable(),
  createdAt: z.string(),
  consistency: Consistency,
  /** Why the consistency is what it is (guest froze / cannot freeze: ... / VM off). */
  consistencyNote: z.string().nullable(),
  freezeWindowMs: z.number().nullable(),
  ioPauseMs: z.number().nullable(),
  disks: z.array(CheckpointDisk),
  /** Made by a backup run holding the VM's lease (null: by a person, or by a host older than leases). */
  run: CheckpointRun.nullable().default(null),
  /**
   * A standard checkpoint of a VM QEMU ran: its memory and device state (QEMU's migration stream), the
   * file beside the checkpoint's .avhdx files (relative to the VM's folder). Applying the checkpoint leaves
   * the VM Saved with it, as Hyper-V does: the next start resumes the guest where it was.
   */
  memoryState: z.string().nullable().default(null),
});
export type Checkpoint = z.infer<typeof Checkpoint>;

/** A reference-point owner name given by a person: 1–100 printable characters (no control characters). */
export const OWNER_NAME = /^[\p{L}\p{M}\p{N}\p{P}\p{S} ]{1,100}$/u;

/**
 * Who a reference point belongs to: the repository (by id) whose backups made it, or a name a person gave.
 * A backup destroys only its own repository's previous reference points; others are never touched.
 */
export const ReferencePointOwner = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('repository'), id: z.string().min(1).max(100) }).strict(),
  z.object({ kind: z.literal('user'), name: z.string().regex(OWNER_NAME) }).strict(),
]);
export type ReferencePointOwner = z.infer<typeof ReferencePointOwner>;

export function describeOwner(o: ReferencePointOwner | null): string {
  return o === null ? 'unowned' : o.kind === 'repository' ? `repository:${o.id}` : `user:${o.name}`;
}

export const ReferencePoint = z.object({
  id: z.string(),
  createdAt: z.string(),
  /** The recovery checkpoint it was converted from, or null when created directly. */
  fromCheckpoint: z.string().nullable(),
  consistency: Consistency.nullable(),
  /** Parallel arrays, as in Hyper-V: match disks by identifier, never by position. */
  virtualDiskIdentifiers: z.array(z.string()),
  resilientChangeTrackingIdentifiers: z.array(z.string().nullable()),
  /** null: made before owners existed (older stores) or without one; never destroyed automatically. */
  owner: ReferencePointOwner.nullable().default(null),
});
export type ReferencePoint = z.infer<typeof ReferencePoint>;

export const PendingOperation = z.discriminatedUnion('op', [
  z.object({
    op: z.literal('checkpoint'),
    checkpointId: z.string(),
    /** Children being created: deleted on restart unless the definition already uses them. */
    created: z.array(z.string()),
  }),
  z.object({
    op: z.literal('merge'),
    checkpointId: z.string(),
    then: z.enum(['delete', 'refpoint']),
    referencePoint: ReferencePoint.nullable(),
    disks: z.array(z.object({ slot: z.string(), child: z.string(), parent: z.string() })),
  }),
  z.object({
    op: z.literal('apply'),
    checkpointId: z.string(),
    created: z.array(z.string()),
    discard: z.array(z.string()),
  }),
  z.object({ op: z.literal('delete-files'), files: z.array(z.string()) }),
  z.object({
    op: z.literal('convert-disks'),
    /**
     * Per disk: the VHD it was (`from`), the VHDX being made beside it (`temp`, renamed to `to`). Not committed
     * while this journal stands (the commit points the attachments at `to` and journals `from` for deletion in
     * the same write): on restart every `temp`, `to` and the tracking files of `to` are removed.
     */
    disks: z.array(z.object({ slot: z.string(), from: z.string(), to: z.string(), temp: z.string() })),
  }),
]);
export type PendingOperation = z.infer<typeof PendingOperation>;

/** How the VM boots: a kernel (+ initrd, command line) directly, or its firmware (BIOS / UEFI) from its disks. */
export const BootDefinition = z.discriminatedUnion('kind', [
  z
    .object({
      kind: z.literal('kernel'),
      kernel: z.string().min(1),
      initrd: z.string().min(1).nullable(),
      append: z.string().max(4096).nullable(),
    })
    .strict(),
  z.object({ kind: z.literal('firmware') }).strict(),
]);
export type BootDefinition = z.infer<typeof BootDefinition>;

export const VmDefinition = z.object({
  schemaVersion: z.literal(DEFINITION_VERSION),
  id: z.string(),
  name: z.string().regex(VM_NAME),
  generation: z.union([z.literal(1), z.literal(2)]),
  configVersion: z.string().regex(/^\d+\.\d+$/),
  checkpointPolicy: CheckpointPolicy,
  /** The guest-agent channel (`unix:PATH`), or null. */
  guest: z.string().nullable(),
  /** The state the host restores after a restart (a running QEMU is adopted; Saved keeps its saved state). */
  state: z.enum(['Off', 'Running', 'Saved']),
  memoryMiB: z.number().int().min(16).max(MAX_MEMORY_MIB),
  cpus: z.number().int().min(1).max(64),
  /** virtio-scsi controllers scsi0.. (0–4; Hyper-V's SCSI controllers) */
  scsiControllers: z.number().int().min(0).max(4),
  /** null: no boot source — `vm start` only exports the disks over NBD for external clients */
  boot: BootDefinition.nullable(),
  /** the guest image folder the boot files came from (`vm create --image`), or null */
  image: z.string().nullable(),
  accel: z.enum(['auto', 'kvm', 'tcg']),
  createdAt: z.string(),
  disks: z.array(DiskAttachment),
  checkpoints: z.array(Checkpoint),
  currentCheckpointId: z.string().nullable(),
  referencePoints: z.array(ReferencePoint),
  pending: PendingOperation.nullable(),
});
export type VmDefinition = z.infer<typeof VmDefinition>;

/** A definition larger than this is refused unread (it lists disks, checkpoints and reference points). */
const MAX_DEFINITION_BYTES = 16 * 1024 * 1024;

export async function readDefinition(file: string): Promise<VmDefinition> {
  let text: string;
  try {
    text = (await readSmallFile(file, { maxBytes: MAX_DEFINITION_BYTES })).toString('utf8');
  } catch (err) {
    // A FIFO, a directory or an oversized file keeps its own code; anything else reads as missing.
    if (err instanceof TidemarkError && err.code !== 'NOT_FOUND' && err.code !== 'IO_ERROR')
      throw new TidemarkError(err.code, `VM definition ${err.message}`, err.details);
    throw new TidemarkError('NOT_FOUND', `cannot read VM definition ${file}: ${(err as Error).message}`);
  }
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (err) {
    throw new TidemarkError('INVALID_ARGUMENT', `VM definition ${file} is not JSON: ${(err as Error).message}`);
  }
  const parsed = VmDefinition.safeParse(migrateDefinition(json));
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    throw new TidemarkError(
      'INVALID_ARGUMENT',
      `VM definition ${file} is invalid at ${issue.path.join('.') || '(root)'}: ${issue.message}`,
    );
  }
  return parsed.data;
}

/**
 * Older definitions read unchanged: version 1 had no memory, vCPUs, controllers or boot source. It gets the
 * defaults (no boot source: the VM keeps exporting its disks only; enough SCSI controllers for its slots).
 */
export function migrateDefinition(json: unknown): unknown {
  if (typeof json !== 'object' || json === null) return json;
  const d = json as Record<string, unknown>;
  if (d.schemaVersion !== 1) return json;
  const slots = Array.isArray(d.disks) ? d.disks.map((x) => String((x as { slot?: unknown })?.slot ?? '')) : [];
  const highest = Math.max(-1, ...slots.map((s) => (/^scsi(\d)-/.exec(s) ? Number(s[4]) : -1)));
  return {
    ...d,
    schemaVersion: 2,
    memoryMiB: DEFAULT_MEMORY_MIB,
    cpus: 1,
    scsiControllers: Math.max(highest + 1, d.generation === 2 ? 1 : 0),
    boot: null,
    image: null,
    accel: 'auto',
  };
}

/** Written private to the host's user (0600, whatever the umask). */
export async function writeDefinition(file: string, def: VmDefinition): Promise<void> {
  await writeFileAtomic(file, JSON.stringify(VmDefinition.parse(def), null, 2) + '\n', 0o600);
}
