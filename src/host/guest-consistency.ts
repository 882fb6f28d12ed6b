/**
 * Application consistency through the VM's guest agent (Hyper-V's integration components): a production
 * or recovery checkpoint is cut while the guest is frozen. A guest that cannot freeze gives crash
 * consistency or a failure, as the caller's policy says, and the reason is recorded with the checkpoint.
 */
import { TidemarkError } from '../errors.js';
import { GuestAgentClient } from '../guest/client.js';
import { freezeAround } from '../guest/freeze.js';
import type { VmDefinition } from './definition.js';
import type { ConsistencyProvider } from './consistency.js';

export interface GuestConsistencyOptions {
  /** Bound on connecting and on each check (default 3 s). */
  commandTimeoutMs?: number;
  /** Bound on the freeze itself, in-guest hooks included (default 30 s). */
  freezeTimeoutMs?: number;
  /** The longest a guest stays frozen (default 10 s; a checkpoint takes milliseconds). */
  maxFreezeWindowMs?: number;
}

export function guestConsistency(opts: GuestConsistencyOptions = {}): ConsistencyProvider {
  const commandTimeoutMs = opts.commandTimeoutMs ?? 3_000;
  return {
    async around(vm: VmDefinition, fn, { fallback }) {
      const cannot = async (reason: string) => {
        if (fallback === 'fail') {
          throw new TidemarkError('NOT_SUPPORTED', `${vm.name}: application consistency required, but ${reason}`);
        }
        return { result: await fn(), consistency: 'crash' as const, freezeWindowMs: null, note: reason };
      };
      if (!vm.guest) return cannot('the VM has no guest channel');
      let client: GuestAgentClient;
      try {
        client = await GuestAgentClient.connect(vm.guest, { timeoutMs: commandTimeoutMs });
      } catch (err) {
        return cannot(`the guest agent at ${vm.guest} does not answer (${(err as Error).message})`);
      }
      try {
        const out = await freezeAround(client, fn, {
          fallback,
          commandTimeoutMs,
          freezeTimeoutMs: opts.freezeTimeoutMs ?? 30_000,
          maxFreezeWindowMs: opts.maxFreezeWindowMs ?? 10_000,
        });
        const note =
          out.consistency === 'application'
            ? `guest froze ${out.frozenFilesystems ?? 0} file system(s)`
            : (out.cannotFreeze ?? out.reason ?? 'guest not frozen');
        return {
          result: out.result,
          consistency: out.consistency,
          freezeWindowMs: out.freezeWindowMs > 0 ? out.freezeWindowMs : null,
          note,
        };
      } finally {
        await client.close().catch(() => undefined);
      }
    },
  };
}
