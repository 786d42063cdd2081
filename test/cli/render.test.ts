// render.ts against qemu-img 7.2 itself: images made at test time, their `info --output=json`
// turned into ImageInfo, rendered, and compared byte for byte with qemu-img's own output.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdirSync, openSync, readSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { mustQemuImg, mustQemuIo, tmpDir } from '../helpers.js';
import type { ImageInfo, Qcow2Specific, SnapshotInfo } from '../../src/qcow2/engine/types.js';
import {
  formatG,
  formatVmSize,
  renderInfoChainHuman,
  renderInfoChainJson,
  renderInfoHuman,
  renderInfoJson,
  renderSnapshotTable,
  renderSnapshotsJson,
} from '../../src/cli/render.js';

const ZONES = ['UTC', 'Asia/Kolkata'];
const SECRET = ['--object', 'secret,id=sec0,data=x'];
const LUKS_OPTS = 'encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10';

// ---------------------------------------------------------------------------
// qemu-img JSON -> ImageInfo. Fields qemu-img does not print (disk size, L1) are filled
// with placeholders; the renderer does not use them.

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Json = any;

function toSnapshotInfo(j: Json): SnapshotInfo {
  return {
    id: j.id,
    name: j.name,
    // qemu prints this unsigned field as a signed 64-bit number; the engine holds it unsigned.
    vmStateSize: j['vm-state-size'] < 0 ? j['vm-state-size'] + 2 ** 64 : j['vm-state-size'],
    dateSec: j['date-sec'],
    dateNsec: j['date-nsec'],
    vmClockNsec: j['vm-clock-sec'] * 1e9 + j['vm-clock-nsec'],
    icount: j.icount ?? null,
    diskSize: null,
    l1TableOffset: 0,
    l1Size: 0,
  };
}

function toQcow2Specific(d: Json): Qcow2Specific {
  const q: Qcow2Specific = {
    compat: d.compat,
    compressionType: d['compression-type'],
    refcountBits: d['refcount-bits'],
  };
  if ('lazy-refcounts' in d) q.lazyRefcounts = d['lazy-refcounts'];
  if ('corrupt' in d) q.corrupt = d.corrupt;
  if ('extended-l2' in d) q.extendedL2 = d['extended-l2'];
  if ('data-file' in d) q.dataFile = d['data-file'];
  if ('data-file-raw' in d) q.dataFileRaw = d['data-file-raw'];
  if ('bitmaps' in d) {
    q.bitmaps = d.bitmaps.map((b: Json) => ({ name: b.name, granularity: b.granularity, flags: b.flags }));
  }
  const e = d.encrypt;
  if (e?.format === 'aes') q.encrypt = { format: 'aes' };
  else if (e) {
    q.encrypt = {
      format: 'luks',
      ivgenAlg: e['ivgen-alg'],
      ...('ivgen-hash-alg' in e ? { ivgenHashAlg: e['ivgen-hash-alg'] } : {}),
      hashAlg: e['hash-alg'],
      cipherAlg: e['cipher-alg'],
      uuid: e.uuid,
      cipherMode: e['cipher-mode'],
      slots: e.slots.map((s: Json) => ({
        active: s.active,
        ...('iters' in s ? { iters: s.iters } : {}),
        ...('stripes' in s ? { stripes: s.stripes } : {}),
        keyOffset: s['key-offset'],
      })),
      payloadOffset: e['payload-offset'],
      masterKeyIters: e['master-key-iters'],
    };
  }
  return q;
}

function toImageInfo(j: Json): ImageInfo {
  const info: ImageInfo = {
    filename: j.filename,
    format: j.format,
    virtualSize: j['virtual-size'],
    actualSize: j['actual-size'],
    encrypted: j.encrypted === true,
    dirty: j['dirty-flag'] === true,
    snapshots: (j.snapshots ?? []).map(toSnapshotInfo),
  };
  if ('cluster-size' in j) info.clusterSize = j['cluster-size'];
  if ('backing-filename' in j) info.backingFilename = j['backing-filename'];
  if ('full-backing-filename' in j) info.fullBackingFilename = j['full-backing-filename'];
  if ('backing-filename-format' in j) info.backingFilenameFormat = j['backing-filename-format'];
  if (j['format-specific']) info.formatSpecific = toQcow2Specific(j['format-specific'].data);
  return info;
}

