// The floor under `convert` in Node: a bare copy of a file's bytes, with no qcow2 logic at all,
// timed against `qemu-img convert` of the same file in paired rounds. If Node cannot copy the
// bytes faster than qemu-img converts them, no amount of work in qimg's engine will.
//
//   node dist/bench/raw-copy.js SOURCE [--runs N] [--chunk-mib N] [--buffers N]
//
// Each round runs, in a fresh process each: this script copying SOURCE (2 MiB chunks, 4 buffers
// of async reads and writes on libuv's threads, as convert overlaps them), and
// `qemu-img convert -O qcow2` of SOURCE. Wall times include process start-up for both.
// It reports; it never fails.

import { spawnSync } from 'node:child_process';
import { closeSync, fstatSync, mkdtempSync, openSync, read, rmSync, write } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ioBuffer } from '../src/qcow2/io/buffers.js';

function arg(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i > 0 ? Number(process.argv[i + 1]) : fallback;
}

/** The child: copies argv[3] to argv[4] and exits. */
async function copy(src: string, dst: string, chunk: number, buffers: number): Promise<void> {
  const fi = openSync(src, 'r');
  const fo = openSync(dst, 'w');
  const size = fstatSync(fi).size;
  const rd = (b: Uint8Array, p: number) => new Promise<number>((res, rej) => read(fi, b, 0, b.length, p, (e, n) => (e ? rej(e) : res(n))));
  const wr = (b: Uint8Array, n: number, p: number) => new Promise<number>((res, rej) => write(fo, b, 0, n, p, (e, w) => (e ? rej(e) : res(w))));
  // Page-aligned, as convert's own (io/buffers.ts): reads into calloc's memory cost several times the CPU.
  const bufs = Array.from({ length: buffers }, () => ioBuffer(chunk));
  const inflight: Array<Promise<unknown>> = bufs.map(() => Promise.resolve());
  for (let pos = 0, k = 0; pos < size; pos += chunk, k++) {
    const i = k % buffers;
    const at = pos;
    await inflight[i];
    inflight[i] = rd(bufs[i]!, at).then((n) => wr(bufs[i]!, n, at));
  }
  await Promise.all(inflight);
  closeSync(fi);
  closeSync(fo);
}

function timed(cmd: string, args: string[]): number {
  const env = { ...process.env };
  delete env.NODE_EXTRA_CA_CERTS; // as bin/qimg.js starts Node
  const t = process.hrtime.bigint();
  const r = spawnSync(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return Number(process.hrtime.bigint() - t) / 1e9;
}

const median = (a: number[]) => [...a].sort((x, y) => x - y)[a.length >> 1]!;

async function main(): Promise<void> {
  if (process.argv[2] === '--child') {
    await copy(process.argv[3]!, process.argv[4]!, Number(process.argv[5]), Number(process.argv[6]));
    return;
  }
  const src = process.argv[2];
  if (!src || src.startsWith('--')) {
    console.error('usage: node dist/bench/raw-copy.js SOURCE [--runs N] [--chunk-mib N] [--buffers N]');
    process.exit(2);
  }
  const runs = arg('--runs', 5);
  const chunk = arg('--chunk-mib', 2) * 1024 * 1024;
  const buffers = arg('--buffers', 4);
  const dir = mkdtempSync(join(tmpdir(), 'qimg-raw-copy-'));
  const self = fileURLToPath(import.meta.url);
  const node: number[] = [];
  const qemu: number[] = [];
  try {
    for (let r = 0; r < runs; r++) {
      for (const f of ['copy.bin', 'out.qcow2']) rmSync(join(dir, f), { force: true });
      node.push(timed(process.execPath, [self, '--child', src, join(dir, 'copy.bin'), String(chunk), String(buffers)]));
      qemu.push(timed('qemu-img', ['convert', '-O', 'qcow2', src, join(dir, 'out.qcow2')]));
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  const ratios = node.map((n, i) => n / qemu[i]!);
  console.log(`raw copy in Node ${median(node).toFixed(3)} s, qemu-img convert ${median(qemu).toFixed(3)} s, ratio ${median(ratios).toFixed(2)} (${runs} paired rounds)`);
}

await main();
