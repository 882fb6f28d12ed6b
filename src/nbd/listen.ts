/**
 * Listening sockets with safe defaults. A unix socket is created mode 0600 whatever the umask, with no
 * moment at which another user could connect: it is bound inside a fresh private directory (0700),
 * made 0600, and only then linked to its path (link(2) fails if the path was taken meanwhile, so a
 * live socket is never replaced). TCP binds loopback unless told otherwise; `isLoopback` says whether
 * an address is.
 */
import { isMainThread } from 'node:worker_threads';
import { chmod, link, lstat, mkdtemp, rmdir, unlink } from 'node:fs/promises';
import net from 'node:net';
import path from 'node:path';
import { TidemarkError } from '../errors.js';

/** The longest unix socket path Linux accepts (sun_path is 108 bytes with its NUL). */
export const MAX_SOCKET_PATH = 107;

/** Listens on unix socket `p` (mode 0600), replacing a socket file left by a dead server. */
export async function listenUnix(server: net.Server, p: string): Promise<void> {
  if (Buffer.byteLength(p) > MAX_SOCKET_PATH) {
    throw new TidemarkError('INVALID_ARGUMENT', `unix socket path ${p} is longer than ${MAX_SOCKET_PATH} bytes`);
  }
  await removeStaleSocket(p);
  const dir = await mkdtemp(path.join(path.dirname(p), '.nbd-')).catch((err: NodeJS.ErrnoException) => {
    throw listenError(err, `unix socket ${p}`);
  });
  const temp = path.join(dir, 's');
  try {
    if (Buffer.byteLength(temp) > MAX_SOCKET_PATH) {
      // The private directory makes the path too long: bind under a umask that leaves the owner alone.
      await listenUnderUmask(server, p);
      return;
    }
    await listenOn(server, { path: temp }, `unix socket ${p}`);
    try {
      await chmod(temp, 0o600);
      await link(temp, p);
    } catch (err) {
      await new Promise((resolve) => server.close(resolve));
      const e = err as NodeJS.ErrnoException;
      if (e.code === 'EEXIST') throw new TidemarkError('BUSY', `another server took ${p} while this one started`);
      throw listenError(e, `unix socket ${p}`);
    }
  } finally {
    await unlink(temp).catch(() => undefined);
    await rmdir(dir).catch(() => undefined);
  }
}

/**
 * Binds with umask 0177 (the socket comes out 0600): the bind runs synchronously inside listen(), so
 * no other JavaScript runs under that umask; only the main thread may change it.
 */
async function listenUnderUmask(server: net.Server, p: string): Promise<void> {
  if (!isMainThread) {
    throw new TidemarkError('INVALID_ARGUMENT', `unix socket path ${p} is too long to be created safely here`);
  }
  const done = new Promise<void>((resolve, reject) => {
    server.once('error', (err: NodeJS.ErrnoException) => reject(listenError(err, `unix socket ${p}`)));
    server.once('listening', () => resolve());
  });
  const old = process.umask(0o177);
  try {
    server.listen({ path: p });
  } finally {
    process.umask(old);
  }
  await done;
}

/** Listens on TCP. */
export function listenTcp(server: net.Server, host: string, port: number): Promise<void> {
  return listenOn(server, { host, port }, `${host}:${port}`);
}

/** Whether `host` is a loopback address (127.0.0.0/8, ::1, localhost). */
export function isLoopback(host: string): boolean {
  const h = host.replace(/^\[|\]$/g, '').toLowerCase();
  if (h === 'localhost' || h === '::1' || h === '0:0:0:0:0:0:0:1') return true;
  const v4 = h.startsWith('::ffff:') ? h.slice(7) : h;
  return net.isIPv4(v4) && v4.startsWith('127.');
}

/** A socket file left by a server that died is removed; a live one or any other file is an error. */
async function removeStaleSocket(p: string): Promise<void> {
  let st;
  try {
    st = await lstat(p);
  } catch {
    return;
  }
  if (!st.isSocket()) throw new TidemarkError('ALREADY_EXISTS', `${p} exists and is not a socket`);
  const alive = await new Promise<boolean>((resolve) => {
    const probe = net.connect({ path: p });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', () => resolve(false));
  });
  if (alive) throw new TidemarkError('BUSY', `another server is listening on ${p}`);
  await unlink(p);
}

function listenOn(server: net.Server, where: net.ListenOptions, what: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: NodeJS.ErrnoException) => reject(listenError(err, what));
    server.once('error', onError);
    server.listen(where, () => {
      server.off('error', onError);
      resolve();
    });
  });
}

function listenError(err: NodeJS.ErrnoException, what: string): TidemarkError {
  const code = err.code === 'EADDRINUSE' ? 'BUSY' : err.code === 'EACCES' ? 'PATH_NOT_ALLOWED' : 'IO_ERROR';
  return new TidemarkError(code, `cannot listen on ${what}: ${err.code ?? err.message}`, { errno: err.code });
}
