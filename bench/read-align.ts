// benchmark.js: 2 MiB preads of a page-cached file into a plain Uint8Array (calloc's memory, 16
// bytes into a mapping) against io/buffers.ts's page-aligned ioBuffer(), the buffer every bulk
// read of convert, compare, commit, rebase, the snapshot tree walk and the checker lands in.
//
//   node dist/bench/run.js read-align [--quick] [--mib N]
//
// The file (N MiB, default 64, of random bytes) is written to the system's temp directory and read
// once before timing, so both cases copy from the page cache; one op reads the whole file. The
// kernel's copy into a destination that is not 32-byte aligned is the difference (bench/README).

import Benchmark from 'benchmark';
import { closeSync, mkdtempSync, openSync, readSync, rmSync, writeFileSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ioBuffer } from '../src/qcow2/io/buffers.js';

const CHUNK = 2 * 1024 * 1024;

function readAll(fd: number, buf: Uint8Array, size: number): number {
  let pos = 0;
  while (pos < size) {
    const n = readSync(fd, buf, 0, CHUNK, pos);
    if (n === 0) break;
    pos += n;
  }
  return pos;
}

export function readAlignMain(argv: string[]): void {
  const quick = argv.includes('--quick');
  const at = argv.indexOf('--mib');
  const mib = at >= 0 ? Number(argv[at + 1]) : 64;
  const size = mib * 1024 * 1024;
  const dir = mkdtempSync(join(tmpdir(), 'qimg-read-align-'));
  const path = join(dir, 'data.bin');
  const data = new Uint8Array(size);
  for (let i = 0; i < size; i += 65536) randomFillSync(data, i, Math.min(65536, size - i));
  writeFileSync(path, data);
  const fd = openSync(path, 'r');
  try {
    const plain = new Uint8Array(CHUNK);
    const aligned = ioBuffer(CHUNK);
    if (readAll(fd, plain, size) !== size || readAll(fd, aligned, size) !== size) throw new Error('short read');
    const suite = new Benchmark.Suite('read-align');
    const opts = quick ? { minSamples: 5, maxTime: 0.5 } : { minSamples: 15, maxTime: 2 };
    suite.add('plain Uint8Array', () => readAll(fd, plain, size), opts);
    suite.add('ioBuffer (page-aligned)', () => readAll(fd, aligned, size), opts);
    const hz: number[] = [];
    process.stdout.write(`read-align: ${mib} MiB from the page cache in 2 MiB preads per op\n`);
    suite.on('cycle', (ev: Benchmark.Event) => {
      const b = ev.target as unknown as Benchmark;
      hz.push(b.hz!);
      process.stdout.write(`  ${String(b.name).padEnd(24)} ${((b.hz! * size) / 2 ** 30).toFixed(2).padStart(6)} GiB/s ±${b.stats!.rme.toFixed(1)}%\n`);
    });
    suite.run({ async: false });
    process.stdout.write(`  aligned / plain throughput: ${(hz[1]! / hz[0]!).toFixed(2)}x\n`);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
}
