// Rewrites the generated API tables of docs/host.md (routes, status codes) from the built code: run
// `npm run build` first. test/api/openapi.test.ts fails when the doc and the code differ.
import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.join(path.dirname(fileURLToPath(import.meta.url)), '..');
const doc = await import(path.join(root, 'dist', 'api', 'route-doc.js'));
const file = path.join(root, 'docs', 'host.md');
let text = await readFile(file, 'utf8');
text = doc.replaceBetween(text, doc.ROUTES_BEGIN, doc.ROUTES_END, doc.routeTable());
text = doc.replaceBetween(text, doc.STATUS_BEGIN, doc.STATUS_END, doc.statusTable());
await writeFile(file, text);
console.log(`rewrote the API tables of ${path.relative(process.cwd(), file)}`);
