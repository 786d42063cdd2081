// Micro-benchmarks for the metadata hot loops: classifying a whole L2 table, refcount get/set.
//
// One op = one full 64 KiB table (8192 L2 entries, or a whole refcount block), so
// entries/sec = ops/sec x entries per table. The table is built with the real encoders and
// every variant is checked to classify it identically before anything is timed.
//
//   node dist/bench/l2-scan.js [--quick] [--json]

import Benchmark from 'benchmark';
import { pathToFileURL } from 'node:url';
import { setU32, u32 } from '../src/qcow2/format/bytes.js';
import { ClusterKind, classifyL2, encodeCompressed, encodeOffset, entryOffset, readEntry } from '../src/qcow2/format/entries.js';
import { getRefcount, maxRefcount, refblockEntries, setRefcount } from '../src/qcow2/format/refblock.js';

/** 64 KiB clusters: one L2 table (and one refcount block) is 64 KiB. */
const CLUSTER_BITS = 16;
const TABLE_BYTES = 1 << CLUSTER_BITS;
const L2_ENTRIES = TABLE_BYTES / 8;
const KIND_COUNT = 5;

export interface BenchResult {
  suite: string;
  name: string;
  opsPerSec: number;
  rme: number;
  entriesPerOp: number;
  entriesPerSec: number;
}

/** Deterministic xorshift32 so every run scans the same table. */
function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s ^= s >>> 17;
    s ^= s << 5;
    return (s >>> 0) / 0x100000000;
  };
}

/**
 * A 64 KiB L2 table mixing every kind, in a rough real-image mix: runs of normal clusters,
 * holes, zero clusters (plain and preallocated) and compressed descriptors. Host offsets go
 * past 4 GiB so the hi word is exercised.
 */
export function buildL2Table(): Uint8Array {
  const table = new Uint8Array(TABLE_BYTES);
  const rand = rng(0x5eed);
  let host = 0x1_2345_0000;
  for (let i = 0; i < L2_ENTRIES; i++) {
    const r = rand();
    let hi = 0;
    let lo = 0;
    if (r < 0.4) {
      [hi, lo] = encodeOffset(host, rand() < 0.9);
      host += TABLE_BYTES;
    } else if (r < 0.6) {
      // unallocated: all zero
    } else if (r < 0.7) {
      [hi, lo] = encodeOffset(0, false, true);
    } else if (r < 0.8) {
      [hi, lo] = encodeOffset(host, true, true);
      host += TABLE_BYTES;
    } else {
      const sectors = 1 + Math.floor(rand() * 100);
      [hi, lo] = encodeCompressed(host + 512 * Math.floor(rand() * 8) + 17, sectors, CLUSTER_BITS);
      host += sectors * 512;
    }
    setU32(table, i * 8, hi);
    setU32(table, i * 8 + 4, lo);
  }
  return table;
}

const littleEndian = new Uint8Array(new Uint32Array([1]).buffer)[0] === 1;

function bswap32(x: number): number {
  return (((x & 0xff) << 24) | ((x & 0xff00) << 8) | ((x >>> 8) & 0xff00) | (x >>> 24)) >>> 0;
}

// Each scan returns a per-kind histogram plus a checksum of the normal offsets, so the work
// cannot be optimised away and the variants can be compared for equal results.

function scanDataView(table: Uint8Array, counts: Float64Array): void {
  const dv = new DataView(table.buffer, table.byteOffset, table.byteLength);
  for (let off = 0; off < table.byteLength; off += 8) {
    const hi = dv.getUint32(off);
    const lo = dv.getUint32(off + 4);
    const k = classifyL2(hi, lo, true);
    counts[k]!++;
    if (k === ClusterKind.Normal) counts[KIND_COUNT]! += entryOffset(hi, lo);
  }
}

function scanU32(table: Uint8Array, counts: Float64Array): void {
  for (let off = 0; off < table.byteLength; off += 8) {
    const hi = u32(table, off);
    const lo = u32(table, off + 4);
    const k = classifyL2(hi, lo, true);
    counts[k]!++;
    if (k === ClusterKind.Normal) counts[KIND_COUNT]! += entryOffset(hi, lo);
  }
}

function scanUint32Array(table: Uint8Array, counts: Float64Array): void {
  // Needs a 4-byte aligned view; table buffers come from allocations, which are.
  const words = new Uint32Array(table.buffer, table.byteOffset, table.byteLength >>> 2);
  const swap = littleEndian;
  for (let w = 0; w < words.length; w += 2) {
    const hi = swap ? bswap32(words[w]!) : words[w]!;
    const lo = swap ? bswap32(words[w + 1]!) : words[w + 1]!;
    const k = classifyL2(hi, lo, true);
    counts[k]!++;
    if (k === ClusterKind.Normal) counts[KIND_COUNT]! += entryOffset(hi, lo);
  }
}

function scanReadEntry(table: Uint8Array, counts: Float64Array): void {
  const n = table.byteLength >>> 3;
  for (let i = 0; i < n; i++) {
    const [hi, lo] = readEntry(table, i);
    const k = classifyL2(hi, lo, true);
    counts[k]!++;
    if (k === ClusterKind.Normal) counts[KIND_COUNT]! += entryOffset(hi, lo);
  }
}