/** The `"snapshots": [...]` part of qemu-img's JSON, cut out and re-indented as a top-level array. */
function snapshotsSlice(json: string): string {
  const lines = json.split('\n');
  const start = lines.indexOf('    "snapshots": [');
  if (start < 0) return '[\n]\n';
  const end = lines.indexOf('    ],', start);
  return ['[', ...lines.slice(start + 1, end).map((l) => l.slice(4)), ']', ''].join('\n');
}

// ---------------------------------------------------------------------------
// Image poking: qemu-img makes snapshots with no VM state, clock 0 and icount 0; set other
// values in the snapshot table directly (qemu-img info does not validate them).

const SNAP_VM_CLOCK = 24;
const SNAP_VM_STATE_SIZE = 32;
const SNAP_EXTRA_SIZE = 36;
const SNAP_HEADER = 40;
const SNAP_EXTRA_VM_STATE_LARGE = 40;
const SNAP_EXTRA_ICOUNT = 56;

function pokeSnapshot(file: string, index: number, fields: { clockNs?: bigint; vmState?: bigint; icount?: bigint }): void {
  const fd = openSync(file, 'r+');
  try {
    const hdr = Buffer.alloc(72);
    readSync(fd, hdr, 0, 72, 0);
    const nb = hdr.readUInt32BE(60);
    let off = Number(hdr.readBigUInt64BE(64));
    for (let i = 0; i < nb; i++) {
      const e = Buffer.alloc(SNAP_HEADER + 1024);
      readSync(fd, e, 0, e.length, off);
      const extra = e.readUInt32BE(SNAP_EXTRA_SIZE);
      if (i === index) {
        if (fields.clockNs !== undefined) e.writeBigUInt64BE(fields.clockNs, SNAP_VM_CLOCK);
        if (fields.vmState !== undefined) {
          e.writeUInt32BE(Number(fields.vmState & 0xffffffffn), SNAP_VM_STATE_SIZE);
          e.writeBigUInt64BE(fields.vmState, SNAP_EXTRA_VM_STATE_LARGE);
        }
        if (fields.icount !== undefined) e.writeBigInt64BE(fields.icount, SNAP_EXTRA_ICOUNT);
        writeSync(fd, e, 0, SNAP_HEADER + extra, off);
        return;
      }
      off += SNAP_HEADER + extra + e.readUInt16BE(12) + e.readUInt16BE(14);
      off = (off + 7) & ~7;
    }
    throw new Error(`no snapshot #${index} in ${file}`);
  } finally {
    closeSync(fd);
  }
}

// ---------------------------------------------------------------------------
// The images, made in test.before (test names are needed before that, so cases are declared here).

interface Case {
  name: string;
  file: string;
  build: (path: string) => void;
  /** How to list its snapshots when plain `snapshot -l IMG` cannot open it (encrypted images). */
  snapshotList?: (path: string) => string[];
}

const dir = tmpDir('qimg-render-');
const p = (f: string) => join(dir, f);
const create = (...args: string[]) => (path: string) => {
  mustQemuImg(['create', ...args.slice(0, -1), path, args[args.length - 1]!]);
};
/** Opening an encrypted image for snapshot operations needs its secret. */
const withSecret = (path: string, op: string[]) => [
  'snapshot', ...SECRET, ...op, '--image-opts', `driver=qcow2,file.filename=${path},encrypt.key-secret=sec0`,
];
const LUKS_ESSIV = `${LUKS_OPTS},encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.cipher-mode=cbc,encrypt.cipher-alg=aes-128`;

