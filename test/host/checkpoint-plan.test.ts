/**
 * planCheckpoint, one row per case: the VM's checkpoint policy, the request and the VM's state give the checkpoint's
 * type, how its instant is made consistent (off, memory, crash, freeze with its fallback), or the error refused
 * before anything is done.
 */
import { describe, expect, it } from 'vitest';
import {
  planCheckpoint,
  type CheckpointAsk,
  type CheckpointPlan,
  type CheckpointState,
} from '../../src/host/checkpoint-plan.js';
import type { CheckpointPolicy } from '../../src/host/definition.js';
import { TidemarkError } from '../../src/errors.js';

type VmState = 'off' | 'running' | 'qemu';
const states: Record<VmState, Omit<CheckpointState, 'vm' | 'disks' | 'pending'>> = {
  off: { running: false, qemuRunning: false },
  // disks exported, no QEMU (an NBD client is the guest)
  running: { running: true, qemuRunning: false },
  qemu: { running: true, qemuRunning: true },
};

interface Row {
  case: string;
  policy: CheckpointPolicy;
  ask: CheckpointAsk;
  vm: VmState;
  disks?: number;
  pending?: string;
  plan?: CheckpointPlan;
  refused?: { code: string; message: RegExp };
}

const freezeOrStandard = { how: 'freeze', fallback: 'crash', typeIfNotFrozen: 'standard' } as const;
const freezeOrFail = { how: 'freeze', fallback: 'fail', typeIfNotFrozen: 'standard' } as const;

