/** `tidemark guest-agent`: the reference guest agent (QEMU guest-agent protocol, freeze hooks, fsfreeze). */
import { Command } from 'commander';
import { InvalidArgumentError } from '../errors.js';
import { GuestAgent } from '../guest/agent.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

function seconds(value: string, option: string): number {
  const n = Number(value);
  if (!/^\d+(\.\d+)?$/.test(value.trim()) || !(n > 0))
    throw new InvalidArgumentError(`${option} wants a positive number of seconds, got "${value}"`);
  return Math.round(n * 1000);
}

function logLine(line: string): void {
  process.stderr.write(`${new Date().toISOString()} guest-agent: ${line}\n`);
}

export function guestAgentCommand(run: Run): Command {
  return new Command('guest-agent')
    .description(
      'run the reference guest agent on a unix socket: QEMU guest-agent protocol (sync, ping, info, fsfreeze ' +
        'status/freeze/thaw), hook executables run with freeze/thaw, fsfreeze of the given mount points',
    )
    .requiredOption('--socket <path>', 'unix socket to listen on (the host connects to it)')
    .option('--hooks <dir>', 'directory of executables run with "freeze" (name order) and "thaw" (reverse)')
    .option('--mount <path...>', 'mount point to freeze with fsfreeze (repeatable, frozen in the order given)')
    .option('--no-fsfreeze', 'run the hooks only; freeze no file system')
    .option('--freeze-timeout <seconds>', 'thaw by itself if no thaw arrives within this time (default 60)')
    .option('--hook-timeout <seconds>', 'bound on each hook or fsfreeze run (default 30)')
    .action((o) =>
      run(async () => {
        const agent = await GuestAgent.listen({
          socketPath: o.socket,
          hooksDir: o.hooks,
          mounts: o.mount ?? [],
          fsfreeze: o.fsfreeze,
          freezeTimeoutMs: o.freezeTimeout !== undefined ? seconds(o.freezeTimeout, '--freeze-timeout') : undefined,
          hookTimeoutMs: o.hookTimeout !== undefined ? seconds(o.hookTimeout, '--hook-timeout') : undefined,
          version: process.env.npm_package_version ?? '0.1.0',
          log: logLine,
        });
        // Runs until a signal; a frozen guest is thawed before the agent goes.
        await new Promise<void>((resolve) => {
          const stop = (signal: string) => {
            logLine(`${signal}: stopping`);
            process.off('SIGINT', onInt);
            process.off('SIGTERM', onTerm);
            agent.close().then(resolve, (err) => {
              logLine(`error while stopping: ${(err as Error).message}`);
              resolve();
            });
          };
          const onInt = () => stop('SIGINT');
          const onTerm = () => stop('SIGTERM');
          process.on('SIGINT', onInt);
          process.on('SIGTERM', onTerm);
        });
      }),
    );
}
