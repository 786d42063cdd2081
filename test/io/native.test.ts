// The optional native helper (fallocate) and NodeFile.growAhead, which reserves disk blocks past
// the end of a growing image and gives back what no write reached. Shown by st_blocks, which is
// what `du` and qemu-img's "disk size" read, and against qemu-img's own convert output.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, copyFileSync, existsSync, fstatSync, ftruncateSync, mkdirSync, openSync, readFileSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { spawnSync } from 'node:child_process';
import { FALLOC_FL_KEEP_SIZE, fallocate, haveBulkIO, haveFallocate, readScan, writeRuns, type BulkIoError } from '../../src/qcow2/io/native.js';
import { NodeFile, readRunsScan } from '../../src/qcow2/io/file.js';
import { QimgError } from '../../src/qcow2/errors.js';
import { REPO, mustQemuImg, mustQemuIo, qimg, tmpDir } from '../helpers.js';
import { settle, sha256 } from '../oracle.js';

const MiB = 1024 * 1024;
const BUILT = join(REPO, 'src', 'qcow2', 'io', 'native', 'build', 'Release', 'qimg_native.node');

test('the helper is built by npm install and loads (Linux; its toolchain is the one fs-ext needs)', () => {
  if (process.platform !== 'linux' || process.env.QIMG_NO_NATIVE) return;
  assert.ok(existsSync(BUILT), `${BUILT} was not built (see src/qcow2/io/native/build.log)`);
  assert.ok(haveFallocate());
  assert.ok(haveBulkIO());
});

test('fallocate: 0 and blocks reserved past the end with KEEP_SIZE; -errno for a bad descriptor', () => {
  if (!haveFallocate()) return;
  const f = join(tmpDir(), 'f.bin');
  writeFileSync(f, new Uint8Array(4096).fill(1));
  const fd = openSync(f, 'r+');
  try {
    const before = fstatSync(fd).blocks * 512;
    assert.is(fallocate(fd, FALLOC_FL_KEEP_SIZE, 4096, 8 * MiB), 0);
    const st = fstatSync(fd);
    assert.is(st.size, 4096, 'KEEP_SIZE leaves the size alone');
    assert.ok(st.blocks * 512 >= before + 8 * MiB, `${st.blocks * 512} bytes allocated`);
  } finally {
    closeSync(fd);
  }
  assert.is(fallocate(1 << 30, 0, 0, 4096), -9, 'EBADF');
  assert.is(fallocate(fd, 0, 0, 0), -22, 'EINVAL: an empty range is refused before the call');
});

test('growAhead: a write past the end reserves ahead; close gives back what no write reached', () => {
  if (!haveFallocate()) return;
  const f = join(tmpDir(), 'grow.bin');
  writeFileSync(f, new Uint8Array(0));
  const file = NodeFile.open(f, true);
  file.growAhead();
  const data = new Uint8Array(MiB).fill(7);
  file.write(data, 0);
  assert.is(file.size(), MiB);
  assert.ok(file.allocatedBytes() >= 16 * MiB, `reserved ahead: ${file.allocatedBytes()} bytes allocated`);
  file.write(data, 3 * MiB); // a later write inside the reservation: no new call needed
  assert.is(file.size(), 4 * MiB);
  file.close();
  const blocks = statSync(f).blocks * 512;
  // [1 MiB, 3 MiB) lies inside the file now and stays reserved (reads as zeros): 4 MiB in all.
  assert.ok(blocks <= 4 * MiB + 64 * 1024, `after close ${blocks} bytes allocated`);
  assert.ok(blocks >= 2 * MiB, 'the written data is still there');
});

test('growAhead does nothing on a file open read-only, or without the helper', () => {
  const f = join(tmpDir(), 'ro.bin');
  writeFileSync(f, new Uint8Array(4096));
  const file = NodeFile.open(f, false);
  file.growAhead();
  file.close();
  assert.is(statSync(f).blocks * 512 <= 8192, true);
});

