// benchmark.js suite for the checker's L2 scan loop (src/qcow2/check/checker.ts fastRun):
// one op = one 64 KiB standard L2 table (8192 entries) of allocated, contiguous, COPIED data
// clusters, counted into the refcount array with the OFLAG_COPIED bitmap check on and off.
//
//   node dist/bench/check-l2-scan.js
import Benchmark from 'benchmark';
import { fastRun } from '../src/qcow2/check/checker.js';

const CB = 16;
const CS = 1 << CB;
const N = CS / 8;
const table = new Uint8Array(CS);
const dv = new DataView(table.buffer);
const firstCluster = 5000;
for (let i = 0; i < N; i++) {
  const off = (firstCluster + i) * CS;
  dv.setUint32(i * 8, (0x80000000 | Math.floor(off / 2 ** 32)) >>> 0);
  dv.setUint32(i * 8 + 4, off >>> 0);
}
const clusters = firstCluster + N + 1;
const ones = new Uint8Array(Math.ceil(clusters / 8)).fill(0xff);
const st = new Float64Array(3);
const lowMask = 0x1fe | ((CS - 1) & ~0x1ff);

function runOnce(arr: Uint8Array | Uint16Array | Uint32Array, withCopied: boolean): number {
  arr.fill(0, firstCluster, firstCluster + N);
  st.fill(0);
  return fastRun(dv, 0, N, arr, 1, 0xff, lowMask, CB, CS, clusters, withCopied ? ones : new Uint8Array(0), st);
}

const u8 = new Uint8Array(clusters);
const u16 = new Uint16Array(clusters);
if (runOnce(u8, true) !== N || st[0] !== N) throw new Error('fastRun did not take every entry');

const suite = new Benchmark.Suite('check L2 scan');
suite
  .add('fastRun u8 counters + COPIED check', () => runOnce(u8, true))
  .add('fastRun u8 counters, no COPIED check', () => runOnce(u8, false))
  .add('fastRun u16 counters + COPIED check', () => runOnce(u16, true))
  .on('cycle', (e: Benchmark.Event) => {
    const t = e.target as Benchmark.Target & { hz: number };
    console.log(`${String(e.target)}  (${((t.hz * N) / 1e6).toFixed(0)} M entries/s)`);
  })
  .run({ async: false });
