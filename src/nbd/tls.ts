/**
 * TLS for NBD (NBD_OPT_STARTTLS, X.509 with client certificates), the server's side and the client's
 * credentials (NbdClient runs the client side). The credentials come from
 * a directory laid out as QEMU's `tls-creds-x509` (endpoint=server) and nbdkit's `--tls-certificates`
 * expect: `ca-cert.pem` (the CA that signs the clients' certificates, and the server's), `server-cert.pem`,
 * `server-key.pem`, and optionally `ca-crl.pem` (revoked certificates). Every client must present a
 * certificate the CA signed; TLS 1.2 at least.
 *
 * The upgrade hands the plain socket to a `tls.Server` (as `'connection'`, the documented way to feed a
 * server a socket) so that Node's own server-side checks run: the handshake fails without a client
 * certificate, and a certificate that does not verify against the CA closes the socket before any
 * data flows. One tls.Server per upgrade: that is how its answer can be matched to the socket.
 */
import { readFile } from 'node:fs/promises';
import type net from 'node:net';
import path from 'node:path';
import tls from 'node:tls';
import { TidemarkError } from '../errors.js';

export const TLS_FILES = { ca: 'ca-cert.pem', cert: 'server-cert.pem', key: 'server-key.pem', crl: 'ca-crl.pem' };
/** A client's side of the same layout (QEMU's `tls-creds-x509,endpoint=client`, libnbd's `tls-certificates`). */
export const TLS_CLIENT_FILES = { ca: 'ca-cert.pem', cert: 'client-cert.pem', key: 'client-key.pem' };

/** What NbdClient needs to start TLS: trust (the CA), its own certificate, and the name to check, if any. */
export interface ClientTls {
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  /** The server certificate's expected name; undefined on a unix socket (the CA alone vouches, as in QEMU). */
  hostname?: string;
}

/** Loads and checks a client's credentials from `dir` (ca-cert.pem, client-cert.pem, client-key.pem). */
export async function loadClientTls(dir: string): Promise<ClientTls> {
  const abs = path.resolve(dir);
  const need = `${TLS_CLIENT_FILES.ca}, ${TLS_CLIENT_FILES.cert} and ${TLS_CLIENT_FILES.key}`;
  const ca = (await readCredential(abs, TLS_CLIENT_FILES.ca, need))!;
  const cert = (await readCredential(abs, TLS_CLIENT_FILES.cert, need))!;
  const key = (await readCredential(abs, TLS_CLIENT_FILES.key, need))!;
  checkUsable(abs, { ca, cert, key });
  return { ca, cert, key };
}

async function readCredential(dir: string, name: string, need: string, optional = false): Promise<Buffer | undefined> {
  const file = path.join(dir, name);
  try {
    return await readFile(file);
  } catch (err) {
    const code = (err as NodeJS.ErrnoException).code;
    if (optional && code === 'ENOENT') return undefined;
    throw new TidemarkError(
      code === 'ENOENT' ? 'NOT_FOUND' : 'IO_ERROR',
      `TLS credentials: cannot read ${file} (${code ?? (err as Error).message}); the directory needs ${need}`,
      { path: file },
    );
  }
}

/** Fails here, once, on a bad PEM file or a key that does not match its certificate. */
function checkUsable(dir: string, options: tls.SecureContextOptions): void {
  try {
    tls.createSecureContext(options);
  } catch (err) {
    throw new TidemarkError('INVALID_ARGUMENT', `TLS credentials in ${dir} cannot be used: ${(err as Error).message}`, {
      path: dir,
    });
  }
}

export class TlsCredentials {
  private constructor(
    readonly dir: string,
    private readonly options: tls.TlsOptions,
  ) {}

  /** Loads and checks the credentials of directory `dir` (QEMU's file names). */
  static async load(dir: string): Promise<TlsCredentials> {
    const abs = path.resolve(dir);
    const need = `${TLS_FILES.ca}, ${TLS_FILES.cert} and ${TLS_FILES.key}`;
    const ca = (await readCredential(abs, TLS_FILES.ca, need))!;
    const cert = (await readCredential(abs, TLS_FILES.cert, need))!;
    const key = (await readCredential(abs, TLS_FILES.key, need))!;
    const crl = await readCredential(abs, TLS_FILES.crl, need, true);
    const options: tls.TlsOptions = { ca, cert, key, minVersion: 'TLSv1.2', ...(crl ? { crl } : {}) };
    checkUsable(abs, options);
    return new TlsCredentials(abs, options);
  }

  /**
   * Runs the server side of the TLS handshake on `socket` (which must carry nothing else from now on).
   * Resolves with the TLS socket once the client's certificate verified; rejects when the handshake
   * fails, the certificate is refused, or the socket closes first. (The caller's negotiation deadline
   * also covers the handshake.)
   */
  upgrade(socket: net.Socket, handshakeTimeoutMs: number): Promise<tls.TLSSocket> {
    return new Promise((resolve, reject) => {
      const server = new tls.Server({
        ...this.options,
        requestCert: true,
        rejectUnauthorized: true,
        handshakeTimeout: handshakeTimeoutMs,
      });
      let settled = false;
      const fail = (why: string) => {
        if (settled) return;
        settled = true;
        reject(new TidemarkError('UNAUTHORIZED', `TLS handshake failed: ${why}`));
      };
      server.once('secureConnection', (t: tls.TLSSocket) => {
        if (settled) return t.destroy();
        settled = true;
        resolve(t);
      });
      server.on('tlsClientError', (err: NodeJS.ErrnoException, t: tls.TLSSocket) =>
        fail(t.authorizationError ? `client certificate refused (${t.authorizationError})` : (err.code ?? err.message)),
      );
      // A socket that closes before the handshake ends is a tlsClientError too ('socket hang up').
      server.emit('connection', socket);
    });
  }
}
