/** `tidemark vhdx ...`: the offline VHDX tools. */
import path from 'node:path';
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../errors.js';
import { checkVhdx, type CheckReport } from '../formats/vhdx/check.js';
import { convertDisk } from '../tracking/convert.js';
import { createVhdx } from '../formats/vhdx/create.js';
import { vhdxInfo, type VhdxInfo } from '../formats/vhdx/info.js';
import { VhdxFile, type OpenOptions } from '../formats/vhdx/vhdx.js';
import { mergeWithTracking } from '../tracking/merge.js';
import { ChangeTracker, DEFAULT_GRANULARITY } from '../tracking/tracker.js';
import { formatSize, parseSize } from '../util/size.js';
import { readRange, writeFromInput } from './disk-io.js';
import { EXIT, printJson, println, progressReporter } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** --allow-dir and --map: where parents may be opened from, and how Windows paths map to this host. */
function withParentOptions(cmd: Command): Command {
  return cmd
    .option(
      '--allow-dir <dir>',
      "a directory parent disks may be opened from (repeatable; default: the disk's own directory)",
      collect,
    )
    .option(
      '--map <prefix=dir>',
      'map a Windows drive, volume or share to a directory, e.g. D:=/mnt/d (repeatable)',
      collect,
    );
}

function parentOptions(
  o: { allowDir?: string[]; map?: string[] },
  diskPath: string,
): Pick<OpenOptions, 'allowedRoots' | 'pathMap'> {
  const pathMap: Record<string, string> = {};
  for (const m of o.map ?? []) {
    const eq = m.indexOf('=');
    if (eq <= 0) throw new InvalidArgumentError(`--map ${m}: expected PREFIX=DIR, e.g. D:=/mnt/d`);
    pathMap[m.slice(0, eq)] = path.resolve(m.slice(eq + 1));
  }
  const roots = o.allowDir
    ? [path.dirname(path.resolve(diskPath)), ...o.allowDir.map((d) => path.resolve(d))]
    : undefined;
  return { allowedRoots: roots, pathMap };
}

function sectorOption(flag: string, description: string): Option {
  return new Option(flag, description).choices(['512', '4096']);
}

