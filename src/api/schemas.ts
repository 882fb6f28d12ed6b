/**
 * The management API's request bodies, as zod schemas: the server validates every body with them, the
 * OpenAPI document is generated from them, and the typed client takes their inferred types.
 */
import { z } from 'zod';
import { CheckpointPolicy, CheckpointType, Consistency, SLOT, VM_NAME } from '../host/definition.js';

const Size = z.union([z.number().int().positive(), z.string().regex(/^\d+(\.\d+)?\s*[KMGT]?i?B?$/i)]);

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
    configVersion: z
      .string()
      .regex(/^\d+\.\d+$/)
      .optional(),
    checkpointPolicy: CheckpointPolicy.optional(),
    guest: z.string().nullable().optional(),
    disks: z.array(NewDiskBody).max(68).optional(),
  })
  .strict();

export const ModifyVmBody = z
  .object({
    checkpointPolicy: CheckpointPolicy.optional(),
    configVersion: z
      .string()
      .regex(/^\d+\.\d+$/)
      .optional(),
    guest: z.string().nullable().optional(),
    attach: z.array(NewDiskBody).optional(),
    detach: z.array(z.string().regex(SLOT)).optional(),
  })
  .strict();

export const CheckpointBody = z
  .object({
    type: CheckpointType.optional(),
    name: z.string().min(1).max(200).optional(),
    consistency: Consistency.optional(),
    requireConsistency: z.boolean().optional(),
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
      .array(z.object({ name: z.string(), checkpoint: z.string().optional() }).strict())
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
