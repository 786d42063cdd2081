// convert's overlapped copy: images several chunks long (many reads, writes and compressions in
// flight at once) come out identical and clean, and an error in the middle of the stream — a
// failing read, a corrupt source cluster, a full disk — ends it with one clear message: no stack
// trace, no hang, nothing left running.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { closeSync, copyFileSync, ftruncateSync, openSync, readFileSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { QIMG_BIN, mustQemuImg, mustQemuIo, qemuImg, tmpDir } from '../helpers.js';
import { convertFrom } from '../../src/qcow2/engine/convert.js';
import { RawImage } from '../../src/qcow2/engine/raw-image.js';
import { openImage } from '../../src/qcow2/engine/open.js';
import { Qcow2Image } from '../../src/qcow2/engine/qcow2-image.js';
import { MemoryFile } from '../../src/qcow2/io/memory-file.js';
import { QimgError, ioError } from '../../src/qcow2/errors.js';
import { u32 } from '../../src/qcow2/format/bytes.js';
import { compressedOffset, entryOffset } from '../../src/qcow2/format/entries.js';
import { OFLAG_COMPRESSED_HI } from '../../src/qcow2/format/layout.js';

const MiB = 1024 * 1024;
/** 20 chunks of 2 MiB and a cut last cluster: the pipeline's buffers are reused many times over. */
const SIZE = 40 * MiB + 1536;
const dir = tmpDir('qimg-convert-pipe-');

/** Random (incompressible) and patterned (compressible) data, zeros written out, and holes, at odd offsets. */
function makeRaw(path: string): void {
  const fd = openSync(path, 'w');
  const put = (off: number, len: number, fill: number | 'random'): void => {
    const b = Buffer.alloc(len, fill === 'random' ? 0 : fill);
    if (fill === 'random') randomFillSync(b);
    writeSync(fd, b, 0, len, off);
  };
  put(0, 3 * MiB, 0x11);
  put(5 * MiB + 512, 700 * 1024, 'random');
  put(9 * MiB, 4 * MiB, 0x33);
  put(10 * MiB, MiB, 0); // zeros over data, written as bytes
  put(17 * MiB + 4096, 64 * 1024 - 512, 'random');
  put(21 * MiB, 128 * 1024, 0);
  put(24 * MiB, 6 * MiB, 'random');
  put(32 * MiB, 2 * MiB, 0x66);
  put(SIZE - 4096, 4096, 0x55); // data in the last, partial cluster
  ftruncateSync(fd, SIZE);
  closeSync(fd);
}

const raw = join(dir, 'src.raw');
makeRaw(raw);
const qcow2 = join(dir, 'src.qcow2');
mustQemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow2]);
// Zero clusters (not zero bytes) in the qcow2 source, one over data.
mustQemuIo(['-f', 'qcow2', '-c', 'write -z 12M 512k', '-c', 'write -z 26M 1M', qcow2]);
const compressed = join(dir, 'src-c.qcow2');
mustQemuImg(['convert', '-c', '-f', 'qcow2', '-O', 'qcow2', qcow2, compressed]);

function runQimg(args: string[]): { status: number | null; stderr: string; timedOut: boolean } {
  const r = spawnSync(process.execPath, [QIMG_BIN, ...args], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stderr: r.stderr, timedOut: r.error !== undefined || r.signal !== null };
}

