/**
 * Hosts for the adversarial lineage suite: in-process ones (startHost) and one child process (`tidemark host`
 * from a private copy of dist/), which the suite can SIGKILL and start again.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFile, rm, symlink } from 'node:fs/promises';
import path from 'node:path';
import { HostClient } from '../../src/api/client.js';
import { startHost, type RunningHost } from '../../src/daemon/daemon.js';
import { HostLog } from '../../src/host/log.js';
import { copyEngine } from '../helpers/engine-copy.js';
import { REPO_ROOT } from '../helpers/fixtures.js';

export interface SuiteHost {
  name: string;
  store: string;
  api: HostClient;
  nbdSocket: string;
  /** The in-process host itself (to plant a change below the tracker in the suite's self-test). */
  running?: RunningHost;
  /** Only the child-process host can be killed. */
  kill?(): Promise<void>;
  restart?(): Promise<void>;
  close(): Promise<void>;
}

export async function inProcessHost(name: string, store: string): Promise<SuiteHost> {
  const running: RunningHost = await startHost({ store, log: HostLog.silent() });
  return {
    name,
    store,
    api: await HostClient.connect({ store }),
    nbdSocket: running.host.nbdSocket,
    running,
    close: () => running.close(),
  };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** `tidemark host --store STORE` as a child process, from a copy of the engine made under `engineDir`. */
export async function childHost(name: string, store: string, engineDir: string): Promise<SuiteHost> {
  // A private copy (a build meanwhile cannot hand the host a half-written module), resolving packages from here.
  copyEngine(path.join(REPO_ROOT, 'dist'), engineDir);
  await symlink(path.join(REPO_ROOT, 'node_modules'), path.join(engineDir, 'node_modules'));
  const main = path.join(engineDir, 'dist', 'cli', 'main.js');
  const script = `import(${JSON.stringify(main)}).then((m) => m.main(process.argv.slice(1))).then((c) => { process.exitCode = c; })`;
  let child: ChildProcess | undefined;
  let exited: Promise<void> = Promise.resolve();
  let stderr = '';
  const host: SuiteHost = {
    name,
    store,
    api: undefined as unknown as HostClient,
    nbdSocket: '',
    async restart() {
      stderr = '';
      await rm(path.join(store, 'host.json'), { force: true });
      const c = spawn(process.execPath, ['--input-type=module', '-e', script, 'host', '--store', store], {
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      child = c;
      c.stderr!.on('data', (d) => (stderr = (stderr + d).slice(-4000)));
      exited = new Promise((resolve) => c.once('exit', () => resolve()));
      const deadline = Date.now() + 30_000;
      for (;;) {
        if (c.exitCode !== null || c.signalCode !== null)
          throw new Error(`child host exited at start (${c.exitCode ?? c.signalCode}): ${stderr}`);
        const info = await readFile(path.join(store, 'host.json'), 'utf8').then(
          (t) => JSON.parse(t) as { pid: number; nbd: { type: string; path?: string } },
          () => undefined,
        );
        if (info && info.pid === c.pid) {
          host.api = await HostClient.connect({ store });
          host.nbdSocket = info.nbd?.path ?? path.join(store, 'nbd.sock');
          return;
        }
        if (Date.now() > deadline) throw new Error(`child host did not start in 30 s: ${stderr}`);
        await sleep(25);
      }
    },
    async kill() {
      child?.kill('SIGKILL');
      await exited;
    },
    async close() {
      if (child && child.exitCode === null && child.signalCode === null) {
        child.kill('SIGTERM');
        const timer = setTimeout(() => child?.kill('SIGKILL'), 10_000);
        await exited;
        clearTimeout(timer);
      }
    },
  };
  await host.restart!();
  return host;
}
