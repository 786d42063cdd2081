// CLI refusals against qemu-img 7.2: build-then-poke headers (each open refusal of qemu-img),
// bad files and arguments, the backing-file policy, backing loops, and image locks.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { copyFileSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { mustQemuImg, mustQemuIo, qemuImg, tmpDir, type RunResult } from '../helpers.js';
import { be32, be64, pool, poke, qimgA, sha256 } from '../oracle.js';

const dir = tmpDir('qimg-errors-');
const good = join(dir, 'good.qcow2');
// 64 MiB, 64 KiB clusters, v3, header_length 112, data at 0 and 1M, one snapshot:
// reftable at 0x10000, L1 at 0x30000, snapshot table at 0x80000 (see /tmp/oracle.md §4).
mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', good, '64M']);
mustQemuIo(['-c', 'write -P 0x01 0 64k', '-c', 'write -P 0x02 1M 64k', good]);
mustQemuImg(['snapshot', '-c', 's1', good]);

/** Header field offsets (qcow2 spec). */
const H = {
  version: 4,
  backingFileOffset: 8,
  backingFileSize: 16,
  clusterBits: 20,
  size: 24,
  cryptMethod: 32,
  l1Size: 36,
  l1TableOffset: 40,
  refcountTableOffset: 48,
  refcountTableClusters: 56,
  nbSnapshots: 60,
  snapshotsOffset: 64,
  incompatibleFeatures: 72,
  refcountOrder: 96,
  headerLength: 100,
} as const;

const FEATURE_NAME_TABLE = 0x6803f857;

/** Offset of the first entry of the feature-name table extension. */
function featureTableEntries(path: string): number {
  const b = readFileSync(path).subarray(0, 65536);
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let off = dv.getUint32(H.headerLength); off + 8 <= b.length; ) {
    const type = dv.getUint32(off);
    const len = dv.getUint32(off + 4);
    if (type === FEATURE_NAME_TABLE) return off + 8;
    if (type === 0) break;
    off += 8 + Math.ceil(len / 8) * 8;
  }
  throw new Error('no feature name table');
}

interface Poke {
  name: string;
  /** A variant of another case: checked with info only (each qimg run costs ~0.15 s of CPU). */
  infoOnly?: boolean;
  pokes: [number, number[]][];
  /** qemu-img's reason, after "Could not open 'F': ". */
  reason: string;
}

function nameEntry(bit: number, name: string): number[] {
  const e = new Array<number>(48).fill(0);
  e[0] = 0; // incompatible
  e[1] = bit;
  Buffer.from(name).forEach((c, i) => (e[2 + i] = c));
  return e;
}

