// Shared oracle plumbing for the engine/CLI tests: async runs (two cores are used), and the
// generated image kinds, built once per process with qemu-img/qemu-io and shared by every test file.
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { readFileSync, statSync, truncateSync, writeFileSync, openSync, writeSync, closeSync, readdirSync, fsyncSync } from 'node:fs';
import { join } from 'node:path';
import { FIXTURES, QIMG_BIN, mustQemuImg, mustQemuIo, tmpDir, type RunResult } from './helpers.js';

const baseEnv = { ...process.env, LC_ALL: 'C', TZ: process.env.TZ ?? 'UTC' };

export interface AsyncRunOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** Kill the child after this many ms (status becomes -1). */
  timeoutMs?: number;
}

/** Runs a command without blocking the event loop, so several can run at once. */
export function runAsync(cmd: string, args: string[], o: AsyncRunOptions = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: { ...baseEnv, ...(o.env ?? {}) }, cwd: o.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (b: Buffer) => out.push(b));
    child.stderr.on('data', (b: Buffer) => err.push(b));
    const timer = o.timeoutMs ? setTimeout(() => child.kill('SIGKILL'), o.timeoutMs) : null;
    child.on('error', reject);
    child.on('close', (code) => {
      if (timer) clearTimeout(timer);
      resolve({ status: code ?? -1, stdout: Buffer.concat(out).toString('utf8'), stderr: Buffer.concat(err).toString('utf8') });
    });
  });
}

export const qimgA = (args: string[], o: AsyncRunOptions = {}) => runAsync(process.execPath, [QIMG_BIN, ...args], o);
/** qemu-img, retried briefly while a concurrent qimg reader's lock refuses it (see helpers.ts). */
export async function qemuImgA(args: string[], o: AsyncRunOptions = {}): Promise<RunResult> {
  let r = await runAsync('qemu-img', args, o);
  for (let i = 0; i < 3 && r.status !== 0 && /Failed to (get (shared )?"[a-z -]+" lock|lock byte)/.test(r.stderr); i++) {
    await new Promise((res) => setTimeout(res, 100));
    r = await runAsync('qemu-img', args, o);
  }
  return r;
}

/** Runs tasks with at most `n` in flight; results in input order. */
export async function pool<T>(tasks: (() => Promise<T>)[], n = 3): Promise<T[]> {
  const results = new Array<T>(tasks.length);
  let next = 0;
  const worker = async () => {
    while (next < tasks.length) {
      const i = next++;
      results[i] = await tasks[i]!();
    }
  };
  await Promise.all(Array.from({ length: Math.min(n, tasks.length) }, worker));
  return results;
}

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/**
 * fsyncs every file in `dir`: a freshly written file's st_blocks (disk size) can still change at
 * writeback, which would make qemu-img and qimg, run a few seconds apart, disagree.
 */
