/**
 * The management API's wire shapes, as zod schemas: what requests carry and what the host answers. The route
 * table (routes.ts) names them per operation; the server validates requests and serializes answers with them,
 * the typed client validates answers with them, the OpenAPI document is generated from them.
 *
 * They are the API's own: nothing here imports from `host/`. The host keeps its own types (its definitions on
 * disk); the handlers (handlers.ts) pass the host's data through these shapes, so the compiler checks that
 * what the host returns satisfies the wire and that what the wire carries satisfies the host's requests.
 * The few constants both sides need (name and slot patterns, configuration versions, limits) are repeated
 * here on purpose, and test/api/wire.test.ts checks they equal the host's.
 */
import { z } from 'zod';
import type { ErrorCode } from '../errors.js';
import { HTTP_STATUS } from './status.js';

// ------------------------------------------------------------------ shared pieces

/** A VM name: 1–64 letters, digits, '.', '_' or '-', starting with a letter or digit. */
export const VM_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
/** `ide0-1`, `scsi2-13`: controller kind, controller number, location. */
export const SLOT = /^(ide[01]-[01]|scsi[0-3]-([0-9]|[1-5][0-9]|6[0-3]))$/;
/** A reference-point owner name a person gives: 1–100 printable characters. */
export const OWNER_NAME = /^[\p{L}\p{M}\p{N}\p{P}\p{S} ]{1,100}$/u;
/** Hyper-V's configuration versions, oldest first. */
export const CONFIG_VERSIONS = [
  '5.0',
  '6.2',
  '7.0',
  '7.1',
  '8.0',
  '8.1',
  '8.2',
  '8.3',
  '9.0',
  '9.1',
  '9.2',
  '9.3',
  '10.0',
  '11.0',
  '12.0',
] as const;
export const MAX_LEASE_TTL_SECONDS = 24 * 3600;
/** The VM definition's schema version the host writes (docs/host.md). */
export const DEFINITION_VERSION = 2;
export const MAX_MEMORY_MIB = 1024 * 1024;
export const VM_STATES = ['Off', 'Starting', 'Running', 'Paused', 'Saved', 'Stopping'] as const;
export const ACCEL_REQUESTS = ['auto', 'kvm', 'tcg'] as const;

const VmName = z.string().regex(VM_NAME, "a VM name is 1–64 letters, digits, '.', '_' or '-'");
const Slot = z.string().regex(SLOT, 'a slot is ide0-0..ide1-1 or scsi0-0..scsi3-63');
/** A configuration version this host knows (the host checks it too, with the list in its message). */
const ConfigVersion = z.string().refine((v) => (CONFIG_VERSIONS as readonly string[]).includes(v), {
  message: `a configuration version is one of ${CONFIG_VERSIONS.join(', ')}`,
});
/** Sizes as a number of bytes or as text (`8G`, `512 MiB`). */
const Size = z.union([z.number().int().positive(), z.string().regex(/^\d+(\.\d+)?\s*[KMGT]?i?B?$/i)]);
/** The id of the VM's lease the calling run holds. */
const LeaseId = z.string().min(1).max(100);
/** The most VMs (or leases) one batch request names. */
export const MAX_BATCH = 10_000;

export const CheckpointPolicy = z.enum(['production-fallback', 'production-only', 'standard-only', 'disabled']);
export const CheckpointType = z.enum(['standard', 'production', 'recovery']);
export const Consistency = z.enum(['application', 'crash']);

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
const MemoryMiB = z.number().int().min(16).max(MAX_MEMORY_MIB);
const Cpus = z.number().int().min(1).max(64);
const ScsiControllers = z.number().int().min(0).max(4);
const Accel = z.enum(ACCEL_REQUESTS);

export const ReferencePointOwner = z.discriminatedUnion('kind', [
  z.object({ kind: z.literal('repository'), id: z.string().min(1).max(100) }).strict(),
  z.object({ kind: z.literal('user'), name: z.string().regex(OWNER_NAME) }).strict(),
]);
export type ReferencePointOwner = z.infer<typeof ReferencePointOwner>;

export const LeaseOwner = z
  .object({
    runId: z.string().min(1).max(100),
    pid: z.number().int().positive(),
    hostname: z.string().min(1).max(255),
    command: z.string().max(500),
  })
  .strict();

export const ImportOwner = z
  .object({ pid: z.number().int().positive(), hostname: z.string().min(1).max(255), command: z.string().max(500) })
  .strict();

