#!/usr/bin/env node
// Entry point of the `tidemark` command: the compiled CLI lives in dist/ (built by `npm install`).
import { main } from '../dist/cli/main.js';

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    process.stderr.write(`tidemark: internal error: ${err?.stack ?? err}\n`);
    process.exitCode = 70;
  },
);