export function vhdxCommand(run: Run): Command {
  const vhdx = new Command('vhdx').description(
    'create, inspect, check, convert, merge, read and write VHDX files (offline)',
  );

  vhdx
    .command('create')
    .description('create a fixed, dynamic or differencing VHDX')
    .argument('<path>', 'the new file (must not exist)')
    .option('--size <size>', 'virtual size: 512, 64K, 32M, 10G, 2T (up to 64T)')
    .addOption(new Option('--type <type>', 'disk type').choices(['dynamic', 'fixed']))
    .option(
      '--block-size <size>',
      'payload block size, a power of two from 1M to 256M (default 32M; 2M for differencing)',
    )
    .addOption(sectorOption('--logical-sector <bytes>', 'logical sector size (default 512)'))
    .addOption(sectorOption('--physical-sector <bytes>', 'physical sector size (default 4096)'))
    .option('--parent <path>', 'create a differencing disk over this parent')
    .option('--json', "print the new disk's info as JSON")
    .action((file: string, o) =>
      run(async () => {
        if (!o.parent && o.size === undefined)
          throw new InvalidArgumentError('give --size SIZE, or --parent PATH for a differencing disk');
        await createVhdx(file, {
          size: o.size !== undefined ? parseSize(o.size, '--size') : undefined,
          type: o.type,
          blockSize: o.blockSize !== undefined ? parseSize(o.blockSize, '--block-size') : undefined,
          logicalSectorSize: o.logicalSector ? (Number(o.logicalSector) as 512 | 4096) : undefined,
          physicalSectorSize: o.physicalSector ? (Number(o.physicalSector) as 512 | 4096) : undefined,
          parent: o.parent,
        });
        const info = await vhdxInfo(file);
        if (o.json) printJson(info);
        else
          println(
            `created ${info.type} VHDX ${file}: ${formatSize(info.virtualSize)}, ${formatSize(info.blockSize)} blocks, ${info.logicalSectorSize}/${info.physicalSectorSize}-byte sectors${o.parent ? `, parent ${path.resolve(o.parent)}` : ''}`,
          );
      }),
    );

  withParentOptions(
    vhdx
      .command('info')
      .description('headers, regions, metadata, parent locator, BAT histogram and chain')
      .argument('<path>')
      .option('--json', 'machine-readable output (stable; see docs/cli.md)'),
  ).action((file: string, o) =>
    run(async () => {
      const info = await vhdxInfo(file, parentOptions(o, file));
      if (o.json) printJson(info);
      else printInfo(info);
    }),
  );

  withParentOptions(
    vhdx
      .command('check')
      .description('verify every rule of the format; exit status 1 when errors are found')
      .argument('<path>')
      .option('--repair', 'replay the log and fix what is safe to fix (headers, region table copy, reserved bits)')
      .option('--json', 'machine-readable report'),
  ).action((file: string, o) =>
    run(async () => {
      const report = await checkVhdx(file, { repair: !!o.repair, ...parentOptions(o, file) });
      if (o.json) printJson(report);
      else printCheck(report);
      return report.ok ? EXIT.OK : EXIT.FAILED;
    }),
  );

  withParentOptions(
    vhdx
      .command('convert')
      .description(
        'between VHDX, VHD and raw in any direction; VHDX → VHDX compacts, changes block size or type, flattens a chain',
      )
      .argument(
        '<src>',
        'a VHDX or VHD (a differencing disk is read through its chain) or a raw image; other formats (qcow2, VMDK, ...) are recognised and refused',
      )
      .argument('<dst>', 'the new file (must not exist)')
      .addOption(
        new Option(
          '--source-format <format>',
          'read the source as this format instead of recognising it by its magic (raw: copy any file byte for byte)',
        ).choices(['vhdx', 'vhd', 'raw']),
      )
      .addOption(
        new Option(
          '--format <format>',
          'output format (default: from the extension: .vhdx/.avhdx → vhdx, .vhd/.avhd → vhd, else raw)',
        ).choices(['vhdx', 'vhd', 'raw']),
      )
      .addOption(new Option('--type <type>', 'VHDX output type (default dynamic)').choices(['dynamic', 'fixed']))
      .option('--block-size <size>', "VHDX output block size (default: the source's, else 32M)")
      .addOption(
        sectorOption('--logical-sector <bytes>', "VHDX output logical sector size (default: the source's, else 512)"),
      )
      .option('--track', 'enable change tracking on the new VHDX (.rct/.mrt beside it)')
      .option('--granularity <size>', 'change tracking granularity with --track (default 256K)')
      .option('--json', 'machine-readable summary'),
  ).action((src: string, dst: string, o) =>
    run(async () => {
      const progress = progressReporter('converting');
      if (o.granularity !== undefined && !o.track) throw new InvalidArgumentError('--granularity goes with --track');
      const result = await convertDisk(src, dst, {
        sourceFormat: o.sourceFormat,
        format: o.format,
        type: o.type,
        blockSize: o.blockSize !== undefined ? parseSize(o.blockSize, '--block-size') : undefined,
        logicalSectorSize: o.logicalSector ? (Number(o.logicalSector) as 512 | 4096) : undefined,
        onProgress: (d, t) => progress.update(d, t),
        track: o.track
          ? { granularity: o.granularity ? parseSize(o.granularity, '--granularity') : DEFAULT_GRANULARITY }
          : undefined,
        ...parentOptions(o, src),
      });
      progress.end();
      if (o.json) printJson(result);
      else
        println(
          `converted ${result.sourceFormat} ${src} → ${result.format} ${dst}: ${formatSize(result.virtualSize)} virtual, ${formatSize(result.bytesWritten)} written, ${formatSize(result.bytesSkipped)} skipped (unallocated or zero)`,
        );
    }),
  );

  withParentOptions(
    vhdx
      .command('merge')
      .description('merge a differencing disk into its parent, then delete it (crash-safe: run again to finish)')
      .argument('<child>')
      .option('--json', 'machine-readable summary'),
  ).action((child: string, o) =>
    run(async () => {
      const progress = progressReporter('merging');
      const result = await mergeWithTracking(child, {
        ...parentOptions(o, child),
        onProgress: (d, t) => progress.update(d, t),
      });
      progress.end();
      if (o.json) printJson(result);
      else
        println(
          `merged ${child} into ${result.parentPath}: ${formatSize(result.bytesCopied)} copied, ${formatSize(result.bytesZeroed)} zeroed, ${result.blocks} blocks`,
        );
    }),
  );

  withParentOptions(
    vhdx
      .command('read')
      .description('read a byte range of the virtual disk (through its chain) to a file or stdout')
      .argument('<path>')
      .requiredOption('--offset <n>', 'byte offset (a size like 1M is accepted)')
      .requiredOption('--length <n>', 'byte count')
      .option('--output <file>', 'write here instead of stdout'),
  ).action((file: string, o) =>
    run(async () => {
      const offset = parseSize(o.offset, '--offset');
      const length = parseSize(o.length, '--length');
      const disk = await VhdxFile.open(file, parentOptions(o, file));
      try {
        await readRange(disk, offset, length, o.output);
      } finally {
        await disk.close();
      }
    }),
  );

  withParentOptions(
    vhdx
      .command('write')
      .description(
        'write bytes from a file or stdin into the virtual disk at an offset, then flush (tracked when tracking is enabled)',
      )
      .argument('<path>')
      .requiredOption('--offset <n>', 'byte offset (a size like 1M is accepted)')
      .option('--input <file>', 'read from here instead of stdin'),
  ).action((file: string, o) =>
    run(async () => {
      const offset = parseSize(o.offset, '--offset');
      const disk = await VhdxFile.open(file, { writable: true, ...parentOptions(o, file) });
      let written: number;
      try {
        disk.checkWritable(); // a damaged disk is refused before anything, tracking files included
        await ChangeTracker.attach(disk, { writable: true }); // a tracked disk records these writes
        written = await writeFromInput(disk, offset, o.input);
      } finally {
        await disk.close();
      }
      process.stderr.write(`wrote ${written} bytes at offset ${offset}\n`);
    }),
  );

  return vhdx;
}