test('convert -O qcow2 with and without the helper: the same bytes and the same disk size as qemu-img', () => {
  const dir = tmpDir();
  const src = join(dir, 'src.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', src, '64M']);
  mustQemuIo(['-c', 'write -P 0x11 0 20M', '-c', 'write -z 20M 4M', '-c', 'write -P 0x22 30M 9M', '-c', 'write -P 0 50M 1M', src]);
  const ref = join(dir, 'ref.qcow2');
  mustQemuImg(['convert', '-O', 'qcow2', src, ref]);
  const outs: string[] = [];
  for (const env of [{}, { QIMG_NO_NATIVE: '1' }] as Array<Record<string, string>>) {
    const out = join(dir, `out${outs.length}.qcow2`);
    const r = qimg(['convert', '-O', 'qcow2', src, out], env);
    assert.is(r.status, 0, r.stderr);
    outs.push(out);
  }
  settle(dir);
  for (const out of outs) {
    assert.is(sha256(out), sha256(ref), `${out}: the same bytes as qemu-img's`);
    // Give or take ext4's own extent blocks (in st_blocks too; qemu-img's fallocate calls make
    // a few more than plain writes): far less than the 16 MiB a reservation left behind would be.
    const [mine, theirs] = [statSync(out).blocks * 512, statSync(ref).blocks * 512];
    assert.ok(Math.abs(mine - theirs) <= 128 * 1024, `${out}: ${mine} bytes on disk, qemu-img's output ${theirs}`);
  }
});

test('commit and rebase (flatten) reserve ahead too, and leave the same disk size as qemu-img', () => {
  const dir = tmpDir();
  const base = join(dir, 'base.qcow2');
  const top = join(dir, 'top.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', base, '64M']);
  mustQemuIo(['-c', 'write -P 0x11 0 8M', base]);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', top]);
  mustQemuIo(['-c', 'write -P 0x22 4M 24M', '-c', 'write -P 0x33 40M 3M', top]);
  const sizes: Record<string, number[]> = {};
  for (const who of ['qimg', 'qemu']) {
    const d = join(dir, who);
    mkdirSync(d);
    for (const f of ['base.qcow2', 'top.qcow2']) copyFileSync(join(dir, f), join(d, f));
    copyFileSync(join(d, 'top.qcow2'), join(d, 'flat.qcow2'));
    const commit = ['commit', '-q', join(d, 'top.qcow2')];
    const rebase = ['rebase', '-b', '', join(d, 'flat.qcow2')];
    for (const args of [rebase, commit]) {
      if (who === 'qimg') {
        const r = qimg(args);
        assert.is(r.status, 0, r.stderr);
      } else mustQemuImg(args);
    }
    settle(d);
    sizes[who] = ['base.qcow2', 'flat.qcow2'].map((f) => statSync(join(d, f)).blocks * 512);
  }
  for (const [i, f] of ['base.qcow2 after commit', 'flat.qcow2 after rebase -b ""'].entries()) {
    const [mine, theirs] = [sizes.qimg![i]!, sizes.qemu![i]!];
    assert.ok(Math.abs(mine - theirs) <= 128 * 1024, `${f}: ${mine} bytes on disk, qemu-img's ${theirs}`);
  }
});

/** A file of the given parts, written at their offsets, cut to `size`. */
function fileOf(name: string, size: number, parts: Array<[number, Uint8Array]>): string {
  const f = join(tmpDir(), name);
  writeFileSync(f, new Uint8Array(0));
  const fd = openSync(f, 'r+');
  for (const [at, bytes] of parts) writeSync(fd, bytes, 0, bytes.length, at);
  ftruncateSync(fd, size);
  closeSync(fd);
  return f;
}

const KiB = 1024;