const cases: Case[] = [
  {
    name: 'plain v3 with snapshots',
    file: 'v3.qcow2',
    build: (path) => {
      create('-f', 'qcow2', '64M')(path);
      mustQemuIo(['-c', 'write -P 0xab 0 1M', path]);
      for (const n of ['snap1', 'ünïcødé', 'a_very_long_snapshot_name_that_exceeds_sixteen', 'snap1', '😀 x']) {
        mustQemuImg(['snapshot', '-c', n, path]);
      }
    },
  },
  {
    name: 'compat=0.10',
    file: 'v2.qcow2',
    build: (path) => {
      create('-f', 'qcow2', '-o', 'compat=0.10', '1048064')(path);
      mustQemuImg(['snapshot', '-c', 'old', path]);
    },
  },
  {
    name: 'zstd, extended_l2, lazy refcounts',
    file: 'zs.qcow2',
    build: create('-f', 'qcow2', '-o', 'compression_type=zstd,extended_l2=on,lazy_refcounts=on', '1G'),
  },
  {
    name: 'tiny clusters, refcount_bits=1',
    file: 'small.qcow2',
    build: create('-f', 'qcow2', '-o', 'cluster_size=512,refcount_bits=1', '1000k'),
  },
  { name: 'raw', file: 'r.raw', build: create('-f', 'raw', '1000k') },
  { name: 'empty raw', file: 'empty.raw', build: (path) => closeSync(openSync(path, 'w')) },
  { name: 'AES', file: 'aes.qcow2', build: create('-f', 'qcow2', ...SECRET, '-o', 'encrypt.format=aes,encrypt.key-secret=sec0', '16M') },
  // Backing chains: base <- sub/mid (relative name) <- top (absolute name).
  { name: 'backing base', file: 'base.qcow2', build: create('-f', 'qcow2', '64M') },
  {
    name: 'backing with relative name',
    file: 'sub/mid.qcow2',
    build: (path) => {
      mkdirSync(p('sub'));
      create('-f', 'qcow2', '-b', '../base.qcow2', '-F', 'qcow2', '64M')(path);
    },
  },
  { name: 'backing with absolute name', file: 'top.qcow2', build: create('-f', 'qcow2', '-b', p('sub/mid.qcow2'), '-F', 'qcow2', '64M') },
  {
    name: 'LUKS essiv with backing and snapshot',
    file: 'luks2.qcow2',
    build: (path) => {
      create('-f', 'qcow2', ...SECRET, '-o', LUKS_ESSIV, '-b', 'base.qcow2', '-F', 'qcow2', '16M')(path);
      mustQemuImg(withSecret(path, ['-c', 'enc']));
    },
    snapshotList: (path) => withSecret(path, ['-l']),
  },
  {
    name: 'bitmaps',
    file: 'bm.qcow2',
    build: (path) => {
      create('-f', 'qcow2', '16M')(path);
      mustQemuImg(['bitmap', '--add', path, 'b0']);
      mustQemuImg(['bitmap', '--add', '-g', '128k', path, 'b1']);
      mustQemuImg(['bitmap', '--add', '--disable', path, 'b2']);
    },
  },
  { name: 'raw data file', file: 'df.qcow2', build: create('-f', 'qcow2', '-o', `data_file=${p('df.raw')},data_file_raw=on`, '16M') },
  // LUKS images are slow to make (qemu times its key derivation), so this one also covers
  // where data-file and data-file-raw sit around encrypt.
  // An absolute data file name: qemu-img resolves a relative one against the working directory,
  // which would drop the file into the repository.
  { name: 'LUKS with data file', file: 'ldf.qcow2', build: (path: string) => create('-f', 'qcow2', ...SECRET, '-o', `${LUKS_OPTS},data_file=${path}.data`, '16M')(path) },
  {
    name: 'dirty and corrupt',
    file: 'dirty.qcow2',
    build: (path) => {
      create('-f', 'qcow2', '16M')(path);
      // Incompatible features, last byte: bit 0 dirty, bit 1 corrupt.
      const fd = openSync(path, 'r+');
      writeSync(fd, Buffer.from([0x03]), 0, 1, 79);
      closeSync(fd);
    },
  },
  {
    name: 'poked snapshots: VM state, clocks, icount -1, names needing JSON escapes',
    file: 'sn.qcow2',
    build: (path) => {
      create('-f', 'qcow2', '16M')(path);
      for (const n of ['a/b', 't\tq"b\\', 'del\x7f', 'a\nb\bc\fd\re\x01f\x1fg', 'plain']) {
        mustQemuImg(['snapshot', '-c', n, path]);
      }
      pokeSnapshot(path, 0, { clockNs: 3723456789012n, vmState: 1152n, icount: -1n });
      pokeSnapshot(path, 1, { clockNs: 999999999999999n, vmState: 1023488n, icount: 12345678901n });
      pokeSnapshot(path, 2, { vmState: 1n << 40n, icount: -1n });
      pokeSnapshot(path, 3, { clockNs: 362439999999999n, vmState: 5000000000000000000n, icount: 7n });
    },
  },
];

