/**
 * A cache of VHD metadata pieces keyed by file offset: the BAT in 512-byte sectors, and whole sector
 * bitmaps. Changes stay here, marked dirty, until a flush writes them after the data they describe is
 * durable (VHD has no log: ordering is its crash safety). Clean pieces are evicted oldest first beyond a
 * byte budget, so a big BAT streams instead of sitting in memory whole.
 */
import type { RandomAccessFile } from '../../util/file.js';
import { SECTOR } from './constants.js';

const DEFAULT_BUDGET = 32 * 1024 * 1024;
/** How much a BAT miss reads around the sector it needs (within the table). */
const READ_WINDOW = 64 * 1024;

export class MetaCache {
  private pieces = new Map<number, Buffer>();
  private dirty = new Set<number>();
  private bytes = 0;

  constructor(
    private readonly file: RandomAccessFile,
    private readonly budget = DEFAULT_BUDGET,
  ) {}

  peek(offset: number): Buffer | undefined {
    return this.pieces.get(offset);
  }

  /** The 512-byte sector at `offset`, reading up to 64 KiB of [windowStart, windowEnd) around it on a miss. */
  async sector(offset: number, windowStart: number, windowEnd: number): Promise<Buffer> {
    const hit = this.pieces.get(offset);
    if (hit) return hit;
    const start = Math.max(windowStart, offset - (offset % READ_WINDOW));
    const end = Math.max(offset + SECTOR, Math.min(windowEnd, start + READ_WINDOW));
    const buf = Buffer.alloc(end - start);
    await this.file.read(buf, start);
    this.evict(end - start);
    for (let o = start; o + SECTOR <= end; o += SECTOR) {
      if (!this.pieces.has(o)) this.set(o, Buffer.from(buf.subarray(o - start, o - start + SECTOR)));
    }
    return this.pieces.get(offset)!;
  }

  /** The `length` bytes at `offset` (a whole sector bitmap), read on a miss. */
  async piece(offset: number, length: number): Promise<Buffer> {
    const hit = this.pieces.get(offset);
    if (hit && hit.length === length) return hit;
    const buf = Buffer.alloc(length);
    await this.file.read(buf, offset);
    this.evict(length);
    this.set(offset, buf);
    return buf;
  }

  /** Installs content the caller has just written to the file (a new block's bitmap), clean. */
  put(offset: number, data: Buffer): void {
    this.evict(data.length);
    this.set(offset, data);
  }

  markDirty(offset: number): void {
    this.dirty.add(offset);
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  /** The dirty pieces in file order, with their content. */
  dirtyPieces(): { offset: number; data: Buffer }[] {
    return [...this.dirty].sort((a, b) => a - b).map((offset) => ({ offset, data: this.pieces.get(offset)! }));
  }

  clean(offsets: number[]): void {
    for (const o of offsets) this.dirty.delete(o);
  }

  private set(offset: number, data: Buffer): void {
    const old = this.pieces.get(offset);
    if (old) this.bytes -= old.length;
    this.pieces.set(offset, data);
    this.bytes += data.length;
  }

  private evict(incoming: number): void {
    if (this.bytes + incoming <= this.budget) return;
    const target = Math.floor(this.budget * 0.75);
    for (const [key, data] of this.pieces) {
      if (this.bytes + incoming <= target) break;
      if (this.dirty.has(key)) continue;
      this.pieces.delete(key);
      this.bytes -= data.length;
    }
  }
}
