/**
 * `vhd check`: the rules of the VHD specification that can be verified on a file, as a structured
 * report of errors (the file is damaged) and warnings (recoverable, or odd but readable), in the same
 * shape as `vhdx check`. `repair` restores a lost or damaged footer copy (at offset 0 or at the end)
 * from the other one: a writable open does it, so a disk whose BAT is damaged is not repaired.
 */
import { TidemarkError } from '../../errors.js';
import type { CheckReport, Finding } from '../vhdx/check.js';
import { FEATURE_RESERVED, FOOTER_SIZE, MAX_CHS_SECTORS, NO_OFFSET, SECTOR, fourCC } from './constants.js';
import { chsSectors } from './geometry.js';
import { VhdFile, type VhdOpenOptions } from './vhd.js';

export type { CheckReport, Finding };

export interface VhdCheckOptions extends Pick<VhdOpenOptions, 'allowedRoots' | 'pathMap'> {
  repair?: boolean;
}

/** Caps findings of one kind so a wholly corrupt BAT gives a readable report. */
const MAX_PER_CODE = 20;

export async function checkVhd(path: string, opts: VhdCheckOptions = {}): Promise<CheckReport> {
  const report: CheckReport = { path, ok: true, errors: [], warnings: [], repaired: [] };
  const counts = new Map<string, number>();
  const add = (f: Finding) => {
    const n = (counts.get(f.code) ?? 0) + 1;
    counts.set(f.code, n);
    if (n <= MAX_PER_CODE) (f.severity === 'error' ? report.errors : report.warnings).push(f);
  };

  if (opts.repair) {
    try {
      const w = await VhdFile.open(path, { writable: true, noParent: true, keepTimeStamp: true });
      try {
        report.repaired.push(...w.repairs);
      } finally {
        await w.close();
      }
    } catch (err) {
      if (!(err instanceof TidemarkError)) throw err;
      report.repaired.push(`nothing repaired: ${err.message}`);
    }
  }

  let disk: VhdFile;
  try {
    disk = await VhdFile.open(path, { noParent: true });
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
  if (disk.diskType === 'differencing') {
    try {
      const chain = await VhdFile.open(path, { allowedRoots: opts.allowedRoots, pathMap: opts.pathMap });
      for (const w of chain.warnings.filter((x) => /^the parent .* bytes, this disk/.test(x))) {
        add({ severity: 'warning', code: 'PARENT_SIZE_DIFFERS', structure: 'parent', message: w });
      }
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

async function checkOpened(disk: VhdFile, add: (f: Finding) => void): Promise<void> {
  const f = disk.footer;
  const inUse = disk.footers.find((x) => x.inUse)!;
  const end = disk.footers.find((x) => x.where === 'end');
  const start = disk.footers.find((x) => x.where === 'start');
  if (end && typeof end.footer === 'string') {
    add({
      severity: 'warning',
      code: 'FOOTER_INVALID',
      structure: 'footer',
      offset: end.offset,
      message: `the footer at the end is invalid (${end.footer}); the copy at offset 0 is used; --repair restores it`,
    });
  } else if (end && typeof end.footer !== 'string' && end.footer.length !== FOOTER_SIZE) {
    add({
      severity: 'warning',
      code: 'FOOTER_511',
      structure: 'footer',
      offset: end.offset,
      message: 'the footer is 511 bytes long (Virtual PC before 2004); --repair rewrites it as 512',
    });
  }
  if (start && typeof start.footer === 'string' && end && typeof end.footer !== 'string') {
    add({
      severity: 'warning',
      code: 'FOOTER_COPY_INVALID',
      structure: 'footer copy',
      offset: 0,
      message: `the footer copy at offset 0 is invalid (${start.footer}); --repair rewrites it from the footer at the end`,
    });
  } else if (start && end && typeof start.footer !== 'string' && typeof end.footer !== 'string') {
    if (start.footer.checksum !== end.footer.checksum || start.footer.timeStamp !== end.footer.timeStamp) {
      add({
        severity: 'warning',
        code: 'FOOTERS_DIFFER',
        structure: 'footer copy',
        offset: 0,
        message: 'the footer copy at offset 0 differs from the footer at the end; --repair rewrites it',
      });
    }
  }
  if ((f.features & FEATURE_RESERVED) === 0) {
    add({
      severity: 'warning',
      code: 'FEATURES_RESERVED',
      structure: 'footer',
      offset: inUse.offset,
      message: 'the reserved feature bit (2) is not set',
    });
  }
  if (f.savedState) {
    add({
      severity: 'warning',
      code: 'SAVED_STATE',
      structure: 'footer',
      offset: inUse.offset,
      message: 'the disk is marked as in a saved state',
    });
  }
  const chs = chsSectors(f.geometry);
  if (chs * SECTOR > disk.virtualSize && chs !== MAX_CHS_SECTORS) {
    add({
      severity: 'warning',
      code: 'GEOMETRY_EXCEEDS_SIZE',
      structure: 'footer',
      offset: inUse.offset,
      message: `the CHS geometry describes ${chs * SECTOR} bytes, more than the ${disk.virtualSize}-byte current size`,
    });
  }
  if (disk.fileSize % SECTOR !== 0) {
    add({
      severity: 'warning',
      code: 'FILE_SIZE_UNALIGNED',
      structure: 'file',
      message: `file size ${disk.fileSize} is not a multiple of 512`,
    });
  }

  if (disk.diskType === 'fixed') {
    if (f.dataOffset !== NO_OFFSET && f.dataOffset !== 0xffffffffn) {
      add({
        severity: 'warning',
        code: 'FIXED_DATA_OFFSET',
        structure: 'footer',
        offset: inUse.offset,
        message: `a fixed disk's data offset is ${f.dataOffset} (all ones expected)`,
      });
    }
    const held = disk.endFooterOffset!;
    if (disk.virtualSize > held) {
      add({
        severity: 'error',
        code: 'FIXED_TRUNCATED',
        structure: 'file',
        offset: held,
        message: `the file holds ${held} bytes of data, the footer says ${disk.virtualSize}`,
      });
    }
    return;
  }

  const h = disk.header!;
  if (h.dataOffset !== NO_OFFSET) {
    add({
      severity: 'warning',
      code: 'HEADER_DATA_OFFSET',
      structure: 'dynamic header',
      offset: disk.headerOffset,
      message: `the dynamic header's data offset is ${h.dataOffset} (all ones expected)`,
    });
  }
  const scan = await disk.scanBlocks();
  for (const p of scan.problems) {
    add({
      severity: 'error',
      code: p.code,
      structure: 'BAT entry',
      offset: h.tableOffset + p.block * 4,
      message: p.message,
    });
  }
  if (scan.beyondSize !== undefined) {
    add({
      severity: 'warning',
      code: 'BAT_BEYOND_SIZE',
      structure: 'BAT entry',
      offset: h.tableOffset + scan.beyondSize * 4,
      message: `block ${scan.beyondSize} is allocated past the end of the ${disk.virtualSize}-byte disk (never read)`,
    });
  }
  for (const l of disk.locators) {
    if (!l.problem) continue;
    add({
      severity: 'warning',
      code: 'LOCATOR_INVALID',
      structure: 'parent locator',
      offset: (disk.headerOffset ?? 0) + 576 + l.index * 24,
      message: `parent locator ${l.index + 1} (${fourCC(l.entry.code)}) is not usable: ${l.problem}`,
    });
  }
  if (disk.diskType === 'differencing') {
    if (!disk.locators.some((l) => l.data) && !h.parentName) {
      add({
        severity: 'error',
        code: 'LOCATOR_NO_PATH',
        structure: 'parent locator',
        offset: disk.headerOffset,
        message: 'no usable parent locator and no parent name: the parent cannot be found',
      });
    }
  } else if (disk.locators.length > 0) {
    add({
      severity: 'warning',
      code: 'LOCATOR_WITHOUT_PARENT',
      structure: 'parent locator',
      offset: disk.headerOffset,
      message: 'a dynamic disk carries parent locators (ignored)',
    });
  }
}