/** Every error code, in the order of the status map. */
export const ErrorCodeSchema = z.enum(Object.keys(HTTP_STATUS) as [ErrorCode, ...ErrorCode[]]);

/** Every error answer: `{ error: { code, message, details } }`. */
export const ErrorBody = z.object({
  error: z.object({
    code: ErrorCodeSchema,
    message: z.string(),
    details: z.record(z.string(), z.unknown()).optional(),
  }),
});
export type ErrorBody = z.infer<typeof ErrorBody>;

// ------------------------------------------------------------------ request bodies

export const NewDiskBody = z
  .object({
    slot: Slot,
    path: z.string().min(1).max(4096).optional(),
    size: Size.optional(),
    blockSize: z.number().int().positive().optional(),
  })
  .strict()
  .refine((d) => (d.path === undefined) !== (d.size === undefined), 'give exactly one of path and size');

export const CreateVmBody = z
  .object({
    name: VmName,
    generation: z.union([z.literal(1), z.literal(2)]).optional(),
    configVersion: ConfigVersion.optional(),
    checkpointPolicy: CheckpointPolicy.optional(),
    guest: z.string().max(4096).nullable().optional(),
    disks: z.array(NewDiskBody).max(68).optional(),
    // What QEMU runs (docs/vm.md).
    memoryMiB: MemoryMiB.optional(),
    cpus: Cpus.optional(),
    scsiControllers: ScsiControllers.optional(),
    boot: BootDefinition.nullable().optional(),
    /** A guest image folder (`tidemark guest-image build`): its kernel, initrd and command line. */
    image: z.string().min(1).max(4096).optional(),
    /** With `image`: the workload on the kernel command line (sqlite, shell, none). */
    workload: z.string().min(1).max(32).optional(),
    accel: Accel.optional(),
  })
  .strict();

export const ModifyVmBody = z
  .object({
    checkpointPolicy: CheckpointPolicy.optional(),
    configVersion: ConfigVersion.optional(),
    guest: z.string().max(4096).nullable().optional(),
    attach: z.array(NewDiskBody).max(68).optional(),
    detach: z.array(Slot).max(68).optional(),
    /** Add-VMScsiController / Remove-VMScsiController (the VM off). */
    scsiControllers: ScsiControllers.optional(),
    lease: LeaseId.optional(),
  })
  .strict();

export const UpgradeVmBody = z.object({ version: ConfigVersion.optional(), lease: LeaseId.optional() }).strict();

/** The formats `POST /v1/vms/:vm/convert-disks` converts to: VHDX only (a VM leaves VHD, never goes back to it). */
export const CONVERT_DISK_TARGETS = ['vhdx'] as const;
export const ConvertDisksBody = z
  .object({
    to: z.enum(CONVERT_DISK_TARGETS, {
      error: (issue) =>
        `disks convert to ${CONVERT_DISK_TARGETS.join(', ')} only, not ${JSON.stringify(issue.input)} (a VM moves off legacy VHD, never back)`,
    }),
    lease: LeaseId.optional(),
  })
  .strict();

export const AcquireLeaseBody = z
  .object({ owner: LeaseOwner, ttlSeconds: z.number().int().min(1).max(MAX_LEASE_TTL_SECONDS).optional() })
  .strict();

/** The leases of many VMs for one run (one write of the host's leases file). */
export const AcquireLeasesBody = z
  .object({
    vms: z.array(z.string().min(1).max(255)).min(1).max(MAX_BATCH),
    owner: LeaseOwner,
    ttlSeconds: z.number().int().min(1).max(MAX_LEASE_TTL_SECONDS).optional(),
    /** A run that will wait for a busy VM: nothing after the first busy VM (in name order) is tried. */
    stopAtBusy: z.boolean().optional(),
  })
  .strict();
export const LeaseIdsBody = z.object({ ids: z.array(LeaseId).min(1).max(MAX_BATCH) }).strict();

export const ConvertBody = z
  .object({ owner: ReferencePointOwner.nullable().optional(), lease: LeaseId.optional() })
  .strict();

export const CreateRefpointBody = z.object({ owner: ReferencePointOwner.nullable().optional() }).strict();

export const ReserveImportBody = z.object({ name: VmName, owner: ImportOwner }).strict();

