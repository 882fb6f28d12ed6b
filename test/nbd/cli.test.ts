/**
 * `tidemark nbd serve` end to end: the built CLI (`node bin/tidemark.js`, compiled by `npm run build`)
 * in a child process serves VHDX files over a unix socket and TCP, prints one URI per export, and on
 * SIGINT/SIGTERM finishes, flushes and closes the disks and exits 0; qemu-img check then passes and the
 * data written through the server is in the file. Usage errors are one line and exit 2.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { peer, qemuImgCheck, qemuImgCreateVhdx, requirePeers, run, tempDir } from '../helpers/peers.js';
import { makeCredentials } from './tls-certs.js';
import { sleep } from '../helpers/async.js';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const BIN = path.join(ROOT, 'bin', 'tidemark.js');
const MAIN = path.join(ROOT, 'dist', 'cli', 'main.js');
const MiB = 2 ** 20;

const peers = requirePeers('qemu-io', 'qemu-img', 'nbdinfo');
let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  if (!existsSync(MAIN)) throw new Error(`${MAIN} is missing: run \`npm run build\` first (\`npm test\` does)`);
  ({ dir, cleanup } = await tempDir('nbd-cli'));
});
afterAll(async () => cleanup?.());

interface Served {
  child: ChildProcess;
  stdout: () => string;
  stderr: () => string;
  exit: Promise<number | null>;
}

/** Starts `tidemark nbd serve ARGS` (under `umask`, when given) and waits until it printed `lines` lines on stdout. */
async function startServe(args: string[], lines: number, umask?: string): Promise<Served> {
  const child =
    umask === undefined
      ? spawn(process.execPath, [BIN, 'nbd', 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
      : spawn('sh', ['-c', `umask ${umask}; exec "$0" "$@"`, process.execPath, BIN, 'nbd', 'serve', ...args], {
          stdio: ['ignore', 'pipe', 'pipe'],
        });
  let out = '';
  let err = '';
  child.stdout!.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exit = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  const deadline = Date.now() + 20_000;
  while (out.split('\n').length <= lines) {
    if (child.exitCode !== null) throw new Error(`tidemark nbd serve exited ${child.exitCode}: ${err}`);
    if (Date.now() > deadline) throw new Error(`tidemark nbd serve printed nothing in time: ${out} ${err}`);
    await sleep(20);
  }
  return { child, stdout: () => out, stderr: () => err, exit };
}

describe.skipIf(peers.skip)('tidemark nbd serve', () => {
  it('serves two disks on a unix socket; SIGINT closes them cleanly and exits 0', async () => {
    const a = path.join(dir, 'alpha.vhdx');
    const b = path.join(dir, 'beta.vhdx');
    await qemuImgCreateVhdx(a, 32 * MiB, { subformat: 'dynamic' });
    await qemuImgCreateVhdx(b, 16 * MiB, { subformat: 'dynamic' });
    const sock = path.join(dir, 'serve.sock');
    const s = await startServe([a, b, '--socket', sock], 2);
    const lines = s.stdout().trim().split('\n');
    expect(lines).toEqual([`alpha\tnbd+unix:///alpha?socket=${sock}`, `beta\tnbd+unix:///beta?socket=${sock}`]);
    const list = await run('nbdinfo', ['--list', '--json', `nbd+unix://?socket=${sock}`]);
    expect(JSON.parse(list.stdout).exports.map((e: { 'export-name': string }) => e['export-name'])).toEqual([
      'alpha',
      'beta',
    ]);
    const io = await run('qemu-io', [
      '-f',
      'raw',
      '-c',
      `write -P 0x3c ${MiB} ${2 * MiB}`,
      '-c',
      'flush',
      lines[0].split('\t')[1],
    ]);
    expect(io.stdout).toMatch(/wrote 2097152\/2097152/);
    // A client still connected when the signal comes: it is disconnected, the server exits 0.
    const idle = spawn('qemu-io', ['-f', 'raw', lines[1].split('\t')[1]], { stdio: ['pipe', 'ignore', 'ignore'] });
    await sleep(300);
    s.child.kill('SIGINT');
    expect(await s.exit).toBe(0);
    expect(s.stderr()).toMatch(/SIGINT: finishing requests in flight/);
    idle.kill();
    expect(existsSync(sock)).toBe(false);
    for (const f of [a, b]) {
      const c = await qemuImgCheck(f);
      expect(c.ok, c.output).toBe(true);
    }
    const verify = await run('qemu-io', ['-f', 'vhdx', '-r', '-c', `read -P 0x3c ${MiB} ${2 * MiB}`, a]);
    expect(verify.stdout).not.toMatch(/fail/i);
  });

  it('serves over TCP (read-only, --json) and stops on SIGTERM', async () => {
    const c = path.join(dir, 'gamma.vhdx');
    await qemuImgCreateVhdx(c, 8 * MiB, { subformat: 'dynamic' });
    const s = await startServe([c, '--port', '0', '--read-only', '--json'], 15);
    const info = JSON.parse(s.stdout());
    expect(info.address).toMatchObject({ type: 'tcp', host: '127.0.0.1' });
    expect(info.exports).toEqual([
      { name: 'gamma', uri: `nbd://127.0.0.1:${info.address.port}/gamma`, path: c, size: 8 * MiB, readOnly: true },
    ]);
    const r = await run('nbdinfo', ['--json', info.exports[0].uri]);
    expect(JSON.parse(r.stdout).exports[0]).toMatchObject({ 'export-size': 8 * MiB, is_read_only: true });
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
    expect((await qemuImgCheck(c)).ok).toBe(true);
  });

  it('the unix socket is 0600 under umask 000; --bind off loopback without TLS warns, loopback does not', async () => {
    const d = path.join(dir, 'delta.vhdx');
    await qemuImgCreateVhdx(d, 8 * MiB, { subformat: 'dynamic' });
    const sock = path.join(dir, 'open.sock');
    const s = await startServe([d, '--socket', sock], 1, '000');
    expect(statSync(sock).mode & 0o777).toBe(0o600);
    expect(s.stderr()).not.toMatch(/warning/);
    s.child.kill('SIGTERM');
    expect(await s.exit).toBe(0);
    const wide = await startServe([d, '--port', '0', '--bind', '0.0.0.0', '--read-only'], 1);
    const warnings = wide
      .stderr()
      .split('\n')
      .filter((l) => /warning/.test(l));
    expect(warnings).toEqual([expect.stringMatching(/^tidemark: warning: serving NBD without TLS on 0\.0\.0\.0: /)]);
    wide.child.kill('SIGTERM');
    expect(await wide.exit).toBe(0);
    const local = await startServe([d, '--port', '0', '--bind', '127.0.0.1', '--read-only'], 1);
    expect(local.stderr()).not.toMatch(/warning/);
    local.child.kill('SIGTERM');
    expect(await local.exit).toBe(0);
  });

  it.skipIf(!peer('openssl'))(
    '--tls-dir: nbds URIs, no warning off loopback, nbdinfo with a certificate reads',
    async () => {
      const creds = await makeCredentials(path.join(dir, 'pki'));
      const e = path.join(dir, 'epsilon.vhdx');
      await qemuImgCreateVhdx(e, 8 * MiB, { subformat: 'dynamic' });
      const sock = path.join(dir, 'tls.sock');
      const s = await startServe([e, '--socket', sock, '--tls-dir', creds.server, '--json'], 12);
      const info = JSON.parse(s.stdout());
      expect(info).toMatchObject({
        tls: true,
        exports: [{ name: 'epsilon', uri: `nbds+unix:///epsilon?socket=${sock}` }],
      });
      const r = await run('nbdinfo', ['--json', `${info.exports[0].uri}&tls-certificates=${creds.client}`]);
      expect(JSON.parse(r.stdout)).toMatchObject({ TLS: true, exports: [{ 'export-size': 8 * MiB }] });
      const plain = await run('nbdinfo', [`nbd+unix:///epsilon?socket=${sock}`], { allowFail: true });
      expect(plain.code).not.toBe(0);
      s.child.kill('SIGTERM');
      expect(await s.exit).toBe(0);
      const wide = await startServe([e, '--port', '0', '--bind', '0.0.0.0', '--tls-dir', creds.server], 1);
      expect(wide.stdout()).toMatch(/^epsilon\tnbds:\/\/0\.0\.0\.0:\d+\/epsilon$/m);
      expect(wide.stderr()).not.toMatch(/warning/);
      wide.child.kill('SIGTERM');
      expect(await wide.exit).toBe(0);
    },
  );

  it('bad TLS and limit options: one line, exit 2 (usage) or 3 (missing credentials)', () => {
    const serve = (...args: string[]) =>
      spawnSync(process.execPath, [BIN, 'nbd', 'serve', path.join(dir, 'none.vhdx'), '--port', '0', ...args], {
        encoding: 'utf8',
      });
    for (const [args, message] of [
      [['--tls', 'require'], /--tls require needs --tls-dir/],
      [['--tls', 'maybe'], /--tls maybe: expected require or off/],
      [['--tls', 'off', '--tls-dir', dir], /--tls off cannot be combined with --tls-dir/],
      [['--memory', '0'], /--memory 0: expected a size above 0/],
      [['--max-connections', '-3'], /--max-connections -3: expected a whole number/],
      [['--stall-timeout', '0'], /--stall-timeout 0: expected a number of seconds above 0/],
      [['--idle-timeout', 'soon'], /--idle-timeout soon: expected a number of seconds/],
    ] as const) {
      const r = serve(...args);
      expect(r.status, args.join(' ')).toBe(2);
      expect(r.stderr, args.join(' ')).toMatch(message);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
    }
    const missing = serve('--tls-dir', path.join(dir, 'no-such-dir'));
    expect(missing.status).toBe(3);
    expect(missing.stderr).toMatch(/^tidemark: NOT_FOUND: TLS credentials: cannot read .*ca-cert\.pem/);
  });

  it('usage errors are one line with exit 2; a missing disk exits 3', () => {
    const both = spawnSync(process.execPath, [BIN, 'nbd', 'serve', 'x.vhdx', '--socket', 's', '--port', '1'], {
      encoding: 'utf8',
    });
    expect(both.status).toBe(2);
    expect(both.stderr).toBe('tidemark: INVALID_ARGUMENT: --socket cannot be combined with --port or --bind\n');
    const same = spawnSync(process.execPath, [BIN, 'nbd', 'serve', 'a/d.vhdx', 'b/d.vhdx', '--port', '0'], {
      encoding: 'utf8',
    });
    expect(same.status).toBe(2);
    expect(same.stderr).toMatch(/would both be exported as "d"/);
    const missing = spawnSync(process.execPath, [BIN, 'nbd', 'serve', path.join(dir, 'none.vhdx'), '--port', '0'], {
      encoding: 'utf8',
    });
    expect(missing.status).toBe(3);
    expect(missing.stderr.trim().split('\n')).toHaveLength(1);
  });
});