const POKES: Poke[] = [
  { name: 'version 4', pokes: [[H.version, be32(4)]], reason: 'Unsupported qcow2 version 4' },
  { name: 'cluster_bits 8', pokes: [[H.clusterBits, be32(8)]], reason: 'Unsupported cluster size: 2^8' },
  { name: 'cluster_bits 22', pokes: [[H.clusterBits, be32(22)]], reason: 'Unsupported cluster size: 2^22' },
  { name: 'header_length 100', pokes: [[H.headerLength, be32(100)]], reason: 'qcow2 header too short' },
  { name: 'header_length 0x20000', infoOnly: true, pokes: [[H.headerLength, be32(0x20000)]], reason: 'qcow2 header exceeds cluster size' },
  { name: 'refcount_order 7', pokes: [[H.refcountOrder, be32(7)]], reason: 'Reference count entry width too large; may not exceed 64 bits' },
  { name: 'incompatible bit 20', pokes: [[H.incompatibleFeatures, be64(2 ** 20)]], reason: 'Unsupported qcow2 feature(s): Unknown incompatible feature: 100000' },
  { name: 'incompatible bits 20+21', infoOnly: true, pokes: [[H.incompatibleFeatures, be64(3 * 2 ** 20)]], reason: 'Unsupported qcow2 feature(s): Unknown incompatible feature: 300000' },
  {
    name: 'incompatible bit 20 named in the feature table',
    // The first entry (incompatible bit 0, "dirty bit") becomes bit 20 "my new feature".
    pokes: [[H.incompatibleFeatures, be64(2 ** 20)], [-1, nameEntry(20, 'my new feature')]],
    reason: 'Unsupported qcow2 feature(s): my new feature',
  },
  { name: 'l1_size 4194305', pokes: [[H.l1Size, be32(4194305)]], reason: 'Active L1 table too large' },
  { name: 'l1_size 0', pokes: [[H.l1Size, be32(0)]], reason: 'L1 table is too small' },
  { name: 'size too big for L1', infoOnly: true, pokes: [[H.size, be64(2 ** 40)]], reason: 'L1 table is too small' },
  { name: 'l1_table_offset unaligned', pokes: [[H.l1TableOffset, be64(0x30200)]], reason: 'Active L1 table offset invalid' },
  { name: 'refcount_table_offset unaligned', pokes: [[H.refcountTableOffset, be64(0x10200)]], reason: 'Reference count table offset invalid' },
  { name: 'refcount_table_clusters 0x100000', pokes: [[H.refcountTableClusters, be32(0x100000)]], reason: 'Reference count table too large' },
  { name: 'refcount_table_clusters 0xffffffff', infoOnly: true, pokes: [[H.refcountTableClusters, be32(0xffffffff)]], reason: 'Reference count table too large' },
  { name: 'refcount_table_clusters 0', pokes: [[H.refcountTableClusters, be32(0)]], reason: 'Image does not contain a reference count table' },
  { name: 'nb_snapshots 70000', pokes: [[H.nbSnapshots, be32(70000)]], reason: 'Snapshot table too large' },
  { name: 'snapshots_offset unaligned', pokes: [[H.snapshotsOffset, be64(0x80200)]], reason: 'Snapshot table offset invalid' },
  { name: 'backing name too long', pokes: [[H.backingFileOffset, be64(512)], [H.backingFileSize, be32(2000)]], reason: 'Backing file name too long' },
  { name: 'crypt_method 3', pokes: [[H.cryptMethod, be32(3)]], reason: 'Unsupported encryption method 3' },
];

const NO_STACK = /^\s+at /m;

/** Exactly one line `qimg: ...` holding `reason`, no stack trace. */
function assertOneLine(r: RunResult, reason: string, label: string): void {
  assert.is(r.status, 1, `${label}: exit code (stderr: ${r.stderr})`);
  assert.not.match(r.stderr, NO_STACK, `${label}: stack trace in stderr`);
  const lines = r.stderr.split('\n');
  assert.is(lines.length, 2, `${label}: one stderr line, got ${JSON.stringify(r.stderr)}`);
  assert.is(lines[1], '', `${label}: stderr ends with a newline`);
  assert.ok(lines[0]!.startsWith('qimg: '), `${label}: ${lines[0]}`);
  assert.ok(lines[0]!.includes(reason), `${label}: ${JSON.stringify(lines[0])} lacks ${JSON.stringify(reason)}`);
}

/** Runs each check, then fails once listing every case that failed (so one bug hides no other). */
function allOf(checks: [string, () => void][]): void {
  const failed: string[] = [];
  for (const [label, fn] of checks) {
    try {
      fn();
    } catch (err) {
      const a = err as { message?: string; actual?: unknown; expects?: unknown };
      const detail = a.actual !== undefined ? `\n  got:  ${JSON.stringify(a.actual)}\n  want: ${JSON.stringify(a.expects)}` : '';
      failed.push(`${label}: ${a.message ?? String(err)}${detail}`);
    }
  }
  assert.is(failed.length, 0, `${failed.length} case(s) failed:\n${failed.join('\n')}`);
}