function identical(a: string, b: string): void {
  const r = qemuImg(['compare', '-U', a, b]);
  assert.is(r.status, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

function clean(path: string): void {
  const r = qemuImg(['check', path]);
  assert.is(r.status, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
}

const TARGETS: Array<{ name: string; args: string[] }> = [
  { name: 'qcow2', args: ['-O', 'qcow2'] },
  { name: 'qcow2 -c', args: ['-O', 'qcow2', '-c'] },
  { name: 'qcow2 4k clusters', args: ['-O', 'qcow2', '-o', 'cluster_size=4096'] },
  { name: 'qcow2 extended L2', args: ['-O', 'qcow2', '-o', 'extended_l2=on'] },
  { name: 'raw', args: ['-O', 'raw'] },
];

let seq = 0;
for (const [srcName, src, fmt] of [
  ['raw', raw, 'raw'],
  ['qcow2', qcow2, 'qcow2'],
  ['compressed qcow2', compressed, 'qcow2'],
] as const) {
  for (const t of TARGETS) {
    test(`convert ${srcName} -> ${t.name}, 20 chunks: identical, clean, as sparse as qemu-img`, () => {
      const out = join(dir, `o${seq++}`);
      const r = runQimg(['convert', '-f', fmt, ...t.args, src, out]);
      assert.is(r.status, 0, r.stderr);
      identical(src, out);
      if (t.args.includes('qcow2')) clean(out);
      else {
        const ref = join(dir, `ref${seq++}`);
        mustQemuImg(['convert', '-f', fmt, '-O', 'raw', src, ref]);
        assert.is(statSync(out).size, statSync(ref).size);
        assert.ok(statSync(out).blocks <= statSync(ref).blocks + 8, `raw output allocates ${statSync(out).blocks} blocks, qemu-img ${statSync(ref).blocks}`);
      }
    });
  }
}

test('convert -B over many chunks writes only what differs from the new backing file', () => {
  const base = join(dir, 'base.qcow2');
  mustQemuImg(['convert', '-f', 'raw', '-O', 'qcow2', raw, base]);
  // The source differs from the base in two places, one of them zeros over the base's data.
  const src = join(dir, 'changed.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', src]);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0x77 15M 64k', '-c', 'write -z 24M 64k', src]);
  const out = join(dir, 'top.qcow2');
  const r = runQimg(['convert', '-O', 'qcow2', '-B', base, '-F', 'qcow2', src, out]);
  assert.is(r.status, 0, r.stderr);
  clean(out);
  identical(src, out);
  const map = JSON.parse(mustQemuImg(['map', '--output=json', out])) as Array<{ depth: number; data: boolean; zero: boolean; length: number }>;
  const own = map.filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
  assert.is(own, 64 * 1024, `the output holds ${own} bytes of its own data`);
});

/** A raw source in memory whose async reads fail with EIO from the `failAt`-th one on. */
class FailingFile extends MemoryFile {
  reads = 0;
  constructor(
    data: Uint8Array,
    readonly failAt: number,
  ) {
    super(data, 'failing.raw', false);
  }
  async readAsync(buf: Uint8Array, pos: number): Promise<number> {
    const n = ++this.reads;
    await new Promise((resolve) => setTimeout(resolve, 1)); // completes later, like the thread pool
    if (n >= this.failAt) throw ioError(Object.assign(new Error('EIO'), { code: 'EIO' }), this.path, 'Could not read');
    return this.read(buf, pos);
  }
}

for (const t of [
  { name: 'qcow2', opts: { outputFormat: 'qcow2' as const } },
  { name: 'qcow2 -c', opts: { outputFormat: 'qcow2' as const, compress: true } },
  { name: 'raw', opts: { outputFormat: 'raw' as const } },
]) {
  test(`a read failing mid-stream (-> ${t.name}) rejects once, with the read error, and leaves nothing running`, async () => {
    const file = new FailingFile(readFileSync(raw), 6);
    const source = new RawImage(file, 'failing.raw');
    let err: unknown = null;
    try {
      await convertFrom(source, join(dir, `fail${seq++}`), t.opts);
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof QimgError, `expected a QimgError, got ${String(err)}`);
    assert.is((err as QimgError).message, "Could not read 'failing.raw': Input/output error");
    // Reads already started settled before the rejection; none start afterwards.
    const reads = file.reads;
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.is(file.reads, reads);
    assert.ok(reads < 20, `${reads} reads: the copy stopped at the first failure`);
  });
}

/** An image in memory whose async reads land late (like the thread pool's) and are counted until they do. */
class SlowFile extends MemoryFile {
  pending = 0;
  async readAsync(buf: Uint8Array, pos: number): Promise<number> {
    this.pending++;
    try {
      await new Promise((resolve) => setTimeout(resolve, 30));
      return this.read(buf, pos);
    } finally {
      this.pending--;
    }
  }
}

test('a damaged L2 entry met after a read has started: the read lands before convert rejects (no read on a closed file)', async () => {
  // Guest cluster 0 is read on its own (cluster 1 is unallocated); the entry of cluster 3 is made
  // unaligned, so the walk of the first chunk throws while cluster 0's read is still running.
  const src = join(dir, 'late.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', src, '4M']);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0x5a 0 64k', '-c', 'write -P 0x5b 128k 128k', src]);
  const bytes = new Uint8Array(readFileSync(src));
  const probe = Qcow2Image.open(new MemoryFile(bytes, 'late.qcow2', false), 'late.qcow2');
  const l2 = entryOffset(u32(probe.l1, 0), u32(probe.l1, 4));
  const at = l2 + 3 * 8 + 4;
  const lo = u32(bytes, at) + 512;
  bytes.set([lo >>> 24, (lo >>> 16) & 0xff, (lo >>> 8) & 0xff, lo & 0xff], at);
  for (const outputFormat of ['raw', 'qcow2'] as const) {
    const file = new SlowFile(bytes, 'late.qcow2', false);
    const img = Qcow2Image.open(file, 'late.qcow2');
    let err: unknown = null;
    try {
      await convertFrom(img, join(dir, `late-out${seq++}`), { outputFormat });
    } catch (e) {
      err = e;
    }
    assert.ok(err instanceof QimgError, `${outputFormat}: expected a QimgError, got ${String(err)}`);
    assert.match((err as QimgError).message, /unaligned cluster offset/, outputFormat);
    assert.is(file.pending, 0, `${outputFormat}: a read was still running when convert rejected`);
  }
});

/** Guest offset -> host offset of a compressed cluster (the test source has a 64 KiB cluster size). */
async function compressedHost(path: string, guest: number): Promise<number> {
  const img = (await openImage(path, { forceShare: true })) as Qcow2Image;
  try {
    const gc = Math.floor(guest / img.clusterSize);
    const l1i = Math.floor(gc / img.l2Entries);
    const l2 = entryOffset(u32(img.l1, l1i * 8), u32(img.l1, l1i * 8 + 4));
    const t = img.l2Table(l2);
    const i = (gc % img.l2Entries) * 8;
    assert.ok(u32(t, i) & OFLAG_COMPRESSED_HI, `guest ${guest} is not a compressed cluster`);
    return compressedOffset(u32(t, i), u32(t, i + 4), img.clusterBits);
  } finally {
    await img.close();
  }
}

test('a corrupt cluster mid-stream: one qimg: line, exit 1, no stack trace, no hang (every output kind)', async () => {
  const bad = join(dir, 'bad.qcow2');
  copyFileSync(compressed, bad); // a copy to damage
  const host = await compressedHost(bad, 33 * MiB);
  const fd = openSync(bad, 'r+');
  writeSync(fd, Buffer.alloc(64, 0xff), 0, 64, host); // not a deflate stream any more
  closeSync(fd);
  for (const args of [['-O', 'qcow2'], ['-O', 'qcow2', '-c'], ['-O', 'raw']]) {
    const r = runQimg(['convert', ...args, bad, join(dir, `bad-out${seq++}`)]);
    assert.not.ok(r.timedOut, `${args.join(' ')}: timed out`);
    assert.is(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, /^qimg: compressed cluster at 0x[0-9a-f]+ cannot be decompressed \([^\n]*\)\n$/, `${args.join(' ')}: ${r.stderr}`);
  }
});

/** Runs a command with its file size limit at `kib` KiB (SIGXFSZ ignored: writes fail with EFBIG). */
function limited(kib: number, cmd: string[]): { status: number | null; stderr: string } {
  const r = spawnSync('sh', ['-c', `ulimit -f ${kib * 2}; trap '' XFSZ; exec "$@"`, 'sh', ...cmd], { encoding: 'utf8', timeout: 120_000 });
  return { status: r.status, stderr: r.stderr };
}

test('a raw target that cannot take the size: refused at its create step in qemu-img words, the device left alone', () => {
  // A device keeps its length (qemu-img: "Cannot grow device files"); a file past the size limit
  // fails its truncate. Neither gets a byte of data, and /dev/full stays a device.
  for (const [dst, limit] of [['/dev/full', 0], [join(dir, 'limited.raw'), 1024]] as const) {
    const args = ['convert', '-O', 'raw', qcow2, dst];
    const ours = limit ? limited(limit, [process.execPath, QIMG_BIN, ...args]) : runQimg(args);
    const theirs = limit ? limited(limit, ['qemu-img', ...args]) : qemuImg(args);
    assert.is(ours.status, 1, ours.stderr);
    assert.is(ours.stderr.replace(/^qimg: /, 'qemu-img: '), theirs.stderr, dst);
  }
  assert.ok(statSync('/dev/full').isCharacterDevice());
});

test('a write failing mid-stream (file size limit): one qimg: line, exit 1', () => {
  // The header and tables fit under the limit, the data does not: the failure comes mid-copy.
  const out = join(dir, 'limited.qcow2');
  const r = limited(2048, [process.execPath, QIMG_BIN, 'convert', '-O', 'qcow2', qcow2, out]);
  assert.is(r.status, 1, r.stderr);
  assert.is(r.stderr, `qimg: Could not write to '${out}': File too large\n`);
});


test('a preallocation=metadata source: its holes are not read, and the outputs are what qemu-img makes', async () => {
  // Every guest cluster is allocated over a hole of the file: read, a 256 GiB one kept the kernel
  // making zeros for 45 s. qemu-img asks the file (SEEK_DATA) and skips them; so must qimg.
  const src = join(dir, 'prealloc.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', src, '256M']);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0x3c 1M 192k', '-c', 'write -P 0 8M 64k', '-c', 'write -P 0x3d 100M 64k', src]);
  for (const outputFormat of ['qcow2', 'raw'] as const) {
    const img = (await openImage(src, { forceShare: true })) as Qcow2Image;
    const file = img.dataFile as { readAsync: (buf: Uint8Array, pos: number) => Promise<number> };
    const readAsync = file.readAsync.bind(file);
    let bytesRead = 0;
    file.readAsync = (buf, pos) => {
      bytesRead += buf.length;
      return readAsync(buf, pos);
    };
    const out = join(dir, `prealloc-out${seq++}.${outputFormat}`);
    try {
      await convertFrom(img, out, { outputFormat });
    } finally {
      await img.close();
    }
    // The three written runs (320 KiB) and no more than a chunk's worth around them.
    assert.ok(bytesRead <= 2 * MiB, `${outputFormat}: ${bytesRead} bytes read from a source with 320 KiB of data`);
    identical(src, out);
    const ref = join(dir, `prealloc-ref${seq++}.${outputFormat}`);
    mustQemuImg(['convert', '-f', 'qcow2', '-O', outputFormat, src, ref]);
    if (outputFormat === 'qcow2') {
      clean(out);
      assert.ok(readFileSync(out).equals(readFileSync(ref)), 'the qcow2 output differs from qemu-img convert\'s, byte for byte');
    } else {
      assert.is(statSync(out).size, statSync(ref).size);
      assert.ok(statSync(out).blocks <= statSync(ref).blocks + 8, `raw output allocates ${statSync(out).blocks} blocks, qemu-img ${statSync(ref).blocks}`);
    }
  }
});

