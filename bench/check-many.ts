// qimg check vs qemu-img check on an image with 65,536 internal snapshots (QEMU's maximum).
//
//   node dist/bench/check-many.js [--runs N] [--dir DIR] [--count N]
//
// Making that many snapshots with `qemu-img snapshot -c` takes hours (each rewrites the whole
// table), so the image is assembled directly, once, and cached in DIR (default
// /tmp/qimg-check-bench): qemu-img creates a 32 KiB image (512-byte clusters, 32-bit refcounts,
// one data cluster written by qemu-io); then N snapshots are added that all share its L2 table
// and data cluster, each with its own one-cluster L1 table, with a new snapshot table and new
// refcount structures that count everything exactly. `qemu-img check` must find it clean
// before it is used. Runs are paired (qemu-img, then qimg) with warm page cache; medians.

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const runner = resolve(here, 'check-run.js');

function arg(name: string, dflt: string): string {
  const i = process.argv.indexOf(name);
  return i >= 0 && process.argv[i + 1] ? process.argv[i + 1]! : dflt;
}

function must(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

const TWO32 = 2 ** 32;
const COPIED = 0x80000000;

/** Assembles the image described above at `out`. */
export function makeManySnapshots(out: string, count: number): void {
  const tmp = out + '.tmp';
  must('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=32', tmp, '32K']);
  must('qemu-io', ['-c', 'write -P 7 0 512', tmp]);
  const src = new Uint8Array(readFileSync(tmp));
  const sdv = new DataView(src.buffer);
  const cs = 512;
  const q = (off: number) => sdv.getUint32(off) * TWO32 + sdv.getUint32(off + 4);
  const l1off = q(40);
  const l2 = (sdv.getUint32(l1off) & 0xffffff) * TWO32 + ((sdv.getUint32(l1off + 4) & 0xfffffe00) >>> 0);
  const dataOff = (sdv.getUint32(l2) & 0xffffff) * TWO32 + ((sdv.getUint32(l2 + 4) & 0xfffffe00) >>> 0);
  const first = Math.ceil(src.length / cs); // first snapshot L1 cluster
  // Snapshot table entries: l1 offset, l1_size 1, id, name "sN", 24 bytes of extra data.
  const enc = new TextEncoder();
  const entries: Uint8Array[] = [];
  let tableBytes = 0;
  for (let i = 0; i < count; i++) {
    const id = enc.encode(String(i + 1));
    const name = enc.encode(`s${i + 1}`);
    const e = new Uint8Array(40 + 24 + id.length + name.length);
    const dv = new DataView(e.buffer);
    const l1 = (first + i) * cs;
    dv.setUint32(0, Math.floor(l1 / TWO32));
    dv.setUint32(4, l1 % TWO32);
    dv.setUint32(8, 1);
    dv.setUint16(12, id.length);
    dv.setUint16(14, name.length);
    dv.setUint32(16, 1700000000 + i);
    dv.setUint32(36, 24);
    dv.setUint32(40 + 12, 32 * 1024); // disk size
    e.fill(0xff, 40 + 16, 40 + 24); // no icount
    e.set(id, 64);
    e.set(name, 64 + id.length);
    entries.push(e);
    tableBytes = Math.ceil(tableBytes / 8) * 8 + e.length;
  }
  const table = first + count;
  const tableClusters = Math.ceil(tableBytes / cs);
  const rbStart = table + tableClusters;
  const per = cs / 4; // 32-bit refcounts
  // Refcount blocks and table at the end; they must also count themselves.
  let blocks = 0;
  let rtClusters = 0;
  for (;;) {
    const total = rbStart + blocks + rtClusters;
    const nb = Math.ceil(total / per);
    const nrt = Math.ceil((nb * 8) / cs);
    if (nb === blocks && nrt === rtClusters) break;
    blocks = nb;
    rtClusters = nrt;
  }
  const total = rbStart + blocks + rtClusters;
  const img = new Uint8Array(total * cs);
  const dv = new DataView(img.buffer);
  img.set(src.subarray(0, Math.min(src.length, first * cs)));
  // Old refcount structures: no longer referenced, zeroed.
  const oldRt = q(48);
  const oldRtClusters = sdv.getUint32(56);
  for (let t = 0; t < (oldRtClusters * cs) / 8; t++) {
    const rb = q(oldRt + t * 8);
    if (rb) img.fill(0, rb, rb + cs);
  }
  img.fill(0, oldRt, oldRt + oldRtClusters * cs);
  // Shared now: no OFLAG_COPIED on the active L1 entry and L2 entry.
  dv.setUint32(l1off, (dv.getUint32(l1off) & ~COPIED) >>> 0);
  dv.setUint32(l2, (dv.getUint32(l2) & ~COPIED) >>> 0);
  const l1Entry = img.slice(l1off, l1off + 8);
  for (let i = 0; i < count; i++) img.set(l1Entry, (first + i) * cs);
  let off = table * cs;
  for (const e of entries) {
    off = Math.ceil(off / 8) * 8;
    img.set(e, off);
    off += e.length;
  }
  // Refcounts of everything referenced.
  const rc = new Uint32Array(total);
  rc[0] = 1;
  rc[l1off / cs] = 1;
  rc[l2 / cs] = count + 1;
  rc[dataOff / cs] = count + 1;
  for (let c = first; c < total; c++) rc[c] = 1;
  const rtOff = (rbStart + blocks) * cs;
  for (let b = 0; b < blocks; b++) {
    const at = (rbStart + b) * cs;
    dv.setUint32(rtOff + b * 8 + 4, at);
    for (let k = 0; k < per && b * per + k < total; k++) dv.setUint32(at + k * 4, rc[b * per + k]!);
  }
  dv.setUint32(48, 0);
  dv.setUint32(52, rtOff);
  dv.setUint32(56, rtClusters);
  dv.setUint32(60, count);
  dv.setUint32(64, 0);
  dv.setUint32(68, table * cs);
  writeFileSync(tmp, img);
  const chk = spawnSync('qemu-img', ['check', tmp], { encoding: 'utf8' });
  if (chk.status !== 0) throw new Error(`generated image is not clean:\n${chk.stdout}${chk.stderr}`);
  renameSync(tmp, out);
}

