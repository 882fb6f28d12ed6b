/**
 * One line saying what went wrong, also for errors that carry no message: Node reports a connect that failed
 * on every address (`localhost` as ::1 and 127.0.0.1) as an AggregateError whose own message is empty, and a
 * bare `new Error()` has none. A run summary must never say "failed: " and nothing more.
 */
export function describeError(err: unknown): string {
  if (err instanceof AggregateError && !err.message) {
    const inner = [...new Set((err.errors as unknown[]).map(describeError).filter((m) => m.length > 0))];
    if (inner.length > 0) return inner.join('; ');
  }
  if (err instanceof Error) {
    const line = err.message.replace(/\s*\n\s*/g, ' ').trim();
    if (line) return line;
    const code = (err as NodeJS.ErrnoException).code;
    return `${err.name}${code ? ` ${code}` : ''} (no message)`;
  }
  return err === undefined || err === null || String(err) === '' ? 'unknown error (no message)' : String(err);
}
