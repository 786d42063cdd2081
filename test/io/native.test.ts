// The optional native helper (fallocate) and NodeFile.growAhead, which reserves disk blocks past
// the end of a growing image and gives back what no write reached. Shown by st_blocks, which is
// what `du` and qemu-img's "disk size" read, and against qemu-img's own convert output.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, copyFileSync, existsSync, fstatSync, mkdirSync, openSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FALLOC_FL_KEEP_SIZE, fallocate, haveFallocate } from '../../src/qcow2/io/native.js';
import { NodeFile } from '../../src/qcow2/io/file.js';
import { REPO, mustQemuImg, mustQemuIo, qimg, tmpDir } from '../helpers.js';
import { settle, sha256 } from '../oracle.js';

const MiB = 1024 * 1024;
const BUILT = join(REPO, 'src', 'qcow2', 'io', 'native', 'build', 'Release', 'qimg_native.node');

test('the helper is built by npm install and loads (Linux; its toolchain is the one fs-ext needs)', () => {
  if (process.platform !== 'linux' || process.env.QIMG_NO_NATIVE) return;
  assert.ok(existsSync(BUILT), `${BUILT} was not built (see src/qcow2/io/native/build.log)`);
  assert.ok(haveFallocate());
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

test.run();