export const CommitImportBody = z
  .object({
    generation: z.union([z.literal(1), z.literal(2)]).optional(),
    configVersion: ConfigVersion.optional(),
    checkpointPolicy: CheckpointPolicy.optional(),
    guest: z.string().max(4096).nullable().optional(),
    disks: z.array(z.object({ slot: Slot, path: z.string().min(1).max(4096) }).strict()).max(68),
    // What QEMU runs, kept from the backed-up definition (so a restored guest boots as it did).
    memoryMiB: MemoryMiB.optional(),
    cpus: Cpus.optional(),
    scsiControllers: ScsiControllers.optional(),
    boot: BootDefinition.nullable().optional(),
    image: z.string().min(1).max(4096).optional(),
    accel: Accel.optional(),
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
    slot: Slot.optional(),
    path: z.string().max(4096).optional(),
    limitId: z.string().min(1).max(200),
    offset: z.number().int().nonnegative().optional(),
    length: z.number().int().nonnegative().optional(),
    maxRanges: z.number().int().positive().optional(),
  })
  .strict()
  .refine((b) => (b.path !== undefined) !== (b.vm !== undefined && b.slot !== undefined), 'give vm and slot, or path');

export const CreateDiskBody = z
  .object({ path: z.string().min(1).max(4096), size: Size, blockSize: z.number().int().positive().optional() })
  .strict();

export const MergeDiskBody = z.object({ path: z.string().min(1).max(4096) }).strict();

export const SnapshotBody = z
  .object({
    vms: z
      .array(z.object({ name: z.string(), checkpoint: z.string().optional(), lease: LeaseId.optional() }).strict())
      .min(1)
      .max(1000),
    provider: z.enum(['cow', 'reflink', 'none']).optional(),
  })
  .strict();

// ------------------------------------------------------------------ path parameters and queries

export const VmParams = z.object({ vm: z.string().min(1) });
export const VmHotPlugParams = z.object({ vm: z.string().min(1), id: z.string().min(1) });
export const VmCheckpointParams = z.object({ vm: z.string().min(1), cp: z.string().min(1) });
export const VmRefpointParams = z.object({ vm: z.string().min(1), id: z.string().min(1) });
export const IdParams = z.object({ id: z.string().min(1) });
export const NameParams = z.object({ name: z.string().min(1) });

const Flag = z.enum(['true', 'false']);
export const DeleteVmQuery = z.object({ removeFiles: Flag.optional() }).strict();
export const StopVmQuery = z.object({ turnOff: Flag.optional(), force: Flag.optional() }).strict();
const Count = z.string().regex(/^\d{1,15}$/, 'a number of bytes');
export const ConsoleQuery = z.object({ offset: Count.optional(), max: Count.optional() }).strict();
export const LeaseQuery = z.object({ lease: LeaseId.optional() }).strict();
export const HotPlugQuery = z.object({ lease: LeaseId.optional() }).strict();
export const ReleaseSnapshotQuery = z.object({ succeeded: Flag.optional(), lease: LeaseId.optional() }).strict();
export const DiskInfoQuery = z.object({ path: z.string().min(1).max(4096) }).strict();
export const WaitQuery = z
  .object({
    timeoutMs: z
      .string()
      .regex(/^\d{1,9}$/, 'milliseconds')
      .optional(),
  })
  .strict();

// ------------------------------------------------------------------ answers

export const NbdAddress = z.discriminatedUnion('type', [
  z.object({ type: z.literal('unix'), path: z.string() }),
  z.object({ type: z.literal('tcp'), host: z.string(), port: z.number().int() }),
]);

export const HostInfo = z.object({
  store: z.string(),
  nbd: NbdAddress.optional(),
  /** The NBD server requires TLS with a client certificate (NBD_OPT_STARTTLS). */
  nbdTls: z.boolean().optional(),
  version: z.literal('1'),
  snapshotsTaken: z.number().int(),
  allowedDiskDirs: z.array(z.string()),
  configVersions: z.object({ supported: z.array(z.string()), default: z.string() }),
});

export const LeaseInfo = z.object({
  id: z.string(),
  vm: z.string(),
  owner: LeaseOwner,
  acquiredAt: z.string(),
  renewedAt: z.string(),
  /** When it expires unless renewed (null while a host operation holds it). */
  expiresAt: z.string().nullable(),
  ttlSeconds: z.number(),
  /** Held by one operation of the host itself, for as long as it runs. */
  operation: z.boolean(),
});
export type LeaseInfo = z.infer<typeof LeaseInfo>;
export const Refusal = z.object({ vm: z.string(), code: z.string(), message: z.string() });
export const LeasesAcquired = z.object({
  leases: LeaseInfo.array(),
  /** VMs not leased, each with why (BUSY naming the holder, NOT_FOUND). */
  refused: Refusal.array(),
  /** With stopAtBusy: the VMs after the first busy one, not tried. */
  untried: z.array(z.string()),
});
export const LeasesRenewed = z.object({ renewed: LeaseInfo.array(), gone: z.array(z.string()) });
export const LeasesReleased = z.object({ released: z.array(z.string()) });

