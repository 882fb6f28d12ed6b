/**
 * Text that came out of a stored object (a damaged or hostile one) on its way into a message a person reads on a
 * terminal: control characters could rewrite the screen or forge lines, so they never get through.
 */

/** Whether text holds a C0 or C1 control character (an escape sequence, a newline, a carriage return, …). */
export function hasControl(text: string): boolean {
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (c < 0x20 || (c >= 0x7f && c <= 0x9f)) return true;
  }
  return false;
}

/** The text with each control character replaced by `?`, at most `max` characters long. */
export function printable(text: string, max = 200): string {
  let out = '';
  for (const ch of text) {
    if (out.length >= max) return `${out}…`;
    out += hasControl(ch) ? '?' : ch;
  }
  return out;
}
