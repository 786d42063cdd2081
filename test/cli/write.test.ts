// The writing commands against the oracle: convert -O qcow2, resize, and locks held by a live qemu-io.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { copyFileSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { openWriter } from '../../src/qcow2/engine/writer.js';
import { FIXTURES, mustQemuImg, mustQemuIo, qemuImg, qimg, tmpDir, withQemuIo } from '../helpers.js';

function clean(path: string): void {
  const r = qemuImg(['check', path]);
  assert.is(r.status, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
}

function identical(a: string, b: string): void {
  const r = qemuImg(['compare', '-U', a, b]);
  assert.is(r.status, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

const SOURCES = ['demo.qcow2', 'compressed.qcow2', 'compressed-zstd.qcow2', 'extl2.qcow2', 'raw.img', 'backing-overlay.qcow2', 'small-clusters.qcow2', 'refcount1.qcow2', 'v2.qcow2'];
const TARGETS = [[], ['-c'], ['-o', 'cluster_size=4096,refcount_bits=1'], ['-c', '-o', 'compression_type=zstd'], ['-o', 'compat=0.10'], ['-o', 'extended_l2=on'], ['-o', 'cluster_size=512,refcount_bits=64']];

test('convert -O qcow2: every source x target option set checks clean and reads back identical', () => {
  const dir = tmpDir();
  let n = 0;
  for (const src of SOURCES) {
    for (const t of TARGETS) {
      const out = join(dir, `o${n++}.qcow2`);
      const r = qimg(['convert', '-O', 'qcow2', ...t, join(FIXTURES, src), out]);
      assert.is(r.status, 0, `${src} ${t.join(' ')}: ${r.stderr}`);
      clean(out);
      identical(join(FIXTURES, src), out);
    }
  }
});

test('convert -O qcow2 leaves zero ranges unallocated and -c really compresses', () => {
  const dir = tmpDir();
  const src = join(dir, 's.raw');
  mustQemuImg(['create', '-q', '-f', 'raw', src, '64M']);
  mustQemuIo(['-f', 'raw', '-c', 'write -P 0x61 0 1M', '-c', 'write -P 0x62 32M 1M', src]);
  const plain = join(dir, 'p.qcow2');
  const comp = join(dir, 'c.qcow2');
  assert.is(qimg(['convert', '-O', 'qcow2', src, plain]).status, 0);
  assert.is(qimg(['convert', '-O', 'qcow2', '-c', src, comp]).status, 0);
  const ref = join(dir, 'ref.qcow2');
  mustQemuImg(['convert', '-O', 'qcow2', src, ref]);
  const map = JSON.parse(mustQemuImg(['map', '--output=json', plain])) as Array<{ data: boolean; length: number }>;
  const allocated = map.filter((e) => e.data).reduce((s, e) => s + e.length, 0);
  assert.is(allocated, 2 * 1024 * 1024, 'only the written data is allocated');
  // 2 MiB of data compresses to a few hundred bytes a cluster; what remains is metadata.
  assert.ok(statSync(comp).size < statSync(plain).size / 4, `compressed output is ${statSync(comp).size} bytes`);
  const info = JSON.parse(mustQemuImg(['check', '--output=json', comp])) as { 'compressed-clusters': number };
  assert.ok(info['compressed-clusters'] >= 32);
  identical(src, plain);
  identical(src, comp);
  // Same size on disk as qemu-img's own conversion, within a few metadata clusters.
  assert.ok(Math.abs(statSync(plain).blocks - statSync(ref).blocks) * 512 <= 4 * 65536);
});

test('convert -B writes only what differs from the new backing file', () => {
  const dir = tmpDir();
  const base = join(dir, 'base.qcow2');
  mustQemuImg(['convert', '-O', 'qcow2', join(FIXTURES, 'backing-base.qcow2'), base]);
  const out = join(dir, 'top.qcow2');
  const r = qimg(['convert', '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', join(FIXTURES, 'backing-overlay.qcow2'), out]);
  assert.is(r.status, 0, r.stderr);
  clean(out);
  identical(join(FIXTURES, 'backing-overlay.qcow2'), out);
  const map = JSON.parse(mustQemuImg(['map', '--output=json', out])) as Array<{ depth: number; data: boolean; length: number }>;
  const own = map.filter((e) => e.depth === 0 && e.data).reduce((s, e) => s + e.length, 0);
  // Three 64 KiB target clusters differ from the base (0x91@4k, zero@1M over base data, 0x92@3M).
  assert.is(own, 3 * 65536, `overlay holds ${own} bytes of its own data`);
});

test('resize grows and shrinks like qemu-img, with its messages', () => {
  const dir = tmpDir();
  const a = join(dir, 'a.qcow2');
  const b = join(dir, 'b.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', a, '1M']);
  mustQemuIo(['-c', 'write -P 0x71 0 1M', a]);
  copyFileSync(a, b);
  const steps = [['+3M'], ['512k'], ['--shrink', '512k'], ['-q', '100M'], ['abc'], ['--', '-100k'], ['--shrink', '--', '-100k']];
  for (const s of steps) {
    const args = s.includes('--') ? [...s.slice(0, s.indexOf('--')), a, ...s.slice(s.indexOf('--') + 1)] : [...s.slice(0, -1), a, s[s.length - 1]!];
    const q = qemuImg(['resize', ...args.map((x) => (x === a ? b : x))]);
    const m = qimg(['resize', ...args.filter((x) => x !== '--')]);
    assert.is(m.status, q.status, `resize ${s.join(' ')}: ${m.stderr} vs ${q.stderr}`);
    assert.is(m.stdout, q.stdout);
    assert.is(m.stderr.replace(/qimg: /g, ''), q.stderr.replace(/qemu-img: /g, ''), `resize ${s.join(' ')}`);
    clean(a);
    identical(a, b);
  }
});

// Found by the ops differential fuzz (bench/ops-diff.ts, seed 1 case 0): qimg grew a v2 image
// with snapshots, rounded sizes to 512 bytes, took a size of 0, and read `-- -1M` as an option.
test('resize takes sizes exactly as qemu-img does: no rounding, -- before a negative size, v2 images with snapshots refused', () => {
  const dir = tmpDir();
  const cases: Array<{ fmt: string; create: string[]; snap?: boolean; args: string[] }> = [];
  for (const fmt of ['qcow2', 'raw']) {
    for (const args of [['+511'], ['1048577'], ['--', '-1M'], ['--shrink', '--', '-2M'], ['--shrink', '--', '-1000'], ['--shrink', '0'], ['-1k'], ['--shrink', '-1k']]) {
      cases.push({ fmt, create: [], args });
    }
  }
  cases.push({ fmt: 'qcow2', create: ['-o', 'compat=0.10'], snap: true, args: ['1M'] });
  cases.push({ fmt: 'qcow2', create: ['-o', 'compat=0.10'], snap: true, args: ['+1k'] });
  cases.push({ fmt: 'qcow2', create: ['-o', 'compat=0.10'], snap: true, args: ['+511'] });
  cases.push({ fmt: 'qcow2', create: [], snap: true, args: ['--shrink', '--', '-1k'] });
  cases.push({ fmt: 'qcow2', create: [], snap: true, args: ['+1k'] });
  for (const c of cases) {
    const a = join(dir, 'a.img');
    const b = join(dir, 'b.img');
    mustQemuImg(['create', '-q', '-f', c.fmt, ...c.create, a, '1M']);
    if (c.snap) mustQemuImg(['snapshot', '-c', 's', a]);
    copyFileSync(a, b);
    const at = (f: string) => (c.args.includes('--') ? [...c.args.slice(0, -2), f, ...c.args.slice(-2)] : [...c.args.slice(0, -1), f, c.args[c.args.length - 1]!]);
    const q = qemuImg(['resize', '-f', c.fmt, ...at(b)]);
    const m = qimg(['resize', '-f', c.fmt, ...at(a)]);
    const what = `${c.fmt} ${c.create.join(' ')}${c.snap ? ' with a snapshot' : ''}: resize ${c.args.join(' ')}`;
    assert.is(m.status, q.status, `${what}: ${m.stderr} vs ${q.stderr}`);
    assert.is(m.stdout, q.stdout, what);
    assert.is(m.stderr.replace(/qimg: /g, '').split(a).join('F'), q.stderr.replace(/qemu-img: /g, '').split(b).join('F'), what);
    assert.is(statSync(a).size, statSync(b).size, `${what}: file size`);
    if (c.fmt === 'qcow2') {
      clean(a);
      identical(a, b);
    }
  }
});

// Found by the ops differential fuzz (bench/ops-diff.ts, seed 8 case 17): growing an overlay whose
// backing file reaches past the old end let the backing data (or a shrunk cluster's stale tail)
// show through; QEMU zeroes the new area, and on a v2 image refuses. qimg also did not open the
// chain at all, so a missing backing file went unnoticed.
test('resize over a larger backing file reads zeros in the new area, as qemu-img makes it', () => {
  const dir = tmpDir();
  const base = join(dir, 'base.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', base, '1M']);
  mustQemuIo(['-c', 'write -P 9 0 1M', base]);
  const cases: Array<[string, string, string]> = [
    ['compat=1.1', '32k', '200k'],
    ['compat=1.1', '32256', '32768'], // within the cluster: explicit zeros only
    ['compat=1.1,extended_l2=on', '33k', '300k'],
    ['compat=1.1,cluster_size=4096', '5k', '700k'],
    ['compat=0.10', '32k', '200k'], // refused: v2 has no zero clusters
    ['compat=0.10', '32k', '64k'], // one partial cluster: fine on v2
  ];
  for (const [opts, shrinkTo, growTo] of cases) {
    const a = join(dir, 'a.qcow2');
    const b = join(dir, 'b.qcow2');
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', opts, '-b', 'base.qcow2', '-F', 'qcow2', a, '1M']);
    mustQemuIo(['-c', 'write -P 4 0 1M', a]);
    mustQemuImg(['resize', '-q', '--shrink', a, shrinkTo]);
    copyFileSync(a, b);
    const before = readFileSync(a);
    const q = qemuImg(['resize', b, growTo]);
    const m = qimg(['resize', a, growTo]);
    const what = `${opts}: ${shrinkTo} -> ${growTo}`;
    assert.is(m.status, q.status, `${what}: ${m.stderr} vs ${q.stderr}`);
    assert.is(m.stderr.replace(/^qimg:/gm, 'qemu-img:'), q.stderr, what);
    if (m.status !== 0) assert.ok(readFileSync(a).equals(before), `${what}: a refused resize changes nothing`);
    clean(a);
    identical(a, b);
  }
  // The chain is opened as qemu-img opens it: a missing backing file is an error.
  const o = join(dir, 'orphan.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', o, '1M']);
  const q = qemuImg(['resize', o, '2M']);
  const m = qimg(['resize', o, '2M']);
  assert.is(m.status, q.status);
  assert.is(m.stderr.replace(/^qimg:/gm, 'qemu-img:'), q.stderr);
});

