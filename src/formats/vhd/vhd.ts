/**
 * An open VHD file (and, through its parent, a differencing chain): open, read, write, write-zeroes,
 * flush, close. VHD has no log: crash safety comes from ordering. New blocks go at the end of the file
 * (bitmap, then data); BAT entries and sector bitmap changes wait in memory until a flush, which makes
 * the data durable first, then writes bitmaps, BAT entries and the footer at the new end, then flushes
 * again. A crash at any point leaves a file whose footer copy at offset 0 is intact and whose durable
 * BAT only names blocks whose data is durable; a lost end footer is restored from the copy (writable
 * open, `check --repair`).
 */
import { realpath, stat } from 'node:fs/promises';
import path from 'node:path';
import { TidemarkError, VhdCorruptError } from '../../errors.js';
import { NodeFile, type RandomAccessFile } from '../../util/file.js';
import { RwLock } from '../../util/rwlock.js';
import { isAllZero, zeroPieces } from '../../util/zero.js';
import { checkRange } from '../../util/range.js';
import { realRoots, resolveInsideRoots } from '../vhdx/locator.js';
import {
  batBytes,
  bitmapRuns,
  blockLayout,
  decodeBatEntry,
  encodeBatEntry,
  setBitmapRange,
  type BlockLayout,
} from './bat.js';
import { MetaCache } from './cache.js';
import {
  BAT_UNUSED,
  DISK_TYPE_NAMES,
  DYNAMIC_HEADER_SIZE,
  DiskType,
  FEATURE_RESERVED,
  FOOTER_SIZE,
  FORMAT_VERSION,
  MAX_ALLOCATION,
  MAX_CHAIN_DEPTH,
  MAX_LOCATOR_DATA,
  MAX_VIRTUAL_SIZE,
  NO_OFFSET,
  OLD_FOOTER_SIZE,
  SECTOR,
  VHD_EPOCH,
  fourCC,
} from './constants.js';
import { decodeFooter, encodeFooter, hex, uuidToString, vhdNow, type VhdFooter } from './footer.js';
import { decodeDynamicHeader, type DynamicHeader, type LocatorEntry } from './header.js';
import { decodeLocatorData, vhdParentCandidates, type LocatorData, type VhdLocatorKey } from './locator.js';

export interface VhdOpenOptions {
  /** Open for writing (restores a lost footer copy at once). Default: read-only. */
  writable?: boolean;
  /** Directories parents may be opened from. Default: the directory of the disk being opened. */
  allowedRoots?: string[];
  /** Windows drive letters / volume GUIDs / shares mapped to host directories (as for VHDX). */
  pathMap?: Record<string, string>;
  /** Do not open the parent of a differencing disk (info, check, merge). Reads that need it then fail. */
  noParent?: boolean;
  /** Opens the files of the chain (default: the live file system). */
  openFile?: (path: string, writable: boolean) => Promise<RandomAccessFile>;
  /**
   * Keep the footer time stamp when the disk is changed (merge writes only what its child already
   * shows, so the child must keep matching until it is gone). Default: the first change of a writable
   * session sets a new time stamp, which children check as their parent's identity.
   */
  keepTimeStamp?: boolean;
  /**
   * For a differencing disk: this open disk is its parent, instead of a new open of the file its
   * locators name (the disk layer opens a checkpoint's child over the live head). It must be the file a
   * locator names, with the unique id and time stamp the child recorded; the child then owns it (closing
   * the child closes it). Not used for other disks.
   */
  parent?: VhdFile;
}

export type VhdDiskType = 'fixed' | 'dynamic' | 'differencing';

/** One footer copy as found: decoded, or why it is not valid. */
export interface FooterCopy {
  where: 'end' | 'start';
  offset: number;
  footer: VhdFooter | string;
  inUse: boolean;
}

/** A parent locator entry of the dynamic header, with its data decoded (or why it cannot be used). */
export interface VhdLocator {
  index: number;
  entry: LocatorEntry;
  data?: LocatorData;
  problem?: string;
}

export interface VhdParentLink {
  path: string;
  foundBy: VhdLocatorKey;
  /** What matched the child's parent time stamp: the parent's footer time stamp, or its file's mtime. */
  timeStampFrom: 'footer' | 'mtime';
  tried: { key: string; value: string; hostPath?: string; outcome: string }[];
}

/** A range of the file a structure or a block occupies. */
export interface Span {
  start: number;
  end: number;
  what: string;
}

/** A problem of one BAT entry, found when the whole table is scanned (writable open, check). */
export interface BlockProblem {
  code: 'BAT_OFFSET_INVALID' | 'BAT_BEYOND_EOF' | 'OVERLAP';
  block: number;
  message: string;
}

export interface Extent {
  offset: number;
  length: number;
}

export class VhdFile {
  readonly path: string;
  readonly diskType: VhdDiskType;
  readonly virtualSize: number;
  /** Both footer copies as found (dynamic and differencing disks keep one at offset 0). */
  readonly footers: FooterCopy[];
  readonly header: DynamicHeader | undefined;
  readonly headerOffset: number | undefined;
  readonly layout: BlockLayout | undefined;
  readonly locators: VhdLocator[];
  /** File ranges of the fixed structures (footer copy, dynamic header, BAT, locator data). */
  readonly structures: Span[];
  /** Recoverable oddities noticed while opening (a lost footer copy, copies that differ...). */
  readonly warnings: string[];
  /** What a writable open restored (a lost footer copy). */
  readonly repairs: string[] = [];
  parent: VhdFile | undefined;
  parentLink: VhdParentLink | undefined;

  private canWrite: boolean;
  private file: RandomAccessFile;
  private currentFooter: VhdFooter;
  /** Where the valid end footer starts (undefined when the end footer is not valid). */
  private endFooterAt: number | undefined;
  private cache: MetaCache;
  private lock = new RwLock();
  /** Writable sessions: where the footer goes, i.e. where the next block starts. */
  private fileEnd = 0;
  private footerMoved = false;
  private timeStampChanged: boolean;
  private closed = false;

  private constructor(init: {
    path: string;
    file: RandomAccessFile;
    writable: boolean;
    footer: VhdFooter;
    footers: FooterCopy[];
    endFooterAt: number | undefined;
    header: DynamicHeader | undefined;
    headerOffset: number | undefined;
    locators: VhdLocator[];
    structures: Span[];
    warnings: string[];
    keepTimeStamp: boolean;
  }) {
    this.path = init.path;
    this.file = init.file;
    this.canWrite = init.writable;
    this.currentFooter = init.footer;
    this.footers = init.footers;
    this.endFooterAt = init.endFooterAt;
    this.header = init.header;
    this.headerOffset = init.headerOffset;
    this.locators = init.locators;
    this.structures = init.structures;
    this.warnings = init.warnings;
    this.timeStampChanged = init.keepTimeStamp;
    this.diskType = DISK_TYPE_NAMES[init.footer.diskType];
    this.virtualSize = Number(init.footer.currentSize);
    this.layout = init.header ? blockLayout(this.virtualSize, init.header.blockSize) : undefined;
    this.cache = new MetaCache(init.file);
  }

