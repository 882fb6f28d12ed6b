/**
 * The foreign-writer watch's look through /proc at start (writers that opened a file before its mark): each
 * watch is told of the holders of its own files only.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FileWatch } from '../../src/util/file-watch.js';
import { tempDir } from '../helpers/peers.js';
import { waitFor } from '../helpers/async.js';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ dir, cleanup } = await tempDir('file-watch'));
});
afterAll(async () => {
  await cleanup?.();
});

/** A shell holding `file` open read-write (fd 3) until killed. */
async function holder(file: string): Promise<ChildProcess> {
  const p = spawn('sh', ['-c', `exec 3<>"${file}"; sleep 30`], { stdio: 'ignore' });
  await waitFor(async () => ((await readdir(`/proc/${p.pid}/fd`).catch(() => [])) as string[]).includes('3'));
  return p;
}

async function stop(p: ChildProcess): Promise<void> {
  p.kill('SIGKILL');
  if (p.exitCode === null && p.signalCode === null) await new Promise((r) => p.once('exit', r));
}

describe('FileWatch', () => {
  it('a writer that opened a file before the watch started is found; a watch of another file is told nothing', async () => {
    const [a, b] = ['a.img', 'b.img'].map((n) => path.join(dir, n));
    await writeFile(a, 'a');
    await writeFile(b, 'b');
    const h = await holder(a);
    try {
      const wa = FileWatch.start([a]);
      const wb = FileWatch.start([b]);
      try {
        expect(wa.available, wa.why).toBe(true);
        // The shell and the `sleep` it runs (which inherits fd 3) both hold a.img.
        const found = wa.findings();
        expect(found.map((x) => x.pid)).toContain(h.pid);
        expect(found.every((x) => x.file === a && x.what === 'holds it open for writing')).toBe(true);
        expect(wb.findings()).toEqual([]);
      } finally {
        wa.close();
        wb.close();
      }
    } finally {
      await stop(h);
    }
  });
});
