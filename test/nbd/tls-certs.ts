/**
 * X.509 credentials made at test time with `openssl` (P-256 keys, valid two days), laid out as QEMU's
 * `tls-creds-x509` and libnbd's `tls-certificates=DIR` expect:
 *
 * - `server/`: ca-cert.pem (CA "A"), server-cert.pem (CN and SAN localhost, 127.0.0.1, ::1), server-key.pem
 * - `client/`: ca-cert.pem (A), client-cert.pem (signed by A), client-key.pem
 * - `nocert/`: ca-cert.pem (A) only: a client that trusts the server but has no certificate
 * - `other/`:  ca-cert.pem (CA "B" then A: QEMU checks its own certificate against it, and must still
 *              trust the server), client-cert.pem signed by B, client-key.pem
 */
import { execFile } from 'node:child_process';
import { copyFile, mkdir, readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';

const execFileP = promisify(execFile);

const CA_EXT = 'basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n';
const SERVER_EXT =
  'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n' +
  'extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n';
const CLIENT_EXT =
  'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n';

export interface TestCredentials {
  server: string;
  client: string;
  nocert: string;
  other: string;
}

async function openssl(args: string[], cwd: string): Promise<void> {
  await execFileP('openssl', args, { cwd });
}

/** A key and a certificate `name` signed by the CA in `ca` (or self-signed when `ca` is undefined). */
async function issue(work: string, name: string, subject: string, ext: string, ca?: string): Promise<void> {
  await writeFile(path.join(work, `${name}.ext`), ext);
  const key = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', `${name}-key.pem`];
  if (!ca) {
    await openssl(['req', '-x509', ...key, '-out', `${name}-cert.pem`, '-days', '2', '-subj', subject, '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign'], work); // prettier-ignore
    return;
  }
  await openssl(['req', ...key, '-out', `${name}.csr`, '-subj', subject], work);
  await openssl(['x509', '-req', '-in', `${name}.csr`, '-CA', `${ca}-cert.pem`, '-CAkey', `${ca}-key.pem`, '-CAcreateserial', '-out', `${name}-cert.pem`, '-days', '2', '-extfile', `${name}.ext`], work); // prettier-ignore
}

export async function makeCredentials(dir: string): Promise<TestCredentials> {
  const work = path.join(dir, 'pki');
  await mkdir(work, { recursive: true });
  await issue(work, 'caA', '/CN=Tidemark test CA A', CA_EXT);
  await issue(work, 'caB', '/CN=Tidemark test CA B', CA_EXT);
  await issue(work, 'server', '/CN=localhost', SERVER_EXT, 'caA');
  await issue(work, 'client', '/CN=client', CLIENT_EXT, 'caA');
  await issue(work, 'stranger', '/CN=stranger', CLIENT_EXT, 'caB');
  const out: TestCredentials = {
    server: path.join(dir, 'server'),
    client: path.join(dir, 'client'),
    nocert: path.join(dir, 'nocert'),
    other: path.join(dir, 'other'),
  };
  const place = async (to: string, files: Record<string, string>) => {
    await mkdir(to, { recursive: true });
    for (const [name, from] of Object.entries(files)) await copyFile(path.join(work, from), path.join(to, name));
  };
  await place(out.server, { 'ca-cert.pem': 'caA-cert.pem', 'server-cert.pem': 'server-cert.pem', 'server-key.pem': 'server-key.pem' }); // prettier-ignore
  await place(out.client, { 'ca-cert.pem': 'caA-cert.pem', 'client-cert.pem': 'client-cert.pem', 'client-key.pem': 'client-key.pem' }); // prettier-ignore
  await place(out.nocert, { 'ca-cert.pem': 'caA-cert.pem' });
  await place(out.other, { 'client-cert.pem': 'stranger-cert.pem', 'client-key.pem': 'stranger-key.pem' });
  const bundle = Buffer.concat([
    await readFile(path.join(work, 'caB-cert.pem')),
    await readFile(path.join(work, 'caA-cert.pem')),
  ]);
  await writeFile(path.join(out.other, 'ca-cert.pem'), bundle);
  return out;
}
