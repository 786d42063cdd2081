// commit, rebase, map, compare and chain against qemu-img 7.2: the same operation on copies of
// the same chains (depth 2..4, internal snapshots inside layers), read back with qemu-img.
import { closeSync, cpSync, ftruncateSync, existsSync, mkdirSync, openSync, readFileSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { compare } from '../../src/qcow2/engine/compare.js';
import { mapFile } from '../../src/qcow2/engine/map.js';
import { renderMapHuman, renderMapJson } from '../../src/cli/render.js';
import { mustQemuImg, mustQemuIo, qemuImg, qimg, tmpDir, withQemuIo } from '../helpers.js';

const SIZE = '4M';

/**
 * A chain l0 (bottom) .. l{depth-1} (top) with mixed cluster sizes, data, zero writes, a
 * compressed cluster at the bottom and an internal snapshot in every layer but the top,
 * taken between two rounds of writes. With `rawBase` the bottom is a raw file.
 */
function buildChain(dir: string, depth: number, rawBase = false): string[] {
  const names: string[] = [];
  const clusters = ['64k', '4k', '16k', '64k'];
  for (let i = 0; i < depth; i++) {
    const name = i === 0 && rawBase ? 'l0.raw' : `l${i}.qcow2`;
    const p = join(dir, name);
    if (i === 0) {
      if (rawBase) mustQemuImg(['create', '-q', '-f', 'raw', p, SIZE]);
      else mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusters[0]}`, p, SIZE]);
    } else {
      mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${clusters[i]}`, '-b', names[i - 1]!, '-F', i === 1 && rawBase ? 'raw' : 'qcow2', p]);
    }
    const fmt = name.endsWith('.raw') ? 'raw' : 'qcow2';
    const k = 0x10 * (i + 1);
    const cmds = [`write -P ${k + 1} ${i * 192}k 96k`, `write -P ${k + 2} ${1024 + i * 300}k 5k`, `write -z ${2048 + i * 128}k 128k`];
    if (i === 0 && !rawBase) cmds.push(`write -c -P ${k + 3} 3M 64k`);
    mustQemuIo(['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), p]);
    if (fmt === 'qcow2' && i < depth - 1) {
      mustQemuImg(['snapshot', '-c', `snap${i}`, p]);
      mustQemuIo(['-c', `write -P ${k + 4} ${i * 64 + 32}k 40k`, '-c', `write -z ${1500 + i * 64}k 64k`, p]);
    }
    if (i === depth - 1 && fmt === 'qcow2') mustQemuIo(['-c', `write -P ${k + 5} 0 4k`, '-c', 'write -z 3M 64k', '-c', `write -P ${k + 6} 3968k 8k`, p]);
    names.push(name);
  }
  return names;
}

/** Two identical copies of a chain: one for qimg, one for qemu-img. */
function twin(depth: number, rawBase = false): { mine: string; theirs: string; names: string[] } {
  const root = tmpDir();
  const mine = join(root, 'mine');
  const theirs = join(root, 'theirs');
  mkdirSync(mine);
  const names = buildChain(mine, depth, rawBase);
  cpSync(mine, theirs, { recursive: true });
  return { mine, theirs, names };
}

function raw(path: string): Buffer {
  const out = join(tmpDir(), 'out.raw');
  mustQemuImg(['convert', '-O', 'raw', path, out]);
  return readFileSync(out);
}

function assertClean(path: string): void {
  if (path.endsWith('.raw')) return;
  const r = qemuImg(['check', path]);
  assert.is(r.status, 0, `qemu-img check ${path}: ${r.stdout}${r.stderr}`);
}

