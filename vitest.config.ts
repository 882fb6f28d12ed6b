import os from 'node:os';
import path from 'node:path';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    // Interop and crash tests spawn peers and child processes: run files in forks, two at a time (2 cores).
    pool: 'forks',
    maxWorkers: 2,
    testTimeout: 120_000,
    hookTimeout: 120_000,
    // Integrity keys of the repositories tests make go here (and to the CLI processes they spawn), not to ~/.config.
    env: { TIDEMARK_CONFIG_DIR: process.env.TIDEMARK_CONFIG_DIR ?? path.join(os.tmpdir(), 'tidemark-test-config') },
  },
});