const ORIGINAL_TZ = process.env.TZ;
test.before(() => {
  for (const c of cases) c.build(p(c.file));
});
test.after(() => {
  if (ORIGINAL_TZ === undefined) delete process.env.TZ;
  else process.env.TZ = ORIGINAL_TZ;
});

function qemuInfoJson(c: Case, tz: string, chain = false): string {
  return mustQemuImg(['info', ...(chain ? ['--backing-chain'] : []), '--output=json', p(c.file)], { TZ: tz });
}

// ---------------------------------------------------------------------------
// Oracle tests.

for (const tz of ZONES) {
  for (const c of cases) {
    test(`info, info --output=json, snapshot -l: ${c.name} (TZ=${tz})`, () => {
      process.env.TZ = tz;
      const json = qemuInfoJson(c, tz);
      const info = toImageInfo(JSON.parse(json));
      assert.fixture(renderInfoJson(info), json, 'json');
      assert.fixture(renderInfoHuman(info), mustQemuImg(['info', p(c.file)], { TZ: tz }), 'human');
      assert.fixture(renderSnapshotsJson(info.snapshots), snapshotsSlice(json), 'snapshots json');
      if (info.format === 'qcow2' && !info.encrypted) {
        assert.fixture(renderSnapshotTable(info.snapshots), mustQemuImg(['snapshot', '-l', p(c.file)], { TZ: tz }), 'snapshot -l');
      } else if (c.snapshotList) {
        assert.fixture(renderSnapshotTable(info.snapshots), mustQemuImg(c.snapshotList(p(c.file)), { TZ: tz }), 'snapshot -l');
      }
    });
  }

  test(`info --backing-chain (TZ=${tz})`, () => {
    process.env.TZ = tz;
    for (const c of cases.filter((x) => /backing|plain v3/.test(x.name))) {
      const json = qemuInfoJson(c, tz, true);
      const infos = (JSON.parse(json) as Json[]).map(toImageInfo);
      assert.fixture(renderInfoChainJson(infos), json, `${c.name} json`);
      assert.fixture(
        renderInfoChainHuman(infos),
        mustQemuImg(['info', '--backing-chain', p(c.file)], { TZ: tz }),
        `${c.name} human`,
      );
    }
  });
}

test('renderInfoChainHuman puts one blank line between images', () => {
  const top = cases.find((c) => c.name === 'backing with absolute name')!;
  const infos = (JSON.parse(qemuInfoJson(top, 'UTC', true)) as Json[]).map(toImageInfo);
  assert.is(infos.length, 3);
  assert.is(renderInfoChainHuman(infos).split('\n\nimage: ').length, 3);
});

