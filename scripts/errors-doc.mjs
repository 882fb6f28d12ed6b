// Rewrites the generated table of docs/errors.md (every code: meaning, exit status, HTTP status) from the built
// code: run `npm run build` first. test/errors.test.ts renders the same table from src/ with errorTable() and
// fails when the doc differs.
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

export const ERRORS_BEGIN = '<!-- errors:begin (generated: node scripts/errors-doc.mjs) -->';
export const ERRORS_END = '<!-- errors:end -->';

/** One row per code, in the order of `meanings` (the ErrorCode union's): code, meaning, exit status, HTTP status. */
export function errorTable({ meanings, exit, http }) {
  const rows = [['code', 'meaning', 'exit', 'HTTP']];
  for (const [code, meaning] of Object.entries(meanings)) {
    rows.push([`\`${code}\``, meaning.replace(/\|/g, '\\|'), String(exit[code]), String(http[code])]);
  }
  // Padded as prettier pads a table, so the file stays prettier-clean.
  const width = rows[0].map((_, i) => Math.max(3, ...rows.map((r) => r[i].length)));
  const line = (r) => `| ${r.map((c, i) => c.padEnd(width[i])).join(' | ')} |`;
  return [line(rows[0]), `| ${width.map((w) => '-'.repeat(w)).join(' | ')} |`, ...rows.slice(1).map(line)].join('\n');
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
  const dist = (p) => import(pathToFileURL(path.join(root, 'dist', p)).href);
  const [{ ERROR_MEANINGS }, { EXIT_BY_CODE }, { HTTP_STATUS }, { replaceBetween }] = await Promise.all([
    dist('errors.js'),
    dist('cli/output.js'),
    dist('api/status.js'),
    dist('api/route-doc.js'),
  ]);
  const file = path.join(root, 'docs', 'errors.md');
  const table = errorTable({ meanings: ERROR_MEANINGS, exit: EXIT_BY_CODE, http: HTTP_STATUS });
  await writeFile(file, replaceBetween(await readFile(file, 'utf8'), ERRORS_BEGIN, ERRORS_END, table));
  console.log(`rewrote the error table of ${path.relative(process.cwd(), file)}`);
}