export const ExitInfo = z.object({
  at: z.string(),
  /** poweroff (the guest), quit (the host), saved, crash (QEMU ended without a shutdown), panic (the guest kernel) */
  reason: z.enum(['poweroff', 'quit', 'saved', 'crash', 'panic']),
  detail: z.string(),
});

export const VmSummary = z.object({
  name: z.string(),
  id: z.string(),
  state: z.enum(VM_STATES),
  generation: z.union([z.literal(1), z.literal(2)]),
  configVersion: z.string(),
  checkpointPolicy: CheckpointPolicy,
  guest: z.string().nullable(),
  disks: z.array(
    z.object({
      slot: z.string(),
      virtualDiskId: z.string(),
      virtualSize: z.number(),
      /** The disk's format, told by its magic: VHDX, or legacy VHD (checkpoint children `.avhd`, no tracking). */
      format: z.enum(['vhdx', 'vhd']),
      base: z.string(),
      head: z.string(),
      /** The NBD export serving the disk while the VM runs, and its URI. */
      export: z.string().nullable(),
      nbdUri: z.string().nullable(),
      tracking: z.enum(['enabled', 'none', 'missing']),
      /** Why the disk can have no change tracking (e.g. a legacy VHD), or null. */
      trackingReason: z.string().nullable(),
    }),
  ),
  memoryMiB: z.number().int(),
  cpus: z.number().int(),
  scsiControllers: z.number().int(),
  boot: BootDefinition.nullable(),
  image: z.string().nullable(),
  /** The QEMU process, while one runs. */
  qemu: z
    .object({
      pid: z.number().int().nullable(),
      qmp: z.string(),
      console: z.string(),
      accel: z.string().nullable(),
      accelReason: z.string().nullable(),
    })
    .nullable(),
  lastExit: ExitInfo.nullable(),
  checkpoints: z.number().int(),
  currentCheckpointId: z.string().nullable(),
  referencePoints: z.number().int(),
  lease: LeaseInfo.nullable(),
});
export type VmSummary = z.infer<typeof VmSummary>;

export const CheckpointRun = z.object({ lease: z.string(), runId: z.string(), command: z.string() });

/** A disk to hot-add to a running VM's SCSI controller (the 2012 R2 flow's auto-recovery inside the VM). */
export const HotPlugBody = z
  .object({
    /** An NBD export on a unix socket of the host's machine (the backup application's overlay over a snapshot). */
    source: z.object({ socket: z.string().min(1).max(4096), export: z.string().min(1).max(4096) }).strict(),
    /** Run the guest's recovery of the disk's file systems (e2fsck -p through the guest agent) once attached. */
    recover: z.boolean().optional(),
    lease: LeaseId.optional(),
  })
  .strict();

export const HotPlugInfo = z.object({
  id: z.string(),
  vm: z.string(),
  /** false: the VM has no guest (no QEMU process), the hot-add was modelled and nothing attached */
  attached: z.boolean(),
  slot: z.string().nullable(),
  serial: z.string(),
  guestDevice: z.string().nullable(),
  recovery: z.string().nullable(),
  note: z.string(),
});
export type HotPlugInfo = z.infer<typeof HotPlugInfo>;

export const Checkpoint = z.object({
  id: z.string(),
  name: z.string(),
  type: CheckpointType,
  parentId: z.string().nullable(),
  createdAt: z.string(),
  consistency: Consistency,
  consistencyNote: z.string().nullable(),
  freezeWindowMs: z.number().nullable(),
  ioPauseMs: z.number().nullable(),
  disks: z.array(
    z.object({ slot: z.string(), virtualDiskId: z.string(), file: z.string(), rctId: z.string().nullable() }),
  ),
  run: CheckpointRun.nullable(),
  /** A standard checkpoint's memory and device state (applying it leaves the VM Saved with it), or null. */
  memoryState: z.string().nullable(),
});
export type Checkpoint = z.infer<typeof Checkpoint>;

export const CheckpointEntry = Checkpoint.extend({ current: z.boolean() });

