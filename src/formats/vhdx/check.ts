/**
 * `vhdx check`: every rule of MS-VHDX that can be verified on a file, as a structured report of
 * errors (the file is damaged) and warnings (recoverable: a stale copy, a log to replay). `repair`
 * replays the log in place and fixes what is safe to fix (see VhdxFile.repairStructures).
 */
import { TidemarkError } from '../../errors.js';
import { isZeroGuid } from '../../util/guid.js';
import { bitmapBatIndex, payloadBatIndex } from './bat.js';
import {
  BlockState,
  HEADER_OFFSETS,
  HEADER_SECTION_SIZE,
  MiB,
  REGION_TABLE_OFFSETS,
  SB_NOT_PRESENT,
  SB_PRESENT,
} from './constants.js';
import { locatorGet } from './metadata.js';
import { VhdxFile, type OpenOptions } from './vhdx.js';

export interface Finding {
  severity: 'error' | 'warning';
  code: string;
  structure: string;
  offset?: number;
  message: string;
}

export interface CheckReport {
  path: string;
  ok: boolean;
  errors: Finding[];
  warnings: Finding[];
  repaired: string[];
}

export interface CheckOptions extends Pick<OpenOptions, 'allowedRoots' | 'pathMap'> {
  repair?: boolean;
}

/** Caps findings of one kind so a wholly corrupt BAT gives a readable report. */
const MAX_PER_CODE = 20;

