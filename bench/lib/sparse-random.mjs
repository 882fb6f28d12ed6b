// The benchmarks' data: a sparse raw file of GIB GiB holding random bytes in 1 MiB pieces on every other MiB
// (half data, half holes). AES-CTR over zeros gives incompressible bytes at GB/s, made in 64 MiB batches.
// Usage: node bench/lib/sparse-random.mjs FILE GIB
import { createCipheriv, randomBytes } from 'node:crypto';
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';

const [file, gib] = [process.argv[2], Number(process.argv[3])];
const MiB = 2 ** 20;
const fd = openSync(file, 'wx');
ftruncateSync(fd, gib * 1024 * MiB);
const cipher = createCipheriv('aes-128-ctr', randomBytes(16), randomBytes(16));
const zeros = Buffer.alloc(64 * MiB);
for (let at = 0; at < gib * 1024 * MiB;) {
  const batch = cipher.update(zeros);
  for (let p = 0; p < batch.length; p += MiB, at += 2 * MiB) writeSync(fd, batch, p, MiB, at);
}
closeSync(fd);
