/**
 * The guest image: its formats (cpio newc, ELF, bzImage) on their own, then a real build from Debian packages
 * (cached: a second build rewrites nothing) whose manifest and initramfs hold what the guest needs.
 */
import { createHash } from 'node:crypto';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { locatePayload } from '../../src/guest-image/bzimage.js';
import { buildGuestImage, type BuildResult } from '../../src/guest-image/builder.js';
import { decodeNewc, NewcWriter, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG } from '../../src/guest-image/cpio.js';
import { decodeElf, elfInterpreter, elfNeeded, isElf } from '../../src/guest-image/elf.js';
import { missingPeers } from '../helpers/peers.js';

let tmp: string;
beforeAll(() => {
  tmp = mkdtempSync(path.join(os.tmpdir(), 'tm-gimg-'));
});
afterAll(() => rmSync(tmp, { recursive: true, force: true }));

describe('cpio newc', () => {
  it('writes what the decoder reads back: directories, files, symlinks, device nodes, the trailer', async () => {
    const file = path.join(tmp, 'a.cpio');
    const w = await NewcWriter.create(file);
    await w.dir('bin');
    await w.file('bin/hello', Buffer.from('#!/bin/sh\necho hi\n'), 0o755);
    await w.file('odd', Buffer.from('abcde')); // data padded to 4
    await w.symlink('bin/sh', 'busybox');
    await w.charDevice('console', 5, 1);
    await expect(w.file('bin/hello', Buffer.alloc(0))).rejects.toMatchObject({ code: 'ALREADY_EXISTS' });
    await expect(w.file('../escape', Buffer.alloc(0))).rejects.toMatchObject({ code: 'INVALID_ARGUMENT' });
    await w.close();
    const buf = readFileSync(file);
    expect(buf.length % 4).toBe(0);
    const entries = decodeNewc(buf);
    expect(entries.map((e) => e.name)).toEqual(['bin', 'bin/hello', 'odd', 'bin/sh', 'console']);
    const by = Object.fromEntries(entries.map((e) => [e.name, e]));
    expect(by.bin.mode & S_IFMT).toBe(S_IFDIR);
    expect(by['bin/hello'].mode).toBe(S_IFREG | 0o755);
    expect(
      buf.toString('utf8', by['bin/hello'].dataOffset, by['bin/hello'].dataOffset + by['bin/hello'].fileSize),
    ).toBe('#!/bin/sh\necho hi\n');
    expect(buf.toString('utf8', by.odd.dataOffset, by.odd.dataOffset + 5)).toBe('abcde');
    expect(by['bin/sh'].mode & S_IFMT).toBe(S_IFLNK);
    expect(buf.toString('utf8', by['bin/sh'].dataOffset, by['bin/sh'].dataOffset + by['bin/sh'].fileSize)).toBe(
      'busybox',
    );
    expect(by.console).toMatchObject({ mode: S_IFCHR | 0o600, rdevMajor: 5, rdevMinor: 1 });
    // Every cut and every damaged magic is an error, never a crash or a partial answer.
    for (const n of [0, 50, 110, buf.length - 8]) expect(() => decodeNewc(buf.subarray(0, n))).toThrow(/cpio archive/);
    const bad = Buffer.from(buf);
    bad.write('070707', 0, 'ascii');
    expect(() => decodeNewc(bad)).toThrow(/bad magic/);
  });
});

describe('ELF and bzImage readers', () => {
  it('reads a host binary: interpreter and DT_NEEDED; refuses truncated and foreign files', () => {
    const ls = readFileSync('/bin/ls');
    expect(isElf(ls)).toBe(true);
    expect(elfInterpreter(ls)).toMatch(/ld-linux-x86-64\.so\.2$/);
    expect(elfNeeded(ls)).toContain('libc.so.6');
    expect(decodeElf(ls).sections.some((s) => s.name === '.dynamic')).toBe(true);
    expect(() => elfNeeded(ls.subarray(0, 40))).toThrow(/truncated/);
    expect(() => elfNeeded(ls.subarray(0, 2000))).toThrow(/runs past the end/);
    expect(() => elfNeeded(Buffer.from('#!/bin/sh\n'))).toThrow(/not an ELF/);
    expect(() => locatePayload(Buffer.alloc(4096))).toThrow(/not a bzImage/);
  });
});

