/**
 * What the reference agent does on freeze and thaw, apart from the protocol: the in-guest writers' hooks (the
 * convention of qemu-ga's fsfreeze-hook.d: each executable called with `freeze` or `thaw`) and util-linux
 * `fsfreeze` on the configured mount points. Order: hooks in name order, then mounts; thaw is the exact reverse.
 * A freeze that fails half way undoes what it did before reporting, so nothing stays frozen.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { TidemarkErrorBase } from '../errors.js';

export interface FreezerOptions {
  /** directory of hook executables; absent: no hooks */
  hooksDir?: string;
  /** mount points to freeze with fsfreeze (in this order) */
  mounts?: string[];
  /** false: hooks only */
  fsfreeze?: boolean;
  /** bound on each hook run and each fsfreeze run; default 30 s */
  stepTimeoutMs?: number;
  log?: (line: string) => void;
}

/** A freeze that failed inside the guest: the agent answers it as its error. */
export class FreezeError extends TidemarkErrorBase<'GUEST_AGENT_ERROR'> {
  constructor(message: string) {
    super('GUEST_AGENT_ERROR', message);
    this.name = 'FreezeError';
  }
}

/** Editor and package-manager leftovers that a hook directory may hold (skipped, as qemu's fsfreeze-hook does). */
const IGNORED = /(~|\.(bak|swp|orig|rpmnew|rpmorig|rpmsave|sample|dpkg-old|dpkg-new|dpkg-tmp|dpkg-dist))$/;
const OUTPUT_CAP = 4096;

/** The hook executables of `dir`, by name (code-unit order, like `ls` in the C locale). */
export async function listHooks(dir: string): Promise<string[]> {
  const names = (await fs.promises.readdir(dir)).filter((n) => !n.startsWith('.') && !IGNORED.test(n)).sort();
  const hooks: string[] = [];
  for (const name of names) {
    const file = path.join(dir, name);
    try {
      const st = await fs.promises.stat(file);
      if (st.isFile() && (st.mode & 0o111) !== 0) hooks.push(file);
    } catch {
      // a dangling link is not a hook
    }
  }
  return hooks;
}

export interface StepResult {
  ok: boolean;
  /** "exit status 3", "killed by SIGTERM", "timed out after 30000 ms", "could not start: ..." */
  outcome: string;
  /** the last line it printed (stdout or stderr), for messages */
  lastLine: string;
}

/**
 * Runs a command with a time bound that holds even if the process cannot be killed (a hook stuck in the kernel):
 * the promise settles at the deadline regardless. The command gets its own process group, killed as a whole.
 */
export function runStep(file: string, args: string[], timeoutMs: number, cwd?: string): Promise<StepResult> {
  return new Promise((resolve) => {
    let output = '';
    let settled = false;
    const settle = (ok: boolean, outcome: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      const lines = output.trim().split('\n');
      resolve({ ok, outcome, lastLine: lines[lines.length - 1] ?? '' });
    };
    const child = spawn(file, args, { cwd, stdio: ['ignore', 'pipe', 'pipe'], detached: true });
    const collect = (d: Buffer) => {
      if (output.length < OUTPUT_CAP) output += d.toString('utf8').slice(0, OUTPUT_CAP - output.length);
    };
    child.stdout.on('data', collect);
    child.stderr.on('data', collect);
    const timer = setTimeout(() => {
      try {
        process.kill(-child.pid!, 'SIGKILL');
      } catch {
        // already gone
      }
      settle(false, `timed out after ${timeoutMs} ms`);
    }, timeoutMs);
    child.on('error', (err) => settle(false, `could not start: ${err.message}`));
    // 'close' comes once the output is read too; but a daemon the hook left behind may hold the pipes open for
    // ever, so after 'exit' the output gets a short grace, not more.
    let exited: { code: number | null; signal: NodeJS.Signals | null } | undefined;
    const finish = () => {
      if (!exited) return;
      child.stdout.destroy();
      child.stderr.destroy();
      const { code, signal } = exited;
      if (code === 0) settle(true, 'exit status 0');
      else settle(false, signal ? `killed by ${signal}` : `exit status ${code}`);
    };
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      setTimeout(finish, 200);
    });
    child.on('close', finish);
  });
}

/** Mount points of this process's mount namespace (octal escapes of /proc/self/mountinfo decoded). */
export async function mountPoints(): Promise<Set<string>> {
  const text = await fs.promises.readFile('/proc/self/mountinfo', 'utf8');
  const out = new Set<string>();
  for (const line of text.split('\n')) {
    const field = line.split(' ')[4];
    if (field) out.add(field.replace(/\\([0-7]{3})/g, (_m, o: string) => String.fromCharCode(parseInt(o, 8))));
  }
  return out;
}

