/**
 * Opening files by path that may name something else: a FIFO (open(2) would wait for a writer forever), a
 * socket, a directory, a character device, a symbolic link where none may be followed. Every open returns
 * at once with a typed error that says what the path is; a regular file (and a block device where a disk is
 * meant) opens. readSmallFile never reads past its limit.
 */
import { execFileSync } from 'node:child_process';
import { constants, mkdirSync, symlinkSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TidemarkError } from '../../src/errors.js';
import { NodeFile } from '../../src/util/file.js';
import {
  FileTypeError,
  SymlinkRefusedError,
  checkFileType,
  openChecked,
  readSmallFile,
} from '../../src/util/safe-open.js';
import { tempDir } from '../helpers/peers.js';

let dir: string;
let cleanup: () => Promise<void>;
let server: net.Server;
const p = (name: string) => path.join(dir, name);

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('safe-open'));
  execFileSync('mkfifo', [p('fifo')]);
  writeFileSync(p('file'), 'hello\n');
  mkdirSync(p('dir'));
  symlinkSync(p('file'), p('link'));
  server = net.createServer();
  await new Promise<void>((resolve) => server.listen(p('socket'), resolve));
});
afterAll(async () => {
  await new Promise((resolve) => server?.close(resolve));
  await cleanup?.();
});

/** The error `fn` rejects with, failing if it takes longer than a few seconds (a FIFO open would hang). */
async function refusal(fn: () => Promise<unknown>): Promise<TidemarkError> {
  const started = performance.now();
  const outcome = await Promise.race([
    fn().then(
      () => new Error('it succeeded'),
      (err: unknown) => err,
    ),
    new Promise((resolve) => setTimeout(() => resolve(new Error('it hung')), 5000).unref()),
  ]);
  expect(performance.now() - started).toBeLessThan(5000);
  expect(outcome).toBeInstanceOf(TidemarkError);
  return outcome as TidemarkError;
}

describe('openChecked', () => {
  const cases: [string, string, number][] = [
    ['fifo', 'FIFO', constants.O_RDONLY],
    ['fifo', 'FIFO', constants.O_RDWR],
    ['fifo', 'FIFO', constants.O_WRONLY],
    ['socket', 'socket', constants.O_RDONLY],
    ['dir', 'directory', constants.O_RDONLY],
    ['dir', 'directory', constants.O_RDWR],
  ];
  for (const [name, type, flags] of cases) {
    it(`a ${type} opened with flags ${flags} is refused at once, saying what it is`, async () => {
      const err = await refusal(() => openChecked(p(name), flags, { kind: 'disk' }));
      expect(err).toBeInstanceOf(FileTypeError);
      expect(err.code).toBe('INVALID_ARGUMENT');
      expect(err.message).toBe(`${p(name)} is a ${type}, not a disk file`);
    });
  }

  it('a character device is not a disk; a block device is one only where a disk is meant', async () => {
    const err = await refusal(() => openChecked('/dev/null', constants.O_RDONLY, { kind: 'disk' }));
    expect(err.message).toBe('/dev/null is a character device, not a disk file');
    const st = await refusal(() => openChecked(p('fifo'), constants.O_RDONLY));
    expect(st.message).toMatch(/is a FIFO, not a regular file$/);
  });

  it('follows a link by default and refuses it with noFollow; O_EXCL never creates through one', async () => {
    const { handle } = await openChecked(p('link'), constants.O_RDONLY);
    await handle.close();
    const err = await refusal(() => openChecked(p('link'), constants.O_RDONLY, { noFollow: true }));
    expect(err).toBeInstanceOf(SymlinkRefusedError);
    expect(err.code).toBe('PATH_NOT_ALLOWED');
    const created = await refusal(() =>
      openChecked(p('link'), constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, { noFollow: true }),
    );
    expect(created.code).toBe('ALREADY_EXISTS');
  });

  it('NodeFile.open refuses a FIFO as a disk, and a sidecar through a link', async () => {
    expect((await refusal(() => NodeFile.open(p('fifo'), 'r'))).message).toMatch(/is a FIFO, not a disk file/);
    expect((await refusal(() => NodeFile.open(p('fifo'), 'r+'))).message).toMatch(/is a FIFO/);
    expect((await refusal(() => NodeFile.open(p('fifo'), 'w'))).message).toMatch(/is a FIFO/);
    expect((await refusal(() => NodeFile.openSidecar(p('link'), 'r+'))).code).toBe('PATH_NOT_ALLOWED');
    expect((await refusal(() => NodeFile.openSidecar(p('link'), 'wx'))).code).toBe('ALREADY_EXISTS');
  });

  it('checkFileType looks without opening', async () => {
    await checkFileType(p('file'), 'file');
    await checkFileType(p('link'), 'disk');
    expect((await refusal(() => checkFileType(p('fifo'), 'disk'))).message).toMatch(/is a FIFO, not a disk file/);
    expect((await refusal(() => checkFileType(p('none'), 'disk'))).code).toBe('NOT_FOUND');
  });
});

describe('readSmallFile', () => {
  it('reads a small regular file, and refuses one over its limit before reading it', async () => {
    expect((await readSmallFile(p('file'), { maxBytes: 6 })).toString()).toBe('hello\n');
    const err = await refusal(() => readSmallFile(p('file'), { maxBytes: 5 }));
    expect(err.code).toBe('LIMIT_EXCEEDED');
  });

  it('a file that grows past the limit while read is refused (a read never passes limit + 1 bytes)', async () => {
    // /proc/self/status reports size 0 in fstat but holds more: the reads alone must stop it.
    const err = await refusal(() => readSmallFile('/proc/self/status', { maxBytes: 16 }));
    expect(err.code).toBe('LIMIT_EXCEEDED');
    expect((await readSmallFile('/proc/self/status', { maxBytes: 1 << 20 })).toString()).toMatch(/^Name:/);
  });

  it('a FIFO, a directory, a link under noFollow: typed errors at once', async () => {
    expect((await refusal(() => readSmallFile(p('fifo'), { maxBytes: 10 }))).message).toMatch(/is a FIFO/);
    expect((await refusal(() => readSmallFile(p('dir'), { maxBytes: 10 }))).message).toMatch(/is a directory/);
    expect((await refusal(() => readSmallFile(p('link'), { maxBytes: 10, noFollow: true }))).code).toBe(
      'PATH_NOT_ALLOWED',
    );
  });
});