// VM SIZE column over many values: the snapshot table is qemu's size_to_str on any 64-bit value.
const SIZE_EDGES: bigint[] = [
  0n, 1n, 999n, 1000n, 1023n, 1024n, 1152n, 1168n, 1408n, 1664n, 10751n, 102297n, 102400n,
  1022976n, 1023487n, 1023488n, 1023999n, 1024000n, 1048575n, 1048576n, 4445962n,
  1073741823n, 1048051712n, 1048051711n, 1047527424n, 1099511627776n, 1n << 50n, 1n << 60n,
  (1n << 53n) - 1n, 1152921504606846976n * 15n,
];

test('formatVmSize agrees with qemu-img on edge values (via snapshot -l VM SIZE)', () => {
  process.env.TZ = 'UTC';
  const img = join(dir, 'sizes.qcow2');
  mustQemuImg(['create', '-f', 'qcow2', img, '1M']);
  SIZE_EDGES.forEach((_, i) => mustQemuImg(['snapshot', '-c', `s${i}`, img]));
  SIZE_EDGES.forEach((v, i) => pokeSnapshot(img, i, { vmState: v }));
  const json = mustQemuImg(['info', '--output=json', img]);
  const info = toImageInfo(JSON.parse(json));
  assert.fixture(renderSnapshotTable(info.snapshots), mustQemuImg(['snapshot', '-l', img]));
  assert.fixture(renderInfoJson(info), json);
});

test('names past 255 bytes are cut as qemu-img cuts them', () => {
  process.env.TZ = 'UTC';
  const img = p('long.qcow2');
  mustQemuImg(['create', '-f', 'qcow2', img, '1M']);
  mustQemuImg(['snapshot', '-c', 'short', img]);
  // 127 two-byte characters, then ASCII: the cut at 255 bytes falls between characters.
  const longName = `${'é'.repeat(127)}Zabcdef`;
  renameLastSnapshot(img, longName);
  const json = mustQemuImg(['info', '--output=json', img]);
  const info = toImageInfo(JSON.parse(json));
  info.snapshots[0]!.name = longName; // as an engine that does not cut would report it
  assert.fixture(renderSnapshotTable(info.snapshots), mustQemuImg(['snapshot', '-l', img]));
  assert.fixture(renderInfoHuman(info), mustQemuImg(['info', img]));
  assert.fixture(renderInfoJson(info), json);
});

/** Gives the last snapshot table entry a new name; it is at the end of a fresh image, so it may grow. */
function renameLastSnapshot(file: string, name: string): void {
  const fd = openSync(file, 'r+');
  try {
    const hdr = Buffer.alloc(72);
    readSync(fd, hdr, 0, 72, 0);
    const nb = hdr.readUInt32BE(60);
    let off = Number(hdr.readBigUInt64BE(64));
    const e = Buffer.alloc(SNAP_HEADER);
    for (let i = 0; ; i++) {
      readSync(fd, e, 0, SNAP_HEADER, off);
      if (i === nb - 1) break;
      off += SNAP_HEADER + e.readUInt32BE(SNAP_EXTRA_SIZE) + e.readUInt16BE(12) + e.readUInt16BE(14);
      off = (off + 7) & ~7;
    }
    const bytes = Buffer.from(name, 'utf8');
    e.writeUInt16BE(bytes.length, 14);
    writeSync(fd, e, 0, SNAP_HEADER, off);
    writeSync(fd, bytes, 0, bytes.length, off + SNAP_HEADER + e.readUInt32BE(SNAP_EXTRA_SIZE) + e.readUInt16BE(12));
  } finally {
    closeSync(fd);
  }
}

// ---------------------------------------------------------------------------
// Unit tests.

test('formatVmSize: documented values', () => {
  assert.is(formatVmSize(0), '0 B');
  assert.is(formatVmSize(999), '999 B');
  assert.is(formatVmSize(1000), '0.977 KiB');
  assert.is(formatVmSize(1024), '1 KiB');
  assert.is(formatVmSize(4445962), '4.24 MiB');
  assert.is(formatVmSize(1152), '1.12 KiB'); // a tie: rounds to even, not up
  assert.is(formatVmSize(1408), '1.38 KiB');
  assert.is(formatVmSize(1023488), '1e+03 KiB'); // 999.5 KiB rounds to 1000
  assert.is(formatVmSize(1024000), '0.977 MiB');
  assert.is(formatVmSize(67108864), '64 MiB');
  assert.is(formatVmSize(2 ** 60), '1 EiB');
  assert.is(formatVmSize(2 ** 64), '16 EiB');
});