export function settle(dir: string): void {
  for (const f of readdirSync(dir)) {
    const p = join(dir, f);
    if (!statSync(p).isFile()) continue;
    const fd = openSync(p, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }
}

export function allocatedBytes(path: string): number {
  return statSync(path).blocks * 512;
}

/** Overwrites bytes of a file in place (build-then-poke). */
export function poke(path: string, offset: number, bytes: number[] | Uint8Array): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, Uint8Array.from(bytes), 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

export function be32(v: number): number[] {
  return [(v >>> 24) & 0xff, (v >>> 16) & 0xff, (v >>> 8) & 0xff, v & 0xff];
}

export function be64(v: number): number[] {
  return [...be32(Math.floor(v / 2 ** 32)), ...be32(v >>> 0)];
}

export interface SnapshotRef {
  id: string;
  name: string;
}

export interface Kind {
  name: string;
  /** Absolute path of the top image. */
  path: string;
  /** Directory holding it (and its backing files). */
  dir: string;
  /** Internal snapshots, as qemu-img lists them. */
  snapshots: SnapshotRef[];
  /** LUKS: qemu-img needs a secret, qimg reads nothing. */
  encrypted?: boolean;
}

export function snapshotsOf(path: string, cwd?: string): SnapshotRef[] {
  const j = JSON.parse(mustQemuImg(['info', '-U', '--output=json', path], {}, cwd)) as { snapshots?: SnapshotRef[] };
  return (j.snapshots ?? []).map((s) => ({ id: s.id, name: s.name }));
}

/** Every fixture image (not the script or sums), in its checked-out place. */
export function fixtureKinds(): Kind[] {
  return readdirSync(FIXTURES)
    .filter((f) => /\.(qcow2|img)$/.test(f))
    .sort()
    .map((f) => {
      const path = join(FIXTURES, f);
      const encrypted = f === 'luks.qcow2';
      return { name: `fixture:${f}`, path, dir: FIXTURES, snapshots: encrypted ? [] : snapshotsOf(path), encrypted };
    });
}

function io(path: string, cmds: string[], extra: string[] = []): void {
  mustQemuIo([...extra, ...cmds.flatMap((c) => ['-c', c]), path]);
}

let cached: Kind[] | null = null;

const MiB = 1024 * 1024;

/**
 * The generated image kinds (built once per process). Every image is small (a few MiB) and
 * written with patterns at unaligned offsets so that misplaced bytes show.
 */
export function generatedKinds(): Kind[] {
  if (cached) return cached;
  const dir = tmpDir('qimg-kinds-');
  const kinds: Kind[] = [];
  const add = (name: string, file: string) => {
    const path = join(dir, file);
    kinds.push({ name, path, dir, snapshots: snapshotsOf(path) });
  };
  const create = (file: string, opts: string, size: number | string, extra: string[] = []) =>
    mustQemuImg(['create', '-q', '-f', 'qcow2', ...(opts ? ['-o', opts] : []), ...extra, file, String(size)], {}, dir);
  const p = (file: string) => join(dir, file);

  // Cluster sizes, each with partial-cluster writes that straddle cluster boundaries.
  for (const [cs, size] of [[512, 4 * MiB], [4096, 4 * MiB], [65536, 4 * MiB], [2 * MiB, 8 * MiB]] as const) {
    const f = `cs${cs}.qcow2`;
    create(f, `cluster_size=${cs}`, size);
    io(p(f), [
      'write -P 0x11 0 1536',
      'write -P 0x12 1000 3333',
      `write -P 0x13 ${cs - 7} 20`,
      `write -P 0x14 ${MiB + 12345} 70001`,
      `write -P 0x15 ${size - 1000} 1000`,
      `write -z ${2 * MiB} ${cs}`,
    ]);
    add(`cluster ${cs}`, f);
  }

  // Refcount widths (refcount_order 0..6).
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    const f = `rb${bits}.qcow2`;
    create(f, `refcount_bits=${bits}`, 4 * MiB);
    io(p(f), [`write -P 0x${(0x20 + bits).toString(16)} 4096 10000`, `write -P 0x2f ${3 * MiB + 511} 4097`]);
    add(`refcount_bits ${bits}`, f);
  }

  // compat 0.10 (v2 header) with a snapshot, and compat 1.1 with lazy refcounts.
  create('v2.qcow2', 'compat=0.10', 4 * MiB);
  io(p('v2.qcow2'), ['write -P 0x31 0 65536', 'write -P 0x32 2097152 4096']);
  mustQemuImg(['snapshot', '-c', 'v2s', p('v2.qcow2')]);
  io(p('v2.qcow2'), ['write -P 0x33 512 1024', 'write -z 2097152 4096']);
  add('compat 0.10', 'v2.qcow2');
  create('v3lazy.qcow2', 'compat=1.1,lazy_refcounts=on', 4 * MiB);
  io(p('v3lazy.qcow2'), ['write -P 0x34 100 5000']);
  add('compat 1.1 lazy', 'v3lazy.qcow2');

  // Zero clusters: without a host cluster, with one (write -z after data), unmapped (-u).
  create('zero.qcow2', 'cluster_size=4096', 4 * MiB);
  io(p('zero.qcow2'), [
    'write -P 0x41 0 65536',
    'write -z 8192 8192',
    'write -z 1048576 65536',
    'write -P 0x42 2097152 16384',
    'write -z -u 2101248 4096',
    'write -z 3000 1000',
  ]);
  add('zero clusters', 'zero.qcow2');

  // preallocation=metadata (every L2 entry points at a host cluster that reads as zero).
  create('prealloc.qcow2', 'preallocation=metadata,cluster_size=65536', 4 * MiB);
  io(p('prealloc.qcow2'), ['write -P 0x43 70000 5000', 'write -z 131072 65536']);
  add('preallocation=metadata', 'prealloc.qcow2');

  // Discard.
  create('discard.qcow2', 'cluster_size=4096', 4 * MiB);
  io(p('discard.qcow2'), ['write -P 0x51 0 1048576', 'discard 4096 8192', 'discard 65536 65536', 'discard 500000 3000']);
  add('discard', 'discard.qcow2');

  // Compressed: convert -c (zlib, zstd) and qemu-io write -c.
  const src = p('comp-src.raw');
  writeFileSync(src, new Uint8Array(0));
  truncateSync(src, 4 * MiB);
  io(src, ['write -P 0x61 0 65536', 'write -P 0x62 65536 65536', 'write -P 0x63 1048576 131072', 'write -P 0x64 3145728 32768', 'write -P 0x65 4190000 4304'], ['-f', 'raw']);
  for (const ct of ['zlib', 'zstd']) {
    mustQemuImg(['convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `compression_type=${ct},cluster_size=65536`, src, p(`comp-${ct}.qcow2`)]);
    add(`compressed ${ct} (convert -c)`, `comp-${ct}.qcow2`);
  }
  for (const ct of ['zlib', 'zstd']) {
    const f = `compio-${ct}.qcow2`;
    create(f, `compression_type=${ct},cluster_size=4096`, 4 * MiB);
    io(p(f), ['write -c -P 0x66 0 4096', 'write -c -P 0x67 8192 4096', 'write -P 0x68 9000 100', 'write -c -P 0x69 1048576 4096']);
    add(`compressed ${ct} (write -c)`, f);
  }

  // Extended L2: subcluster writes, zero subclusters, and an extl2 overlay over a base.
  create('extl2.qcow2', 'extended_l2=on,cluster_size=65536', 4 * MiB);
  io(p('extl2.qcow2'), ['write -P 0x71 0 2048', 'write -P 0x72 6144 4096', 'write -z 8192 2048', 'write -P 0x73 63488 4096', 'write -z 1048576 2048', 'write -P 0x74 2100000 777']);
  add('extended_l2', 'extl2.qcow2');
  create('extl2-base.qcow2', 'cluster_size=4096', 4 * MiB);
  io(p('extl2-base.qcow2'), ['write -P 0x75 0 262144']);
  create('extl2-ov.qcow2', 'extended_l2=on,cluster_size=32768', 4 * MiB, ['-b', 'extl2-base.qcow2', '-F', 'qcow2']);
  io(p('extl2-ov.qcow2'), ['write -P 0x76 1024 1024', 'write -z 4096 1024', 'write -P 0x77 40000 3000', 'discard 65536 32768']);
  add('extended_l2 overlay', 'extl2-ov.qcow2');

  // Backing chain of depth 3 over a raw bottom: raw <- c1 <- c2 <- c3.
  const raw = p('chain0.raw');
  writeFileSync(raw, new Uint8Array(0));
  truncateSync(raw, 4 * MiB);
  io(raw, ['write -P 0x81 0 1048576', 'write -P 0x82 3145728 1048576'], ['-f', 'raw']);
  create('chain1.qcow2', 'cluster_size=4096', 4 * MiB, ['-b', 'chain0.raw', '-F', 'raw']);
  io(p('chain1.qcow2'), ['write -P 0x83 4096 4096', 'write -z 65536 65536', 'write -P 0x84 2097152 4096']);
  create('chain2.qcow2', 'cluster_size=65536', 4 * MiB, ['-b', 'chain1.qcow2', '-F', 'qcow2']);
  io(p('chain2.qcow2'), ['write -P 0x85 70000 100', 'write -z 3145728 4096', 'write -P 0x86 2099000 5000']);
  create('chain3.qcow2', 'cluster_size=512', 4 * MiB, ['-b', 'chain2.qcow2', '-F', 'qcow2']);
  io(p('chain3.qcow2'), ['write -P 0x87 1 1', 'discard 3149824 4096', 'write -P 0x88 4194000 304']);
  add('chain depth 1 (raw backing)', 'chain1.qcow2');
  add('chain depth 3', 'chain3.qcow2');

  // An overlay larger than its backing; the backing ends inside an overlay cluster.
  create('small-base.qcow2', 'cluster_size=512', 1050112);
  io(p('small-base.qcow2'), ['write -P 0x91 0 1050112']);
  create('big-ov.qcow2', 'cluster_size=65536', 4 * MiB, ['-b', 'small-base.qcow2', '-F', 'qcow2']);
  io(p('big-ov.qcow2'), ['write -P 0x92 100 100']);
  add('overlay larger than backing', 'big-ov.qcow2');

  // Internal snapshots, one of them of a smaller disk (the image was grown afterwards).
  create('snaps.qcow2', 'cluster_size=4096', 2 * MiB);
  io(p('snaps.qcow2'), ['write -P 0xa1 0 20000', 'write -P 0xa2 1048576 4096']);
  mustQemuImg(['snapshot', '-c', 'first', p('snaps.qcow2')]);
  io(p('snaps.qcow2'), ['write -P 0xa3 4096 4096', 'write -z 1048576 4096', 'discard 8192 4096']);
  mustQemuImg(['snapshot', '-c', 'second snap', p('snaps.qcow2')]);
  mustQemuImg(['resize', '-q', p('snaps.qcow2'), String(4 * MiB)]);
  io(p('snaps.qcow2'), ['write -P 0xa4 3000000 5000', 'write -P 0xa5 0 100']);
  mustQemuImg(['snapshot', '-c', '7', p('snaps.qcow2')]);
  mustQemuImg(['snapshot', '-c', 'first', p('snaps.qcow2')]);
  io(p('snaps.qcow2'), ['write -P 0xa6 0 4096']);
  add('internal snapshots', 'snaps.qcow2');

  // External data files (plain and data_file_raw).
  create('ext.qcow2', `data_file=${p('ext.data')}`, 4 * MiB);
  io(p('ext.qcow2'), ['write -P 0xb1 1000 70000', 'write -z 131072 65536', 'write -P 0xb2 3145728 65536']);
  add('external data file', 'ext.qcow2');
  create('extraw.qcow2', `data_file=${p('extraw.data')},data_file_raw=on`, 4 * MiB);
  io(p('extraw.qcow2'), ['write -P 0xb3 1000 70000', 'write -P 0xb4 3145728 65536']);
  add('external data file (raw)', 'extraw.qcow2');

  settle(dir);
  cached = kinds;
  return kinds;
}