  // ---------------------------------------------------------------- open

  static async open(filePath: string, opts: VhdOpenOptions = {}): Promise<VhdFile> {
    const roots = await realRoots(opts.allowedRoots ?? [path.dirname(path.resolve(filePath))]);
    return VhdFile.openInChain(path.resolve(filePath), opts, roots, 0);
  }

  private static async openInChain(
    filePath: string,
    opts: VhdOpenOptions,
    roots: string[],
    depth: number,
  ): Promise<VhdFile> {
    const writable = opts.writable ?? false;
    const base = opts.openFile
      ? await opts.openFile(filePath, writable)
      : await NodeFile.open(filePath, writable ? 'r+' : 'r', { lock: writable ? 'writer' : 'reader' });
    let disk: VhdFile | undefined;
    try {
      disk = await VhdFile.decode(filePath, base, writable, opts.keepTimeStamp ?? false);
      if (disk.diskType === 'differencing' && !opts.noParent) {
        if (depth + 1 >= MAX_CHAIN_DEPTH) {
          throw new VhdCorruptError(
            'parent locator',
            undefined,
            `chain deeper than ${MAX_CHAIN_DEPTH} disks (a locator loop?)`,
          );
        }
        await disk.attachParent(opts, roots, depth);
      }
      if (writable) await disk.prepareWrites();
      return disk;
    } catch (err) {
      // A parent given by the caller stays the caller's.
      if (disk && opts.parent && disk.parent === opts.parent) disk.parent = undefined;
      if (disk) await disk.closeFiles().catch(() => undefined);
      else await base.close().catch(() => undefined);
      throw err;
    }
  }

