/**
 * Application consistency around a piece of host work (a production or recovery checkpoint): freeze the guest,
 * run the work, thaw — the part of Hyper-V's "child VM snapshot" that the guest's integration components do.
 * The real qemu-ga never thaws by itself, so the thaw is in a finally and is verified with guest-fsfreeze-status.
 */
import { performance } from 'node:perf_hooks';
import { TidemarkError } from '../errors.js';
import type { GuestAgentClient } from './client.js';
import { COMMANDS, GuestAgentError } from './protocol.js';

export type Consistency = 'application' | 'crash';

export interface FreezeAroundOptions {
  /** bound on guest-fsfreeze-freeze (the guest's hooks run inside it); default 30 s */
  freezeTimeoutMs?: number;
  /** longest the guest may stay frozen: past it the guest is thawed even if the work goes on; default 60 s */
  maxFreezeWindowMs?: number;
  /** bound on each of the checks (sync, ping, info, status) and on each thaw attempt; default 10 s */
  commandTimeoutMs?: number;
  /** when the guest cannot be frozen: run the work anyway, crash-consistent (default), or throw */
  fallback?: 'crash' | 'fail';
  log?: (line: string) => void;
}

export interface FreezeOutcome<T> {
  result: T;
  consistency: Consistency;
  /** freeze sent → thaw acknowledged (or, failing that, the end of the thaw attempts); 0 if never frozen */
  freezeWindowMs: number;
  /** why the consistency is 'crash' */
  reason?: string;
  /** set when the guest could not be frozen: the reason, in words */
  cannotFreeze?: string;
  /** what guest-fsfreeze-freeze answered (file systems frozen), when it answered */
  frozenFilesystems?: number;
  /** false when the guest may be left frozen: a thaw that could not be verified, or a freeze by another caller */
  thawed: boolean;
  /** things that went wrong without changing the outcome (a lost answer, a slow thaw) */
  warnings: string[];
}

const THAW_ATTEMPTS = 3;

function describe(err: unknown): string {
  if (err instanceof GuestAgentError && err.cannotFreeze) return err.cannotFreeze;
  return err instanceof Error ? err.message : String(err);
}

/**
 * Freezes the guest around `fn`. If the guest cannot be frozen (no agent, freezing disabled, a hook failed, no
 * answer), `fallback` decides: run `fn` unfrozen and report 'crash', or throw (the error's `cannotFreeze` says why).
 * If `fn` outlives `maxFreezeWindowMs`, the guest is thawed at that moment and the outcome is 'crash' with the
 * reason: `fn`'s result (a checkpoint) is returned either way so the caller can keep or discard it by its policy.
 * A guest already frozen by someone else is left frozen (not ours to thaw) and counts as "cannot freeze".
 */