function timed(cmd: string, args: string[]): { wall: number; stdout: string; status: number } {
  const t0 = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 1 << 26 });
  return { wall: Number(process.hrtime.bigint() - t0) / 1e9, stdout: r.stdout, status: r.status ?? -1 };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function main(): void {
  const runs = Number(arg('--runs', '3'));
  const count = Number(arg('--count', '65536'));
  const dir = arg('--dir', '/tmp/qimg-check-bench');
  mkdirSync(dir, { recursive: true });
  const img = join(dir, `many${count}.qcow2`);
  if (!existsSync(img)) {
    process.stderr.write(`assembling an image with ${count} snapshots...\n`);
    makeManySnapshots(img, count);
  }
  const q0 = timed('qemu-img', ['check', img]);
  const m0 = timed(process.execPath, [runner, img]);
  if (q0.stdout !== m0.stdout || q0.status !== m0.status) throw new Error(`reports differ:\n${q0.stdout}\n---\n${m0.stdout}`);
  const qs: number[] = [];
  const ms: number[] = [];
  const ratios: number[] = [];
  for (let i = 0; i < runs; i++) {
    const a = timed('qemu-img', ['check', img]).wall;
    const b = timed(process.execPath, [runner, img]).wall;
    qs.push(a);
    ms.push(b);
    ratios.push(b / a);
  }
  console.log(`${count} snapshots: qemu-img ${median(qs).toFixed(3)} s, qimg ${median(ms).toFixed(3)} s, median paired ratio ${median(ratios).toFixed(3)}`);
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) main();
