// `qimg create` on the command line: Formatting lines, refusals and locking, against qemu-img create.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { mustQemuImg, qemuImg, qimg, run, tmpDir, type RunResult } from '../helpers.js';

const MODULE = fileURLToPath(new URL('../../src/cli/commands/create.js', import.meta.url));
/** Until main.ts registers `create`, run the command module directly (same error reporting as main.ts). */
const registered = qimg(['create', '--help']).status === 0;
function qimgCreate(args: string[], cwd: string): RunResult {
  if (registered) return qimg(['create', ...args], {}, cwd);
  const script =
    `import(${JSON.stringify(MODULE)}).then(m => m.run(process.argv.slice(1))).then(c => process.exit(c), ` +
    `e => { process.stderr.write('qimg: ' + e.message + '\\n'); process.exit(1); })`;
  return run(process.execPath, ['-e', script, '--', ...args], {}, cwd);
}

const dir = tmpDir('qimg-create-cli-');
mustQemuImg(['create', '-q', '-f', 'raw', join(dir, 'base.raw'), '3M']);

const LINES: string[][] = [
  ['-f', 'qcow2', 'IMG', '64M'],
  ['-f', 'qcow2', '-o', 'compat=v2', 'IMG', '1M'],
  ['-f', 'qcow2', '-o', 'lazy_refcounts=yes,refcount_bits=8', 'IMG', '1.5M'],
  ['-f', 'qcow2', '-o', 'lazy_refcounts', 'IMG', '100k'],
  ['-f', 'qcow2', '-o', 'cluster_size=4k', '-o', 'cluster_size=8k', 'IMG', '1001'],
  ['-f', 'qcow2', '-o', 'refcount_bits=16,lazy_refcounts=off,compat=1.1,data_file_raw=off,data_file=dd,backing_fmt=raw,backing_file=base.raw,preallocation=off,compression_type=zlib,extended_l2=off,cluster_size=64k', 'IMG', '1M'],
  ['-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'IMG'],
  ['-f', 'qcow2', '-o', 'size=2M', 'IMG'],
  ['-f', 'raw', 'IMG', '1G'],
  ['IMG', '0x100'],
  ['-f', 'raw', '-o', 'preallocation=full', 'IMG', '1M'],
  ['-f', 'qcow2', '-o', 'extended_l2=on,preallocation=metadata', '-b', 'base.raw', '-F', 'raw', 'IMG', '1M'],
];

for (const args of LINES) {
  test(`create ${args.join(' ')}: same output, exit status and bytes as qemu-img`, () => {
    const sub = tmpDir('qimg-create-cli-');
    mustQemuImg(['create', '-q', '-f', 'raw', join(sub, 'base.raw'), '3M']);
    const q = qemuImg(['create', ...args.map((a) => (a === 'IMG' ? 'q.img' : a))], {}, sub);
    const m = qimgCreate(args.map((a) => (a === 'IMG' ? 'm.img' : a)), sub);
    assert.is(m.status, q.status, m.stderr);
    assert.is(m.stdout.replace(/m\.img/g, 'q.img'), q.stdout);
    const a = readFileSync(join(sub, 'q.img'));
    const b = readFileSync(join(sub, 'm.img'));
    if (!args.some((x) => x.includes('data_file'))) assert.ok(a.equals(b), 'byte-identical');
    else assert.is(b.length, a.length);
    if (args.includes('qcow2')) {
      const chk = qemuImg(['check', 'm.img'], {}, sub);
      assert.is(chk.status, 0, chk.stdout + chk.stderr);
    }
  });
}

test('create over an existing larger file replaces its bytes, as qemu-img does', () => {
  const sub = tmpDir('qimg-create-cli-');
  const old = Buffer.alloc(8 << 20, 0xff);
  writeFileSync(join(sub, 'q.img'), old);
  writeFileSync(join(sub, 'm.img'), old);
  const q = qemuImg(['create', '-f', 'qcow2', 'q.img', '1M'], {}, sub);
  const m = qimgCreate(['-f', 'qcow2', 'm.img', '1M'], sub);
  assert.is(m.status, 0, m.stderr);
  assert.is(q.status, 0, q.stderr);
  const a = readFileSync(join(sub, 'q.img'));
  const b = readFileSync(join(sub, 'm.img'));
  assert.ok(a.length < old.length, 'qemu-img truncated the old file');
  assert.ok(a.equals(b), 'byte-identical');
});

const REFUSALS: Array<[string[], string, boolean]> = [
  // [args, the qemu-img message, whether qemu-img prints the Formatting line first]
  [['-f', 'qcow2', '-o', 'cluster_size=1000', 'IMG', '1M'], 'IMG: Cluster size must be a power of two between 512 and 2048k', true],
  [['-f', 'qcow2', '-o', 'compat=0.10,refcount_bits=8', 'IMG', '1M'], 'IMG: Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)', true],
  [['-f', 'qcow2', '-o', 'compat=0.10,lazy_refcounts=on', 'IMG', '1M'], 'IMG: Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)', true],
  [['-f', 'qcow2', '-o', 'extended_l2=on,cluster_size=8k', 'IMG', '1M'], 'IMG: Extended L2 entries are only supported with cluster sizes of at least 16384 bytes', true],
  [['-f', 'qcow2', '-o', 'compat=v4', 'IMG', '1M'], "IMG: Parameter 'version' does not accept value 'v4'", true],
  [['-f', 'qcow2', '-o', 'compression_type=lz4', 'IMG', '1M'], "IMG: Parameter 'compression-type' does not accept value 'lz4'", true],
  [['-f', 'qcow2', '-o', 'refcount_bits=0016', 'IMG', '1M'], 'IMG: Refcount width must be a power of two and may not exceed 64 bits', true],
  [['-f', 'qcow2', '-o', 'lazy_refcounts=1', 'IMG', '1M'], "IMG: Parameter 'lazy_refcounts' expects 'on' or 'off'", false],
  [['-f', 'qcow2', '-o', 'foo=bar', 'IMG', '1M'], "IMG: Invalid parameter 'foo'", false],
  [['-f', 'qcow2', '-o', 'cluster_size=4k,', 'IMG', '1M'], 'Invalid option list: cluster_size=4k,', false],
  [['-f', 'qcow2', 'IMG'], 'IMG: Image creation needs a size parameter', false],
  [['-f', 'qcow2', '-b', 'base.raw', 'IMG', '1M'], 'IMG: Backing file specified without backing format', false],
  [['-f', 'qcow2', '-b', 'nonexist', '-F', 'raw', 'IMG', '1M'], "IMG: Could not open 'nonexist': No such file or directory", false],
  [['-f', 'raw', '-b', 'base.raw', '-F', 'raw', 'IMG', '1M'], "IMG: Backing file not supported for file format 'raw'", false],
  [['-f', 'qcow2', '-o', 'size=2M', 'IMG', '1M'], 'IMG: The image size must be specified only once', false],
  [['-f', 'qcow2', 'IMG', '1.5'], 'Invalid image size specified. You may use k, M, G, T, P or E suffixes for', false],
  [['-f', 'qcow2', 'IMG', '8E'], 'Invalid image size specified. Must be between 0 and 9223372036854775807.', false],
];

for (const [args, msg, printsLine] of REFUSALS) {
  test(`refused like qemu-img: ${args.join(' ')}`, () => {
    const q = qemuImg(['create', ...args.map((a) => (a === 'IMG' ? 'q.img' : a))], {}, dir);
    const m = qimgCreate(args.map((a) => (a === 'IMG' ? 'm.img' : a)), dir);
    assert.is(q.status, 1);
    assert.is(m.status, 1);
    assert.ok(q.stderr.startsWith('qemu-img: ' + msg.replace(/IMG/g, 'q.img')), q.stderr);
    assert.ok(m.stderr.startsWith('qimg: ' + msg.replace(/IMG/g, 'm.img')), m.stderr);
    assert.is(m.stderr.split('\n').filter((l) => l.startsWith('qimg: ')).length, 1);
    assert.is(m.stdout.replace(/m\.img/g, 'q.img'), q.stdout);
    assert.is(m.stdout !== '', printsLine);
    assert.not.ok(existsSync(join(dir, 'm.img')), 'no file created');
    assert.not.ok(existsSync(join(dir, 'q.img')));
  });
}

// Found by a differential run of random option sets: with two faults in one option list qimg
// reported another than qemu-img (e.g. extended_l2 on a v2 image is refused before a bad cluster
// size). Every pair of these faults, in both tools.
test('create on a device: refused as qemu-img refuses it when too short, and the device never deleted', () => {
  // Device nodes of our own (as /dev/full and /dev/null), so a regression deletes nothing that matters.
  const dir = tmpDir();
  for (const [name, minor] of [['full', 7], ['null', 3]] as const) {
    const dev = join(dir, name);
    if (run('mknod', ['-m', '666', dev, 'c', '1', String(minor)]).status !== 0) return; // not root: nothing to show
    const r = qimg(['create', '-q', '-f', 'raw', dev, '1M']);
    assert.is(r.status, 1);
    assert.is(r.stderr.replace(/^qimg: /, 'qemu-img: '), qemuImg(['create', '-q', '-f', 'raw', dev, '1M']).stderr);
    // A failed qcow2 create removes the half-written image, as QEMU does: regular files only.
    const q = qimg(['create', '-q', '-f', 'qcow2', dev, '1M']);
    assert.is(q.status, 1);
    assert.is(q.stderr, `qimg: ${dev}: Cannot grow device files\n`);
    assert.ok(statSync(dev).isCharacterDevice(), `${dev} is still a device`);
  }
});

test('option faults two at a time: the one qemu-img reports first', () => {
  const dir = tmpDir();
  mustQemuImg(['create', '-q', '-f', 'qcow2', join(dir, 'base.qcow2'), '1M']);
  const faults = [
    'extended_l2=on,compat=0.10',
    'cluster_size=1000',
    'extended_l2=on,cluster_size=4096',
    'preallocation=full,backing_file=base.qcow2,backing_fmt=qcow2',
    'backing_fmt=qcow2',
    'lazy_refcounts=on,compat=0.10',
    'refcount_bits=3',
    'refcount_bits=8,compat=0.10',
    'data_file_raw=on',
    'data_file_raw=on,data_file=d.raw,backing_file=base.qcow2,backing_fmt=qcow2',
    'data_file=d.raw,compat=0.10',
    'compression_type=zstd,compat=0.10',
  ];
  for (let i = 0; i < faults.length; i++) {
    for (let j = i + 1; j < faults.length; j++) {
      const o = `${faults[i]},${faults[j]}`;
      const q = qemuImg(['create', '-f', 'qcow2', '-o', o, 'img', '1M'], {}, dir);
      const m = qimg(['create', '-f', 'qcow2', '-o', o, 'img', '1M'], {}, dir);
      assert.is(m.status, q.status, o);
      assert.is(m.stderr, q.stderr.replace(/qemu-img/g, 'qimg'), o);
      assert.not.ok(existsSync(join(dir, 'img')), `${o}: nothing created`);
    }
  }
});

test('-o help lists the options', () => {
  const m = qimgCreate(['-f', 'qcow2', '-o', 'help'], dir);
  assert.is(m.status, 0);
  assert.ok(m.stdout.startsWith('Supported qcow2 options:\n  backing_file=<str>     - File name of a base image\n'), m.stdout);
  assert.ok(qimgCreate(['-f', 'qcow2', '-o', '?', 'x.img', '1M'], dir).stdout.startsWith('Supported options:\n'));
  assert.not.ok(existsSync(join(dir, 'x.img')));
});

test('an image held by a running qemu-io is refused with qemu-img wording and left unchanged', async () => {
  const img = join(dir, 'held.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', img, '1M']);
  const before = createHash('sha256').update(readFileSync(img)).digest('hex');
  const child = spawn('qemu-io', ['-c', 'sleep 30000', img], { stdio: 'ignore' });
  try {
    // Wait until qemu-io holds its locks (qemu-img itself is refused then).
    const deadline = Date.now() + 10_000;
    while (qemuImg(['info', img]).status === 0) {
      if (Date.now() > deadline) throw new Error('qemu-io did not lock the image');
      await new Promise((r) => setTimeout(r, 50));
    }
    const m = qimgCreate(['-f', 'qcow2', img, '2M'], dir);
    assert.is(m.status, 1);
    assert.is(m.stderr, `qimg: ${img}: Failed to get "write" lock\nIs another process using the image [${img}]?\n`);
    assert.is(createHash('sha256').update(readFileSync(img)).digest('hex'), before);
  } finally {
    child.kill('SIGKILL');
  }
});

test.run();
