/**
 * `tidemark demo`: a short tour of the VHDX engine on embedded defaults, in a folder it names: a
 * dynamic disk, a differencing child, info, check, convert (flatten) and merge, each verified.
 */
import { createHash } from 'node:crypto';
import { mkdtemp, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Command } from 'commander';
import { TidemarkError } from '../errors.js';
import { checkVhdx } from '../formats/vhdx/check.js';
import { convertImage } from '../formats/vhdx/convert.js';
import { createVhdx } from '../formats/vhdx/create.js';
import { vhdxInfo } from '../formats/vhdx/info.js';
import { mergeIntoParent } from '../formats/vhdx/merge.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import { formatSize } from '../util/size.js';
import { println } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

const MiB = 2 ** 20;

async function digest(file: string): Promise<string> {
  const disk = await VhdxFile.open(file);
  try {
    const h = createHash('sha256');
    for (let at = 0; at < disk.virtualSize; at += 8 * MiB)
      h.update(await disk.readAt(at, Math.min(8 * MiB, disk.virtualSize - at)));
    return h.digest('hex').slice(0, 16);
  } finally {
    await disk.close();
  }
}

async function write(file: string, pieces: [number, number, number][]): Promise<void> {
  const disk = await VhdxFile.open(file, { writable: true });
  try {
    for (const [offset, length, byte] of pieces) await disk.write(Buffer.alloc(length, byte), offset);
  } finally {
    await disk.close();
  }
}

export function demoCommand(run: Run): Command {
  return new Command('demo')
    .description('a short tour of the VHDX engine in a new folder (default: a temporary one)')
    .argument('[dir]', 'folder to work in (created if missing)')
    .action((dir: string | undefined) =>
      run(async () => {
        const work = dir ? path.resolve(dir) : await mkdtemp(path.join(os.tmpdir(), 'tidemark-demo-'));
        await mkdir(work, { recursive: true });
        const base = path.join(work, 'base.vhdx');
        const child = path.join(work, 'checkpoint.avhdx');
        println(`Tidemark VHDX demo in ${work}`);

        await createVhdx(base, { size: 256 * MiB, type: 'dynamic', blockSize: 2 * MiB });
        await write(base, [
          [0, 4 * MiB, 0xa5],
          [100 * MiB + 512, 3000, 0x5a],
        ]);
        println(`1. created ${base}: dynamic, 256 MiB, 2 MiB blocks; wrote 4 MiB at 0 and 3000 bytes at 100 MiB+512`);

        await createVhdx(child, { parent: base });
        await write(child, [
          [MiB, 4096, 0x11],
          [200 * MiB, 5 * MiB, 0x22],
        ]);
        const info = await vhdxInfo(child);
        println(
          `2. created ${path.basename(child)} over it (parent_linkage ${info.parentLocator?.entries.parent_linkage}); wrote 4 KiB into a parent block (sector bitmap) and 5 MiB into new blocks`,
        );
        println(
          `   chain: ${info.chain.map((c) => path.basename(c.path)).join(' → ')}; child BAT: ${JSON.stringify(info.bat.payload)}`,
        );

        for (const f of [base, child]) {
          const r = await checkVhdx(f);
          if (!r.ok) throw new TidemarkError('VHDX_CORRUPT', `check of ${f} failed: ${r.errors[0].message}`);
        }
        println('3. check: both files pass every rule');

        const flat = path.join(work, 'flattened.vhdx');
        const raw = path.join(work, 'flattened.raw');
        const c1 = await convertImage(child, flat, {});
        await convertImage(flat, raw, {});
        const expected = await digest(child);
        const flatDigest = await digest(flat);
        println(
          `4. converted the chain into one file: ${formatSize(c1.bytesWritten)} written, ${formatSize(c1.bytesSkipped)} skipped; and to raw`,
        );
        println(
          `   content sha256 chain ${expected}…, flattened ${flatDigest}… ${expected === flatDigest ? '(equal)' : '(DIFFERENT)'}`,
        );

        const m = await mergeIntoParent(child);
        const merged = await digest(base);
        println(
          `5. merged the child into ${path.basename(m.parentPath)}: ${formatSize(m.bytesCopied)} copied; content ${merged}… ${merged === expected ? '(equal to the chain)' : '(DIFFERENT)'}`,
        );
        if (merged !== expected || flatDigest !== expected)
          throw new TidemarkError('VHDX_CORRUPT', 'demo content mismatch');
        println(`Done. Try: tidemark vhdx info ${base}`);
      }),
    );
}