/** Every layer file of both copies reads the same (through its own chain), and every snapshot too. */
function assertSameChains(t: { mine: string; theirs: string; names: string[] }, what: string): void {
  for (const n of t.names) {
    const a = join(t.mine, n);
    const b = join(t.theirs, n);
    assertClean(a);
    const r = qemuImg(['compare', a, b]);
    assert.is(r.status, 0, `${what}: ${n} differs: ${r.stdout}${r.stderr}`);
    if (n.endsWith('.qcow2')) {
      const la = mustQemuImg(['snapshot', '-l', a]).split('\n').length;
      assert.is(la, mustQemuImg(['snapshot', '-l', b]).split('\n').length, `${what}: ${n} snapshot count`);
      if (la > 1) {
        const sa = join(tmpDir(), 's.raw');
        const sb = join(tmpDir(), 's.raw');
        const idx = n.slice(1, 2);
        mustQemuImg(['convert', '-O', 'raw', '-l', `snap${idx}`, a, sa]);
        mustQemuImg(['convert', '-O', 'raw', '-l', `snap${idx}`, b, sb]);
        assert.ok(readFileSync(sa).equals(readFileSync(sb)), `${what}: ${n} snapshot content`);
      }
    }
  }
}

test('commit (to the backing file, with -b BASE, with -d) equals qemu-img commit, depths 2..4', () => {
  const cases: Array<[number, string[]]> = [[2, []], [4, []], [3, ['-d']], [3, ['-b', 'l0.qcow2']], [4, ['-b', 'l1.qcow2']]];
  for (const [depth, variant] of cases) {
    {
      const t = twin(depth);
      const top = t.names[depth - 1]!;
      const before = raw(join(t.mine, top));
      const m = qimg(['commit', ...variant, join(t.mine, top)]);
      const q = qemuImg(['commit', ...variant, join(t.theirs, top)]);
      assert.is(m.status, 0, m.stderr);
      assert.is(m.stdout, q.stdout);
      assert.is(m.stdout, 'Image committed.\n');
      assertSameChains(t, `commit ${variant.join(' ')} depth ${depth}`);
      // The top still reads as before (its data now lives below, or it kept it).
      assert.ok(raw(join(t.mine, top)).equals(before), 'top guest data unchanged');
    }
  }
});

test('commit into a raw base equals qemu-img commit', () => {
  const t = twin(2, true);
  const m = qimg(['commit', join(t.mine, 'l1.qcow2')]);
  assert.is(m.status, 0, m.stderr);
  mustQemuImg(['commit', join(t.theirs, 'l1.qcow2')]);
  assertSameChains(t, 'commit raw');
  assert.ok(readFileSync(join(t.mine, 'l0.raw')).equals(readFileSync(join(t.theirs, 'l0.raw'))));
});

// qemu-img commit -t and rebase -t/-T (cache modes, passed by tools such as OpenStack's): qimg
// refused them as unknown options. They are checked as qemu-img checks them and change nothing.
test('commit -t and rebase -t/-T: accepted, and checked in qemu-img order', () => {
  const dir = tmpDir();
  mustQemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '1M']);
  mustQemuIo(['-c', 'write -P 1 0 64k', join(dir, 'b.qcow2')]);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'o.qcow2')]);
  mustQemuIo(['-c', 'write -P 2 32k 64k', join(dir, 'o.qcow2')]);
  const pristine = readFileSync(join(dir, 'o.qcow2'));
  const base = readFileSync(join(dir, 'b.qcow2'));
  const cases = [
    ['commit', '-t', 'bogus', 'o.qcow2'],
    ['rebase', '-t', 'bogus', '-b', 'x', 'o.qcow2'],
    ['rebase', '-T', 'bogus', '-b', 'x', 'o.qcow2'],
    ['rebase', '-T', 'bogus', '-t', 'bogus', '-b', 'x', 'o.qcow2'],
    ['rebase', '-t', 'writeback', '-T', 'none', '-b', '', 'o.qcow2'],
    ['commit', '-t', 'writethrough', 'o.qcow2'],
  ];
  for (const args of cases) {
    writeFileSync(join(dir, 'o.qcow2'), pristine);
    writeFileSync(join(dir, 'b.qcow2'), base);
    const q = qemuImg(args, {}, dir);
    const qOut = readFileSync(join(dir, args[0] === 'commit' ? 'b.qcow2' : 'o.qcow2'));
    writeFileSync(join(dir, 'o.qcow2'), pristine);
    writeFileSync(join(dir, 'b.qcow2'), base);
    const m = qimg(args, {}, dir);
    assert.is(m.status, q.status, `${args.join(' ')}: ${m.stderr}`);
    assert.is(m.stdout, q.stdout, args.join(' '));
    assert.is(m.stderr, q.stderr.replace(/qemu-img/g, 'qimg'), args.join(' '));
    if (m.status === 0) {
      const f = join(dir, args[0] === 'commit' ? 'b.qcow2' : 'o.qcow2');
      writeFileSync(join(dir, 'theirs.qcow2'), qOut);
      assert.is(qemuImg(['compare', f, join(dir, 'theirs.qcow2')]).status, 0, `${args.join(' ')}: the result`);
    }
  }
});