export const ReferencePoint = z.object({
  id: z.string(),
  createdAt: z.string(),
  fromCheckpoint: z.string().nullable(),
  consistency: Consistency.nullable(),
  /** Parallel arrays, as in Hyper-V: match disks by identifier, never by position. */
  virtualDiskIdentifiers: z.array(z.string()),
  resilientChangeTrackingIdentifiers: z.array(z.string().nullable()),
  owner: ReferencePointOwner.nullable(),
});
export type ReferencePoint = z.infer<typeof ReferencePoint>;

/** The operation in progress a definition journals (the host finishes or rolls it back after a crash). */
const PendingOperation = z.discriminatedUnion('op', [
  z.object({ op: z.literal('checkpoint'), checkpointId: z.string(), created: z.array(z.string()) }),
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
    disks: z.array(z.object({ slot: z.string(), from: z.string(), to: z.string(), temp: z.string() })),
  }),
]);

/** A VM's definition as the host stores it (docs/host.md): what a backup keeps with a restore point. */
export const VmDefinition = z.object({
  schemaVersion: z.literal(DEFINITION_VERSION),
  id: z.string(),
  name: z.string(),
  generation: z.union([z.literal(1), z.literal(2)]),
  configVersion: z.string(),
  checkpointPolicy: CheckpointPolicy,
  guest: z.string().nullable(),
  /** The state the host restores after a restart. */
  state: z.enum(['Off', 'Running', 'Saved']),
  memoryMiB: MemoryMiB,
  cpus: Cpus,
  scsiControllers: ScsiControllers,
  boot: BootDefinition.nullable(),
  image: z.string().nullable(),
  accel: Accel,
  createdAt: z.string(),
  disks: z.array(
    z.object({
      slot: z.string(),
      base: z.string(),
      head: z.string(),
      virtualDiskId: z.string(),
      virtualSize: z.number(),
    }),
  ),
  checkpoints: z.array(Checkpoint),
  currentCheckpointId: z.string().nullable(),
  referencePoints: z.array(ReferencePoint),
  pending: PendingOperation.nullable(),
});
export type VmDefinition = z.infer<typeof VmDefinition>;

export const VmDetail = VmSummary.extend({ definition: VmDefinition });

/** What `convert-disks` did: per disk converted (old file → new file), per disk skipped (already VHDX). */
export const ConvertDisksResult = z.object({
  converted: z.array(
    z.object({
      slot: z.string(),
      from: z.string(),
      to: z.string(),
      virtualSize: z.number(),
      bytesWritten: z.number(),
    }),
  ),
  skipped: z.array(z.object({ slot: z.string(), file: z.string(), reason: z.string() })),
  /** The new disks have change tracking (the configuration version has RCT). */
  tracking: z.boolean(),
  vm: VmSummary,
});

export const ImportInfo = z.object({
  name: z.string(),
  dir: z.string(),
  disksDir: z.string(),
  owner: ImportOwner,
  createdAt: z.string(),
});
export type ImportInfo = z.infer<typeof ImportInfo>;

export const ChangesResult = z.object({
  ranges: z.array(z.object({ offset: z.number(), length: z.number() })),
  /** How much of the requested window this answer covers; page on from offset + processedLength. */
  processedLength: z.number(),
  totalBytes: z.number(),
  virtualDiskId: z.string(),
});

/** `vhdx info` of a disk in the store (docs/cli.md, `vhdx info --json`): the main fields, the rest as is. */
const VhdxDiskInfo = z.looseObject({
  path: z.string(),
  format: z.literal('vhdx'),
  type: z.string(),
  fileSize: z.number(),
  virtualSize: z.number(),
  blockSize: z.number(),
  logicalSectorSize: z.number(),
  physicalSectorSize: z.number(),
  virtualDiskId: z.string(),
  hasParent: z.boolean(),
  chain: z.array(
    z.object({
      path: z.string(),
      type: z.string().optional(),
      virtualSize: z.number().optional(),
      dataWriteGuid: z.string().optional(),
      parentLinkage: z.string().optional(),
      parentLinkage2: z.string().optional(),
      foundBy: z.string().optional(),
      error: z.object({ code: z.string(), message: z.string() }).optional(),
    }),
  ),
  warnings: z.array(z.unknown()),
});

