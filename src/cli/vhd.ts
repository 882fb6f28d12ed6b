/** `tidemark vhd ...`: the offline tools for legacy VHD files, with the verbs and options of `tidemark vhdx`. */
import path from 'node:path';
import { Command, Option } from 'commander';
import { InvalidArgumentError } from '../errors.js';
import { checkVhd } from '../formats/vhd/check.js';
import { convertDisk } from '../tracking/convert.js';
import { createVhd } from '../formats/vhd/create.js';
import { vhdInfo, type VhdInfo } from '../formats/vhd/info.js';
import { mergeVhd } from '../formats/vhd/merge.js';
import { VhdFile, type VhdOpenOptions } from '../formats/vhd/vhd.js';
import type { CheckReport } from '../formats/vhdx/check.js';
import { formatSize, parseSize } from '../util/size.js';
import { readRange, writeFromInput } from './disk-io.js';
import { EXIT, printJson, println, progressReporter } from './output.js';

type Run = (fn: () => Promise<number | void>) => Promise<void>;

function collect(value: string, previous: string[] = []): string[] {
  return [...previous, value];
}

/** --allow-dir and --map, as `tidemark vhdx` has them: where parents may be opened from, Windows paths mapped. */
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
): Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'> {
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

const BLOCK_SIZE_HELP = '512K, 1M or 2M (default 2M; a differencing disk takes its parent’s)';

