/** `tidemark rct ...`: resilient change tracking of VHDX disks (offline). */
import { Command } from 'commander';
import { TidemarkError } from '../errors.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import { ChangeTracker, DEFAULT_GRANULARITY, trackingPaths, type ChangesResult } from '../tracking/tracker.js';
import { formatSize, parseSize } from '../util/size.js';
import { printJson, println } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

async function notEnabled(file: string, disk?: VhdxFile): Promise<TidemarkError> {
  const found = disk ? await ChangeTracker.inspect(disk.chain().at(-1)!.path) : { state: 'none' as const };
  if (found.state === 'foreign') {
    return new TidemarkError(
      'TRACKING_NOT_ENABLED',
      `${file} is tracked by another product (${found.detail}); Tidemark does not read or modify its files (tidemark rct enable --replace-foreign ${file})`,
    );
  }
  return new TidemarkError(
    'TRACKING_NOT_ENABLED',
    `change tracking is not enabled for ${file} (tidemark rct enable ${file})`,
  );
}

async function withDisk<T>(file: string, writable: boolean, fn: (disk: VhdxFile) => Promise<T>): Promise<T> {
  const disk = await VhdxFile.open(file, { writable });
  try {
    return await fn(disk);
  } finally {
    await disk.close();
  }
}

export function rctCommand(run: Run): Command {
  const rct = new Command('rct').description('resilient change tracking: which bytes changed since a sealed id');

  rct
    .command('enable')
    .description('start tracking a disk (its files NAME.vhdx.rct and NAME.vhdx.mrt sit beside the base disk)')
    .argument('<disk>')
    .option(
      '--granularity <size>',
      `tracking granularity, a power of two from 4K (default ${formatSize(DEFAULT_GRANULARITY)})`,
    )
    .option(
      '--replace-foreign',
      "when another product's tracking files sit beside the disk (e.g. Hyper-V's), move them aside (NAME.foreign-TIME) and track with Tidemark's",
    )
    .action((file: string, o) =>
      run(() =>
        withDisk(file, false, async (disk) => {
          const granularity = o.granularity ? parseSize(o.granularity, '--granularity') : DEFAULT_GRANULARITY;
          const { movedAside } = await ChangeTracker.enable(disk, granularity, { replaceForeign: !!o.replaceForeign });
          for (const f of movedAside) println(`moved another product's tracking file aside: ${f}`);
          const t = (await ChangeTracker.attach(disk, { writable: false }))!;
          println(
            `change tracking enabled for ${file}: granularity ${formatSize(granularity)}, epoch ${t.status().epoch}`,
          );
        }),
      ),
    );

  rct
    .command('disable')
    .description('stop tracking a disk and delete its tracking files')
    .argument('<disk>')
    .action((file: string) =>
      run(() =>
        withDisk(file, false, async (disk) => {
          const base = disk.chain().at(-1)!.path;
          if (!(await ChangeTracker.disable(base))) throw await notEnabled(file);
          println(`change tracking disabled for ${file}`);
        }),
      ),
    );

  rct
    .command('status')
    .description('enabled, epoch, most recent id, state (valid / reset, and why)')
    .argument('<disk>')
    .option('--json', 'machine-readable output')
    .action((file: string, o) =>
      run(() =>
        withDisk(file, false, async (disk) => {
          const t = await ChangeTracker.attach(disk, { writable: false });
          if (!t) {
            const base = disk.chain().at(-1)!.path;
            const found = await ChangeTracker.inspect(base);
            const foreign = found.state === 'foreign' ? found.detail : null;
            if (o.json) printJson({ enabled: false, foreign, trackingFiles: trackingPaths(base) });
            else if (foreign)
              println(
                `${file}: tracked by another product (${foreign}); Tidemark leaves its files alone (rct enable --replace-foreign takes over)`,
              );
            else println(`${file}: change tracking not enabled`);
            return;
          }
          const s = t.status();
          if (o.json) return printJson(s);
          println(`${file}: change tracking ${s.state}${s.reason ? ` (${s.reason})` : ''}`);
          println(`  epoch        ${s.epoch} (since ${s.epochStartedAt})`);
          println(`  granularity  ${formatSize(s.granularity)}`);
          println(`  latest id    ${s.lastId ?? '(none sealed yet)'}`);
          println(`  oldest id    ${s.firstId ?? '(none)'}`);
          println(`  in use       ${s.inUse ? 'yes (open for writing, or not closed cleanly)' : 'no'}`);
          println(`  bound to     ${s.binding.head} (DataWriteGuid ${s.binding.dataWriteGuid})`);
        }),
      ),
    );

  rct
    .command('seal')
    .description('make the current state durable and print its id; later writes belong to later ids')
    .argument('<disk>')
    .option('--json', 'machine-readable output')
    .action((file: string, o) =>
      run(() =>
        withDisk(file, true, async (disk) => {
          const t = await ChangeTracker.attach(disk, { writable: true });
          if (!t) throw await notEnabled(file, disk);
          const id = await t.seal();
          if (o.json) printJson({ id, status: t.status() });
          else println(id);
        }),
      ),
    );

  rct
    .command('changes')
    .description('the byte ranges changed since a sealed id (or "*" for every allocated range), and the total')
    .argument('<disk>')
    .requiredOption('--since <id>', 'a sealed id, or * for all allocated ranges')
    .option('--offset <n>', 'start of the window (default 0)')
    .option('--length <n>', 'length of the window (default: to the end of the disk)')
    .option('--max-ranges <n>', 'answer at most this many ranges (the answer says how far it got)')
    .option('--json', 'machine-readable output')
    .action((file: string, o) =>
      run(() =>
        withDisk(file, false, async (disk) => {
          const t = await ChangeTracker.attach(disk, { writable: false });
          if (!t) throw await notEnabled(file, disk);
          const offset = o.offset ? parseSize(o.offset, '--offset') : 0;
          const length = o.length ? parseSize(o.length, '--length') : disk.virtualSize - offset;
          let result: ChangesResult;
          if (o.maxRanges) {
            result = await t.changes(o.since, offset, length, parseSize(o.maxRanges, '--max-ranges'));
          } else {
            // Page through the whole window, as a backup application does.
            result = { ranges: [], processedLength: 0, totalBytes: 0 };
            while (result.processedLength < length) {
              const page = await t.changes(
                o.since,
                offset + result.processedLength,
                length - result.processedLength,
                4096,
              );
              result.ranges.push(...page.ranges);
              result.totalBytes += page.totalBytes;
              result.processedLength += page.processedLength;
            }
          }
          if (o.json) return printJson({ since: o.since, offset, length, ...result });
          for (const r of result.ranges) println(`${r.offset}\t${r.length}`);
          println(
            `# ${result.ranges.length} ranges, ${result.totalBytes} bytes changed (${formatSize(result.totalBytes)}), ${result.processedLength} bytes processed`,
          );
        }),
      ),
    );

  return rct;
}