const SCANS: [string, (t: Uint8Array, c: Float64Array) => void][] = [
  ['(a) DataView getUint32', scanDataView],
  ['(b) u32() from bytes.ts', scanU32],
  ['(c) Uint32Array + bswap', scanUint32Array],
  ['(d) readEntry() tuple', scanReadEntry],
];

/** Throws if any variant disagrees with (b), the helper the engine uses. */
export function checkScansAgree(table: Uint8Array): number[] {
  const ref = new Float64Array(KIND_COUNT + 1);
  scanU32(table, ref);
  for (const [name, scan] of SCANS) {
    const c = new Float64Array(KIND_COUNT + 1);
    scan(table, c);
    if (c.some((v, i) => v !== ref[i])) throw new Error(`${name} classifies differently: ${[...c]} vs ${[...ref]}`);
  }
  if (ref.slice(0, KIND_COUNT).some((v) => v === 0)) throw new Error(`table does not mix every kind: ${[...ref]}`);
  return [...ref.slice(0, KIND_COUNT)];
}

/** Sink for results so V8 cannot drop the loops. */
let sink = 0;

function runSuite(name: string, benches: [string, number, () => void][], opts: { quick: boolean; json: boolean }): BenchResult[] {
  const suite = new Benchmark.Suite(name);
  const perOp = new Map<string, number>();
  for (const [bname, entries, fn] of benches) {
    perOp.set(bname, entries);
    suite.add(bname, fn, opts.quick ? { minSamples: 5, maxTime: 0.5 } : { minSamples: 20, maxTime: 2 });
  }
  const out: BenchResult[] = [];
  suite.on('cycle', (ev: Benchmark.Event) => {
    const b = ev.target as unknown as Benchmark;
    const entries = perOp.get(String(b.name))!;
    const r: BenchResult = {
      suite: name,
      name: String(b.name),
      opsPerSec: b.hz!,
      rme: b.stats!.rme,
      entriesPerOp: entries,
      entriesPerSec: b.hz! * entries,
    };
    out.push(r);
    if (!opts.json) {
      process.stdout.write(
        `  ${r.name.padEnd(28)} ${fmtNum(r.opsPerSec).padStart(10)} ops/s ±${r.rme.toFixed(1).padStart(4)}%` +
          `  ${fmtNum(r.entriesPerSec).padStart(8)} entries/s\n`,
      );
    }
  });
  if (!opts.json) process.stdout.write(`${name}\n`);
  suite.run({ async: false });
  if (!opts.json) {
    // Compared on entries/sec: ops differ in size across refcount orders.
    const best = Math.max(...out.map((r) => r.entriesPerSec));
    process.stdout.write(`  entries/s relative to fastest: ${out.map((r) => `${r.name} ${(r.entriesPerSec / best).toFixed(2)}`).join('; ')}\n\n`);
  }
  return out;
}

function fmtNum(n: number): string {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)}G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)}M`;
  if (n >= 1e3) return `${(n / 1e3).toFixed(1)}k`;
  return n.toFixed(0);
}

export function runL2Bench(opts: { quick: boolean; json: boolean }): BenchResult[] {
  const table = buildL2Table();
  const mix = checkScansAgree(table);
  if (!opts.json) {
    process.stdout.write(
      `L2 table: ${L2_ENTRIES} entries, ${TABLE_BYTES / 1024} KiB; unallocated/zero-plain/zero-alloc/normal/compressed = ${mix.join('/')}\n` +
        `host is ${littleEndian ? 'little' : 'big'}-endian; Node ${process.version}\n\n`,
    );
  }
  const counts = new Float64Array(KIND_COUNT + 1);
  const results = runSuite(
    'classify one L2 table (classifyL2 + entryOffset per entry)',
    SCANS.map(([n, scan]) => [n, L2_ENTRIES, () => {
      scan(table, counts);
      sink += counts[ClusterKind.Normal]!;
    }]),
    opts,
  );

  const refBenches: [string, number, () => void][] = [];
  for (const order of [0, 4, 6]) {
    const n = refblockEntries(CLUSTER_BITS, order);
    const block = new Uint8Array(TABLE_BYTES);
    const max = Math.min(maxRefcount(order), 0xffff);
    for (let i = 0; i < n; i++) setRefcount(block, i, order, (i * 7) % (max + 1));
    refBenches.push([`get order ${order} (${1 << order}-bit)`, n, () => {
      let s = 0;
      for (let i = 0; i < n; i++) s += getRefcount(block, i, order);
      sink += s;
    }]);
    refBenches.push([`set order ${order} (${1 << order}-bit)`, n, () => {
      for (let i = 0; i < n; i++) setRefcount(block, i, order, (i + sink) & max);
      sink++;
    }]);
  }
  results.push(...runSuite('refcount block get/set, one whole 64 KiB block per op', refBenches, opts));
  if (sink === -1) process.stdout.write('');
  return results;
}

export function l2Main(argv: string[]): void {
  const opts = { quick: false, json: false };
  for (const a of argv) {
    if (a === '--quick') opts.quick = true;
    else if (a === '--json') opts.json = true;
    else throw new Error(`l2: unknown option ${a} (use --quick, --json)`);
  }
  const results = runL2Bench(opts);
  if (opts.json) process.stdout.write(JSON.stringify(results, null, 2) + '\n');
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  l2Main(process.argv.slice(2));
}
