/**
 * What a checkpoint will be, decided before anything is done: the type, how its instant is made consistent
 * (a VM that is off, the guest's memory saved, the guest frozen, or nothing), and what is refused. A pure function
 * of the VM's checkpoint policy, the request and the VM's state, so that every case is one row of a table
 * (test/host/checkpoint-plan.test.ts); checkpoints.ts carries it out.
 */
import { TidemarkError } from '../errors.js';
import type { CheckpointPolicy, CheckpointType, Consistency } from './definition.js';

/** What the caller asks for (the fields of a CheckpointRequest the decision reads). */
export interface CheckpointAsk {
  type?: CheckpointType;
  /** For recovery checkpoints (backup): the consistency wanted (default application), and whether less fails. */
  consistency?: Consistency;
  requireConsistency?: boolean;
}

/** The VM as the decision sees it. */
export interface CheckpointState {
  vm: string;
  disks: number;
  /** The journal's unfinished operation, if any (a checkpoint waits for recovery). */
  pending: string | null;
  /** Its disks are open (served over NBD): the checkpoint is cut live. */
  running: boolean;
  /** A QEMU process runs it (it has memory and device state to save). */
  qemuRunning: boolean;
}

/**
 * How the instant is made:
 * - `off`: the VM is off, its disks closed: nothing writes, the point is consistent as it is;
 * - `memory`: a standard checkpoint of a VM QEMU runs: the guest pauses and its memory is saved with the disks;
 * - `crash`: cut without asking the guest (a standard checkpoint without QEMU, or crash consistency requested);
 * - `freeze`: the guest is asked to freeze around the cut; if it cannot, `fallback` says whether the checkpoint is
 *   crash-consistent or fails, and a production checkpoint that fell back is recorded as `typeIfNotFrozen`.
 */
export type CheckpointPlan =
  | { type: CheckpointType; how: 'off'; note: string }
  | { type: 'standard'; how: 'memory' }
  | { type: CheckpointType; how: 'crash'; note: string }
  | { type: CheckpointType; how: 'freeze'; fallback: 'crash' | 'fail'; typeIfNotFrozen: CheckpointType };

/** Decides the checkpoint, or refuses it (BUSY, CONFLICT) before any file is made. */
export function planCheckpoint(policy: CheckpointPolicy, ask: CheckpointAsk, state: CheckpointState): CheckpointPlan {
  const name = state.vm;
  if (state.pending !== null) {
    throw new TidemarkError('BUSY', `${name} has an unfinished ${state.pending}; restart the host to recover it`);
  }
  if (policy === 'disabled') {
    throw new TidemarkError('CONFLICT', `checkpoints are disabled for ${name} (checkpoint policy "disabled")`);
  }
  if (state.disks === 0) throw new TidemarkError('CONFLICT', `${name} has no disks to checkpoint`);
  const type: CheckpointType = ask.type ?? (policy === 'standard-only' ? 'standard' : 'production');
  if (type === 'production' && policy === 'standard-only') {
    throw new TidemarkError('CONFLICT', `${name} allows standard checkpoints only (policy "standard-only")`);
  }

  if (!state.running) return { type, how: 'off', note: 'the VM is off' };
  if (type === 'standard') {
    // A standard checkpoint of a VM QEMU runs holds its memory too, as Hyper-V's do; it never freezes the guest.
    return state.qemuRunning
      ? { type, how: 'memory' }
      : { type, how: 'crash', note: 'standard checkpoint of a running VM (no guest freeze)' };
  }
  // Production always wants the guest frozen; a recovery checkpoint wants what the backup asks (default: frozen).
  if (type === 'recovery' && (ask.consistency ?? 'application') !== 'application') {
    return { type, how: 'crash', note: 'crash consistency requested' };
  }
  if (type === 'production') {
    // ProductionNoFallback fails when the guest cannot freeze; ProductionFallbackToStandard takes a standard one.
    return {
      type,
      how: 'freeze',
      fallback: policy === 'production-only' ? 'fail' : 'crash',
      typeIfNotFrozen: 'standard',
    };
  }
  return { type, how: 'freeze', fallback: ask.requireConsistency ? 'fail' : 'crash', typeIfNotFrozen: type };
}