describe.skipIf(missingPeers('apt-get', 'dpkg-deb', 'xz'))('guest-image build (Debian packages)', () => {
  let first: BuildResult;
  const out = () => path.join(tmp, 'image');

  beforeAll(async () => {
    first = await buildGuestImage({ outDir: out(), log: (l) => console.log(`guest-image: ${l}`) });
  }, 900_000);

  it('a second build with a warm cache rewrites nothing and says so', async () => {
    const outputs = () =>
      [first.vmlinux, first.initrd, path.join(out(), 'manifest.json')].map((f) => statSync(f).mtimeMs);
    const before = outputs();
    const t0 = performance.now();
    const again = await buildGuestImage({ outDir: out() });
    const ms = performance.now() - t0;
    console.log(
      `warm rebuild: ${ms.toFixed(0)} ms (first build ${first.manifest.buildMs} ms, ${first.manifest.cache.downloaded} download(s))`,
    );
    expect(again.upToDate).toBe(true);
    expect(again.manifest.key).toBe(first.manifest.key);
    expect(outputs()).toEqual(before);
  }, 300_000);

  it('the manifest names the kernel, the packages, the modules in dependency order and the outputs', () => {
    const m = first.manifest;
    expect(m.kernel.release).toMatch(/-amd64$/);
    expect(m.kernel.package).toBe(`linux-image-${m.kernel.release}`);
    const names = m.packages.map((p) => p.name);
    for (const p of [
      'busybox-static',
      'qemu-guest-agent',
      'sqlite3',
      'e2fsprogs',
      'libc6',
      'libglib2.0-0',
      'libsqlite3-0',
    ])
      expect(names).toContain(p);
    expect(m.packages.find((p) => p.name === 'libc6')!.role).toBe('libraries');
    expect(m.packages.every((p) => p.debBytes > 0 && p.version.length > 0)).toBe(true);
    const order = m.modules.map((x) => x.name);
    for (const want of [
      'virtio_pci',
      'virtio_blk',
      'virtio_scsi',
      'sd_mod',
      'virtio_console',
      'crc32c_generic',
      'ext4',
    ])
      expect(order).toContain(want);
    for (const [i, mod] of m.modules.entries())
      for (const d of mod.depends) expect(order.indexOf(d), `${d} before ${mod.name}`).toBeLessThan(i);
    expect(order.indexOf('crc32c_generic')).toBeLessThan(order.indexOf('ext4'));
    expect(m.workloads).toEqual(['sqlite', 'shell', 'none']);
    expect(m.cmdline).toContain('tidemark.workload=sqlite');
    const vmlinux = readFileSync(first.vmlinux);
    expect(isElf(vmlinux)).toBe(true);
    expect(vmlinux.length).toBe(m.kernel.bytes);
    expect(createHash('sha256').update(vmlinux).digest('hex')).toBe(m.kernel.sha256);
  });

  it('the initrd holds init, busybox, the programs and their libraries, the modules and the shutdown path', () => {
    const m = first.manifest;
    const buf = readFileSync(first.initrd);
    expect(createHash('sha256').update(buf).digest('hex')).toBe(m.initrd.sha256);
    const entries = decodeNewc(buf);
    expect(entries.length).toBe(m.initrd.entries);
    const by = new Map(entries.map((e) => [e.name, e]));
    const text = (n: string) =>
      buf.toString('utf8', by.get(n)!.dataOffset, by.get(n)!.dataOffset + by.get(n)!.fileSize);
    for (const p of [
      'init',
      'bin/busybox',
      m.programs.qemuGa.slice(1),
      m.programs.sqlite3.slice(1),
      m.programs.mke2fs.slice(1),
      m.programs.e2fsck.slice(1),
      'sbin/shutdown',
      'sbin/poweroff',
      'usr/lib/tidemark/workload',
      'usr/lib/tidemark/stop-guest',
      'etc/qemu/fsfreeze-hook',
      'etc/qemu/fsfreeze-hook.d/tidemark-workload',
      'etc/mke2fs.conf',
      'lib64/ld-linux-x86-64.so.2',
      'etc/tidemark/modules',
    ])
      expect(by.has(p), p).toBe(true);
    expect(by.get('init')!.mode & 0o111).not.toBe(0);
    expect(by.get('dev/console')).toMatchObject({ mode: S_IFCHR | 0o600, rdevMajor: 5, rdevMinor: 1 });
    // Every module listed for loading is in the archive; the init script calls e2fsprogs by full path.
    const modules = text('etc/tidemark/modules').trim().split('\n');
    expect(modules).toEqual(m.modules.map((x) => x.path));
    for (const mod of modules) expect(by.has(mod.slice(1)), mod).toBe(true);
    expect(text('init')).toContain(`${m.programs.mke2fs} -q -F -t ext4`);
    // Every ELF program's needs resolve inside the archive (the closure is complete).
    const libDirs = ['lib/x86_64-linux-gnu', 'usr/lib/x86_64-linux-gnu', 'lib64', 'usr/lib64', 'lib', 'usr/lib'];
    for (const prog of [m.programs.qemuGa, m.programs.sqlite3, m.programs.mke2fs]) {
      const e = by.get(prog.slice(1))!;
      const elf = buf.subarray(e.dataOffset, e.dataOffset + e.fileSize);
      for (const so of elfNeeded(elf))
        expect(
          libDirs.some((d) => by.has(`${d}/${so}`)),
          `${so} for ${prog}`,
        ).toBe(true);
    }
    // Documentation stays out.
    expect(entries.some((e) => e.name.startsWith('usr/share/doc/'))).toBe(false);
  });
});
