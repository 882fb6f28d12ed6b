/** A running NbdServer on a unix socket in a fresh temporary directory, for the tests. */
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import type { BlockDevice } from '../../src/disk/device.js';
import { NbdServer, type ExportOptions, type NbdServerOptions } from '../../src/nbd/index.js';

export interface RunningServer {
  server: NbdServer;
  socket: string;
  dir: string;
  uri(name: string): string;
  stop(): Promise<void>;
}

export async function startServer(
  exports: { name: string; device: BlockDevice; opts?: ExportOptions }[],
  opts: NbdServerOptions = {},
): Promise<RunningServer> {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'tidemark-nbd-'));
  const socket = path.join(dir, 's');
  const server = new NbdServer(opts);
  for (const e of exports) server.addExport(e.name, e.device, e.opts);
  await server.listen({ socket });
  return {
    server,
    socket,
    dir,
    uri: (name) => server.uri(name),
    stop: async () => {
      await server.close();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
