/** The `tidemark` command: one Commander program, one exit status per outcome (docs/cli.md). */
import { Command, CommanderError } from 'commander';
import { backupCommand, restoreCommand } from './backup.js';
import { demoCommand } from './demo.js';
import { quickstartCommand } from './quickstart.js';
import { guestAgentCommand } from './guest-agent.js';
import { guestImageCommand } from './guest-image.js';
import { checkpointCommand, diskCommand, hostCommand, refpointCommand, vmCommand } from './host.js';
import { nbdCommand } from './nbd.js';
import { EXIT, reportError } from './output.js';
import { rctCommand } from './rct.js';
import { repoCommands } from './repo.js';
import { vhdxCommand } from './vhdx.js';

export async function main(argv: string[]): Promise<number> {
  // A reader that goes away (`| head`) ends the output, not the program with a stack trace.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(status);
    throw err;
  });
  let status: number = EXIT.OK;
  const run = async (fn: () => Promise<number | void>) => {
    try {
      status = (await fn()) ?? EXIT.OK;
    } catch (err) {
      status = reportError(err);
    }
  };
  const program = new Command('tidemark')
    .description('Tidemark: VHDX storage stack, change tracking and VM backup')
    .version(process.env.npm_package_version ?? '0.1.0')
    // `--version` after a command is that command's own option (`vm upgrade NAME --version 9.0`).
    .enablePositionalOptions()
    .exitOverride();
  program.addCommand(vhdxCommand(run));
  program.addCommand(rctCommand(run));
  program.addCommand(nbdCommand(run));
  program.addCommand(demoCommand(run));
  program.addCommand(guestAgentCommand(run));
  program.addCommand(guestImageCommand(run));
  program.addCommand(hostCommand(run));
  program.addCommand(vmCommand(run));
  program.addCommand(checkpointCommand(run));
  program.addCommand(refpointCommand(run));
  program.addCommand(diskCommand(run));
  for (const c of repoCommands(run)) program.addCommand(c);
  program.addCommand(backupCommand(run));
  program.addCommand(restoreCommand(run));
  program.addCommand(quickstartCommand(run));
  // Usage errors look like every other error: one line, `tidemark: INVALID_ARGUMENT: ...`, exit 2.
  const output = {
    writeErr: (s: string) => process.stderr.write(s),
    outputError: (s: string, write: (s: string) => void) =>
      write(`tidemark: INVALID_ARGUMENT: ${s.replace(/^error: /, '').trim()} (see --help)\n`),
  };
  program.configureOutput(output).showHelpAfterError(false);
  const configure = (c: Command): void => {
    c.exitOverride().configureOutput(output);
    for (const sub of c.commands) configure(sub);
  };
  for (const c of program.commands) configure(c);
  try {
    await program.parseAsync(argv, { from: 'user' });
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help')
        return EXIT.OK;
      return EXIT.USAGE;
    }
    return reportError(err);
  }
  return status;
}