// A backing file another process holds read-write: QEMU's lock refusal names it only in its second
// line ("Could not open backing file: Failed to get shared "write" lock"); qimg put the backing
// file's own "Could not open 'b.qcow2': " in between. info --backing-chain opens each layer on its
// own, so a failing backing file reports as itself there (a missing one too).
test('a backing file held by a live qemu-io, and a missing one, worded as qemu-img words them', async () => {
  const dir = tmpDir();
  mustQemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'b.qcow2'), '1M']);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'b.qcow2', '-F', 'qcow2', join(dir, 'o.qcow2')]);
  mustQemuImg(['create', '-q', '-u', '-f', 'qcow2', '-b', 'gone.qcow2', '-F', 'qcow2', join(dir, 'm.qcow2'), '1M']);
  const same = (args: string[]) => {
    const q = qemuImg(args, {}, dir);
    const m = qimg(args, {}, dir);
    assert.is(m.status, q.status, `${args.join(' ')}: ${m.stderr}`);
    assert.is(m.stderr, q.stderr.replace(/^qemu-img:/gm, 'qimg:').replace(/(Could not open '[^']*': )\1/, '$1'), args.join(' '));
  };
  same(['info', '--backing-chain', 'm.qcow2']);
  // check opens a qcow2 backing file with a shared lock too (qimg read its header and went on);
  // -U takes no locks. commit opens the chain read-only before it tries to lock the base for
  // writing (qimg reported the base's write lock).
  await withQemuIo(join(dir, 'b.qcow2'), () => {
    for (const args of [['map', 'o.qcow2'], ['rebase', '-b', '', 'o.qcow2'], ['resize', 'o.qcow2', '2M'], ['info', '--backing-chain', 'o.qcow2'], ['check', 'o.qcow2'], ['check', '--output=json', 'o.qcow2'], ['check', '-U', 'o.qcow2'], ['commit', 'o.qcow2']]) same(args);
  });
});