const rows: Row[] = [
  // refused before anything is done
  {
    case: 'an unfinished journal entry',
    policy: 'production-fallback',
    ask: {},
    vm: 'qemu',
    pending: 'merge',
    refused: { code: 'BUSY', message: /unfinished merge; restart the host/ },
  },
  {
    case: 'the journal is checked before the policy',
    policy: 'disabled',
    ask: {},
    vm: 'off',
    pending: 'apply',
    refused: { code: 'BUSY', message: /unfinished apply/ },
  },
  {
    case: 'policy disabled',
    policy: 'disabled',
    ask: {},
    vm: 'running',
    refused: { code: 'CONFLICT', message: /checkpoints are disabled for v \(checkpoint policy "disabled"\)/ },
  },
  {
    case: 'policy disabled refuses recovery checkpoints too',
    policy: 'disabled',
    ask: { type: 'recovery' },
    vm: 'qemu',
    refused: { code: 'CONFLICT', message: /disabled/ },
  },
  {
    case: 'no disks',
    policy: 'production-fallback',
    ask: {},
    vm: 'off',
    disks: 0,
    refused: { code: 'CONFLICT', message: /v has no disks to checkpoint/ },
  },
  {
    case: 'production asked of standard-only',
    policy: 'standard-only',
    ask: { type: 'production' },
    vm: 'qemu',
    refused: { code: 'CONFLICT', message: /allows standard checkpoints only/ },
  },
  {
    case: 'production asked of standard-only, VM off',
    policy: 'standard-only',
    ask: { type: 'production' },
    vm: 'off',
    refused: { code: 'CONFLICT', message: /standard-only/ },
  },

  // the VM is off: nothing writes, whatever the type
  {
    case: 'default type, off',
    policy: 'production-fallback',
    ask: {},
    vm: 'off',
    plan: { type: 'production', how: 'off', note: 'the VM is off' },
  },
  {
    case: 'standard-only default, off',
    policy: 'standard-only',
    ask: {},
    vm: 'off',
    plan: { type: 'standard', how: 'off', note: 'the VM is off' },
  },
  {
    case: 'recovery, off',
    policy: 'production-only',
    ask: { type: 'recovery', requireConsistency: true },
    vm: 'off',
    plan: { type: 'recovery', how: 'off', note: 'the VM is off' },
  },

  // standard: never frozen; with QEMU, the memory is saved
  {
    case: 'standard, QEMU runs',
    policy: 'production-fallback',
    ask: { type: 'standard' },
    vm: 'qemu',
    plan: { type: 'standard', how: 'memory' },
  },
  {
    case: 'standard-only default, QEMU runs',
    policy: 'standard-only',
    ask: {},
    vm: 'qemu',
    plan: { type: 'standard', how: 'memory' },
  },
  {
    case: 'standard, disks exported without QEMU',
    policy: 'production-only',
    ask: { type: 'standard' },
    vm: 'running',
    plan: { type: 'standard', how: 'crash', note: 'standard checkpoint of a running VM (no guest freeze)' },
  },

  // production: frozen; the policy decides the fallback
  {
    case: 'production, fallback to standard',
    policy: 'production-fallback',
    ask: {},
    vm: 'qemu',
    plan: { type: 'production', ...freezeOrStandard },
  },
  {
    case: 'production, no fallback',
    policy: 'production-only',
    ask: { type: 'production' },
    vm: 'qemu',
    plan: { type: 'production', ...freezeOrFail },
  },
  {
    case: 'production without QEMU is frozen too',
    policy: 'production-fallback',
    ask: { type: 'production' },
    vm: 'running',
    plan: { type: 'production', ...freezeOrStandard },
  },
  {
    case: 'production ignores a consistency asked',
    policy: 'production-fallback',
    ask: { type: 'production', consistency: 'crash', requireConsistency: true },
    vm: 'qemu',
    plan: { type: 'production', ...freezeOrStandard },
  },

  // recovery (backup): the request decides
  {
    case: 'recovery, application by default, crash when the guest cannot',
    policy: 'production-fallback',
    ask: { type: 'recovery' },
    vm: 'qemu',
    plan: { type: 'recovery', how: 'freeze', fallback: 'crash', typeIfNotFrozen: 'recovery' },
  },
  {
    case: 'recovery, application required',
    policy: 'production-fallback',
    ask: { type: 'recovery', consistency: 'application', requireConsistency: true },
    vm: 'running',
    plan: { type: 'recovery', how: 'freeze', fallback: 'fail', typeIfNotFrozen: 'recovery' },
  },
  {
    case: 'recovery of production-only VM follows the request, not the policy',
    policy: 'production-only',
    ask: { type: 'recovery' },
    vm: 'qemu',
    plan: { type: 'recovery', how: 'freeze', fallback: 'crash', typeIfNotFrozen: 'recovery' },
  },
  {
    case: 'recovery under standard-only is allowed',
    policy: 'standard-only',
    ask: { type: 'recovery' },
    vm: 'qemu',
    plan: { type: 'recovery', how: 'freeze', fallback: 'crash', typeIfNotFrozen: 'recovery' },
  },
  {
    case: 'recovery, crash requested',
    policy: 'production-only',
    ask: { type: 'recovery', consistency: 'crash' },
    vm: 'qemu',
    plan: { type: 'recovery', how: 'crash', note: 'crash consistency requested' },
  },
  {
    case: 'recovery, crash requested and required',
    policy: 'production-fallback',
    ask: { type: 'recovery', consistency: 'crash', requireConsistency: true },
    vm: 'running',
    plan: { type: 'recovery', how: 'crash', note: 'crash consistency requested' },
  },
];

describe('planCheckpoint', () => {
  it.each(rows)('$case', (row) => {
    const state: CheckpointState = { vm: 'v', disks: row.disks ?? 2, pending: row.pending ?? null, ...states[row.vm] };
    if (row.refused) {
      let thrown: unknown;
      try {
        planCheckpoint(row.policy, row.ask, state);
      } catch (err) {
        thrown = err;
      }
      expect(thrown).toBeInstanceOf(TidemarkError);
      expect((thrown as TidemarkError).code).toBe(row.refused.code);
      expect((thrown as TidemarkError).message).toMatch(row.refused.message);
    } else {
      expect(planCheckpoint(row.policy, row.ask, state)).toEqual(row.plan);
    }
  });

  it('has a row for every policy and type', () => {
    const seen = new Set(rows.map((r) => `${r.policy}/${r.ask.type ?? 'default'}`));
    for (const p of ['production-fallback', 'production-only', 'standard-only', 'disabled']) {
      expect([...seen].some((s) => s.startsWith(`${p}/`))).toBe(true);
    }
    for (const t of ['standard', 'production', 'recovery', 'default']) {
      expect([...seen].some((s) => s.endsWith(`/${t}`))).toBe(true);
    }
  });
});
