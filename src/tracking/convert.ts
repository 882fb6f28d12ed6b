/**
 * One conversion for every format the engines read and write: VHDX ↔ VHD ↔ raw, in any direction. The
 * source is recognised by its magic (formats/detect.ts) unless the caller names its format; any other format is
 * refused before anything is created. VHDX-only work (raw ↔ VHDX, VHDX → VHDX, change tracking on the new
 * VHDX) goes through the VHDX engine's converter; anything involving VHD through the VHD engine's.
 * It lives in tracking/, not formats/, because it can start change tracking on the new disk: the format
 * engines know nothing above them.
 */
import { InvalidArgumentError } from '../errors.js';
import { detectFormat, unsupportedFormatError } from '../formats/detect.js';
import { convertVhdImage, formatFromName, type ImageFormat } from '../formats/vhd/convert.js';
import { convertImage, type ConvertOptions } from '../formats/vhdx/convert.js';
import { VhdxFile } from '../formats/vhdx/vhdx.js';
import { ChangeTracker, DEFAULT_GRANULARITY } from './tracker.js';

export type { ImageFormat };

export interface DiskConvertOptions extends Omit<ConvertOptions, 'sourceFormat' | 'format' | 'onDestinationOpen'> {
  /** How to read the source (default: by its magic); `raw` copies the bytes of any file as they are. */
  sourceFormat?: ImageFormat;
  /** Output format; default from the destination's extension (.vhd/.avhd, .vhdx/.avhdx, else raw). */
  format?: ImageFormat;
  /** VHD output: round the size up to a whole CHS geometry. */
  chsAligned?: boolean;
  /** Start change tracking on the new VHDX, with this granularity (default 256 KiB). */
  track?: boolean | { granularity?: number };
}

export interface DiskConvertResult {
  sourceFormat: ImageFormat;
  format: ImageFormat;
  virtualSize: number;
  bytesRead: number;
  bytesWritten: number;
  bytesSkipped: number;
}

export async function convertDisk(src: string, dst: string, opts: DiskConvertOptions = {}): Promise<DiskConvertResult> {
  const format = opts.format ?? formatFromName(dst);
  const sourceFormat = opts.sourceFormat ?? (await recognise(src));
  if (opts.track && format !== 'vhdx')
    throw new InvalidArgumentError('change tracking (--track) applies to VHDX output only');
  const granularity =
    typeof opts.track === 'object' ? (opts.track.granularity ?? DEFAULT_GRANULARITY) : DEFAULT_GRANULARITY;
  if (sourceFormat !== 'vhd' && format !== 'vhd') {
    if (opts.chsAligned) throw new InvalidArgumentError('--chs-size applies to VHD output only');
    return convertImage(src, dst, {
      ...opts,
      sourceFormat,
      format,
      onDestinationOpen: opts.track
        ? async (d) => {
            await ChangeTracker.enable(d, granularity);
            await ChangeTracker.attach(d, { writable: true });
          }
        : undefined,
    });
  }
  const result = await convertVhdImage(src, dst, { ...opts, sourceFormat, format });
  if (opts.track) {
    // Tracking starts on the finished disk: no id existed before it, so nothing written earlier can be missed.
    const d = await VhdxFile.open(dst);
    try {
      await ChangeTracker.enable(d, granularity);
    } finally {
      await d.close();
    }
  }
  return result;
}

async function recognise(path: string): Promise<ImageFormat> {
  const found = await detectFormat(path);
  if (found.format === 'vhd' || found.format === 'vhdx' || found.format === 'raw') return found.format;
  throw unsupportedFormatError(path, found, {
    reader: 'convert',
    also: 'or give --source-format raw to copy its bytes as they are',
  });
}