test('errors: every poked header is refused by info, snapshot -l and convert (image unchanged)', async () => {
  const jobs: { label: string; reason: string; file: string; args: string[]; out?: string }[] = [];
  const sums = new Map<string, string>();
  POKES.forEach((p, i) => {
    const file = join(dir, `poke${i}.qcow2`);
    copyFileSync(good, file);
    for (const [off, bytes] of p.pokes) poke(file, off < 0 ? featureTableEntries(file) : off, bytes);
    // The oracle: qemu-img refuses each the same way (so the pokes hit what they mean to).
    const w = qemuImg(['info', file]);
    assert.is(w.stderr, `qemu-img: Could not open '${file}': ${p.reason}\n`, `${p.name}: qemu-img info`);
    assert.is(w.status, 1);
    sums.set(file, sha256(file));
    const out = join(dir, `poke${i}.raw`);
    jobs.push({ label: `${p.name}: info`, reason: p.reason, file, args: ['info', file] });
    if (p.infoOnly) return;
    jobs.push({ label: `${p.name}: snapshot -l`, reason: p.reason, file, args: ['snapshot', '-l', file] });
    jobs.push({ label: `${p.name}: convert`, reason: p.reason, file, args: ['convert', '-O', 'raw', file, out], out });
  });
  const results = await pool(jobs.map((j) => () => qimgA(j.args)), 4);
  jobs.forEach((j, i) => {
    assertOneLine(results[i]!, `Could not open '${j.file}': ${j.reason}`, j.label);
    if (j.out) assert.not.ok(existsSync(j.out), `${j.label}: output file created`);
  });
  for (const [file, sum] of sums) assert.is(sha256(file), sum, `${file} changed`);
});

test('errors: bad files (nonexistent, directory, empty, bad magic)', async () => {
  const missing = join(dir, 'nonexistent.qcow2');
  const adir = join(dir, 'adir');
  mkdirSync(adir);
  const empty = join(dir, 'empty.img');
  writeFileSync(empty, '');
  const badmagic = join(dir, 'badmagic.qcow2');
  copyFileSync(good, badmagic);
  poke(badmagic, 0, [0x51, 0x46, 0x49, 0x00]);
  const before = sha256(badmagic);
  const out = join(dir, 'bad.raw');

  const cases: { args: string[]; reason?: string }[] = [
    // qemu-img: `Could not open 'F': Could not open 'F': No such file or directory`; the reason
    // (after the first "Could not open 'F': ") is what qimg must say.
    { args: ['info', missing], reason: `Could not open '${missing}': No such file or directory` },
    { args: ['snapshot', '-l', missing], reason: `Could not open '${missing}': No such file or directory` },
    { args: ['convert', '-O', 'raw', missing, out], reason: `Could not open '${missing}': No such file or directory` },
    { args: ['info', adir], reason: `Could not open '${adir}': 'file' driver requires '${adir}' to be a regular file` },
    { args: ['info', '-f', 'qcow2', adir], reason: `'file' driver requires '${adir}' to be a regular file` },
    { args: ['snapshot', '-l', adir], reason: `'file' driver requires '${adir}' to be a regular file` },
    { args: ['convert', '-O', 'raw', adir, out], reason: `'file' driver requires '${adir}' to be a regular file` },
    { args: ['info', empty] },
    { args: ['info', '--output=json', empty] },
    { args: ['snapshot', '-l', empty] },
    { args: ['info', '-f', 'qcow2', empty], reason: `Could not open '${empty}': Image is not in qcow2 format` },
    { args: ['info', badmagic] },
    { args: ['snapshot', '-l', badmagic] },
    { args: ['info', '-f', 'qcow2', badmagic], reason: `Could not open '${badmagic}': Image is not in qcow2 format` },
    { args: ['convert', '-f', 'qcow2', '-O', 'raw', badmagic, out], reason: `Could not open '${badmagic}': Image is not in qcow2 format` },
  ];
  const want = cases.map((c) => qemuImg(c.args));
  const got = await pool(cases.map((c) => () => qimgA(c.args)), 4);
  allOf(cases.map((c, i) => [c.args.join(' '), () => {
    const label = c.args.join(' ');
    if (c.reason) {
      assert.is(want[i]!.status, 1, `qemu-img ${label}`);
      assert.ok(want[i]!.stderr.includes(c.reason), `qemu-img ${label}: ${want[i]!.stderr}`);
      assertOneLine(got[i]!, c.reason, label);
    } else {
      assert.is(want[i]!.status, 0, `qemu-img ${label}`);
      assert.is(got[i]!.status, 0, `${label}: ${got[i]!.stderr}`);
      assert.fixture(got[i]!.stdout, want[i]!.stdout, label);
    }
  }]));
  assert.not.ok(existsSync(out), 'convert of a bad source created its output');
  assert.is(sha256(badmagic), before);
  // convert of an empty (raw) image: an empty output, like qemu-img.
  const emptyOut = join(dir, 'empty-out.raw');
  const r = await qimgA(['convert', '-O', 'raw', empty, emptyOut]);
  assert.is(r.status, 0, r.stderr);
  assert.is(statSync(emptyOut).size, 0);
});

