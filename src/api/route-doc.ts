/**
 * The API's tables for docs/host.md, generated from the route table and the status map, so the doc cannot
 * drift: `node scripts/api-doc.mjs` rewrites them (after `npm run build`), test/api/openapi.test.ts fails
 * when they differ from what the code says.
 */
import { z } from 'zod';
import { answerStatus, ROUTES, type RouteDef } from './routes.js';
import { HTTP_STATUS } from './status.js';

export const ROUTES_BEGIN = '<!-- api-routes:begin (generated: node scripts/api-doc.mjs) -->';
export const ROUTES_END = '<!-- api-routes:end -->';
export const STATUS_BEGIN = '<!-- api-status:begin (generated: node scripts/api-doc.mjs) -->';
export const STATUS_END = '<!-- api-status:end -->';

function fields(schema: z.ZodType | undefined): string {
  if (!(schema instanceof z.ZodObject)) return '';
  return Object.keys(schema.shape)
    .map((k) => `\`${k}\``)
    .join(', ');
}

/** One row per route: method, path, operation (the client's method), body or query fields, answer. */
export function routeTable(): string {
  const rows = ['| method | path | operation | body / query | answer |', '| --- | --- | --- | --- | --- |'];
  for (const [name, r] of Object.entries(ROUTES) as [string, RouteDef][]) {
    const input = [fields(r.body), r.query ? `?${fields(r.query)}` : ''].filter(Boolean).join(' ');
    const answer = answerStatus(r) === 202 ? '202 job' : '200';
    rows.push(`| ${r.method} | \`${r.path}\` | \`${name}\`: ${r.summary} | ${input} | ${answer} |`);
  }
  return rows.join('\n');
}

export function statusTable(): string {
  const byStatus = new Map<number, string[]>();
  for (const [code, status] of Object.entries(HTTP_STATUS))
    byStatus.set(status, [...(byStatus.get(status) ?? []), code]);
  const rows = ['| status | codes |', '| --- | --- |'];
  for (const status of [...byStatus.keys()].sort((a, b) => a - b)) {
    rows.push(
      `| ${status} | ${byStatus
        .get(status)!
        .map((c) => `\`${c}\``)
        .join(', ')} |`,
    );
  }
  return rows.join('\n');
}

/** Cells trimmed and separator rows reduced, so a table prettier padded compares equal to the generated one. */
export function normalizeTable(md: string): string {
  return md
    .trim()
    .split('\n')
    .map((line) =>
      line
        .trim()
        .split('|')
        .map((c) => (/^\s*:?-+:?\s*$/.test(c) ? '---' : c.trim()))
        .join('|'),
    )
    .join('\n');
}

/** The text between two markers of a document (undefined when the markers are missing). */
export function between(doc: string, begin: string, end: string): string | undefined {
  const a = doc.indexOf(begin);
  const b = doc.indexOf(end);
  if (a < 0 || b < a) return undefined;
  return doc.slice(a + begin.length, b);
}

/** The document with the text between the markers replaced. */
export function replaceBetween(doc: string, begin: string, end: string, text: string): string {
  const a = doc.indexOf(begin);
  const b = doc.indexOf(end);
  if (a < 0 || b < a) throw new Error(`markers ${begin} … ${end} are missing`);
  return `${doc.slice(0, a + begin.length)}\n\n${text}\n\n${doc.slice(b)}`;
}
