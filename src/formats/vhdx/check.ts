/**
 * `vhdx check`: every rule of MS-VHDX that can be verified on a file, as a structured report of
 * errors (the file is damaged) and warnings (recoverable: a stale copy, a log to replay). `repair`
 * replays the log in place and fixes what is safe to fix (see VhdxFile.repairStructures).
 */
import { TidemarkError } from '../../errors.js';
import { isZeroGuid } from '../../util/guid.js';
import { bitmapBatIndex, chunkSpans, decodeBatEntry, type BatEntry } from './bat.js';
import { isAllZero } from '../../util/zero.js';
import { BlockState, HEADER_OFFSETS, MiB, REGION_TABLE_OFFSETS, SB_NOT_PRESENT, SB_PRESENT } from './constants.js';
import { locatorGet } from './metadata.js';
import { describeEntry, describeProblems, describeSpan, lowWords } from './placement.js';
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
      // Another format is the command's error (NOT_SUPPORTED), not a finding.
      if (!(err instanceof TidemarkError) || err.code === 'NOT_SUPPORTED') throw err;
      report.repaired.push(`nothing repaired: ${err.message}`);
    }
  }

  let disk: VhdxFile;
  try {
    disk = await VhdxFile.open(path, { noParent: true });
  } catch (err) {
    // A file that cannot be read at all has no findings: that is an error of the command itself.
    if (!(err instanceof TidemarkError) || ['NOT_FOUND', 'IO_ERROR', 'NOT_SUPPORTED'].includes(err.code)) throw err;
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

  // Structures: inside the file, clear of each other (the BAT, metadata and log were checked at open).
  const spans = disk.placement.spans;
  for (const s of spans) {
    if (s.start > 0 && s.end > disk.fileSize) {
      add({
        severity: 'error',
        code: 'REGION_BEYOND_EOF',
        structure: s.name.replace(/^the /, ''),
        offset: s.start,
        message: `${describeSpan(s)} extends past the end of the file (${disk.fileSize} bytes)`,
      });
    }
  }
  for (let a = 0; a < spans.length; a++) {
    for (let b = a + 1; b < spans.length && spans[b].start < spans[a].end; b++) {
      add({
        severity: 'error',
        code: 'OVERLAP',
        structure: spans[b].name.replace(/^the /, ''),
        offset: spans[b].start,
        message: `${describeSpan(spans[b])} overlaps ${describeSpan(spans[a])}`,
      });
    }
  }
  for (const p of disk.placement.structureProblems) {
    if (p.kind === 'past-eof') continue; // REGION_BEYOND_EOF above
    add({
      severity: 'error',
      code: p.kind === 'bat-cut' ? 'BAT_TRUNCATED' : 'REGION_BEYOND_LIMIT',
      structure: 'region table',
      message: p.message,
    });
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

  await checkEntries(disk, add);
  checkPlacement(disk, add);
}

/** States and reserved bits of every BAT entry, read in 1 MiB pieces. */
async function checkEntries(disk: VhdxFile, add: (f: Finding) => void): Promise<void> {
  const g = disk.geometry;
  const batAt = (i: number) => disk.batRegion.fileOffset + i * 8;
  const partialChunks = new Set<number>();
  const piece = Buffer.alloc(Math.min(MiB, g.batEntries * 8));
  const lows = lowWords(piece);
  let chunk = 0;
  let pos = 0; // index = chunk * (chunkRatio + 1) + pos
  for (let first = 0; first < g.batEntries; first += MiB / 8) {
    const view = piece.subarray(0, Math.min(MiB / 8, g.batEntries - first) * 8);
    await disk.readBatRaw(view, first);
    const n = view.length / 8;
    if (isAllZero(view)) {
      // A piece of a sparse disk's BAT: only a missing sector bitmap of a chunk begun earlier can be wrong.
      for (const span of chunkSpans(g, first, n)) {
        if (span.to > g.chunkRatio && span.chunk < g.bitmapBlocks && partialChunks.has(span.chunk))
          checkBitmapEntry(disk, span.chunk, bitmapBatIndex(g, span.chunk), decodeBatEntry(0, 0), true, add);
      }
      chunk = Math.floor((first + n) / (g.chunkRatio + 1));
      pos = first + n - chunk * (g.chunkRatio + 1);
      continue;
    }
    for (let k = 0; k < n; k++, pos === g.chunkRatio ? ((pos = 0), chunk++) : pos++) {
      const lo = lows ? lows[2 * k] : view.readUInt32LE(k * 8);
      const hi = view.readUInt32LE(k * 8 + 4);
      const i = first + k;
      if (pos === g.chunkRatio) {
        if (chunk < g.bitmapBlocks && (lo !== 0 || hi !== 0 || partialChunks.has(chunk)))
          checkBitmapEntry(disk, chunk, i, decodeBatEntry(lo, hi), partialChunks.has(chunk), add);
        continue;
      }
      if (lo === 0) continue; // NOT_PRESENT, no reserved bits
      const b = chunk * g.chunkRatio + pos;
      if (b >= g.dataBlocks) continue;
      const e = decodeBatEntry(lo, hi);
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
        partialChunks.add(chunk);
      }
    }
  }
}