  /** Reads and checks the footers, the dynamic header and the parent locators of one file. */
  private static async decode(
    filePath: string,
    file: RandomAccessFile,
    writable: boolean,
    keepTimeStamp: boolean,
  ): Promise<VhdFile> {
    const warnings: string[] = [];
    const size = file.size();
    if (size < OLD_FOOTER_SIZE) {
      throw new VhdCorruptError('footer', 0, `file is ${size} bytes, shorter than a footer: not a VHD`);
    }
    // The end footer: 512 bytes, or the 511 that Virtual PC wrote before 2004.
    const tail = Buffer.alloc(FOOTER_SIZE);
    await file.read(tail, Math.max(0, size - FOOTER_SIZE));
    let end = size >= FOOTER_SIZE ? decodeFooter(tail) : 'short file';
    let endAt = size - FOOTER_SIZE;
    if (typeof end === 'string') {
      const old = decodeFooter(tail.subarray(FOOTER_SIZE - OLD_FOOTER_SIZE));
      if (typeof old !== 'string') {
        end = old;
        endAt = size - OLD_FOOTER_SIZE;
        warnings.push('the footer is 511 bytes long (Virtual PC before 2004); a writable open rewrites it as 512');
      }
    }
    const head = Buffer.alloc(FOOTER_SIZE);
    await file.read(head, 0);
    const start = size >= FOOTER_SIZE ? decodeFooter(head) : 'short file';

    let footer: VhdFooter;
    let endFooterAt: number | undefined;
    const footers: FooterCopy[] = [];
    if (typeof end !== 'string') {
      footer = end;
      endFooterAt = endAt;
      footers.push({ where: 'end', offset: endAt, footer: end, inUse: true });
      if (end.diskType !== DiskType.Fixed) {
        footers.push({ where: 'start', offset: 0, footer: start, inUse: false });
        if (typeof start === 'string') {
          warnings.push(`the footer copy at offset 0 is invalid (${start}); the footer at the end is used`);
        } else if (!encodeFooter(start).equals(encodeFooter(end))) {
          warnings.push('the footer copy at offset 0 differs from the footer at the end, which is used');
        }
      }
    } else if (typeof start !== 'string' && start.diskType !== DiskType.Fixed) {
      footer = start;
      footers.push({ where: 'end', offset: Math.max(0, size - FOOTER_SIZE), footer: end, inUse: false });
      footers.push({ where: 'start', offset: 0, footer: start, inUse: true });
      warnings.push(
        `the footer at the end is invalid (${end}); the copy at offset 0 is used (a writable open or check --repair restores it)`,
      );
    } else {
      throw new VhdCorruptError(
        'footer',
        Math.max(0, size - FOOTER_SIZE),
        `no valid footer: at the end: ${end}; at offset 0: ${typeof start === 'string' ? start : 'a fixed-disk footer, which belongs at the end'}`,
      );
    }
    const fAt = footers.find((f) => f.inUse)!.offset;
    if (footer.version >>> 16 !== FORMAT_VERSION >>> 16) {
      throw new VhdCorruptError('footer', fAt, `format version 0x${hex(footer.version)} is not 1.x`, 'VHD_UNSUPPORTED');
    }
    if (!DISK_TYPE_NAMES[footer.diskType]) {
      throw new VhdCorruptError(
        'footer',
        fAt,
        `disk type ${footer.diskType} is not fixed (2), dynamic (3) or differencing (4)`,
        'VHD_UNSUPPORTED',
      );
    }
    if (footer.currentSize === 0n || footer.currentSize % BigInt(SECTOR) !== 0n) {
      throw new VhdCorruptError('footer', fAt, `current size ${footer.currentSize} is not a whole number of sectors`);
    }
    if (footer.currentSize > BigInt(MAX_VIRTUAL_SIZE)) {
      throw new VhdCorruptError(
        'footer',
        fAt,
        `current size ${footer.currentSize} exceeds the 2040 GiB a VHD can hold`,
        'VHD_UNSUPPORTED',
      );
    }
    if ((footer.features & FEATURE_RESERVED) === 0) warnings.push('the footer lacks the reserved feature bit (2)');
    if (footer.savedState) warnings.push('the disk is marked as in a saved state');
    const virtualSize = Number(footer.currentSize);
    // Data may use the file up to the end footer (or to its end when that footer is lost).
    const limit = endFooterAt ?? size;

    if (footer.diskType === DiskType.Fixed) {
      if (footer.dataOffset !== NO_OFFSET && footer.dataOffset !== 0xffffffffn) {
        warnings.push(`the fixed disk's footer has data offset ${footer.dataOffset} (all ones expected)`);
      }
      if (virtualSize > limit) {
        warnings.push(
          `the file holds ${limit} bytes of data, the footer says ${virtualSize}: truncated (reads past it fail)`,
        );
      }
      return new VhdFile({
        path: filePath,
        file,
        writable,
        footer,
        footers,
        endFooterAt,
        header: undefined,
        headerOffset: undefined,
        locators: [],
        structures: endFooterAt === undefined ? [] : [{ start: endFooterAt, end: size, what: 'footer' }],
        warnings,
        keepTimeStamp,
      });
    }

    // Dynamic and differencing disks: the dynamic header, then the BAT and the locators it describes.
    if (footer.dataOffset < BigInt(FOOTER_SIZE) || footer.dataOffset > BigInt(Number.MAX_SAFE_INTEGER)) {
      throw new VhdCorruptError('footer', fAt, `data offset ${footer.dataOffset} cannot hold the dynamic header`);
    }
    const headerOffset = Number(footer.dataOffset);
    if (headerOffset + DYNAMIC_HEADER_SIZE > limit) {
      throw new VhdCorruptError(
        'dynamic header',
        headerOffset,
        `lies past the ${limit} bytes before the footer`,
        headerOffset + DYNAMIC_HEADER_SIZE > size ? 'VHD_TRUNCATED' : 'VHD_CORRUPT',
      );
    }
    const hbuf = Buffer.alloc(DYNAMIC_HEADER_SIZE);
    await file.read(hbuf, headerOffset);
    const header = decodeDynamicHeader(hbuf, headerOffset);
    const layout = blockLayout(virtualSize, header.blockSize);
    if (header.maxTableEntries < layout.dataBlocks) {
      throw new VhdCorruptError(
        'dynamic header',
        headerOffset,
        `${header.maxTableEntries} BAT entries of ${header.blockSize} bytes cannot hold the ${virtualSize}-byte disk`,
      );
    }
    const structures: Span[] = [
      { start: 0, end: FOOTER_SIZE, what: 'footer copy' },
      { start: headerOffset, end: headerOffset + DYNAMIC_HEADER_SIZE, what: 'dynamic header' },
    ];
    const tableEnd = header.tableOffset + batBytes(header.maxTableEntries);
    if (header.tableOffset < FOOTER_SIZE || tableEnd > limit) {
      throw new VhdCorruptError(
        'BAT',
        header.tableOffset,
        `[${header.tableOffset}, ${tableEnd}) lies outside the ${limit} bytes before the footer`,
        tableEnd > size ? 'VHD_TRUNCATED' : 'VHD_CORRUPT',
      );
    }
    const bat: Span = { start: header.tableOffset, end: tableEnd, what: 'BAT' };
    if (structures.some((s) => overlaps(s, bat))) {
      throw new VhdCorruptError('BAT', header.tableOffset, 'overlaps the footer copy or the dynamic header');
    }
    structures.push(bat);

    const locators: VhdLocator[] = [];
    const isChild = footer.diskType === DiskType.Differencing;
    for (const [index, entry] of header.locators.entries()) {
      if (entry.code === 0) continue;
      const loc: VhdLocator = { index, entry };
      locators.push(loc);
      const span: Span = {
        start: entry.dataOffset,
        end: entry.dataOffset + Math.ceil(entry.dataLength / SECTOR) * SECTOR,
        what: `parent locator ${index + 1} data`,
      };
      if (entry.dataLength === 0 || entry.dataLength > MAX_LOCATOR_DATA) {
        loc.problem = `data length ${entry.dataLength} is not between 1 and ${MAX_LOCATOR_DATA} bytes`;
      } else if (entry.dataOffset < FOOTER_SIZE || entry.dataOffset + entry.dataLength > limit) {
        loc.problem = `data [${entry.dataOffset}, +${entry.dataLength}) lies outside the ${limit} bytes before the footer`;
      } else if (structures.some((s) => overlaps(s, span))) {
        loc.problem = `data at ${entry.dataOffset} overlaps ${structures.find((s) => overlaps(s, span))!.what}`;
      } else {
        const data = Buffer.alloc(entry.dataLength);
        await file.read(data, entry.dataOffset);
        const decoded = decodeLocatorData(entry.code, data);
        if (typeof decoded === 'string') loc.problem = decoded;
        else loc.data = decoded;
        structures.push(span);
      }
      if (loc.problem) {
        warnings.push(`parent locator ${index + 1} (${fourCC(entry.code)}) is not usable: ${loc.problem}`);
      }
    }
    if (!isChild && locators.length > 0) warnings.push('a dynamic disk carries parent locators (ignored)');
    return new VhdFile({
      path: filePath,
      file,
      writable,
      footer,
      footers,
      endFooterAt,
      header,
      headerOffset,
      locators,
      structures,
      warnings,
      keepTimeStamp,
    });
  }