test('formatG: C %g forms', () => {
  assert.is(formatG(0, 3), '0');
  assert.is(formatG(0.0001234, 3), '0.000123');
  assert.is(formatG(0.00001234, 3), '1.23e-05');
  assert.is(formatG(123456, 3), '1.23e+05');
  assert.is(formatG(100, 3), '100');
  assert.is(formatG(2.5, 1), '2');
  assert.is(formatG(3.5, 1), '4');
  assert.is(formatG(0.5, 3), '0.5');
});

const SNAP: SnapshotInfo = {
  id: '1', name: 'ünïcødé', vmStateSize: 4445962, dateSec: 0, dateNsec: 5, vmClockNsec: 360000001000000,
  icount: null, diskSize: null, l1TableOffset: 0, l1Size: 0,
};

test('renderSnapshotTable: byte-counted padding, long clocks, blank icount, TZ', () => {
  process.env.TZ = 'UTC';
  assert.is(renderSnapshotTable([]), '');
  assert.fixture(
    renderSnapshotTable([SNAP]),
    'Snapshot list:\n' +
      'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT\n' +
      '1         ünïcødé      4.24 MiB 1970-01-01 00:00:00100:00:00.001           \n',
  );
  process.env.TZ = 'Asia/Kolkata';
  assert.match(renderSnapshotTable([SNAP]), '1970-01-01 05:30:00');
});

test('renderSnapshotTable: optional FREED column', () => {
  process.env.TZ = 'UTC';
  const other = { ...SNAP, id: '2', name: 'b', icount: 3 };
  assert.fixture(
    renderSnapshotTable([SNAP, other], { freed: new Map([['1', 1048576]]) }),
    'Snapshot list:\n' +
      'ID        TAG               VM SIZE                DATE     VM CLOCK     ICOUNT       FREED\n' +
      '1         ünïcødé      4.24 MiB 1970-01-01 00:00:00100:00:00.001' + ' '.repeat(11) + '       1 MiB\n' +
      '2         b                4.24 MiB 1970-01-01 00:00:00100:00:00.001          3            \n',
  );
});

test('renderSnapshotsJson: freed-bytes last, icount left out when null', () => {
  assert.fixture(
    renderSnapshotsJson([SNAP], new Map([['1', 65536]])),
    '[\n' +
      '    {\n' +
      '        "vm-clock-nsec": 1000000,\n' +
      '        "name": "\\u00FCn\\u00EFc\\u00F8d\\u00E9",\n' +
      '        "date-sec": 0,\n' +
      '        "date-nsec": 5,\n' +
      '        "vm-clock-sec": 360000,\n' +
      '        "id": "1",\n' +
      '        "vm-state-size": 4445962,\n' +
      '        "freed-bytes": 65536\n' +
      '    }\n' +
      ']\n',
  );
  assert.is(renderSnapshotsJson([]), '[\n]\n');
});

test('human info: unavailable disk size, backing path that cannot be resolved', () => {
  const info: ImageInfo = {
    filename: 'x', format: 'qcow2', virtualSize: 512, actualSize: -1, clusterSize: 65536,
    encrypted: false, dirty: false, backingFilename: 'b', snapshots: [],
  };
  assert.is(
    renderInfoHuman(info),
    'image: x\nfile format: qcow2\nvirtual size: 512 B (512 bytes)\ndisk size: unavailable\n' +
      'cluster_size: 65536\nbacking file: b (cannot determine actual path)\n',
  );
  assert.not.match(renderInfoJson(info), 'actual-size');
});

test.run();