test('writers refuse an image a live qemu-io holds, with qemu-img wording, and change nothing', async () => {
  const dir = tmpDir();
  const img = join(dir, 'held.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', img, '4M']);
  mustQemuIo(['-c', 'write -P 0x11 0 64k', img]);
  mustQemuImg(['snapshot', '-c', 's1', img]);
  const before = readFileSync(img);
  await withQemuIo(img, () => {
    for (const args of [['snapshot', '-c', 'x', img], ['snapshot', '-a', 's1', img], ['snapshot', '-d', 's1', img], ['resize', img, '8M']]) {
      const r = qimg(args);
      assert.is(r.status, 1, args.join(' '));
      assert.is(r.stderr, `qimg: Could not open '${img}': Failed to get "write" lock\nIs another process using the image [${img}]?\n`, args.join(' '));
      const q = qemuImg(args);
      assert.is(q.status, 1);
      assert.ok(q.stderr.includes('Failed to get "write" lock'), q.stderr);
    }
  });
  assert.ok(readFileSync(img).equals(before), 'the held image changed');
  // A read-only holder blocks writers but not readers.
  await withQemuIo(img, () => {
    assert.is(qimg(['snapshot', '-c', 'x', img]).status, 1);
    assert.is(qimg(['snapshot', '-l', img]).status, 0);
  }, true);
  assert.ok(readFileSync(img).equals(before));
});

test('while qimg writes, qemu-img cannot open the image, and can again afterwards', async () => {
  const dir = tmpDir();
  const img = join(dir, 'w.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', img, '4M']);
  const w = await openWriter(img);
  w.write(new Uint8Array(4096).fill(0x42), 0);
  const during = qemuImg(['info', img]);
  assert.is(during.status, 1);
  assert.match(during.stderr, /Failed to (get .* lock|lock byte)/);
  const rw = qemuImg(['snapshot', '-c', 'x', img]);
  assert.is(rw.status, 1);
  await w.close();
  clean(img);
  mustQemuIo(['-c', 'read -P 0x42 0 4096', img]);
});

test.run();