function fsfreezeBinary(): string {
  return ['/usr/sbin/fsfreeze', '/sbin/fsfreeze'].find((p) => fs.existsSync(p)) ?? 'fsfreeze';
}

export class Freezer {
  private readonly hooksDir: string | undefined;
  private readonly mounts: string[];
  private readonly stepTimeoutMs: number;
  private readonly log: (line: string) => void;
  /** hooks given `freeze` (the one that failed included: it may have done part of its work) */
  private hooksRun: string[] = [];
  private mountsFrozen: string[] = [];

  constructor(opts: FreezerOptions) {
    // Absolute: hooks run with the hook directory as their working directory.
    this.hooksDir = opts.hooksDir === undefined ? undefined : path.resolve(opts.hooksDir);
    this.mounts = opts.fsfreeze === false ? [] : [...(opts.mounts ?? [])];
    this.stepTimeoutMs = opts.stepTimeoutMs ?? 30_000;
    this.log = opts.log ?? (() => {});
  }

  /** Hooks with `freeze`, then mounts; returns the number of file systems frozen. Throws FreezeError, undone. */
  async freeze(): Promise<number> {
    this.hooksRun = [];
    this.mountsFrozen = [];
    let hooks: string[] = [];
    if (this.hooksDir !== undefined) {
      try {
        hooks = await listHooks(this.hooksDir);
      } catch (err) {
        throw new FreezeError(`cannot read the hook directory ${this.hooksDir}: ${(err as Error).message}`);
      }
    }
    for (const hook of hooks) {
      this.hooksRun.push(hook);
      const r = await runStep(hook, ['freeze'], this.stepTimeoutMs, this.hooksDir);
      this.log(`hook ${path.basename(hook)} freeze: ${r.outcome}`);
      if (!r.ok) {
        const problems = await this.undo();
        throw new FreezeError(
          `fsfreeze hook ${path.basename(hook)} failed (${r.outcome}${r.lastLine ? `: ${r.lastLine}` : ''}); ` +
            `everything frozen so far was thawed${problems.length ? ` (with errors: ${problems.join('; ')})` : ''}`,
        );
      }
    }
    if (this.mounts.length > 0) {
      const known = await mountPoints();
      for (const mount of this.mounts) {
        // fsfreeze on any directory freezes the file system holding it: insist on the mount point itself.
        let real = mount;
        try {
          real = await fs.promises.realpath(mount);
        } catch {
          // reported below
        }
        let r: StepResult;
        if (!known.has(real)) r = { ok: false, outcome: 'not a mount point', lastLine: '' };
        else r = await runStep(fsfreezeBinary(), ['-f', real], this.stepTimeoutMs);
        this.log(`fsfreeze -f ${mount}: ${r.outcome}`);
        if (!r.ok) {
          const problems = await this.undo();
          throw new FreezeError(
            `cannot freeze ${mount} (${r.outcome}${r.lastLine ? `: ${r.lastLine}` : ''}); ` +
              `everything frozen so far was thawed${problems.length ? ` (with errors: ${problems.join('; ')})` : ''}`,
          );
        }
        this.mountsFrozen.push(real);
      }
    }
    return this.mountsFrozen.length;
  }

  /** Mounts unfrozen in reverse, then hooks with `thaw` in reverse; every step is tried. */
  async thaw(): Promise<{ thawed: number; problems: string[] }> {
    const thawed = this.mountsFrozen.length;
    const problems = await this.undo();
    return { thawed, problems };
  }

  private async undo(): Promise<string[]> {
    const problems: string[] = [];
    for (const mount of [...this.mountsFrozen].reverse()) {
      const r = await runStep(fsfreezeBinary(), ['-u', mount], this.stepTimeoutMs);
      this.log(`fsfreeze -u ${mount}: ${r.outcome}`);
      if (!r.ok) problems.push(`fsfreeze -u ${mount}: ${r.outcome}${r.lastLine ? ` (${r.lastLine})` : ''}`);
    }
    this.mountsFrozen = [];
    for (const hook of [...this.hooksRun].reverse()) {
      const r = await runStep(hook, ['thaw'], this.stepTimeoutMs, this.hooksDir);
      this.log(`hook ${path.basename(hook)} thaw: ${r.outcome}`);
      if (!r.ok) problems.push(`hook ${path.basename(hook)} thaw: ${r.outcome}${r.lastLine ? ` (${r.lastLine})` : ''}`);
    }
    this.hooksRun = [];
    return problems;
  }
}
