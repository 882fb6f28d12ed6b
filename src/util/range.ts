import { TidemarkError } from '../errors.js';

/**
 * The byte range [offset, offset+length) lies within a `size`-byte disk, both integers and not negative:
 * INVALID_ARGUMENT naming the range otherwise (`what` names the disk in the message).
 */
export function checkRange(offset: number, length: number, size: number, what = 'disk'): void {
  if (
    !Number.isSafeInteger(offset) ||
    !Number.isSafeInteger(length) ||
    offset < 0 ||
    length < 0 ||
    offset + length > size
  ) {
    throw new TidemarkError('INVALID_ARGUMENT', `range [${offset}, +${length}) is outside the ${size}-byte ${what}`);
  }
}