test('commit errors: no backing file, BASE not in the chain', () => {
  const dir = tmpDir();
  const img = join(dir, 'a.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const r = qimg(['commit', img]);
  assert.is(r.status, 1);
  assert.is(r.stderr, 'qimg: Image does not have a backing file\n');
  const t = twin(2);
  const top = join(t.mine, 'l1.qcow2');
  const r2 = qimg(['commit', '-b', 'nonex', top]);
  assert.is(r2.status, 1);
  assert.is(r2.stderr, `qimg: Did not find 'nonex' in the backing chain of '${top}'\n`);
  assert.is(qimg(['commit', '-q', top]).stdout, '');
});

test('rebase safe / -u / flatten equals qemu-img rebase, depths 2..4', () => {
  const cases: Array<[number, string[]]> = [
    [2, ['-b', '', '-F', 'qcow2']],
    [3, ['-u', '-b', 'l0.qcow2', '-F', 'qcow2']],
    [3, ['-b', 'l0.qcow2', '-F', 'qcow2']],
    [4, ['-b', 'l0.qcow2', '-F', 'qcow2']],
    [4, ['-b', 'l1.qcow2', '-F', 'qcow2']],
    [4, ['-b', '', '-F', 'qcow2']],
  ];
  for (const [depth, args] of cases) {
    {
      const t = twin(depth);
      const top = t.names[depth - 1]!;
      const m = qimg(['rebase', ...args, join(t.mine, top)]);
      const q = qemuImg(['rebase', ...args, join(t.theirs, top)]);
      assert.is(m.status, q.status, `${args.join(' ')}: ${m.stderr}`);
      assert.is(m.stdout, q.stdout);
      assertSameChains(t, `rebase ${args.join(' ')} depth ${depth}`);
      const im = mustQemuImg(['info', '--output=json', join(t.mine, top)]);
      const iq = mustQemuImg(['info', '--output=json', join(t.theirs, top)]);
      const pick = (s: string) => {
        const j = JSON.parse(s) as Record<string, unknown>;
        return [j['backing-filename'], j['backing-filename-format'], j['virtual-size']];
      };
      assert.equal(pick(im), pick(iq), `header after rebase ${args.join(' ')}`);
    }
  }
});

test('rebase onto a different file (not in the chain) keeps the guest data', () => {
  const t = twin(3);
  for (const d of [t.mine, t.theirs]) {
    mustQemuImg(['create', '-q', '-f', 'qcow2', join(d, 'other.qcow2'), SIZE]);
    mustQemuIo(['-c', 'write -P 0x77 0 1M', '-c', 'write -P 0x78 2M 512k', join(d, 'other.qcow2')]);
  }
  const before = raw(join(t.mine, 'l2.qcow2'));
  assert.is(qimg(['rebase', '-b', 'other.qcow2', '-F', 'qcow2', join(t.mine, 'l2.qcow2')]).status, 0);
  mustQemuImg(['rebase', '-b', 'other.qcow2', '-F', 'qcow2', join(t.theirs, 'l2.qcow2')]);
  assert.ok(raw(join(t.mine, 'l2.qcow2')).equals(before));
  assertSameChains({ ...t, names: [...t.names, 'other.qcow2'] }, 'rebase other');
});

test('rebase copies exactly the differing sectors: equal data, a byte inside a sector, zeros on either side, v2 and v3', () => {
  for (const compat of ['0.10', '1.1']) {
    const t = { mine: join(tmpDir(), 'mine'), theirs: '', names: ['base.qcow2', 'mid.qcow2', 'top.qcow2', 'other.qcow2'] };
    mkdirSync(t.mine);
    const o = ['-o', `compat=${compat},cluster_size=4k`];
    const d = t.mine;
    mustQemuImg(['create', '-q', '-f', 'qcow2', ...o, join(d, 'base.qcow2'), '1M']);
    mustQemuImg(['create', '-q', '-f', 'qcow2', ...o, '-b', 'base.qcow2', '-F', 'qcow2', join(d, 'mid.qcow2')]);
    mustQemuImg(['create', '-q', '-f', 'qcow2', ...o, '-b', 'mid.qcow2', '-F', 'qcow2', join(d, 'top.qcow2')]);
    mustQemuImg(['create', '-q', '-f', 'qcow2', ...o, join(d, 'other.qcow2'), '1M']);
    // base and other agree on 0..256k; mid repeats that data (equal, nothing to copy) but for one
    // byte in the middle of a sector, zeros where other has data, and data where other reads zeros.
    mustQemuIo(['-c', 'write -P 1 0 256k', '-c', 'write -P 3 512k 64k', join(d, 'base.qcow2')]);
    mustQemuIo(['-c', 'write -P 1 0 256k', '-c', 'write -P 4 600k 8k', join(d, 'other.qcow2')]);
    const zero = compat === '1.1' ? 'write -z 600k 4k' : 'write -P 0 600k 4k';
    mustQemuIo(['-c', 'write -P 1 0 128k', '-c', 'write -P 2 70000 1', '-c', 'write -P 5 300k 3k', '-c', zero, join(d, 'mid.qcow2')]);
    mustQemuIo(['-c', 'write -P 6 1000k 4k', join(d, 'top.qcow2')]);
    t.theirs = join(tmpDir(), 'theirs');
    cpSync(t.mine, t.theirs, { recursive: true });
    for (const [img, args] of [['top.qcow2', ['-b', 'other.qcow2', '-F', 'qcow2']], ['mid.qcow2', ['-b', '']]] as const) {
      const before = raw(join(t.mine, img));
      const m = qimg(['rebase', ...args, join(t.mine, img)]);
      assert.is(m.status, 0, m.stderr);
      mustQemuImg(['rebase', ...args, join(t.theirs, img)]);
      assert.ok(raw(join(t.mine, img)).equals(before), `compat ${compat}: ${img} reads the same after rebase ${args.join(' ')}`);
      assertSameChains(t, `compat ${compat} rebase ${img} ${args.join(' ')}`);
    }
  }
});

test('rebase errors are worded as qemu-img words them', () => {
  const t = twin(2);
  const top = join(t.mine, 'l1.qcow2');
  const r1 = qimg(['rebase', '-b', 'l0.qcow2', top]);
  assert.is(r1.status, 1);
  assert.is(r1.stderr, "qimg: Could not change the backing file to 'l0.qcow2': backing format must be specified\n");
  const r2 = qimg(['rebase', '-b', 'nonexist', '-F', 'qcow2', top]);
  assert.is(r2.status, 1, r2.stderr);
  assert.match(r2.stderr, /^qimg: Could not open new backing file 'nonexist': .*No such file or directory\n$/);
  const r3 = qimg(['rebase', top]);
  assert.is(r3.status, 1);
  assert.match(r3.stderr, /Must specify backing file \(-b\) or use unsafe mode \(-u\)/);
});

test('map: human and JSON byte for byte as qemu-img, on every layer of chains with a raw base', async () => {
  for (const [depth, rawBase] of [[4, false], [3, true]] as Array<[number, boolean]>) {
    const dir = tmpDir();
    const names = buildChain(dir, depth, rawBase);
    for (const n of names) {
      const entries = await mapFile(join(dir, n));
      for (const e of entries) if (e.filename) e.filename = e.filename.slice(dir.length + 1);
      const j = qemuImg(['map', '--output=json', n], {}, dir);
      assert.is(renderMapJson(entries), j.stdout, `map --output=json ${n}`);
      const h = qemuImg(['map', n], {}, dir);
      const r = renderMapHuman(entries);
      assert.is(r.text, h.stdout, `map ${n}`);
      assert.is(r.error === null ? 0 : 1, h.status);
      if (r.error) assert.is(`qemu-img: ${r.error}\n`, h.stderr);
    }
    // The CLI itself, on the top (relative names as the user typed them).
    for (const o of ['human', 'json']) {
      const m = qimg(['map', `--output=${o}`, names[depth - 1]!], {}, dir);
      const q = qemuImg(['map', `--output=${o}`, names[depth - 1]!], {}, dir);
      assert.is(m.stdout, q.stdout, `qimg map --output=${o}`);
      assert.is(m.status, q.status);
    }
  }
});

// Found by the ops differential fuzz (bench/ops-diff.ts, seed 5 case 2): on an image QEMU takes for
// metadata-preallocated (clearly more clusters with a refcount than the file has blocks for), it
// asks the file under each data extent where its holes are and reports a hole, or the end of the
// file, as "zero": true. qimg always said data. On other images QEMU does not ask.
test('map: data over holes in the file or past its end reads as zero, as qemu-img decides', () => {
  const dir = tmpDir();
  const pre = join(dir, 'prealloc.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'preallocation=metadata', pre, '4M']);
  mustQemuIo(['-c', 'write -P 2 0 128k', '-c', 'write -P 3 1M 64k', pre]);
  const host = (JSON.parse(qemuImg(['map', '--output=json', pre]).stdout) as Array<{ offset?: number }>)[0]!.offset!;
  const b = readFileSync(pre);
  /**
   * A copy of `src` with [from, to) left as a hole (4 KiB aligned: the file system's blocks);
   * `sparse`: blocks of zeros left as holes too, as a preallocated original has them.
   */
  const holed = (src: Buffer, name: string, from: number, to: number, sparse = true): void => {
    const fd = openSync(join(dir, name), 'w');
    for (let p = 0; p < src.length; p += 4096) {
      const blk = src.subarray(p, Math.min(src.length, p + 4096));
      if ((p < from || p >= to) && (!sparse || blk.some((x) => x !== 0))) writeSync(fd, blk, 0, blk.length, p);
    }
    ftruncateSync(fd, src.length);
    closeSync(fd);
  };
  holed(b, 'hole.qcow2', host + 69632, host + 77824);
  holed(b.subarray(0, host + 65536 + 1000), 'cut.qcow2', 0, 0); // ends inside written data
  holed(b.subarray(0, host + 65536 + 1024), 'cut-sector.qcow2', 0, 0);
  // Not preallocated: the same hole, which QEMU does not look for.
  const plain = join(dir, 'plain.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', plain, '1M']);
  mustQemuIo(['-c', 'write -P 1 0 256k', plain]);
  const pb = readFileSync(plain);
  const ph = (JSON.parse(qemuImg(['map', '--output=json', plain]).stdout) as Array<{ offset?: number }>)[0]!.offset!;
  holed(pb, 'plain-hole.qcow2', ph + 69632, ph + 77824, false);
  for (const n of ['prealloc.qcow2', 'hole.qcow2', 'cut.qcow2', 'cut-sector.qcow2', 'plain-hole.qcow2']) {
    for (const o of ['human', 'json']) {
      const m = qimg(['map', `--output=${o}`, n], {}, dir);
      const q = qemuImg(['map', `--output=${o}`, n], {}, dir);
      assert.is(m.stdout, q.stdout, `map --output=${o} ${n}`);
      assert.is(m.status, q.status, n);
    }
    const json = qimg(['map', '--output=json', n], {}, dir).stdout;
    if (n === 'plain-hole.qcow2') assert.not.match(json, '"zero": true, "data": true', `${n}: QEMU does not look`);
    else assert.match(json, '"zero": true, "data": true', `${n}: some data reads as zero`);
  }
});

test('compare: messages and exit codes as qemu-img (sizes, strict, allocation, errors)', async () => {
  const dir = tmpDir();
  const mk = (name: string, size: string, cmds: string[], fmt = 'qcow2') => {
    mustQemuImg(['create', '-q', '-f', fmt, join(dir, name), size]);
    if (cmds.length) mustQemuIo(['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), join(dir, name)]);
    return name;
  };
  mk('a', '1M', ['write -P 5 12345 1']);
  mk('b', '1M', []);
  mk('c', '2M', ['write -P 5 1200000 1']);
  mk('d', '2M', ['write -P 0 0 64k']);
  mk('e', '1M', ['write -P 0 0 64k', 'write -z 512k 64k']);
  mk('f', '1M', ['write -P 0 0 64k', 'write -P 0 512k 64k']);
  mk('g', '1M', ['write -c -P 7 128k 64k']);
  mk('h', '1M', ['write -P 7 128k 64k']);
  mk('r.raw', '1M', ['write -P 5 12345 1'], 'raw');
  mk('z.raw', '1M', [], 'raw');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'a', '-F', 'qcow2', join(dir, 'o')]);
  const names = ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'o', 'r.raw', 'z.raw'];
  let n = 0;
  for (const x of names) {
    for (const y of names) {
      for (const s of [[], ['-s']]) {
        // The engine in-process (the CLI adds only the newline per line and the exit code).
        const m = await compare(join(dir, x), join(dir, y), { strict: s.length > 0 });
        const q = qemuImg(['compare', ...s, x, y], {}, dir);
        assert.is(m.lines.map((l) => `${l}\n`).join(''), q.stdout, `compare ${s.join(' ')} ${x} ${y}`);
        assert.is(m.identical ? 0 : 1, q.status, `compare ${s.join(' ')} ${x} ${y} exit`);
        n++;
      }
    }
  }
  assert.ok(n > 200);
  for (const [x, y, s] of [['a', 'b', ''], ['c', 'b', ''], ['d', 'b', '-s'], ['e', 'f', '-s'], ['a', 'o', '']]) {
    const m = qimg(['compare', ...(s ? [s] : []), x!, y!], {}, dir);
    const qq = qemuImg(['compare', ...(s ? [s] : []), x!, y!], {}, dir);
    assert.is(m.stdout, qq.stdout);
    assert.is(m.status, qq.status);
  }
  const q = qimg(['compare', '-q', 'a', 'b'], {}, dir);
  assert.is(q.stdout, '');
  assert.is(q.status, 1);
  const e = qimg(['compare', 'a', 'nonex'], {}, dir);
  assert.is(e.status, 2);
  assert.is(e.stderr, "qimg: Could not open 'nonex': No such file or directory\n");
});