  /**
   * Finds, checks and opens the parent: same unique id, and the time stamp the child recorded. With
   * `opts.parent` the parent is that open disk, accepted only if a locator names its file.
   */
  private async attachParent(opts: VhdOpenOptions, roots: string[], depth: number): Promise<void> {
    const h = this.header!;
    const given = opts.parent;
    const givenPath = given ? await realpath(given.path).catch(() => given.path) : undefined;
    const tried: VhdParentLink['tried'] = [];
    const usable = this.locators.filter((l) => l.data).map((l) => l.data!);
    const candidates = vhdParentCandidates(this.path, usable, h.parentName, {
      allowedRoots: roots,
      pathMap: opts.pathMap,
    });
    let mismatch: string | undefined;
    const seen = new Set<string>();
    for (const c of candidates) {
      if (!c.hostPath) {
        tried.push({ key: c.key, value: c.value, outcome: 'no host mapping' });
        continue;
      }
      const r = await resolveInsideRoots(c.hostPath, roots);
      if ('problem' in r) {
        const outcome = r.problem === 'missing' ? 'not found' : 'outside the allowed directories';
        tried.push({ key: c.key, value: c.value, hostPath: c.hostPath, outcome });
        continue;
      }
      const found = r.path;
      if (seen.has(found)) continue;
      seen.add(found);
      if (found === this.path) {
        tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'names the disk itself' });
        continue;
      }
      let parent: VhdFile;
      if (given) {
        if (found !== givenPath) {
          tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'not the open parent given' });
          continue;
        }
        parent = given;
      } else {
        try {
          parent = await VhdFile.openInChain(
            found,
            { ...opts, writable: false, keepTimeStamp: undefined },
            roots,
            depth + 1,
          );
        } catch (err) {
          // Not a readable file (a directory, a device): try the next candidate. A damaged VHD is reported.
          if (!(err instanceof TidemarkError) || (err.code !== 'IO_ERROR' && err.code !== 'NOT_FOUND')) throw err;
          tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'not a readable file' });
          continue;
        }
      }
      const why = await linkageProblem(h, parent, found);
      if (typeof why === 'string') {
        if (parent !== given) await parent.close();
        mismatch = `${found}: ${why}`;
        tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'identity does not match' });
        continue;
      }
      if (parent.virtualSize !== this.virtualSize) {
        this.warnings.push(`the parent ${found} is ${parent.virtualSize} bytes, this disk ${this.virtualSize}`);
      }
      tried.push({ key: c.key, value: c.value, hostPath: found, outcome: 'opened' });
      this.parent = parent;
      this.parentLink = { path: found, foundBy: c.key, timeStampFrom: why.from, tried };
      return;
    }
    if (mismatch) throw new TidemarkError('PARENT_MISMATCH', `parent of ${this.path}: ${mismatch}`, { tried });
    const list = tried
      .map(
        (t) =>
          `${t.key}=${JSON.stringify(t.value)}${t.hostPath ? ` -> ${JSON.stringify(t.hostPath)}` : ''} (${t.outcome})`,
      )
      .join('; ');
    if (tried.some((t) => t.outcome === 'outside the allowed directories')) {
      throw new TidemarkError(
        'PATH_NOT_ALLOWED',
        `parent of ${this.path} lies outside the allowed directories (${roots.join(', ')}): ${list}`,
        { tried },
      );
    }
    throw new TidemarkError('PARENT_NOT_FOUND', `parent of ${this.path} not found: ${list || 'no parent locator'}`, {
      tried,
    });
  }

  /**
   * Before the first write of a session: every BAT entry must name space of its own inside the file (a
   * block that overlaps a structure or another block would be written through to it), and a footer copy
   * that is lost or stale is restored, so the session starts from a file every reader opens.
   */
  private async prepareWrites(): Promise<void> {
    const size = this.file.size();
    if (this.diskType === 'fixed') {
      const at = this.endFooterAt!;
      if (this.virtualSize > at) {
        throw new VhdCorruptError(
          'footer',
          at,
          `the file holds ${at} bytes of data, the footer says ${this.virtualSize}: truncated; it cannot be written`,
          'VHD_TRUNCATED',
        );
      }
      this.fileEnd = at;
      if (size - at !== FOOTER_SIZE) {
        await this.file.write(encodeFooter(this.currentFooter), at);
        await this.file.datasync();
        this.repairs.push('the 511-byte footer rewritten as 512 bytes');
      }
      return;
    }
    const scan = await this.scanBlocks(true);
    if (scan.problems.length > 0) {
      throw new VhdCorruptError(
        'BAT',
        this.header!.tableOffset,
        `${scan.problems[0].message}${scan.problems.length > 1 ? ` (and ${scan.problems.length - 1} more)` : ''}; the disk cannot be written (see tidemark vhd check)`,
      );
    }
    const footerBytes = encodeFooter(this.currentFooter);
    if (this.endFooterAt !== undefined && this.endFooterAt >= scan.dataEnd) {
      this.fileEnd = this.endFooterAt;
      if (size - this.endFooterAt !== FOOTER_SIZE) {
        await this.file.write(footerBytes, this.fileEnd);
        this.repairs.push('the 511-byte footer rewritten as 512 bytes');
      }
    } else {
      // The end footer was lost (a crash while a block was being added): it goes after the last block.
      this.fileEnd = scan.dataEnd;
      await this.file.truncate(this.fileEnd);
      await this.file.write(footerBytes, this.fileEnd);
      this.endFooterAt = this.fileEnd;
      this.repairs.push(`footer at the end restored at offset ${this.fileEnd} from the copy at offset 0`);
    }
    const start = this.footers.find((f) => f.where === 'start');
    if (!start || typeof start.footer === 'string' || !encodeFooter(start.footer).equals(footerBytes)) {
      await this.file.write(footerBytes, 0);
      this.repairs.push('footer copy at offset 0 rewritten from the footer at the end');
    }
    if (this.repairs.length > 0) await this.file.datasync();
  }

  /**
   * Every allocated BAT entry (all of the table, not only the blocks the size needs): where the data
   * ends, and the entries that lie outside the file, inside a structure, or over another block.
   */
  async scanBlocks(stopEarly = false): Promise<{
    dataEnd: number;
    allocated: number;
    problems: BlockProblem[];
    /** The first allocated entry past the blocks the size needs (never read), if any. */
    beyondSize: number | undefined;
  }> {
    const h = this.header!;
    const span = this.layout!.bitmapBytes + h.blockSize;
    const limit = this.endFooterAt ?? this.file.size();
    const problems: BlockProblem[] = [];
    let dataEnd = Math.max(...this.structures.map((s) => s.end));
    const starts: number[] = [];
    const blocks: number[] = [];
    const piece = Buffer.alloc(64 * 1024);
    let beyondSize: number | undefined;
    for (let first = 0; first < h.maxTableEntries; first += piece.length / 4) {
      const n = Math.min(piece.length / 4, h.maxTableEntries - first);
      const view = piece.subarray(0, n * 4);
      await this.file.read(view, h.tableOffset + first * 4);
      for (let i = 0; i < n; i++) {
        const raw = view.readUInt32BE(i * 4);
        if (raw === BAT_UNUSED) continue;
        const block = first + i;
        if (block >= this.layout!.dataBlocks) beyondSize ??= block;
        const at = raw * SECTOR;
        const s: Span = { start: at, end: at + span, what: `block ${block}` };
        const inside = this.structures.find((x) => overlaps(x, s));
        if (inside) {
          problems.push({
            code: 'BAT_OFFSET_INVALID',
            block,
            message: `block ${block} at ${at} overlaps the ${inside.what}`,
          });
        } else if (s.end > limit) {
          problems.push({
            code: 'BAT_BEYOND_EOF',
            block,
            message: `block ${block} [${at}, ${s.end}) extends past the ${limit} bytes before the footer`,
          });
        } else {
          starts.push(at);
          blocks.push(block);
          dataEnd = Math.max(dataEnd, s.end);
        }
        if (stopEarly && problems.length > 0) return { dataEnd, allocated: starts.length, problems, beyondSize };
      }
    }
    // Blocks are all the same length: sorted by start, neighbours closer than that overlap.
    const order = Array.from(starts.keys()).sort((a, b) => starts[a] - starts[b]);
    for (let k = 1; k < order.length; k++) {
      const prev = order[k - 1];
      const cur = order[k];
      if (starts[cur] - starts[prev] < span) {
        problems.push({
          code: 'OVERLAP',
          block: blocks[cur],
          message: `block ${blocks[cur]} at ${starts[cur]} overlaps block ${blocks[prev]} at ${starts[prev]}`,
        });
        if (stopEarly) break;
      }
    }
    return { dataEnd, allocated: starts.length, problems, beyondSize };
  }

  // ---------------------------------------------------------------- properties

  get footer(): VhdFooter {
    return this.currentFooter;
  }

  get writable(): boolean {
    return this.canWrite;
  }

  get uniqueId(): string {
    return uuidToString(this.currentFooter.uniqueId);
  }

  get blockSize(): number | undefined {
    return this.header?.blockSize;
  }

  get fileSize(): number {
    return this.file.size();
  }

  /** Where the valid footer at the end of the file starts, if there is one. */
  get endFooterOffset(): number | undefined {
    return this.endFooterAt;
  }

  /** The chain from this disk to its base. */
  chain(): VhdFile[] {
    return [this, ...(this.parent?.chain() ?? [])];
  }

  // ---------------------------------------------------------------- BAT and bitmaps

  private get batWindow(): [number, number] {
    const h = this.header!;
    return [h.tableOffset, h.tableOffset + batBytes(h.maxTableEntries)];
  }

  /** The file offset of block `block`'s bitmap, or undefined when the block is not allocated. */
  async blockOffset(block: number): Promise<number | undefined> {
    const h = this.header!;
    const byte = h.tableOffset + block * 4;
    const sector = byte - (byte % SECTOR);
    const [ws, we] = this.batWindow;
    const buf = this.cache.peek(sector) ?? (await this.cache.sector(sector, ws, we));
    return decodeBatEntry(buf.readUInt32BE(byte - sector));
  }

  private async setBlockOffset(block: number, offset: number | undefined): Promise<void> {
    const h = this.header!;
    const byte = h.tableOffset + block * 4;
    const sector = byte - (byte % SECTOR);
    const [ws, we] = this.batWindow;
    const buf = await this.cache.sector(sector, ws, we);
    buf.writeUInt32BE(encodeBatEntry(offset), byte - sector);
    this.cache.markDirty(sector);
  }

  /** Checks that a block's bitmap and its data up to byte `to` lie in the file, clear of structures. */
  private checkBlock(block: number, at: number, to: number): void {
    const l = this.layout!;
    const s: Span = { start: at, end: at + l.bitmapBytes + l.blockSize, what: `block ${block}` };
    const inside = this.structures.find((x) => overlaps(x, s));
    if (inside) {
      throw new VhdCorruptError(
        'BAT',
        this.header!.tableOffset + block * 4,
        `block ${block} at ${at} overlaps the ${inside.what}`,
      );
    }
    const limit = this.canWrite ? this.fileEnd : (this.endFooterAt ?? this.file.size());
    const need = at + l.bitmapBytes + to;
    if (need > limit || (this.canWrite && s.end > limit)) {
      const truncated = need > this.file.size();
      throw new VhdCorruptError(
        'BAT',
        this.header!.tableOffset + block * 4,
        truncated
          ? `block ${block} at ${at} extends past the end of the file (${this.file.size()} bytes): truncated`
          : `block ${block} at ${at} reaches into the footer at ${limit}`,
        truncated ? 'VHD_TRUNCATED' : 'VHD_CORRUPT',
      );
    }
  }

  private bitmap(at: number): Promise<Buffer> {
    return this.cache.piece(at, this.layout!.bitmapBytes);
  }

  // ---------------------------------------------------------------- reads

  private assertOpen(): void {
    if (this.closed) throw new TidemarkError('CLOSED', `${this.path} is closed`);
  }

  private assertRange(offset: number, length: number): void {
    checkRange(offset, length, this.virtualSize, 'virtual disk');
  }

  /** Reads `dst.length` bytes of the virtual disk at `offset`. */
  async read(dst: Uint8Array, offset: number): Promise<void> {
    this.assertOpen();
    this.assertRange(offset, dst.length);
    await this.lock.shared(() => this.readVirtual(dst, offset));
  }

  async readAt(offset: number, length: number): Promise<Buffer> {
    if (length > MAX_ALLOCATION)
      throw new TidemarkError('LIMIT_EXCEEDED', `a single read is limited to ${MAX_ALLOCATION} bytes`);
    const buf = Buffer.alloc(length);
    await this.read(buf, offset);
    return buf;
  }

  private async readVirtual(dst: Uint8Array, offset: number): Promise<void> {
    if (dst.length === 0) return;
    if (this.diskType === 'fixed') {
      const limit = this.canWrite ? this.fileEnd : this.endFooterAt!;
      if (offset + dst.length > limit) {
        throw new VhdCorruptError(
          'fixed disk data',
          limit,
          `bytes up to ${offset + dst.length} lie past the ${limit} bytes the file holds: truncated`,
          'VHD_TRUNCATED',
        );
      }
      await this.file.read(dst, offset);
      return;
    }
    const bs = this.layout!.blockSize;
    for (let pos = 0; pos < dst.length;) {
      const v = offset + pos;
      const block = Math.floor(v / bs);
      const inBlock = v - block * bs;
      const n = Math.min(bs - inBlock, dst.length - pos);
      await this.readBlock(block, inBlock, dst.subarray(pos, pos + n));
      pos += n;
    }
  }

  private async readBlock(block: number, inBlock: number, dst: Uint8Array): Promise<void> {
    const at = await this.blockOffset(block);
    if (at === undefined) {
      if (this.diskType === 'differencing') return this.readParent(block * this.layout!.blockSize + inBlock, dst);
      dst.fill(0);
      return;
    }
    this.checkBlock(block, at, inBlock + dst.length);
    const bm = await this.bitmap(at);
    const data = at + this.layout!.bitmapBytes;
    const s0 = Math.floor(inBlock / SECTOR);
    const s1 = Math.ceil((inBlock + dst.length) / SECTOR);
    const runs: [number, number, boolean][] = [];
    bitmapRuns(bm, s0, s1, (from, to, present) => runs.push([from, to, present]));
    for (const [from, to, present] of runs) {
      const a = Math.max(inBlock, from * SECTOR);
      const b = Math.min(inBlock + dst.length, to * SECTOR);
      const part = dst.subarray(a - inBlock, b - inBlock);
      if (present) await this.file.read(part, data + a);
      else if (this.diskType === 'differencing') await this.readParent(block * this.layout!.blockSize + a, part);
      else part.fill(0);
    }
  }

  private async readParent(offset: number, dst: Uint8Array): Promise<void> {
    const p = this.parent;
    if (!p)
      throw new TidemarkError('PARENT_NOT_FOUND', `${this.path} is a differencing disk opened without its parent`);
    const inside = Math.max(0, Math.min(dst.length, p.virtualSize - offset));
    // Under the parent's lock: a writer of the parent (an online merge) is never seen half-done.
    if (inside > 0) await p.lock.shared(() => p.readVirtual(dst.subarray(0, inside), offset));
    if (inside < dst.length) dst.fill(0, inside);
  }

  /**
   * Ranges of [offset, offset+length) that any disk of the chain may hold data for (block granularity);
   * everything else reads as zeros. Convert reads only these.
   */
  async allocatedExtents(offset = 0, length = this.virtualSize - offset): Promise<Extent[]> {
    this.assertOpen();
    this.assertRange(offset, length);
    const out: Extent[] = [];
    await this.lock.shared(() => this.collectAllocated(offset, length, out));
    return out;
  }

  private async collectAllocated(offset: number, length: number, out: Extent[]): Promise<void> {
    const push = (o: number, l: number) => {
      if (l <= 0) return;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === o) last.length += l;
      else out.push({ offset: o, length: l });
    };
    if (this.diskType === 'fixed') return push(offset, length);
    const bs = this.layout!.blockSize;
    for (let pos = offset; pos < offset + length;) {
      const block = Math.floor(pos / bs);
      const n = Math.min((block + 1) * bs, offset + length) - pos;
      const at = await this.blockOffset(block);
      if (at !== undefined) push(pos, n);
      else if (this.parent) {
        const inside = Math.max(0, Math.min(n, this.parent.virtualSize - pos));
        if (inside > 0) {
          const sub: Extent[] = [];
          const p = this.parent;
          await p.lock.shared(() => p.collectAllocated(pos, inside, sub));
          for (const x of sub) push(x.offset, x.length);
        }
      }
      pos += n;
    }
  }

  /**
   * Ranges of [offset, offset+length) whose sectors some disk of the chain holds (sector granularity:
   * the BAT and each block's sector bitmap); everything else reads as zeros because no file has it.
   * A fixed disk holds all of its sectors. The NBD server's block status answers from this.
   */
  async contentExtents(offset = 0, length = this.virtualSize - offset): Promise<Extent[]> {
    this.assertOpen();
    this.assertRange(offset, length);
    const out: Extent[] = [];
    await this.lock.shared(() => this.collectContent(offset, length, out));
    return out;
  }

  private async collectContent(offset: number, length: number, out: Extent[]): Promise<void> {
    const push = (o: number, l: number) => {
      if (l <= 0) return;
      const last = out[out.length - 1];
      if (last && last.offset + last.length === o) last.length += l;
      else out.push({ offset: o, length: l });
    };
    const fromParent = async (o: number, l: number) => {
      const p = this.parent;
      if (!p) return;
      const inside = Math.max(0, Math.min(l, p.virtualSize - o));
      if (inside > 0) await p.lock.shared(() => p.collectContent(o, inside, out));
    };
    if (this.diskType === 'fixed') return push(offset, length);
    const l = this.layout!;
    const bs = l.blockSize;
    for (let pos = offset; pos < offset + length;) {
      const block = Math.floor(pos / bs);
      const end = Math.min((block + 1) * bs, offset + length);
      const at = await this.blockOffset(block);
      if (at === undefined) {
        await fromParent(pos, end - pos);
      } else {
        const base = block * bs;
        const sectors = Math.min(l.sectorsPerBlock, Math.ceil((this.virtualSize - base) / SECTOR));
        this.checkBlock(block, at, sectors * SECTOR);
        const bm = await this.bitmap(at);
        const s0 = Math.floor((pos - base) / SECTOR);
        const s1 = Math.ceil((end - base) / SECTOR);
        const runs: [number, number, boolean][] = [];
        bitmapRuns(bm, s0, s1, (from, to, present) => runs.push([from, to, present]));
        for (const [from, to, present] of runs) {
          const a = Math.max(pos, base + from * SECTOR);
          const b = Math.min(end, base + to * SECTOR);
          if (present) push(a, b - a);
          else if (this.diskType === 'differencing') await fromParent(a, b - a);
        }
      }
      pos = end;
    }
  }

  /** The blocks this file allocates itself (not its parent's), for merge and info. */
  async *ownBlocks(): AsyncGenerator<{ block: number; offset: number }> {
    if (!this.layout) return;
    for (let block = 0; block < this.layout.dataBlocks; block++) {
      const offset = await this.blockOffset(block);
      if (offset !== undefined) yield { block, offset };
    }
  }

  /** Block-relative byte ranges of an allocated block whose sectors this file holds (bitmap bit set). */
  async presentRuns(block: number): Promise<Extent[]> {
    const at = await this.blockOffset(block);
    if (at === undefined) return [];
    const l = this.layout!;
    const sectors = Math.min(l.sectorsPerBlock, Math.ceil((this.virtualSize - block * l.blockSize) / SECTOR));
    this.checkBlock(block, at, sectors * SECTOR);
    const bm = await this.bitmap(at);
    const out: Extent[] = [];
    bitmapRuns(bm, 0, sectors, (from, to, present) => {
      if (present) out.push({ offset: from * SECTOR, length: (to - from) * SECTOR });
    });
    return out;
  }

  /** Reads bytes this file holds for an allocated block, without consulting the bitmap or the parent. */
  async readOwn(block: number, inBlock: number, dst: Uint8Array): Promise<void> {
    const at = await this.blockOffset(block);
    if (at === undefined) throw new TidemarkError('INVALID_ARGUMENT', `block ${block} holds no data in ${this.path}`);
    this.checkBlock(block, at, inBlock + dst.length);
    await this.file.read(dst, at + this.layout!.bitmapBytes + inBlock);
  }

  // ---------------------------------------------------------------- writes

  private assertWritable(): void {
    this.assertOpen();
    if (!this.canWrite) throw new TidemarkError('READ_ONLY', `${this.path} is open read-only`);
  }

  /**
   * Before the first change of a session: a new footer time stamp (what children check as this disk's
   * identity), written at the end and then at offset 0, each made durable before anything else changes.
   */
  private async beginChange(): Promise<void> {
    if (this.timeStampChanged) return;
    const f = this.currentFooter;
    const next: VhdFooter = { ...f, timeStamp: Math.min(0xffffffff, Math.max(vhdNow(), f.timeStamp + 1)) };
    if (next.timeStamp === f.timeStamp) {
      throw new VhdCorruptError('footer', this.fileEnd, 'the time stamp cannot advance past 2136', 'VHD_UNSUPPORTED');
    }
    const bytes = encodeFooter(next);
    await this.file.write(bytes, this.fileEnd);
    await this.file.datasync();
    if (this.diskType !== 'fixed') {
      await this.file.write(bytes, 0);
      await this.file.datasync();
    }
    this.currentFooter = next;
    this.timeStampChanged = true;
  }

  /** Installs a new time stamp now, as the first change would (merge calls it when it is done). */
  async markChanged(): Promise<void> {
    this.assertWritable();
    await this.lock.exclusive(async () => {
      this.timeStampChanged = false;
      await this.beginChange();
    });
  }

  /**
   * Makes every change durable and turns this disk into a read-only parent (a checkpoint's frozen point):
   * writes are refused from now on, reads go on, and the image lock lets other readers in, as QEMU does
   * for a backing file. The footer time stamp stays: the child that now continues on it recorded it.
   */
  async retire(): Promise<void> {
    this.assertOpen();
    if (!this.canWrite) return;
    await this.lock.exclusive(async () => {
      await this.commit();
      this.canWrite = false;
    });
    await this.file.relock?.('reader');
  }

  /**
   * The unit writes are made of: the 512-byte sector, and in a differencing disk 4 KiB, one bitmap byte:
   * sectors are copied from the parent so that every byte of a bitmap is 0x00 or 0xff. libvhdi 20210425
   * (Debian 12) misreads bytes with a 1 followed by a 0 (it shifts without masking: the rest of such a byte
   * reads as present); bitmaps of whole bytes read the same everywhere.
   */
  private get writeUnit(): number {
    return this.diskType === 'differencing' ? 8 * SECTOR : SECTOR;
  }

  /** [offset, offset + length) widened to whole write units, within the disk. */
  private unitRange(offset: number, length: number): [number, number] {
    const unit = this.writeUnit;
    return [Math.floor(offset / unit) * unit, Math.min(this.virtualSize, Math.ceil((offset + length) / unit) * unit)];
  }

  /** Writes `data` at virtual `offset`. Unaligned edges are completed from the current content. */
  async write(data: Uint8Array, offset: number): Promise<void> {
    this.assertWritable();
    this.assertRange(offset, data.length);
    if (data.length === 0) return;
    await this.lock.exclusive(async () => {
      await this.beginChange();
      const [start, end] = this.unitRange(offset, data.length);
      let buf = data;
      if (start !== offset || end !== offset + data.length) {
        // Edges completed from the current content (in a child: the parent's, copied into this file).
        const aligned = Buffer.alloc(end - start);
        const unit = this.writeUnit;
        if (start < offset) await this.readVirtual(aligned.subarray(0, Math.min(unit, end - start)), start);
        const tail = Math.max(start, Math.floor((offset + data.length) / unit) * unit);
        if (end > offset + data.length) await this.readVirtual(aligned.subarray(tail - start), tail);
        aligned.set(data, offset - start);
        buf = aligned;
      }
      await this.writeSectors(buf, start);
    });
  }

  /** A sector-aligned write. */
  private async writeSectors(buf: Uint8Array, offset: number): Promise<void> {
    if (this.diskType === 'fixed') {
      await this.file.write(buf, offset);
      return;
    }
    await this.forEachBlock(offset, buf.length, (block, inBlock, pos, n) =>
      this.writeBlock(block, inBlock, buf.subarray(pos, pos + n)),
    );
  }

  private async forEachBlock(
    offset: number,
    length: number,
    fn: (block: number, inBlock: number, pos: number, n: number) => Promise<void>,
  ): Promise<void> {
    const bs = this.layout!.blockSize;
    for (let pos = 0; pos < length;) {
      const v = offset + pos;
      const block = Math.floor(v / bs);
      const inBlock = v - block * bs;
      const n = Math.min(bs - inBlock, length - pos);
      await fn(block, inBlock, pos, n);
      pos += n;
    }
  }

  /** Bytes of `block` that lie inside the virtual disk. */
  private blockExtent(block: number): number {
    const bs = this.layout!.blockSize;
    return Math.min(bs, this.virtualSize - block * bs);
  }

  /** Sector-aligned write inside one block of a dynamic or differencing disk. */
  private async writeBlock(block: number, inBlock: number, src: Uint8Array): Promise<void> {
    const l = this.layout!;
    const s0 = inBlock / SECTOR;
    const s1 = (inBlock + src.length) / SECTOR;
    const at = await this.blockOffset(block);
    if (at === undefined) {
      // A dynamic disk's unallocated block already reads zeros.
      if (this.diskType === 'dynamic' && isAllZero(src)) return;
      const whole = inBlock === 0 && src.length >= this.blockExtent(block);
      const placed = await this.allocate(block, whole ? [0, l.sectorsPerBlock] : [s0, s1]);
      await this.file.write(src, placed + l.bitmapBytes + inBlock);
      return;
    }
    this.checkBlock(block, at, inBlock + src.length);
    await this.file.write(src, at + l.bitmapBytes + inBlock);
    await this.markPresent(at, s0, s1);
  }

  /** Sets the bitmap bits of sectors [s0, s1) of the block at `at` (written at the next flush). */
  private async markPresent(at: number, s0: number, s1: number): Promise<void> {
    const bm = await this.bitmap(at);
    let all = true;
    bitmapRuns(bm, s0, s1, (_f, _t, present) => {
      if (!present) all = false;
    });
    if (all) return;
    setBitmapRange(bm, s0, s1, true);
    this.cache.markDirty(at);
  }

  /**
   * A new block at the end of the file: the space (old footer included) is cut off and grown back as a
   * hole, so everything not written reads zeros; the bitmap is written at once; the BAT entry waits for
   * the next flush, and the footer moves to the new end then. `present`: the sectors this file holds
   * (a dynamic disk's blocks hold all of theirs, as QEMU writes them).
   */
  private async allocate(block: number, present: [number, number]): Promise<number> {
    const l = this.layout!;
    const at = this.fileEnd;
    const end = at + l.bitmapBytes + l.blockSize;
    if (at / SECTOR >= BAT_UNUSED || end + FOOTER_SIZE > Number.MAX_SAFE_INTEGER) {
      throw new TidemarkError('LIMIT_EXCEEDED', `${this.path}: a new block at ${at} is beyond what a BAT entry holds`);
    }
    const bm = Buffer.alloc(l.bitmapBytes);
    if (this.diskType === 'dynamic') bm.fill(0xff);
    else {
      setBitmapRange(bm, present[0], present[1], true);
      // Padding bits past the block's sectors set: libvhdi 20210425 lets the last run of a bitmap go on
      // into the padding, and past the block, unless the padding starts a run of its own.
      setBitmapRange(bm, l.sectorsPerBlock, l.bitmapBytes * 8, true);
    }
    if (this.file.size() > at) await this.file.truncate(at);
    await this.file.truncate(end + FOOTER_SIZE);
    await this.file.write(bm, at);
    this.cache.put(at, bm);
    this.fileEnd = end;
    this.footerMoved = true;
    await this.setBlockOffset(block, at);
    return at;
  }

  /** Makes [offset, offset+length) read as zeros. Whole blocks of a dynamic disk are deallocated unless `noHole`. */
  async writeZeroes(offset: number, length: number, opts: { noHole?: boolean } = {}): Promise<void> {
    this.assertWritable();
    this.assertRange(offset, length);
    if (length === 0) return;
    await this.lock.exclusive(async () => {
      await this.beginChange();
      const [start, end] = this.unitRange(offset, length);
      // Unaligned edges keep their other bytes: those units are rewritten.
      const unit = this.writeUnit;
      const edges: [number, Buffer][] = [];
      for (const s of new Set([start, Math.max(start, end - unit)])) {
        const e = Math.min(s + unit, end);
        if (s < offset || e > offset + length) {
          const b = Buffer.alloc(e - s);
          await this.readVirtual(b, s);
          b.fill(0, Math.max(offset, s) - s, Math.min(offset + length, e) - s);
          edges.push([s, b]);
        }
      }
      if (this.diskType === 'fixed') {
        let at = start;
        for (const z of zeroPieces(end - start)) {
          await this.file.write(z, at);
          at += z.length;
        }
      } else {
        await this.forEachBlock(start, end - start, (block, inBlock, _pos, n) =>
          this.zeroBlock(block, inBlock, n, opts.noHole ?? false),
        );
      }
      for (const [s, b] of edges) await this.writeSectors(b, s);
    });
  }

  /** Discards [offset, offset+length): it reads zeros afterwards (VHD has no unmapped state of its own). */
  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  private async zeroBlock(block: number, inBlock: number, n: number, noHole: boolean): Promise<void> {
    const l = this.layout!;
    const whole = inBlock === 0 && n >= this.blockExtent(block);
    const s0 = inBlock / SECTOR;
    const s1 = (inBlock + n) / SECTOR;
    const at = await this.blockOffset(block);
    if (this.diskType === 'dynamic') {
      if (at === undefined) return;
      if (whole && !noHole) {
        await this.setBlockOffset(block, undefined);
        return;
      }
    } else if (at === undefined) {
      // The parent's sectors are hidden by sectors of this file's own: a new block reads zeros.
      await this.allocate(block, whole ? [0, l.sectorsPerBlock] : [s0, s1]);
      return;
    }
    this.checkBlock(block, at!, inBlock + n);
    let pos = at! + l.bitmapBytes + inBlock;
    for (const z of zeroPieces(n)) {
      await this.file.write(z, pos);
      pos += z.length;
    }
    await this.markPresent(at!, s0, s1);
  }

  /**
   * Makes every completed write durable: data first, then the sector bitmaps and BAT entries that
   * describe it, then the footer at the (new) end of the file, then a second flush.
   */
  async flush(): Promise<void> {
    this.assertOpen();
    if (!this.canWrite) return;
    await this.lock.exclusive(() => this.commit());
  }

  private async commit(): Promise<void> {
    await this.file.datasync();
    const dirty = this.cache.dirtyPieces();
    if (dirty.length === 0 && !this.footerMoved) return;
    const [batStart, batEnd] = this.diskType === 'fixed' ? [0, 0] : this.batWindow;
    const isBat = (o: number) => o >= batStart && o < batEnd;
    // Bitmaps, then BAT entries (adjacent sectors in one write), then the footer.
    for (const group of [dirty.filter((d) => !isBat(d.offset)), dirty.filter((d) => isBat(d.offset))]) {
      for (let i = 0; i < group.length;) {
        let j = i + 1;
        while (j < group.length && group[j].offset === group[j - 1].offset + group[j - 1].data.length) j++;
        const run = group.slice(i, j);
        await this.file.write(run.length === 1 ? run[0].data : Buffer.concat(run.map((r) => r.data)), run[0].offset);
        i = j;
      }
    }
    this.cache.clean(dirty.map((d) => d.offset));
    if (this.footerMoved) {
      await this.file.write(encodeFooter(this.currentFooter), this.fileEnd);
      this.endFooterAt = this.fileEnd;
      this.footerMoved = false;
    }
    await this.file.datasync();
  }

  /** Flushes and closes this file and its parents. */
  async close(): Promise<void> {
    if (this.closed) return;
    try {
      if (this.canWrite) await this.lock.exclusive(() => this.commit());
    } finally {
      await this.closeFiles();
    }
  }

  /** Closes without flushing, as if the process had died: for crash tests, and after an I/O error. */
  async abandon(): Promise<void> {
    await this.closeFiles();
  }

  private async closeFiles(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      await this.file.close();
    } finally {
      if (this.parent) await this.parent.close();
    }
  }
}