/** `vhd info --json` of a legacy VHD disk in the store: the main fields, the rest as is. */
const VhdDiskInfo = z.looseObject({
  path: z.string(),
  format: z.literal('vhd'),
  type: z.string(),
  fileSize: z.number(),
  virtualSize: z.number(),
  blockSize: z.number().nullable(),
  uniqueId: z.string(),
  chain: z.array(
    z.object({
      path: z.string(),
      type: z.string().optional(),
      virtualSize: z.number().optional(),
      uniqueId: z.string().optional(),
      timeStamp: z.string().optional(),
      foundBy: z.string().optional(),
      error: z.object({ code: z.string(), message: z.string() }).optional(),
    }),
  ),
  warnings: z.array(z.unknown()),
});

/** The information of a disk in the store, by its format (VHDX or VHD). */
export const DiskInfo = z.discriminatedUnion('format', [VhdxDiskInfo, VhdDiskInfo]);

export const SnapshotExport = z.object({
  vm: z.string(),
  slot: z.string(),
  virtualDiskId: z.string(),
  virtualSize: z.number(),
  /** The NBD export serving the disk as it was at the snapshot (read-only). */
  export: z.string(),
  file: z.string(),
});

export const SnapshotSetInfo = z.object({
  id: z.string(),
  provider: z.string(),
  createdAt: z.string(),
  /** Storage snapshots this set took (1 for the whole set, whatever the number of VMs). */
  storageSnapshots: z.number().int(),
  runId: z.string().nullable(),
  vms: z.array(
    z.object({
      name: z.string(),
      checkpoint: z.string().nullable(),
      lease: z.string().nullable(),
      consistency: Consistency,
      note: z.string(),
      freezeWindowMs: z.number().nullable(),
    }),
  ),
  exports: z.array(SnapshotExport),
  timings: z.object({ holdMs: z.number().nullable(), commitMs: z.number().nullable(), totalMs: z.number() }),
  warnings: z.array(z.string()),
});
export type SnapshotSetInfo = z.infer<typeof SnapshotSetInfo>;

export const JobInfo = z.object({
  id: z.string(),
  type: z.string(),
  target: z.string(),
  state: z.enum(['New', 'Running', 'Completed', 'Failed']),
  createdAt: z.string(),
  startedAt: z.string().nullable(),
  endedAt: z.string().nullable(),
  progress: z.number().nullable(),
  /** The operation's answer once Completed: the route's job result schema says its shape. */
  result: z.unknown().optional(),
  error: z.object({ code: ErrorCodeSchema, message: z.string() }).nullable(),
});
export type JobInfo = z.infer<typeof JobInfo>;

export const ConsoleChunk = z.object({
  /** The console's bytes from `offset` (UTF-8, as the guest wrote them). */
  data: z.string(),
  offset: z.number(),
  /** The console log's size now: read on from offset + bytes of data. */
  size: z.number(),
});

export const MergeResult = z.object({ parentPath: z.string(), bytesCopied: z.number() });
export const DiskPath = z.object({ path: z.string() });
export const Deleted = z.object({ deleted: z.string() });
export const Released = z.object({ released: z.string() });
export const Cancelled = z.object({ cancelled: z.string() });
export const Destroyed = z.object({ destroyed: z.string() });
/** A job's result when the operation answers nothing. */
export const Nothing = z.void();

/** The OpenAPI document (validated in full by the tests; here, what a client relies on). */
export const OpenApiDocument = z.looseObject({
  openapi: z.string(),
  info: z.looseObject({ title: z.string(), version: z.string() }),
  paths: z.record(z.string(), z.record(z.string(), z.unknown())),
});

export type CreateVmBody = z.input<typeof CreateVmBody>;
export type ModifyVmBody = z.input<typeof ModifyVmBody>;
export type CheckpointBody = z.input<typeof CheckpointBody>;
export type ChangesBody = z.input<typeof ChangesBody>;
export type SnapshotBody = z.input<typeof SnapshotBody>;
export type HotPlugBody = z.input<typeof HotPlugBody>;
export type UpgradeVmBody = z.input<typeof UpgradeVmBody>;
export type ConvertDisksBody = z.input<typeof ConvertDisksBody>;
export type AcquireLeaseBody = z.input<typeof AcquireLeaseBody>;
export type AcquireLeasesBody = z.input<typeof AcquireLeasesBody>;
export type ConvertBody = z.input<typeof ConvertBody>;
export type CreateRefpointBody = z.input<typeof CreateRefpointBody>;
export type ReserveImportBody = z.input<typeof ReserveImportBody>;
export type CommitImportBody = z.input<typeof CommitImportBody>;
