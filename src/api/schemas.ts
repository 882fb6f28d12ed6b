/**
 * The management API's request bodies, as zod schemas: the server validates every body with them, the
 * OpenAPI document is generated from them, and the typed client takes their inferred types.
 */
import { z } from 'zod';
import { CONFIG_VERSIONS } from '../host/config-version.js';
import {
  BootDefinition,
  CheckpointPolicy,
  CheckpointType,
  Consistency,
  ReferencePointOwner,
  SLOT,
  VM_NAME,
} from '../host/definition.js';
import { ImportOwner } from '../host/imports.js';
import { LeaseOwner, MAX_LEASE_TTL_SECONDS } from '../host/leases.js';

const Size = z.union([z.number().int().positive(), z.string().regex(/^\d+(\.\d+)?\s*[KMGT]?i?B?$/i)]);

/** A configuration version this host knows (the host checks it too, with the list in its message). */
const ConfigVersion = z.string().refine((v) => (CONFIG_VERSIONS as readonly string[]).includes(v), {
  message: `a configuration version is one of ${CONFIG_VERSIONS.join(', ')}`,
});

/** The id of the VM's lease the calling run holds. */
const LeaseId = z.string().min(1).max(100);

export const NewDiskBody = z
  .object({
    slot: z.string().regex(SLOT, 'a slot is ide0-0..ide1-1 or scsi0-0..scsi3-63'),
    path: z.string().min(1).optional(),
    size: Size.optional(),
    blockSize: z.number().int().positive().optional(),
  })
  .strict()
  .refine((d) => (d.path === undefined) !== (d.size === undefined), 'give exactly one of path and size');

export const CreateVmBody = z
  .object({
    name: z.string().regex(VM_NAME, "a VM name is 1–64 letters, digits, '.', '_' or '-'"),
    generation: z.union([z.literal(1), z.literal(2)]).optional(),
    configVersion: ConfigVersion.optional(),
    checkpointPolicy: CheckpointPolicy.optional(),
    guest: z.string().nullable().optional(),
    disks: z.array(NewDiskBody).max(68).optional(),
    memoryMiB: z
      .number()
      .int()
      .min(16)
      .max(1024 * 1024)
      .optional(),
    cpus: z.number().int().min(1).max(64).optional(),
    scsiControllers: z.number().int().min(0).max(4).optional(),
    boot: BootDefinition.nullable().optional(),
    image: z.string().min(1).optional(),
    workload: z.string().min(1).max(32).optional(),
    accel: z.enum(['auto', 'kvm', 'tcg']).optional(),
  })
  .strict();

export const ModifyVmBody = z
  .object({
    checkpointPolicy: CheckpointPolicy.optional(),
    configVersion: ConfigVersion.optional(),
    guest: z.string().nullable().optional(),
    attach: z.array(NewDiskBody).optional(),
    detach: z.array(z.string().regex(SLOT)).optional(),
    lease: LeaseId.optional(),
  })
  .strict();

export const UpgradeVmBody = z.object({ version: ConfigVersion.optional(), lease: LeaseId.optional() }).strict();

export const AcquireLeaseBody = z
  .object({
    owner: LeaseOwner,
    ttlSeconds: z.number().int().min(1).max(MAX_LEASE_TTL_SECONDS).optional(),
  })
  .strict();

export const ConvertBody = z
  .object({ owner: ReferencePointOwner.nullable().optional(), lease: LeaseId.optional() })
  .strict();

export const CreateRefpointBody = z.object({ owner: ReferencePointOwner.nullable().optional() }).strict();

export const ReserveImportBody = z
  .object({
    name: z.string().regex(VM_NAME, "a VM name is 1–64 letters, digits, '.', '_' or '-'"),
    owner: ImportOwner,
  })
  .strict();

export const CommitImportBody = z
  .object({
    generation: z.union([z.literal(1), z.literal(2)]).optional(),
    configVersion: ConfigVersion.optional(),
    checkpointPolicy: CheckpointPolicy.optional(),
    guest: z.string().nullable().optional(),
    disks: z.array(z.object({ slot: z.string().regex(SLOT), path: z.string().min(1) }).strict()).max(68),
  })
  .strict();

export const CheckpointBody = z
  .object({
    type: CheckpointType.optional(),
    name: z.string().min(1).max(200).optional(),
    consistency: Consistency.optional(),
    requireConsistency: z.boolean().optional(),
    lease: LeaseId.optional(),
  })
  .strict();

export const ChangesBody = z
  .object({
    vm: z.string().optional(),
    slot: z.string().regex(SLOT).optional(),
    path: z.string().optional(),
    limitId: z.string().min(1),
    offset: z.number().int().nonnegative().optional(),
    length: z.number().int().nonnegative().optional(),
    maxRanges: z.number().int().positive().optional(),
  })
  .strict()
  .refine((b) => (b.path !== undefined) !== (b.vm !== undefined && b.slot !== undefined), 'give vm and slot, or path');

export const CreateDiskBody = z
  .object({ path: z.string().min(1), size: Size, blockSize: z.number().int().positive().optional() })
  .strict();

export const MergeDiskBody = z.object({ path: z.string().min(1) }).strict();

export const SnapshotBody = z
  .object({
    vms: z
      .array(z.object({ name: z.string(), checkpoint: z.string().optional(), lease: LeaseId.optional() }).strict())
      .min(1)
      .max(1000),
    provider: z.enum(['cow', 'reflink', 'none']).optional(),
  })
  .strict();

export type CreateVmBody = z.infer<typeof CreateVmBody>;
export type ModifyVmBody = z.infer<typeof ModifyVmBody>;
export type CheckpointBody = z.infer<typeof CheckpointBody>;
export type ChangesBody = z.infer<typeof ChangesBody>;
export type SnapshotBody = z.infer<typeof SnapshotBody>;
export type UpgradeVmBody = z.infer<typeof UpgradeVmBody>;
export type AcquireLeaseBody = z.infer<typeof AcquireLeaseBody>;
export type ConvertBody = z.infer<typeof ConvertBody>;
export type CreateRefpointBody = z.infer<typeof CreateRefpointBody>;
export type ReserveImportBody = z.infer<typeof ReserveImportBody>;
export type CommitImportBody = z.infer<typeof CommitImportBody>;