export async function checkVhdx(path: string, opts: CheckOptions = {}): Promise<CheckReport> {
  const report: CheckReport = { path, ok: true, errors: [], warnings: [], repaired: [] };
  const counts = new Map<string, number>();
  const add = (f: Finding) => {
    const n = (counts.get(f.code) ?? 0) + 1;
    counts.set(f.code, n);
    if (n <= MAX_PER_CODE) (f.severity === 'error' ? report.errors : report.warnings).push(f);
  };

  if (opts.repair) {
    try {
      const w = await VhdxFile.open(path, { writable: true, noParent: true });
      try {
        if (w.replay) report.repaired.push(`log replayed (${w.replay.entries} entries)`);
        report.repaired.push(...(await w.repairStructures()));
      } finally {
        await w.close();
      }
    } catch (err) {
      if (!(err instanceof TidemarkError)) throw err;
      report.repaired.push(`nothing repaired: ${err.message}`);
    }
  }

  let disk: VhdxFile;
  try {
    disk = await VhdxFile.open(path, { noParent: true });
  } catch (err) {
    // A file that cannot be read at all has no findings: that is an error of the command itself.
    if (!(err instanceof TidemarkError) || err.code === 'NOT_FOUND' || err.code === 'IO_ERROR') throw err;
    const d = err.details as { structure?: string; offset?: number };
    add({
      severity: 'error',
      code: err.code,
      structure: d.structure ?? 'file',
      offset: d.offset,
      message: err.message,
    });
    report.ok = false;
    return report;
  }
  try {
    await checkOpened(disk, add);
  } finally {
    await disk.close();
  }
  if (disk.params.hasParent) {
    try {
      const chain = await VhdxFile.open(path, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
      await chain.close();
    } catch (err) {
      if (!(err instanceof TidemarkError)) throw err;
      add({ severity: 'error', code: err.code, structure: 'parent locator', message: err.message });
    }
  }
  for (const [code, n] of counts) {
    if (n > MAX_PER_CODE)
      add({
        severity: 'warning',
        code: 'MORE_FINDINGS',
        structure: 'report',
        message: `${n - MAX_PER_CODE} more ${code} findings not listed`,
      });
  }
  report.ok = report.errors.length === 0;
  return report;
}

async function checkOpened(disk: VhdxFile, add: (f: Finding) => void): Promise<void> {
  const h = disk.header;
  disk.headerSlots.forEach((slot, i) => {
    if (typeof slot === 'string') {
      add({
        severity: 'warning',
        code: 'HEADER_INVALID',
        structure: `header ${i + 1}`,
        offset: HEADER_OFFSETS[i],
        message: `header ${i + 1} is invalid (${slot}); --repair rewrites it`,
      });
    }
  });
  disk.regionTables.forEach((t, i) => {
    if (typeof t === 'string') {
      add({
        severity: 'warning',
        code: 'REGION_TABLE_INVALID',
        structure: `region table ${i + 1}`,
        offset: REGION_TABLE_OFFSETS[i],
        message: `region table ${i + 1} is invalid (${t}); --repair rewrites it`,
      });
    }
  });
  const [t1, t2] = disk.regionTables;
  if (typeof t1 !== 'string' && typeof t2 !== 'string' && t1.checksum !== t2.checksum) {
    add({
      severity: 'warning',
      code: 'REGION_TABLES_DIFFER',
      structure: 'region table 2',
      offset: REGION_TABLE_OFFSETS[1],
      message: 'the two region table copies differ; --repair rewrites copy 2',
    });
  }
  if (!isZeroGuid(h.logGuid)) {
    add({
      severity: 'warning',
      code: 'LOG_NOT_EMPTY',
      structure: 'log',
      offset: h.logOffset,
      message: `the log holds ${disk.replay?.entries ?? 0} entries to replay (the file was not closed cleanly); --repair replays them`,
    });
  }
  if (disk.fileSize % MiB !== 0) {
    add({
      severity: 'warning',
      code: 'FILE_SIZE_UNALIGNED',
      structure: 'file',
      message: `file size ${disk.fileSize} is not a multiple of 1 MiB`,
    });
  }

  // Structures that must not overlap: header section, log, regions, then every allocated block.
  const spans: { start: number; end: number; what: string }[] = [
    { start: 0, end: HEADER_SECTION_SIZE, what: 'header section' },
    { start: disk.batRegion.fileOffset, end: disk.batRegion.fileOffset + disk.batRegion.length, what: 'BAT region' },
    {
      start: disk.metadataRegion.fileOffset,
      end: disk.metadataRegion.fileOffset + disk.metadataRegion.length,
      what: 'metadata region',
    },
  ];
  if (h.logLength > 0) spans.push({ start: h.logOffset, end: h.logOffset + h.logLength, what: 'log' });
  for (const s of spans.slice(1)) {
    if (s.end > disk.fileSize) {
      add({
        severity: 'error',
        code: 'REGION_BEYOND_EOF',
        structure: s.what,
        offset: s.start,
        message: `${s.what} [${s.start}, ${s.end}) extends past the end of the file (${disk.fileSize} bytes)`,
      });
    }
  }
  if (disk.params.hasParent) {
    const loc = disk.parentLocator!;
    if (!['relative_path', 'volume_path', 'absolute_win32_path'].some((k) => locatorGet(loc, k) !== undefined)) {
      add({
        severity: 'error',
        code: 'LOCATOR_NO_PATH',
        structure: 'parent locator',
        message: 'the parent locator has no relative_path, volume_path or absolute_win32_path',
      });
    }
  } else if (disk.parentLocator) {
    add({
      severity: 'warning',
      code: 'LOCATOR_WITHOUT_PARENT',
      structure: 'parent locator',
      message: 'a parent locator is present but HasParent is not set',
    });
  }

  const g = disk.geometry;
  const batAt = (i: number) => disk.batRegion.fileOffset + i * 8;
  const partialChunks = new Set<number>();
  for (let b = 0; b < g.dataBlocks; b++) {
    const i = payloadBatIndex(g, b);
    const e = await disk.batEntry(i);
    if (e.reservedBits)
      add({
        severity: 'error',
        code: 'BAT_RESERVED_BITS',
        structure: 'BAT entry',
        offset: batAt(i),
        message: `block ${b}: reserved bits set (0x${e.reservedBits.toString(16)}); --repair clears them`,
      });
    if (![0, 1, 2, 3, 6, 7].includes(e.state)) {
      add({
        severity: 'error',
        code: 'BAT_UNKNOWN_STATE',
        structure: 'BAT entry',
        offset: batAt(i),
        message: `block ${b}: unknown state ${e.state}`,
      });
      continue;
    }
    if (e.state === BlockState.PartiallyPresent) {
      if (!disk.params.hasParent)
        add({
          severity: 'error',
          code: 'BAT_PARTIAL_WITHOUT_PARENT',
          structure: 'BAT entry',
          offset: batAt(i),
          message: `block ${b}: partially present in a disk without a parent`,
        });
      partialChunks.add(Math.floor(b / g.chunkRatio));
    }
    if (e.state === BlockState.FullyPresent || e.state === BlockState.PartiallyPresent) {
      spans.push({ start: e.offset, end: e.offset + g.blockSize, what: `block ${b}` });
      if (e.offset < HEADER_SECTION_SIZE) {
        add({
          severity: 'error',
          code: 'BAT_OFFSET_INVALID',
          structure: 'BAT entry',
          offset: batAt(i),
          message: `block ${b}: file offset ${e.offset} lies in the header section`,
        });
      } else if (e.offset + Math.min(g.blockSize, disk.virtualSize - b * g.blockSize) > disk.fileSize) {
        add({
          severity: 'error',
          code: 'BAT_BEYOND_EOF',
          structure: 'BAT entry',
          offset: batAt(i),
          message: `block ${b}: data at ${e.offset} extends past the end of the file (${disk.fileSize} bytes)`,
        });
      }
    }
  }
  for (let c = 0; c < g.bitmapBlocks; c++) {
    const i = bitmapBatIndex(g, c);
    if (i >= g.batEntries) break;
    const e = await disk.batEntry(i);
    if (e.state !== SB_NOT_PRESENT && e.state !== SB_PRESENT) {
      add({
        severity: 'error',
        code: 'SB_UNKNOWN_STATE',
        structure: 'BAT entry',
        offset: batAt(i),
        message: `sector bitmap ${c}: unknown state ${e.state}`,
      });
      continue;
    }
    if (e.state === SB_PRESENT) {
      if (!disk.params.hasParent)
        add({
          severity: 'error',
          code: 'SB_PRESENT_WITHOUT_PARENT',
          structure: 'BAT entry',
          offset: batAt(i),
          message: `sector bitmap ${c}: present in a disk without a parent`,
        });
      spans.push({ start: e.offset, end: e.offset + MiB, what: `sector bitmap ${c}` });
      if (e.offset < HEADER_SECTION_SIZE || e.offset + MiB > disk.fileSize) {
        add({
          severity: 'error',
          code: 'SB_OFFSET_INVALID',
          structure: 'BAT entry',
          offset: batAt(i),
          message: `sector bitmap ${c}: file offset ${e.offset} lies outside the file`,
        });
      }
    } else if (partialChunks.has(c)) {
      add({
        severity: 'error',
        code: 'SB_MISSING',
        structure: 'BAT entry',
        offset: batAt(i),
        message: `sector bitmap ${c} is not present but blocks of its chunk are partially present`,
      });
    }
  }
  spans.sort((a, b) => a.start - b.start);
  for (let k = 1; k < spans.length; k++) {
    const prev = spans[k - 1];
    const cur = spans[k];
    if (cur.start < prev.end) {
      add({
        severity: 'error',
        code: 'OVERLAP',
        structure: cur.what,
        offset: cur.start,
        message: `${cur.what} at ${cur.start} overlaps ${prev.what} [${prev.start}, ${prev.end})`,
      });
    }
  }
}