export function vhdCommand(run: Run): Command {
  const vhd = new Command('vhd').description(
    'create, inspect, check, convert, merge, read and write legacy VHD files (offline)',
  );

  withParentOptions(
    vhd
      .command('create')
      .description('create a fixed, dynamic or differencing VHD')
      .argument('<path>', 'the new file (must not exist)')
      .option('--size <size>', 'virtual size, a multiple of 512: 64K, 32M, 10G, 2T (up to 2040G)')
      .addOption(new Option('--type <type>', 'disk type (default dynamic)').choices(['dynamic', 'fixed']))
      .option('--block-size <size>', BLOCK_SIZE_HELP)
      .option(
        '--chs-size',
        'round the size up to a whole CHS geometry, so tools that size a VHD by its geometry (Virtual PC, qemu-img) see all of it',
      )
      .option('--parent <path>', 'create a differencing disk over this parent (a VHD)')
      .option('--json', "print the new disk's info as JSON"),
  ).action((file: string, o) =>
    run(async () => {
      if (!o.parent && o.size === undefined)
        throw new InvalidArgumentError('give --size SIZE, or --parent PATH for a differencing disk');
      if (o.parent && o.chsSize)
        throw new InvalidArgumentError('a differencing disk takes its geometry from the parent');
      await createVhd(file, {
        size: o.size !== undefined ? parseSize(o.size, '--size') : undefined,
        type: o.type,
        blockSize: o.blockSize !== undefined ? parseSize(o.blockSize, '--block-size') : undefined,
        chsAligned: !!o.chsSize,
        parent: o.parent,
        parentOpenOptions: o.parent ? parentOptions(o, o.parent) : undefined,
      });
      const info = await vhdInfo(file, parentOptions(o, file));
      if (o.json) printJson(info);
      else
        println(
          `created ${info.type} VHD ${file}: ${formatSize(info.virtualSize)}${info.blockSize ? `, ${formatSize(info.blockSize)} blocks` : ''}${o.parent ? `, parent ${path.resolve(o.parent)}` : ''}`,
        );
    }),
  );

  withParentOptions(
    vhd
      .command('info')
      .description('footers, dynamic header, parent locators, BAT allocation and chain')
      .argument('<path>')
      .option('--json', 'machine-readable output (stable; see docs/cli.md)'),
  ).action((file: string, o) =>
    run(async () => {
      const info = await vhdInfo(file, parentOptions(o, file));
      if (o.json) printJson(info);
      else printInfo(info);
    }),
  );

  withParentOptions(
    vhd
      .command('check')
      .description('verify every rule of the format; exit status 1 when errors are found')
      .argument('<path>')
      .option('--repair', 'restore a lost or damaged footer copy (at offset 0 or at the end) from the other')
      .option('--json', 'machine-readable report'),
  ).action((file: string, o) =>
    run(async () => {
      const report = await checkVhd(file, { repair: !!o.repair, ...parentOptions(o, file) });
      if (o.json) printJson(report);
      else printCheck(report);
      return report.ok ? EXIT.OK : EXIT.FAILED;
    }),
  );

  withParentOptions(
    vhd
      .command('convert')
      .description('between VHD, VHDX and raw, any direction (compact, change block size or type, flatten a chain)')
      .argument('<src>', 'a VHD, a VHDX or a raw image (a differencing disk is read through its chain)')
      .argument('<dst>', 'the new file (must not exist)')
      .addOption(
        new Option(
          '--format <format>',
          'output format (default: from the extension: .vhd/.avhd → vhd, .vhdx/.avhdx → vhdx, else raw)',
        ).choices(['vhd', 'vhdx', 'raw']),
      )
      .addOption(new Option('--type <type>', 'VHD/VHDX output type (default dynamic)').choices(['dynamic', 'fixed']))
      .option('--block-size <size>', "output block size (default: the source's, else 2M for VHD, 32M for VHDX)")
      .option('--chs-size', 'VHD output: round the size up to a whole CHS geometry')
      .addOption(
        new Option(
          '--logical-sector <bytes>',
          "VHDX output logical sector size (default: the source's, else 512)",
        ).choices(['512', '4096']),
      )
      .option('--json', 'machine-readable summary'),
  ).action((src: string, dst: string, o) =>
    run(async () => {
      const progress = progressReporter('converting');
      const result = await convertDisk(src, dst, {
        format: o.format,
        type: o.type,
        blockSize: o.blockSize !== undefined ? parseSize(o.blockSize, '--block-size') : undefined,
        chsAligned: !!o.chsSize,
        logicalSectorSize: o.logicalSector ? (Number(o.logicalSector) as 512 | 4096) : undefined,
        onProgress: (d, t) => progress.update(d, t),
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
    vhd
      .command('merge')
      .description('merge a differencing disk into its parent, then delete it (crash-safe: run again to finish)')
      .argument('<child>')
      .option('--json', 'machine-readable summary'),
  ).action((child: string, o) =>
    run(async () => {
      const progress = progressReporter('merging');
      const result = await mergeVhd(child, { ...parentOptions(o, child), onProgress: (d, t) => progress.update(d, t) });
      progress.end();
      if (o.json) printJson(result);
      else
        println(
          `merged ${child} into ${result.parentPath}: ${formatSize(result.bytesCopied)} copied, ${result.blocks} blocks`,
        );
    }),
  );

  withParentOptions(
    vhd
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
      const disk = await VhdFile.open(file, parentOptions(o, file));
      try {
        await readRange(disk, offset, length, o.output);
      } finally {
        await disk.close();
      }
    }),
  );

  withParentOptions(
    vhd
      .command('write')
      .description('write bytes from a file or stdin into the virtual disk at an offset, then flush')
      .argument('<path>')
      .requiredOption('--offset <n>', 'byte offset (a size like 1M is accepted)')
      .option('--input <file>', 'read from here instead of stdin'),
  ).action((file: string, o) =>
    run(async () => {
      const offset = parseSize(o.offset, '--offset');
      const disk = await VhdFile.open(file, { writable: true, ...parentOptions(o, file) });
      let written: number;
      try {
        written = await writeFromInput(disk, offset, o.input);
      } finally {
        await disk.close();
      }
      process.stderr.write(`wrote ${written} bytes at offset ${offset}\n`);
    }),
  );

  return vhd;
}

function printInfo(info: VhdInfo): void {
  println(
    `${info.path}: ${info.type} VHD, created by "${info.creator.application}" ${info.creator.version} (${info.creator.hostOs})`,
  );
  println(`  virtual size      ${formatSize(info.virtualSize)} (${info.virtualSize} bytes)`);
  println(
    `  CHS geometry      ${info.geometry.cylinders}/${info.geometry.heads}/${info.geometry.sectorsPerTrack} = ${info.geometry.bytes} bytes${info.qemuVirtualSize !== info.virtualSize ? ` (qemu-img -f vpc shows ${info.qemuVirtualSize})` : ''}`,
  );
  println(`  file size         ${formatSize(info.fileSize)}`);
  if (info.blockSize) println(`  block size        ${formatSize(info.blockSize)}`);
  println(`  unique id         ${info.uniqueId}`);
  println(`  time stamp        ${info.timeStamp}`);
  for (const f of info.footers) {
    if (!f.valid)
      println(`  footer (${f.where})${' '.repeat(7 - f.where.length)}INVALID: ${'problem' in f ? f.problem : ''}`);
    else println(`  footer (${f.where})${' '.repeat(7 - f.where.length)}at ${f.offset}${f.inUse ? ' (in use)' : ''}`);
  }
  if (info.dynamicHeader) {
    const h = info.dynamicHeader;
    println(
      `  BAT               ${h.maxTableEntries} entries at ${h.tableOffset}; ${info.bat!.allocatedBlocks} blocks allocated`,
    );
    if (info.type === 'differencing') {
      println(`  parent            "${h.parentName}", unique id ${h.parentUniqueId}, time stamp ${h.parentTimeStamp}`);
    }
  }
  for (const l of info.parentLocators) {
    println(`  locator ${l.index} ${l.platform.padEnd(9)} ${'value' in l ? l.value : `UNUSABLE: ${l.problem}`}`);
  }
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