test('errors: bad command lines exit 1 like qemu-img', async () => {
  const cases = [
    { q: ['nosuchcommand', good], m: 'Command not found: nosuchcommand' },
    { q: ['info', '--bogus', good], m: "unrecognized option '--bogus'" },
    { q: ['snapshot', '-l', '--bogus', good], m: "unrecognized option '--bogus'" },
    { q: ['convert', '--bogus', '-O', 'raw', good, join(dir, 'x.raw')], m: "unrecognized option '--bogus'" },
    // getopt's wording as qemu-img 7.2 prints it: the whole argument, clusters and '=value' included.
    { q: ['snapshot', '-lx', good], m: "unrecognized option '-lx'" },
    { q: ['info', '--force-share=1', good], m: "unrecognized option '--force-share=1'" },
    { q: ['info', '--bogus=3', good], m: "unrecognized option '--bogus=3'" },
    { q: ['snapshot', '-c'], m: "missing argument for option '-c'" },
    { q: ['snapshot', '-lc'], m: "missing argument for option '-lc'" },
    { q: ['check', '-r'], m: "missing argument for option '-r'" },
    { q: ['info', good, '--output'], m: "missing argument for option '--output'" },
    { q: ['convert', good], m: 'Must specify image file name' },
    { q: ['resize', good], m: 'Not enough arguments' },
    { q: ['info', '-f', 'foo', good], m: `Could not open '${good}': Unknown driver 'foo'` },
    { q: ['check', '-f', 'foo', good], m: `Could not open '${good}': Unknown driver 'foo'` },
    { q: ['convert', '-f', 'foo', '-O', 'raw', good, join(dir, 'y.raw')], m: `Could not open '${good}': Unknown driver 'foo'` },
    { q: ['check', '-r', 'bogus', good], m: "Unknown option value for -r (expecting 'leaks' or 'all'): bogus" },
    { q: ['info'], m: 'Expecting one image file name' },
    { q: ['snapshot', '-l'], m: 'Expecting one image file name' },
    { q: ['info', '--output=xml', good], m: '--output must be used with human or json as argument.' },
  ];
  const want = cases.map((c) => qemuImg(c.q));
  const got = await pool(cases.map((c) => () => qimgA(c.q)), 4);
  cases.forEach((c, i) => {
    const label = c.q.join(' ');
    assert.is(want[i]!.status, 1, `qemu-img ${label}`);
    assert.is(got[i]!.status, 1, `${label}: ${got[i]!.stderr}`);
    assert.is(got[i]!.stdout, '', label);
    assert.not.match(got[i]!.stderr, NO_STACK, label);
    assert.ok(got[i]!.stderr.startsWith(`qimg: ${c.m}\n`), `${label}: ${JSON.stringify(got[i]!.stderr)}`);
    assert.ok(want[i]!.stderr.startsWith(`qemu-img: ${c.m}\n`), `qemu-img ${label}: ${want[i]!.stderr}`);
  });
});

// ---------------------------------------------------------------------------------------------
// Backing files

const bdir = join(dir, 'outside');
const odir = join(dir, 'images');
mkdirSync(bdir);
mkdirSync(odir);
const base = join(bdir, 'base.qcow2');
mustQemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
mustQemuIo(['-c', 'write -P 0xc1 0 1M', '-c', 'write -P 0xc2 3M 64k', base]);
const ov = join(odir, 'ov.qcow2');
mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', ov, '4M']);
mustQemuIo(['-c', 'write -P 0xc3 4096 4096', ov]);

function qemuRaw(source: string[], name: string): Buffer {
  const dst = join(dir, `${name}.ref.raw`);
  mustQemuImg(['convert', ...source, '-O', 'raw', dst]);
  return readFileSync(dst);
}

