/**
 * The port through which the host freezes a VM's guest around a checkpoint's instant (guest-consistency.ts is the
 * guest-agent implementation; tests pass their own). Apart from checkpoints.ts so that the implementation does not
 * import the service that uses it.
 */
import type { Consistency, VmDefinition } from './definition.js';

/** Freezes a VM's guest around a checkpoint's instant, or says why it cannot. */
export interface ConsistencyProvider {
  around<T>(
    vm: VmDefinition,
    fn: () => Promise<T>,
    opts: { fallback: 'crash' | 'fail' },
  ): Promise<{ result: T; consistency: Consistency; freezeWindowMs: number | null; note: string }>;
}
