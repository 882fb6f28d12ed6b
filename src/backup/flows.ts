/**
 * The backup flows as compositions of the named phases (phases.ts), as HYPERV-BACKUP-MODEL.md §1 draws them:
 * what differs from one Hyper-V generation to the next is how many storage snapshots a set takes (one for the
 * set, or one per VM or batch of `--batch N`) and where the auto-recovery happens.
 */
import {
  checkpoints,
  commit,
  data,
  hostAutoRecovery,
  inBatches,
  noSnapshot,
  oneSnapshot,
  preflight,
  preflightWith,
  referencePoints,
  release,
  type BatchStep,
  type RunStep,
} from './phases.js';
import { guestAutoRecovery, lineUpFiles, requireScsi, writerMetadata } from './phases-2012r2.js';
import type { BackupSetSummary, Flow, RunState } from './run-types.js';

/** Every VM of the set in one batch: one storage snapshot for the whole set. */
const together = (...steps: BatchStep[]) => inBatches(() => null, ...steps);
/** One batch per VM, or per `--batch N` VMs: a storage snapshot each. */
const perBatch = (...steps: BatchStep[]) => inBatches((run) => Math.max(1, run.opts.batch ?? 1), ...steps);

/** 2016 and later: every VM checkpointed, then ONE storage snapshot, whatever the number of VMs. */
export const flow2016 = [preflight, together(checkpoints, oneSnapshot, referencePoints, data), commit, release];

/** 2012 R2's coupling: each VM (or batch) triggers its own storage snapshot. */
export const flowPerVm = [preflight, perBatch(checkpoints, oneSnapshot, referencePoints, data), commit, release];

/**
 * 2012 R2: per VM or batch, the writer's metadata names the `.avhdx` files before they exist, the guest freezes
 * and the checkpoint makes them, then a storage snapshot, and the auto-recovery inside the VM: each disk of the
 * snapshot hot-added to the guest over SCSI (a VM without a SCSI controller is refused at preflight).
 */
export const flow2012r2 = [
  preflightWith(requireScsi),
  perBatch(writerMetadata, checkpoints, lineUpFiles, oneSnapshot, referencePoints, guestAutoRecovery, data),
  commit,
  release,
];

/** 2008 R2 / 2012: per VM or batch, the snapshot's disks mounted and rolled back on the host before they are read. */
export const flow2008r2 = [
  preflight,
  perBatch(checkpoints, oneSnapshot, referencePoints, hostAutoRecovery, data),
  commit,
  release,
];

/** No storage snapshot: the frozen parents read while the checkpoints exist, converted after the data phase. */
export const flowNoSnapshot = [preflight, together(checkpoints, noSnapshot, data, referencePoints), commit, release];

export const FLOWS: Record<Flow, RunStep[]> = {
  '2016': flow2016,
  'per-vm': flowPerVm,
  '2012r2': flow2012r2,
  '2008r2': flow2008r2,
  'no-snapshot': flowNoSnapshot,
};

/** Runs a flow's steps in order; the run's summary. A step that throws aborts the repository's session. */
export async function runFlow(steps: RunStep[], run: RunState): Promise<BackupSetSummary> {
  try {
    for (const step of steps) await step(run);
  } catch (err) {
    await run.session?.abort().catch(() => undefined);
    throw err;
  }
  return {
    ok: run.errors.length === 0 && run.pointId !== null,
    pointId: run.pointId,
    flow: run.flow,
    snapshots: run.snapshots,
    durationMs: performance.now() - run.started,
    phases: run.phases,
    auditSeed: run.data.audit.kind === 'off' ? null : run.data.auditSeed,
    vms: run.states.map((s) => s.summary),
    errors: run.errors,
    warnings: run.warnings,
  };
}