test('errors: backing outside the image directory needs --backing-root / QIMG_BACKING_ROOTS / --allow-any-backing', async () => {
  const want = qemuRaw([ov], 'ov');
  const topOnly = qemuRaw([`json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"${ov}"}}`], 'ovtop');
  const outs = ['refused', 'root', 'env', 'any', 'none'].map((n) => join(dir, `ov-${n}.raw`));
  const [refused, root, env, any, none] = await pool([
    () => qimgA(['convert', '-O', 'raw', ov, outs[0]!]),
    () => qimgA(['convert', '--backing-root', bdir, '-O', 'raw', ov, outs[1]!]),
    () => qimgA(['convert', '-O', 'raw', ov, outs[2]!], { env: { QIMG_BACKING_ROOTS: `/nonexistent:${bdir}` } }),
    () => qimgA(['convert', '--allow-any-backing', '-O', 'raw', ov, outs[3]!]),
    () => qimgA(['convert', '--no-backing', '-O', 'raw', ov, outs[4]!]),
  ], 4);
  assertOneLine(refused!, '--backing-root', 'convert without a root');
  assert.ok(refused!.stderr.includes('--allow-any-backing'), refused!.stderr);
  assert.not.ok(existsSync(outs[0]!), 'refused convert created its output');
  for (const [r, o, label] of [[root, outs[1], '--backing-root'], [env, outs[2], 'QIMG_BACKING_ROOTS'], [any, outs[3], '--allow-any-backing']] as const) {
    assert.is(r!.status, 0, `${label}: ${r!.stderr}`);
    assert.ok(Buffer.compare(readFileSync(o!), want) === 0, `${label}: output differs from qemu-img's`);
  }
  assert.is(none!.status, 0, none!.stderr);
  assert.ok(Buffer.compare(readFileSync(outs[4]!), topOnly) === 0, '--no-backing: output differs from the top layer alone');
});

test('errors: info does not open the backing file; --backing-chain does', async () => {
  const mdir = join(dir, 'missing');
  mkdirSync(mdir);
  const mov = join(mdir, 'mov.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', mov, '4M']);
  const cases = [['info', mov], ['info', '--output=json', mov], ['info', '--backing-chain', mov], ['snapshot', '-l', mov], ['convert', '-O', 'raw', mov, join(mdir, 'o.raw')]];
  const want = cases.map((c) => qemuImg(c));
  const got = await pool(cases.map((c) => () => qimgA(c)), 4);
  // Also: info on the outside-backing overlay needs no policy flag.
  const w = qemuImg(['info', ov]);
  const g = await qimgA(['info', ov]);
  assert.is(g.status, 0, g.stderr);
  assert.fixture(g.stdout, w.stdout);
  allOf(cases.map((c, i) => [c.slice(0, -1).join(' '), () => {
    const label = c.slice(0, -1).join(' ') + ' (missing backing)';
    if (c[0] === 'snapshot') {
      // Deliberate difference: listing snapshots never opens backing files (qemu-img fails here).
      assert.is(got[i]!.status, 0, `${label}: ${got[i]!.stderr}`);
      assert.is(got[i]!.stdout, '');
      return;
    }
    assert.is(got[i]!.status, want[i]!.status, `${label}: exit code; qemu-img: ${want[i]!.stderr}; qimg: ${got[i]!.stderr}`);
    if (want[i]!.status === 0) assert.fixture(got[i]!.stdout, want[i]!.stdout, label);
    else assertOneLine(got[i]!, 'gone.qcow2', label);
  }]));
});