test('commit and rebase refuse while a live qemu-io holds the overlay or the base, and change nothing', async () => {
  const t = twin(3);
  const top = join(t.mine, 'l2.qcow2');
  for (const held of ['l2.qcow2', 'l1.qcow2']) {
    const path = join(t.mine, held);
    const before = t.names.map((n) => readFileSync(join(t.mine, n)));
    await withQemuIo(path, () => {
      for (const args of [['commit', top], ['rebase', '-b', 'l0.qcow2', '-F', 'qcow2', top], ['rebase', '-u', '-b', 'l0.qcow2', '-F', 'qcow2', top]]) {
        if (held === 'l1.qcow2' && args.includes('-u')) continue; // -u opens FILE only
        const r = qimg(args);
        assert.is(r.status, 1, `${args.join(' ')} while ${held} is held`);
        assert.match(r.stderr, /lock/, `${args.join(' ')}: ${r.stderr}`);
      }
    });
    t.names.forEach((n, i) => assert.ok(readFileSync(join(t.mine, n)).equals(before[i]!), `${n} untouched`));
  }
});

test('chain: tree and JSON; revert keeps the old image and leaves LAYER untouched; --delete', () => {
  const dir = tmpDir();
  const names = buildChain(dir, 3);
  const h = qimg(['chain', 'l2.qcow2'], {}, dir);
  assert.is(h.status, 0, h.stderr);
  const lines = h.stdout.trimEnd().split('\n');
  assert.is(lines.length, 3);
  assert.match(lines[0]!, /^l2\.qcow2 \(qcow2, 4 MiB virtual, .* allocated\)$/);
  assert.match(lines[2]!, /^    └── l0\.qcow2 \(qcow2, 4 MiB virtual, .* allocated, 1 internal snapshot\)$/);
  const j = JSON.parse(qimg(['chain', '--output=json', 'l2.qcow2'], {}, dir).stdout) as Array<Record<string, unknown>>;
  assert.equal(j.map((l) => [l.depth, l.filename, l.format, l['virtual-size'], l['backing-filename'] ?? null]), [
    [0, 'l2.qcow2', 'qcow2', 4194304, 'l1.qcow2'],
    [1, 'l1.qcow2', 'qcow2', 4194304, 'l0.qcow2'],
    [2, 'l0.qcow2', 'qcow2', 4194304, null],
  ]);
  const l0 = readFileSync(join(dir, 'l0.qcow2'));
  const old = raw(join(dir, 'l2.qcow2'));
  const r = qimg(['chain', 'revert', 'l2.qcow2', '--to', 'l0.qcow2'], {}, dir);
  assert.is(r.status, 0, r.stderr);
  assert.ok(readFileSync(join(dir, 'l0.qcow2')).equals(l0), 'LAYER untouched');
  assert.ok(raw(join(dir, 'l2.qcow2')).equals(raw(join(dir, 'l0.qcow2'))), 'the new overlay reads as LAYER');
  assert.ok(raw(join(dir, 'l2.qcow2.pre-revert')).equals(old), 'old image kept');
  assertClean(join(dir, 'l2.qcow2'));
  const info = JSON.parse(mustQemuImg(['info', '--output=json', join(dir, 'l2.qcow2')])) as Record<string, unknown>;
  assert.is(info['backing-filename'], 'l0.qcow2');
  assert.ok(existsSync(join(dir, names[1]!)));
  // --delete drops the old image and the layers in between.
  const bad = qimg(['chain', 'revert', 'l2.qcow2.pre-revert', '--to', 'nope'], {}, dir);
  assert.is(bad.status, 1);
  const d = qimg(['chain', 'revert', 'l2.qcow2.pre-revert', '--to', 'l0.qcow2', '--delete'], {}, dir);
  assert.is(d.status, 0, d.stderr);
  assert.not.ok(existsSync(join(dir, 'l1.qcow2')));
  assert.ok(existsSync(join(dir, 'l2.qcow2.pre-revert')));
  assert.not.ok(existsSync(join(dir, 'l2.qcow2.pre-revert.pre-revert')));
  writeFileSync(join(dir, 'marker'), '');
});

test.run();
