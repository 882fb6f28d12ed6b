/**
 * A host script run in a child process (`node --input-type=module -e SCRIPT ARGS...`) that kills itself with
 * SIGKILL at a step of its own choosing, printing the step's name first; without a kill it prints `done`. The
 * crash tests that stop a host after each durable step of an operation (convert-disks, checkpoints) share it.
 */
import { spawn } from 'node:child_process';

/** Runs `script` with `args`: killed (and after which step), or ran to `done`; any other end throws. */
export async function runKilledAt(script: string, args: string[]): Promise<{ killed: boolean; step: string }> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', script, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d) => (out += d));
  child.stderr.on('data', (d) => (err += d));
  const signal = await new Promise<NodeJS.Signals | null>((resolve) =>
    child.on('exit', (code, sig) => resolve(code !== null && code !== 0 ? null : sig)),
  );
  await new Promise((r) => setImmediate(r));
  if (signal === null && !out.includes('done')) throw new Error(`host child failed: ${err}${out}`);
  return { killed: signal === 'SIGKILL', step: out.trim() };
}
