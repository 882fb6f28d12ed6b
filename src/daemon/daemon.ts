/**
 * `tidemark host`, composed: the host (src/host) plus its management API (src/api) over it, with the address
 * and token a client needs written to `STORE/host.json` (mode 0600). One host per store: a second one is
 * refused while the first lives. This is the composition root: it sits above both host and api (DESIGN.md's
 * layering), so the host never imports the API and the API's wire types never need the host.
 */
import { randomBytes } from 'node:crypto';
import { unlink } from 'node:fs/promises';
import path from 'node:path';
import { hostHandlers } from '../api/handlers.js';
import { ApiServer, type ApiLimits } from '../api/server.js';
import { TidemarkError } from '../errors.js';
import { Host, type HostOptions } from '../host/host.js';
import { writeFileAtomic } from '../util/atomic.js';
import { readSmallFile } from '../util/safe-open.js';

export interface DaemonOptions extends HostOptions {
  /** Serve the API on loopback TCP instead of `STORE/api.sock`. */
  apiPort?: number;
  apiHost?: string;
  /** The API's connection cap, timeouts and body limit (defaults: DEFAULT_API_LIMITS). */
  apiLimits?: Partial<ApiLimits>;
}

export interface RunningHost {
  host: Host;
  api: ApiServer;
  endpoint: string;
  token: string;
  close(): Promise<void>;
}

export async function startHost(opts: DaemonOptions): Promise<RunningHost> {
  const store = path.resolve(opts.store);
  await refuseSecondHost(store);
  const host = await Host.open({ ...opts, store });
  const token = randomBytes(24).toString('base64url');
  const api = new ApiServer(hostHandlers(host), {
    token,
    socket: opts.apiPort === undefined ? path.join(store, 'api.sock') : undefined,
    port: opts.apiPort,
    host: opts.apiHost,
    limits: opts.apiLimits,
  });
  let endpoint: string;
  try {
    endpoint = await api.listen();
  } catch (err) {
    await host.close();
    throw err;
  }
  const nbd = host.nbd.address();
  await writeFileAtomic(
    path.join(store, 'host.json'),
    JSON.stringify(
      {
        api: endpoint,
        token,
        pid: process.pid,
        nbd,
        allowedDiskDirs: host.diskPaths.allowedDirs,
        startedAt: new Date().toISOString(),
      },
      null,
      2,
    ) + '\n',
    0o600,
  );
  let closing: Promise<void> | undefined;
  return {
    host,
    api,
    endpoint,
    token,
    close: () =>
      (closing ??= (async () => {
        await api.close();
        await host.close();
        await unlink(path.join(store, 'host.json')).catch(() => undefined);
      })()),
  };
}

/** host.json holds an address, a token and a pid: a few hundred bytes. */
const HOST_FILE_MAX = 64 * 1024;

async function refuseSecondHost(store: string): Promise<void> {
  let pid: number | undefined;
  try {
    pid = JSON.parse((await readSmallFile(path.join(store, 'host.json'), { maxBytes: HOST_FILE_MAX })).toString()).pid;
  } catch {
    return;
  }
  if (!pid || pid === process.pid) return;
  try {
    process.kill(pid, 0);
  } catch {
    return; // a host that died without cleaning up
  }
  throw new TidemarkError('BUSY', `a host (pid ${pid}) already runs on ${store}`);
}
