/**
 * The host's log: one line per event, timestamped, on stderr (or a caller's sink). Quiet by design:
 * what happened and what it cost, never progress chatter.
 */
export type LogSink = (line: string) => void;

export class HostLog {
  constructor(
    private readonly sink: LogSink = (line) => process.stderr.write(line + '\n'),
    private readonly verbose = false,
  ) {}

  info(msg: string): void {
    this.sink(`${new Date().toISOString()} info ${msg}`);
  }

  warn(msg: string): void {
    this.sink(`${new Date().toISOString()} warn ${msg}`);
  }

  debug(msg: string): void {
    if (this.verbose) this.sink(`${new Date().toISOString()} debug ${msg}`);
  }

  static silent(): HostLog {
    return new HostLog(() => undefined);
  }
}