function checkBitmapEntry(
  disk: VhdxFile,
  c: number,
  i: number,
  e: BatEntry,
  hasPartialBlocks: boolean,
  add: (f: Finding) => void,
): void {
  const at = disk.batRegion.fileOffset + i * 8;
  if (e.state !== SB_NOT_PRESENT && e.state !== SB_PRESENT) {
    add({
      severity: 'error',
      code: 'SB_UNKNOWN_STATE',
      structure: 'BAT entry',
      offset: at,
      message: `sector bitmap ${c}: unknown state ${e.state}`,
    });
  } else if (e.state === SB_PRESENT && !disk.params.hasParent) {
    add({
      severity: 'error',
      code: 'SB_PRESENT_WITHOUT_PARENT',
      structure: 'BAT entry',
      offset: at,
      message: `sector bitmap ${c}: present in a disk without a parent (never read); --repair sets it to NOT_PRESENT`,
    });
  } else if (e.state === SB_NOT_PRESENT && hasPartialBlocks) {
    add({
      severity: 'error',
      code: 'SB_MISSING',
      structure: 'BAT entry',
      offset: at,
      message: `sector bitmap ${c} is not present but blocks of its chunk are partially present`,
    });
  }
}

/** Every allocated entry whose space is not its own (found by the open's scan), and the truncation. */
function checkPlacement(disk: VhdxFile, add: (f: Finding) => void): void {
  const p = disk.placement;
  const size = disk.fileSize;
  for (const d of p.listed) {
    const e = d.entry;
    const what = `${describeEntry(e)} (BAT entry ${e.index}) at file offset ${e.offset}`;
    const repair = d.lost
      ? e.bitmap
        ? 'NOT_PRESENT with the partially present blocks of its chunk'
        : disk.params.hasParent
          ? 'NOT_PRESENT (it reads from the parent)'
          : 'ZERO'
      : undefined;
    const hint = repair
      ? `; --repair sets it to ${repair}`
      : '; --repair moves it to new space with a copy of the bytes that are its own';
    for (const x of d.problems) {
      const code =
        x.kind === 'eof'
          ? e.bitmap
            ? 'SB_OFFSET_INVALID'
            : 'BAT_BEYOND_EOF'
          : x.kind === 'limit' || (x.kind === 'structure' && x.span.start === 0)
            ? e.bitmap
              ? 'SB_OFFSET_INVALID'
              : 'BAT_OFFSET_INVALID'
            : 'OVERLAP';
      add({
        severity: 'error',
        code,
        structure: 'BAT entry',
        offset: disk.batRegion.fileOffset + e.index * 8,
        message: `${what} ${describeProblems({ ...d, problems: [x] }, size)}${hint}`,
      });
    }
  }
  if (p.damagedCount > p.listed.length) {
    add({
      severity: 'warning',
      code: 'MORE_FINDINGS',
      structure: 'report',
      message: `${p.damagedCount - p.listed.length} more damaged BAT entries not examined one by one`,
    });
  }
  if (p.truncated.entries > 0) {
    const blocks = p.listed
      .filter((d) => d.problems.some((x) => x.kind === 'eof'))
      .slice(0, 10)
      .map((d) => describeEntry(d.entry));
    const more = p.truncated.entries > blocks.length ? `, and ${p.truncated.entries - blocks.length} more` : '';
    add({
      severity: 'error',
      code: 'FILE_TRUNCATED',
      structure: 'file',
      message: `the file is ${size} bytes but its BAT references data up to ${p.truncated.end} (${p.truncated.end - size} bytes missing): ${p.truncated.entries} entries lie past its end (${blocks.join(', ')}${more}); reads of the missing bytes fail; --repair keeps what exists and makes the rest read zeros (the missing data is lost)`,
    });
  }
}