export async function freezeAround<T>(
  client: GuestAgentClient,
  fn: () => Promise<T>,
  opts: FreezeAroundOptions = {},
): Promise<FreezeOutcome<T>> {
  const freezeTimeoutMs = opts.freezeTimeoutMs ?? 30_000;
  const maxFreezeWindowMs = opts.maxFreezeWindowMs ?? 60_000;
  const timeoutMs = opts.commandTimeoutMs ?? 10_000;
  const fallback = opts.fallback ?? 'crash';
  const log = opts.log ?? (() => {});
  const warnings: string[] = [];

  let cannot: TidemarkError | undefined;
  let thawedAtEnd = true;
  let cannotReason: string | undefined;
  const refuse = (err: unknown, reason: string) => {
    cannot = err instanceof TidemarkError ? err : new TidemarkError('GUEST_AGENT_ERROR', reason, {}, { cause: err });
    cannotReason = reason;
  };

  // 1. Is an agent there, not frozen by someone else, and able to freeze and thaw? (Never freeze what we
  //    could not thaw; while frozen, qemu-ga shows the freeze disabled, hence the status first.)
  try {
    await client.sync({ timeoutMs });
    await client.ping({ timeoutMs });
  } catch (err) {
    refuse(err, `the guest agent does not answer (${describe(err)})`);
  }
  if (!cannot) {
    try {
      if ((await client.fsfreezeStatus({ timeoutMs })) === 'frozen') {
        const why = 'the guest is already frozen by another caller (left as it is)';
        refuse(new GuestAgentError('CONFLICT', why, { cannotFreeze: why }), why);
        thawedAtEnd = false;
      }
    } catch (err) {
      refuse(err, `guest-fsfreeze-status failed (${describe(err)})`);
    }
  }

  if (!cannot) {
    try {
      const info = await client.info({ timeoutMs });
      for (const name of [COMMANDS.freeze, COMMANDS.thaw, COMMANDS.freezeStatus]) {
        const c = info.supportedCommands.find((x) => x.name === name);
        if (!c || !c.enabled) {
          const why = c ? `the guest agent has ${name} disabled` : `the guest agent does not know ${name}`;
          refuse(new GuestAgentError('NOT_SUPPORTED', why, { command: name, cannotFreeze: why }), why);
          break;
        }
      }
    } catch (err) {
      refuse(err, `guest-info failed (${describe(err)})`);
    }
  }

  // 2. Freeze.
  let frozen = false;
  let frozenFilesystems: number | undefined;
  let freezeSentAt = 0;
  if (!cannot) {
    freezeSentAt = performance.now();
    try {
      frozenFilesystems = await client.fsfreezeFreeze({ timeoutMs: freezeTimeoutMs });
      frozen = true;
    } catch (err) {
      // The freeze may have happened anyway (its answer lost or late): ask, and undo it if so or if unsure.
      let status: string;
      try {
        status = await client.fsfreezeStatus({ timeoutMs });
      } catch (e) {
        status = `unknown (${describe(e)})`;
      }
      const answered = err instanceof GuestAgentError && err.agentClass !== undefined;
      if (status === 'frozen' && !answered) {
        frozen = true;
        warnings.push(`guest-fsfreeze-freeze: ${describe(err)}; the guest reports frozen, so the freeze took effect`);
      } else {
        refuse(err, describe(err));
        if (status !== 'thawed') {
          const th = await thawAndVerify(client, timeoutMs, warnings);
          thawedAtEnd = th.thawed;
          if (!th.thawed) warnings.push(`the guest may still be frozen after a failed freeze: ${th.error}`);
        }
      }
    }
  }

  if (!frozen) {
    const reason = cannotReason ?? 'the guest could not be frozen';
    log(`cannot freeze the guest: ${reason}`);
    if (fallback === 'fail') {
      throw new GuestAgentError(
        cannot?.code ?? 'GUEST_AGENT_ERROR',
        `cannot freeze the guest for an application-consistent point: ${reason}`,
        { cannotFreeze: reason },
        {},
        { cause: cannot },
      );
    }
    const result = await fn();
    return {
      result,
      consistency: 'crash',
      freezeWindowMs: 0,
      reason,
      cannotFreeze: reason,
      thawed: thawedAtEnd,
      warnings,
    };
  }

  // 3. The work, under the freeze, with the window enforced by a timer (the guest is not left waiting on fn).
  log(`guest frozen (${frozenFilesystems ?? '?'} file systems)`);
  let thawing: Promise<ThawResult> | undefined;
  const thawOnce = () => (thawing ??= thawAndVerify(client, timeoutMs, warnings));
  let windowExceeded = false;
  const timer = setTimeout(() => {
    windowExceeded = true;
    log(`freeze window of ${maxFreezeWindowMs} ms exceeded: thawing the guest now`);
    void thawOnce();
  }, maxFreezeWindowMs);
  let result: T;
  let thaw: ThawResult;
  try {
    result = await fn();
  } finally {
    clearTimeout(timer);
    thaw = await thawOnce();
    if (!thaw.thawed) log(`the guest may still be frozen: ${thaw.error}`);
  }
  const freezeWindowMs = Math.max(0, thaw.at - freezeSentAt);
  log(`guest thawed; freeze window ${freezeWindowMs.toFixed(0)} ms`);
  const outcome: FreezeOutcome<T> = {
    result,
    consistency: 'application',
    freezeWindowMs,
    frozenFilesystems,
    thawed: thaw.thawed,
    warnings,
  };
  if (windowExceeded) {
    outcome.consistency = 'crash';
    outcome.reason = `the work took longer than the freeze window of ${maxFreezeWindowMs} ms; the guest was thawed before it finished`;
  }
  return outcome;
}

interface ThawResult {
  thawed: boolean;
  /** performance.now() of the acknowledgement (or of the last attempt) */
  at: number;
  error?: string;
}

/** Thaws (retrying a lost answer) and checks the status says thawed. Never throws. */
async function thawAndVerify(client: GuestAgentClient, timeoutMs: number, warnings: string[]): Promise<ThawResult> {
  let acked = false;
  let at = performance.now();
  let error: string | undefined;
  for (let attempt = 0; attempt < THAW_ATTEMPTS && !acked; attempt++) {
    try {
      await client.fsfreezeThaw({ timeoutMs });
      acked = true;
    } catch (err) {
      error = describe(err);
      warnings.push(`guest-fsfreeze-thaw attempt ${attempt + 1}: ${error}`);
      if (err instanceof TidemarkError && err.code === 'CLOSED') break;
    }
    at = performance.now();
  }
  try {
    const status = await client.fsfreezeStatus({ timeoutMs });
    if (status === 'thawed') return { thawed: true, at };
    return { thawed: false, at, error: 'guest-fsfreeze-status still says frozen after the thaw' };
  } catch (err) {
    return { thawed: false, at, error: `${error ?? 'thawed'}; then guest-fsfreeze-status failed: ${describe(err)}` };
  }
}