test('readScan: segments of two files land where asked, zeros past an end; all-zero blocks flagged 2, set flags kept', async () => {
  if (!haveBulkIO()) return;
  // a: 64 KiB of 0xaa, 64 KiB of zeros, 100 bytes of 0xbb (the end). b: 4 KiB of zeros, 4 KiB of 0xcc.
  const a = fileOf('a.bin', 128 * KiB + 100, [[0, new Uint8Array(64 * KiB).fill(0xaa)], [128 * KiB, new Uint8Array(100).fill(0xbb)]]);
  const b = fileOf('b.bin', 8 * KiB, [[4 * KiB, new Uint8Array(4 * KiB).fill(0xcc)]]);
  const fa = openSync(a, 'r');
  const fb = openSync(b, 'r');
  try {
    const buf = new Uint8Array(160 * KiB).fill(0x55); // stale bytes everywhere
    const segs = new Float64Array([fa, 0, 128 * KiB, 0, fb, 128 * KiB, 8 * KiB, 0, fa, 136 * KiB, 8 * KiB, 128 * KiB]);
    const zero = new Uint8Array(36);
    zero[0] = 1; // already known: left alone though its bytes are not zero
    zero[20] = 1;
    await readScan(buf, segs, { zero, grain: 4 * KiB, first: 0, end: 144 * KiB });
    const want = new Uint8Array(160 * KiB).fill(0x55);
    want.fill(0xaa, 0, 64 * KiB).fill(0, 64 * KiB, 132 * KiB).fill(0xcc, 132 * KiB, 136 * KiB);
    want.fill(0xbb, 136 * KiB, 136 * KiB + 100).fill(0, 136 * KiB + 100, 144 * KiB); // past a's end: zeros
    assert.ok(Buffer.from(buf).equals(Buffer.from(want)), 'the bytes, and nothing past the last segment');
    const flags = Array.from(zero);
    assert.equal(flags.slice(0, 16), [1, ...Array(15).fill(0)]);
    assert.equal(flags.slice(16, 33), [2, 2, 2, 2, 1, ...Array(12).fill(2)]);
    assert.equal(flags.slice(33), [0, 0, 2], 'b data, a tail with data, a tail past the end');
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
});

test('readScan: blocks counted from `first`, the last cut at `end`; nothing outside them flagged', async () => {
  if (!haveBulkIO()) return;
  const f = fileOf('c.bin', 64 * KiB, [[1000 + 4096 + 7, new Uint8Array([9])]]);
  const fd = openSync(f, 'r');
  try {
    const buf = new Uint8Array(16 * KiB);
    const zero = new Uint8Array(4);
    // Blocks [1000, 5096) zero, [5096, 9192) holding the 9, [9192, 9692) zero (cut).
    await readScan(buf, new Float64Array([fd, 0, 16 * KiB, 0]), { zero, grain: 4096, first: 1000, end: 9692 });
    assert.equal(Array.from(zero), [2, 0, 2, 0]);
    assert.is(buf[1000 + 4096 + 7], 9);
  } finally {
    closeSync(fd);
  }
});

test('writeRuns: each segment written from its place in the buffer, in order', async () => {
  if (!haveBulkIO()) return;
  const f = fileOf('w.bin', 0, []);
  const fd = openSync(f, 'r+');
  try {
    const buf = new Uint8Array(8192);
    for (let i = 0; i < buf.length; i++) buf[i] = i % 251;
    await writeRuns(buf, new Float64Array([fd, 0, 4096, 65536, fd, 4096, 4096, 0, fd, 100, 10, 65536]));
  } finally {
    closeSync(fd);
  }
  const got = readFileSync(f);
  assert.is(got.length, 65536 + 4096);
  assert.ok(got.subarray(0, 4096).equals(Buffer.from(new Uint8Array(8192).map((_, i) => i % 251).subarray(4096))));
  assert.ok(got.subarray(4096, 65536).every((x) => x === 0), 'a hole between');
  // The third segment came after the first: its 10 bytes over the first's start.
  assert.equal(Array.from(got.subarray(65536, 65536 + 12)), [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 10, 11]);
});

test('writeRuns with allocate: the runs reserved and written, the holes between and the size left alone', async () => {
  if (!haveBulkIO()) return;
  const f = fileOf('alloc.bin', 8 * MiB, []);
  const fd = openSync(f, 'r+');
  const buf = new Uint8Array(2 * MiB).fill(0x5a);
  try {
    await writeRuns(buf, new Float64Array([fd, 0, MiB, 0, fd, MiB, MiB, 6 * MiB, fd, 0, 4096, 8 * MiB]), true);
  } finally {
    closeSync(fd);
  }
  // Before write-back, ext4 shows blocks it has not allocated yet as "delalloc" (filefrag -v):
  // reserved runs are allocated extents already; the same writes without `allocate` are not.
  const plain = fileOf('plain.bin', 8 * MiB, []);
  const pfd = openSync(plain, 'r+');
  try {
    await writeRuns(buf, new Float64Array([pfd, 0, MiB, 0]), false);
  } finally {
    closeSync(pfd);
  }
  const frag = (path: string): string => spawnSync('filefrag', ['-v', path], { encoding: 'utf8' }).stdout ?? '';
  if (frag(plain).includes('delalloc')) assert.not.match(frag(f), /delalloc/, frag(f));
  settle(dirname(f)); // delayed allocation counts its blocks once written back
  const st = statSync(f);
  assert.is(st.size, 8 * MiB + 4096, 'only the write past the end moved the end');
  assert.ok(st.blocks * 512 <= 2 * MiB + 4096 + 64 * 1024, `${st.blocks * 512} bytes on disk: the runs, not the holes`);
  assert.ok(st.blocks * 512 >= 2 * MiB, `${st.blocks * 512} bytes on disk`);
  const got = readFileSync(f);
  assert.ok(got.subarray(0, MiB).every((x) => x === 0x5a) && got.subarray(6 * MiB, 7 * MiB).every((x) => x === 0x5a));
  assert.ok(got.subarray(MiB, 6 * MiB).every((x) => x === 0) && got.subarray(7 * MiB, 8 * MiB).every((x) => x === 0));
});

test('bulk jobs: a failing segment rejects with its errno and index; bad segments throw before anything runs', async () => {
  if (!haveBulkIO()) return;
  const f = fileOf('e.bin', 8192, [[0, new Uint8Array(8192).fill(3)]]);
  const fd = openSync(f, 'r');
  const closed = 2 ** 30; // no descriptor that high: EBADF (a closed one's number may come back)
  try {
    const buf = new Uint8Array(16384);
    const err = (await readScan(buf, new Float64Array([fd, 0, 8192, 0, closed, 8192, 8192, 0]), null)!.then(
      () => null,
      (e: BulkIoError) => e,
    ))!;
    assert.ok(err, 'a bad descriptor fails');
    assert.is(err.code, 'EBADF');
    assert.is(err.segment, 1);
    assert.is(buf[0], 3, 'the segment before it was read');
    // Past the buffer, a negative length, a fractional descriptor: refused at once, nothing queued.
    for (const segs of [[fd, 8192, 8193, 0], [fd, 0, -1, 0], [fd + 0.5, 0, 1, 0], [fd, 0, 1]]) {
      assert.throws(() => readScan(buf, new Float64Array(segs), null), /bad buffer, segments or zero map/);
    }
    assert.throws(() => readScan(buf, new Float64Array([fd, 0, 1, 0]), { zero: new Uint8Array(1), grain: 4096, first: 0, end: 8193 }), /bad buffer/);
    // Through NodeFile / readRunsScan: qemu-img's words, with the file that failed.
    const file = NodeFile.open(f, false);
    try {
      const e = await readRunsScan(buf, [{ file, offset: 0, length: 10, pos: 0 }, { file: { ...file, fd: closed, path: '/the/bad/one' } as unknown as NodeFile, offset: 10, length: 10, pos: 0 }], null)!.then(
        () => null,
        (x: unknown) => x,
      );
      assert.instance(e, QimgError);
      assert.is((e as QimgError).message, "Could not read '/the/bad/one': EBADF: bad file descriptor");
    } finally {
      file.close();
    }
  } finally {
    closeSync(fd);
  }
});

test('convert without the helper and with it: the same images as qemu-img, raw and qcow2 targets', () => {
  const dir = tmpDir();
  const src = join(dir, 'src.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', src, '40M']);
  // Data, zero clusters, zeros written as data, short holes between data (bridged in one raw chunk).
  mustQemuIo(['-c', 'write -P 0x11 0 3M', '-c', 'write -z 3M 1M', '-c', 'write -P 0 4M 1M', '-c', 'write -P 0x22 5M 64k', '-c', 'write -P 0x33 5248k 4k', '-c', 'write -P 0x44 9M 7M', '-c', 'write -P 0x55 39M 1M', src]);
  for (const fmt of ['raw', 'qcow2']) {
    const ref = join(dir, `ref.${fmt}`);
    mustQemuImg(['convert', '-O', fmt, src, ref]);
    for (const env of [{}, { QIMG_NO_NATIVE: '1' }] as Array<Record<string, string>>) {
      const out = join(dir, `out-${Object.keys(env).length}.${fmt}`);
      const r = qimg(['convert', '-O', fmt, src, out], env);
      assert.is(r.status, 0, r.stderr);
      assert.is(sha256(out), sha256(ref), `${fmt} ${JSON.stringify(env)}: the same bytes as qemu-img's`);
      if (fmt === 'raw') {
        settle(dir);
        const [mine, theirs] = [statSync(out).blocks * 512, statSync(ref).blocks * 512];
        assert.ok(Math.abs(mine - theirs) <= 64 * 1024, `${fmt} ${JSON.stringify(env)}: ${mine} bytes on disk, qemu-img's ${theirs}`);
      }
    }
  }
});

test.run();
