/**
 * The bodies of `vhdx read|write` and `vhd read|write`: a byte range of an open virtual disk to a file or
 * stdout, and a file or stdin into it. The commands open and close the disk (each with its own engine).
 */
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import { InvalidArgumentError, fromSystemError } from '../errors.js';
import { NodeFile } from '../util/file.js';

interface ReadableDisk {
  readonly virtualSize: number;
  readAt(offset: number, length: number): Promise<Buffer>;
}

interface WritableDisk {
  readonly virtualSize: number;
  write(data: Buffer, offset: number): Promise<void>;
  flush(): Promise<void>;
}

/** Copies [offset, offset + length) of `disk` to `output` (a file it creates) or stdout, 8 MiB at a time. */
export async function readRange(disk: ReadableDisk, offset: number, length: number, output?: string): Promise<void> {
  if (offset + length > disk.virtualSize) {
    throw new InvalidArgumentError(
      `--offset ${offset} --length ${length} reaches past the ${disk.virtualSize}-byte disk`,
    );
  }
  // Open the output first, so a bad path is one clear error before anything is read.
  const out = output ? await NodeFile.open(output, 'w') : undefined;
  try {
    const piece = 8 * 2 ** 20;
    for (let at = 0; at < length; at += piece) {
      const buf = await disk.readAt(offset + at, Math.min(piece, length - at));
      if (out) await out.write(buf, at);
      else if (!process.stdout.write(buf)) await new Promise<void>((r) => process.stdout.once('drain', () => r()));
    }
  } finally {
    await out?.close();
  }
}

/** Writes `input` (a file) or stdin into `disk` at `offset`, then flushes; the bytes written. */
export async function writeFromInput(disk: WritableDisk, offset: number, input?: string): Promise<number> {
  let written = 0;
  if (input) {
    const size = (await stat(input).catch((err) => Promise.reject(fromSystemError(err, 'open', input)))).size;
    if (offset + size > disk.virtualSize) {
      throw new InvalidArgumentError(
        `${input} (${size} bytes) at offset ${offset} reaches past the ${disk.virtualSize}-byte disk`,
      );
    }
  }
  const source = input ? createReadStream(input, { highWaterMark: 4 * 2 ** 20 }) : process.stdin;
  const chunks = (async function* () {
    try {
      yield* source as AsyncIterable<Buffer>;
    } catch (err) {
      throw fromSystemError(err, 'read', input ?? 'standard input');
    }
  })();
  for await (const chunk of chunks) {
    if (offset + written + chunk.length > disk.virtualSize) {
      throw new InvalidArgumentError(
        `input reaches past the ${disk.virtualSize}-byte disk after ${written} bytes; what came before was written`,
      );
    }
    await disk.write(chunk, offset + written);
    written += chunk.length;
  }
  await disk.flush();
  return written;
}
