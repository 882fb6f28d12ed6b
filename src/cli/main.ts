/** The `tidemark` command: one Commander program, one exit status per outcome (docs/cli.md). */
import { Command, CommanderError } from 'commander';
import { EXIT, reportError } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

/**
 * The top-level commands and the module that builds each: only the module of the command being run is
 * loaded (a `vm list` does not load the VHDX engine or the repository), so start-up stays short. Help and
 * unknown commands load them all.
 */
const COMMANDS: Record<string, (run: Run) => Promise<Command[]>> = {
  vhdx: async (run) => [(await import('./vhdx.js')).vhdxCommand(run)],
  vhd: async (run) => [(await import('./vhd.js')).vhdCommand(run)],
  rct: async (run) => [(await import('./rct.js')).rctCommand(run)],
  nbd: async (run) => [(await import('./nbd.js')).nbdCommand(run)],
  demo: async (run) => [(await import('./demo.js')).demoCommand(run)],
  'guest-agent': async (run) => [(await import('./guest-agent.js')).guestAgentCommand(run)],
  'guest-image': async (run) => [(await import('./guest-image.js')).guestImageCommand(run)],
  host: async (run) => [(await import('./host.js')).hostCommand(run)],
  vm: async (run) => [(await import('./host.js')).vmCommand(run)],
  checkpoint: async (run) => [(await import('./host.js')).checkpointCommand(run)],
  refpoint: async (run) => [(await import('./host.js')).refpointCommand(run)],
  disk: async (run) => [(await import('./host.js')).diskCommand(run)],
  backup: async (run) => [(await import('./backup.js')).backupCommand(run)],
  restore: async (run) => [(await import('./backup.js')).restoreCommand(run)],
  quickstart: async (run) => [(await import('./quickstart.js')).quickstartCommand(run)],
};
/** The repository's commands come from one module. */
const REPO_COMMANDS = ['repo', 'points', 'verify', 'prune', 'gc'];

/** The commands `argv` needs: the one it names, or every command (help, no command, an unknown one). */
async function commandsFor(argv: string[], run: Run): Promise<Command[]> {
  const name = argv.find((a) => !a.startsWith('-'));
  if (!name && (argv.includes('--version') || argv.includes('-V'))) return [];
  if (name && COMMANDS[name]) return COMMANDS[name](run);
  if (name && REPO_COMMANDS.includes(name)) {
    const all = (await import('./repo.js')).repoCommands(run);
    return all.filter((c) => c.name() === name);
  }
  const out: Command[] = [];
  for (const build of Object.values(COMMANDS)) {
    for (const c of await build(run)) if (!out.some((o) => o.name() === c.name())) out.push(c);
  }
  out.push(...(await import('./repo.js')).repoCommands(run));
  return out;
}

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
  for (const c of await commandsFor(argv, run)) program.addCommand(c);
  // Usage errors look like every other error: one line, `tidemark: INVALID_ARGUMENT: ...`, exit 2.
  const output = {
    writeErr: (s: string) => process.stderr.write(s),
    outputError: (s: string, write: (s: string) => void) =>
      write(`tidemark: INVALID_ARGUMENT: ${s.replace(/^error: /, '').trim()} (see --help)\n`),
  };
  program.configureOutput(output).showHelpAfterError(false);
  // Every level (`repo key export` is three deep).
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