function overlaps(a: Span, b: Span): boolean {
  return a.start < b.end && b.start < a.end;
}

/**
 * Whether `parent` is the disk the child's header names: the same unique id, and the parent time stamp
 * the child recorded equal to the parent's footer time stamp (Windows' rule) or, as Virtual PC and Xen
 * record it, to the parent file's modification time (only when the parent's footer is older than that:
 * a footer stamped later was re-stamped by a writer that changed the parent).
 */
async function linkageProblem(
  h: DynamicHeader,
  parent: VhdFile,
  parentPath: string,
): Promise<string | { from: 'footer' | 'mtime' }> {
  if (!h.parentUniqueId.equals(parent.footer.uniqueId)) {
    return `unique id ${parent.uniqueId}, the child expects ${uuidToString(h.parentUniqueId)} (another disk)`;
  }
  if (h.parentTimeStamp === parent.footer.timeStamp) return { from: 'footer' };
  // A footer stamped after the child was made means a writer changed the parent since, whatever its mtime.
  if (parent.footer.timeStamp > h.parentTimeStamp) {
    return `time stamp ${parent.footer.timeStamp}, the child expects ${h.parentTimeStamp} (the parent was modified after this disk was created)`;
  }
  const mtime = await stat(parentPath).then(
    (s) => Math.floor(s.mtimeMs / 1000) - VHD_EPOCH,
    () => undefined,
  );
  if (mtime === h.parentTimeStamp) return { from: 'mtime' };
  return `time stamp ${parent.footer.timeStamp}, the child expects ${h.parentTimeStamp} (the parent was modified after this disk was created)`;
}
