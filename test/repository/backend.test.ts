/** Every backend through the conformance suite, plus what is particular to the local directory. */
import { execFileSync } from 'node:child_process';
import { mkdir, readdir, symlink, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { LocalBackend } from '../../src/repository/local-backend.js';
import { tempDir } from '../helpers/peers.js';
import { testBackend } from './backend-conformance.js';

testBackend('local directory', async () => {
  const { dir, cleanup } = await tempDir('backend');
  return { backend: new LocalBackend(path.join(dir, 'repo')), cleanup };
});

describe('local directory backend', () => {
  it('keys are paths under the root; temporary files live in .tmp and are swept only when old', async () => {
    const { dir, cleanup } = await tempDir('backend-local');
    try {
      const root = path.join(dir, 'repo');
      const b = new LocalBackend(root);
      await b.put('chunks/ab/abcd', Buffer.from('x'));
      expect(await readdir(path.join(root, 'chunks', 'ab'))).toEqual(['abcd']);
      // A put that died half way leaves a temporary file: not an object, swept after the grace period only.
      await mkdir(path.join(root, '.tmp'), { recursive: true });
      const old = path.join(root, '.tmp', 'dead.tmp');
      const young = path.join(root, '.tmp', 'young.tmp');
      await writeFile(old, 'partial');
      await writeFile(young, 'partial');
      const past = new Date(Date.now() - 2 * 3600_000);
      await utimes(old, past, past);
      const keys: string[] = [];
      for await (const o of b.list('')) keys.push(o.key);
      expect(keys).toEqual(['chunks/ab/abcd']);
      expect(await b.sweepTemporary(3600_000)).toBe(1);
      expect(await readdir(path.join(root, '.tmp'))).toEqual(['young.tmp']);
    } finally {
      await cleanup();
    }
  });

  it('list shows entries that are not objects only when asked, marked; names that cannot be keys never', async () => {
    const { dir, cleanup } = await tempDir('backend-unusable');
    try {
      const root = path.join(dir, 'repo');
      const b = new LocalBackend(root);
      await b.put('points/real', Buffer.from('x'));
      const at = (name: string) => path.join(root, 'points', name);
      await symlink(at('real'), at('link'));
      await symlink(path.join(dir, 'nowhere'), at('dangling'));
      execFileSync('mkfifo', [at('fifo')]);
      await mkdir(at('dir'));
      await writeFile(path.join(at('dir'), 'inner'), 'y');
      await writeFile(at('bad name'), 'z');
      await writeFile(at('.hidden'), 'z');
      const plain: string[] = [];
      for await (const o of b.list('points/')) plain.push(o.key);
      // Objects only: what an object store would hold.
      expect(plain.sort()).toEqual(['points/dir/inner', 'points/real']);
      const all = new Map<string, string | undefined>();
      for await (const o of b.list('points/', { unusable: true })) all.set(o.key, o.unusable);
      expect(Object.fromEntries(all)).toEqual({
        'points/real': undefined,
        'points/link': 'a symbolic link',
        'points/dangling': 'a symbolic link',
        'points/fifo': 'a FIFO',
        'points/dir': 'a directory',
        'points/dir/inner': undefined,
      });
    } finally {
      await cleanup();
    }
  });
});
