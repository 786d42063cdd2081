// benchmark.js: finding the counted clusters in the checker's refcount array (check/refarray.ts)
// one counter at a time against RefArray.nextNonZero's eight-bytes-at-a-time skip. A repair that
// grows the file to terabytes walks arrays of billions of mostly zero counters twice (comparing
// and writing refcount blocks): 2^31 clusters took 64 s, 7 s after the change (bench/README).
//
//   node dist/bench/run.js zero-skip [--quick] [--mib N]
//
// One op walks an N MiB (default 256) array of 8-bit counters with a counted cluster every 64 MiB.

import Benchmark from 'benchmark';
import { RefArray } from '../src/qcow2/check/refarray.js';

export function zeroSkipMain(argv: string[]): void {
  const quick = argv.includes('--quick');
  const at = argv.indexOf('--mib');
  const n = (at >= 0 ? Number(argv[at + 1]) : 256) * 1024 * 1024;
  const arr = new RefArray(n);
  for (let i = 12345; i < n; i += 64 << 20) arr.a[i] = 1;
  const each = (): number => {
    const a = arr.a;
    let found = 0;
    for (let i = 0; i < n; i++) if (a[i]) found++;
    return found;
  };
  const skip = (): number => {
    let found = 0;
    for (let i = arr.nextNonZero(0, n); i < n; i = arr.nextNonZero(i + 1, n)) found++;
    return found;
  };
  if (each() !== skip()) throw new Error('zero-skip: the two scans disagree');
  const suite = new Benchmark.Suite('zero-skip');
  const opts = quick ? { minSamples: 5, maxTime: 0.5 } : { minSamples: 10, maxTime: 2 };
  suite.add('one counter at a time', each, opts);
  suite.add('nextNonZero', skip, opts);
  const hz: number[] = [];
  process.stdout.write(`zero-skip: ${n / 2 ** 20} Mi counters, one counted every 64 Mi\n`);
  suite.on('cycle', (ev: Benchmark.Event) => {
    const b = ev.target as unknown as Benchmark;
    hz.push(b.hz!);
    process.stdout.write(`  ${String(b.name).padEnd(24)} ${((b.hz! * n) / 1e9).toFixed(2).padStart(6)} G counters/s ±${b.stats!.rme.toFixed(1)}%\n`);
  });
  suite.run({ async: false });
  process.stdout.write(`  nextNonZero / one at a time: ${(hz[1]! / hz[0]!).toFixed(2)}x\n`);
}