test('errors: FIFO, /dev/zero and json: backing names are refused even with --allow-any-backing', async () => {
  const fdir = join(dir, 'special');
  mkdirSync(fdir);
  const fifo = join(fdir, 'fifo');
  spawnSync('mkfifo', [fifo]);
  const names = [['fifo', 'raw'], ['/dev/zero', 'raw'], [`json:{"driver":"raw","file":{"driver":"file","filename":"${base}"}}`, 'raw']] as const;
  const imgs = names.map(([b, f], i) => {
    const p = join(fdir, `sp${i}.qcow2`);
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', b, '-F', f, p, '4M']);
    return p;
  });
  const outs = imgs.map((_, i) => join(fdir, `sp${i}.raw`));
  const t0 = Date.now();
  const got = await pool(imgs.map((p, i) => () => qimgA(['convert', '--allow-any-backing', '-O', 'raw', p, outs[i]!], { timeoutMs: 5000 })), 3);
  assert.ok(Date.now() - t0 < 10000, 'took too long');
  got.forEach((r, i) => {
    const label = `backing ${names[i]![0]}`;
    assert.is(r.status, 1, `${label}: exit ${r.status} (-1: killed after 5 s) ${r.stderr}`);
    assertOneLine(r, 'Could not open', label);
    assert.not.ok(existsSync(outs[i]!), `${label}: output created`);
  });
});

test('errors: backing loops (self, a->b->a) fail at once naming a loop', async () => {
  const ldir = join(dir, 'loops');
  mkdirSync(ldir);
  const self = join(ldir, 'self.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'self.qcow2', '-F', 'qcow2', self, '4M']);
  const a = join(ldir, 'a.qcow2');
  const b = join(ldir, 'b.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', a, '4M']);
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'a.qcow2', '-F', 'qcow2', b, '4M']);
  mustQemuImg(['rebase', '-u', '-b', 'b.qcow2', '-F', 'qcow2', a]);
  const runs = [
    ['convert', '-O', 'raw', self, join(ldir, 'self.raw')],
    ['convert', '-O', 'raw', a, join(ldir, 'a.raw')],
    ['convert', '--allow-any-backing', '-O', 'raw', b, join(ldir, 'b.raw')],
    ['info', '--backing-chain', a],
  ];
  const t0 = Date.now();
  const got = await pool(runs.map((args) => () => qimgA(args, { timeoutMs: 5000 })), 4);
  assert.ok(Date.now() - t0 < 10000, 'took too long');
  got.forEach((r, i) => {
    const label = runs[i]!.slice(0, -1).join(' ');
    assert.is(r.status, 1, `${label}: exit ${r.status} (-1: killed after 5 s) ${r.stderr}`);
    assertOneLine(r, 'loop', label);
  });
});

// ---------------------------------------------------------------------------------------------
// Locks

function ofdLocks(path: string): string[] {
  const ino = statSync(path).ino;
  return readFileSync('/proc/locks', 'utf8')
    .split('\n')
    .filter((l) => l.includes(`:${ino} `) && l.includes('OFDLCK'));
}

test('errors: an image held read-write by qemu-io is refused; -U reads it', async () => {
  const ldir = join(dir, 'lock');
  mkdirSync(ldir);
  const img = join(ldir, 'l.qcow2');
  copyFileSync(good, img);
  let holder: ChildProcess | null = null;
  try {
    holder = spawn('qemu-io', ['-c', 'sleep 30000', img], { stdio: 'ignore' });
    const deadline = Date.now() + 5000;
    // A read-write qemu-io holds bytes 100-101 (one merged line), 103, 201, 203.
    while (!ofdLocks(img).some((l) => / 10[01] 101$/.test(l.trim()))) {
      if (Date.now() > deadline) throw new Error(`qemu-io took no locks: ${ofdLocks(img).join('; ')}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    const wantU = qemuImg(['info', '-U', img]);
    const wantLocked = qemuImg(['info', img]);
    assert.is(wantLocked.status, 1);
    const [locked, lockedL, withU] = await pool([() => qimgA(['info', img]), () => qimgA(['snapshot', '-l', img]), () => qimgA(['info', '-U', img])], 3);
    const msg = `qimg: Could not open '${img}': Failed to get shared "write" lock\nIs another process using the image [${img}]?\n`;
    assert.is(locked!.status, 1);
    assert.is(locked!.stderr, msg);
    assert.is(wantLocked.stderr, msg.replace(/^qimg/, 'qemu-img'));
    assert.is(lockedL!.status, 1);
    assert.is(lockedL!.stderr, msg);
    assert.is(withU!.status, 0, withU!.stderr);
    assert.fixture(withU!.stdout, wantU.stdout);
  } finally {
    if (holder?.pid) process.kill(holder.pid, 'SIGKILL');
  }
});

test.run();