function printInfo(info: VhdxInfo): void {
  println(`${info.path}: ${info.type} VHDX, created by "${info.creator}"`);
  println(`  virtual size      ${formatSize(info.virtualSize)} (${info.virtualSize} bytes)`);
  println(`  file size         ${formatSize(info.fileSize)}`);
  println(`  block size        ${formatSize(info.blockSize)}`);
  println(`  sectors           ${info.logicalSectorSize} logical / ${info.physicalSectorSize} physical`);
  println(`  virtual disk id   ${info.virtualDiskId}`);
  for (const h of info.headers) {
    if (!h.valid) println(`  header ${h.slot}          INVALID: ${'problem' in h ? h.problem : ''}`);
    else if ('sequenceNumber' in h)
      println(
        `  header ${h.slot}${h.current ? ' (current)' : '          '} seq ${h.sequenceNumber}, data write ${h.dataWriteGuid}, log ${h.logGuid}`,
      );
  }
  for (const t of info.regionTables) {
    if (!t.valid) println(`  region table ${t.copy}    INVALID: ${'problem' in t ? t.problem : ''}`);
    else if ('entries' in t)
      println(
        `  region table ${t.copy}    ${t.entries!.map((e) => `${e.name}@${e.fileOffset}+${formatSize(e.length)}${e.required ? '' : ' (optional)'}`).join(', ')}`,
      );
  }
  println(
    `  log               ${formatSize(info.log.length)} at ${info.log.offset}${info.log.replayed ? `, ${info.log.replayed.entries} entries replayed in memory` : ', empty'}`,
  );
  println(`  metadata items    ${info.metadata.items.map((m) => m.name).join(', ')}`);
  if (info.parentLocator) {
    for (const [k, v] of Object.entries(info.parentLocator.entries)) println(`  locator ${k.padEnd(20)} ${v}`);
  }
  const states = Object.entries(info.bat.payload)
    .map(([k, v]) => `${k} ${v}`)
    .join(', ');
  println(
    `  BAT               ${info.bat.entries} entries; payload blocks: ${states}; allocated ${formatSize(info.bat.allocatedBytes)}`,
  );
  info.chain.forEach((c, i) => {
    if (c.error) println(`  chain[${i}]          ${c.path}: ${c.error.code}: ${c.error.message}`);
    else println(`  chain[${i}]          ${c.path} (${c.type}${c.foundBy ? `, parent found by ${c.foundBy}` : ''})`);
  });
  for (const w of info.warnings) println(`  warning: ${w}`);
}

function printCheck(r: CheckReport): void {
  for (const f of r.repaired) println(`repaired: ${f}`);
  for (const f of r.errors) println(`error   ${f.code}: ${f.message}`);
  for (const f of r.warnings) println(`warning ${f.code}: ${f.message}`);
  println(
    `${r.path}: ${r.ok ? 'no errors' : `${r.errors.length} error(s)`}${r.warnings.length ? `, ${r.warnings.length} warning(s)` : ''}`,
  );
}