test('a data cluster whose entry points past 2^53 (fuzz seed 20240601 #804): convert ends, as qemu-img does', () => {
  const src = join(dir, 'far.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', src, '1M']);
  mustQemuIo(['-f', 'qcow2', '-c', 'write -P 0x61 0 128k', src]);
  const bytes = new Uint8Array(readFileSync(src));
  const probe = Qcow2Image.open(new MemoryFile(bytes, 'far.qcow2', false), 'far.qcow2');
  const l2 = entryOffset(u32(probe.l1, 0), u32(probe.l1, 4));
  // Cluster 1's entry: host offset bit 54 set (the high word 0x00400000), flags kept.
  const at = l2 + 8;
  bytes.set([0x80, 0x40, 0x00, 0x00], at);
  const fd = openSync(src, 'r+');
  writeSync(fd, bytes, at, 4, at);
  closeSync(fd);
  for (const fmt of ['raw', 'qcow2']) {
    const out = join(dir, `far-out${seq++}.${fmt}`);
    const ref = join(dir, `far-ref${seq++}.${fmt}`);
    const q = qemuImg(['convert', '-O', fmt, src, ref]);
    const r = spawnSync(process.execPath, [QIMG_BIN, 'convert', '-O', fmt, src, out], { encoding: 'utf8', timeout: 30_000 });
    assert.is(r.signal, null, `${fmt}: qimg convert did not finish (killed after 30 s)`);
    assert.is(r.status, q.status, `${fmt}: qimg exit ${r.status} (${r.stderr.trim()}), qemu-img ${q.status} (${q.stderr.trim()})`);
    if (q.status === 0) identical(ref, out);
  }
});

test.run();
