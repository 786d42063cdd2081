// Fuzz cases: a seeded PRNG, a map of a seed image's structures, and mutators aimed at them.
//
// Pure (bytes in, bytes out) so the parent and the runner child regenerate the same case from
// (run seed, case index) without passing images around. The layout parser is deliberately
// independent of src/: it reads only valid seed images made by qemu-img.

/** mulberry32: small, fast, good enough to spread mutations; deterministic across runs. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A per-case seed from the run seed and the case index (so any case reruns alone). */
export function caseSeed(runSeed: number, index: number): number {
  let h = (runSeed ^ 0x9e3779b9) >>> 0;
  h = Math.imul(h ^ index, 0x85ebca6b) >>> 0;
  h = Math.imul(h ^ (h >>> 13), 0xc2b2ae35) >>> 0;
  return (h ^ (h >>> 16)) >>> 0;
}

export class Rng {
  private next: () => number;
  constructor(seed: number) {
    this.next = prng(seed);
  }
  float(): number {
    return this.next();
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)]!;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
}

// ---------------------------------------------------------------- big-endian helpers

function u32(b: Uint8Array, o: number): number {
  return ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
}
function u64(b: Uint8Array, o: number): number {
  return u32(b, o) * 0x100000000 + u32(b, o + 4);
}
function u16(b: Uint8Array, o: number): number {
  return (b[o]! << 8) | b[o + 1]!;
}
export function putU32(b: Uint8Array, o: number, v: number): void {
  if (o < 0 || o + 4 > b.length) return;
  b[o] = (v >>> 24) & 0xff;
  b[o + 1] = (v >>> 16) & 0xff;
  b[o + 2] = (v >>> 8) & 0xff;
  b[o + 3] = v & 0xff;
}
/** Writes a 64-bit value given as a bigint (so 2^63 and 2^64-1 are exact). */
export function putU64(b: Uint8Array, o: number, v: bigint): void {
  putU32(b, o, Number((v >> 32n) & 0xffffffffn));
  putU32(b, o + 4, Number(v & 0xffffffffn));
}
function putU16(b: Uint8Array, o: number, v: number): void {
  if (o < 0 || o + 2 > b.length) return;
  b[o] = (v >>> 8) & 0xff;
  b[o + 1] = v & 0xff;
}

// ---------------------------------------------------------------- seed layout

export interface Region {
  kind: 'header' | 'ext' | 'backing-name' | 'l1' | 'l2' | 'reftable' | 'refblock' | 'sntable' | 'sn-l1' | 'data';
  offset: number;
  length: number;
}

export interface Layout {
  clusterSize: number;
  version: number;
  l1Offset: number;
  l1Size: number;
  reftableOffset: number;
  reftableClusters: number;
  snapshotsOffset: number;
  nbSnapshots: number;
  /** Offsets of each snapshot table entry. */
  snapshotEntries: number[];
  l2Offsets: number[];
  refblockOffsets: number[];
  extensions: Array<{ offset: number; type: number; length: number }>;
  backingNameOffset: number;
  backingNameSize: number;
  regions: Region[];
}

const OFF_MASK = 0x00fffffffffffe00n;
function entryOff(b: Uint8Array, o: number): number {
  const v = (BigInt(u32(b, o)) << 32n) | BigInt(u32(b, o + 4));
  return Number(v & OFF_MASK);
}

/** Finds every structure of a (valid) seed image by its header. */
export function parseLayout(b: Uint8Array): Layout {
  const clusterBits = u32(b, 20);
  const cs = 2 ** clusterBits;
  const version = u32(b, 4);
  const headerLength = version >= 3 ? u32(b, 100) : 72;
  const L: Layout = {
    clusterSize: cs,
    version,
    l1Offset: u64(b, 40),
    l1Size: u32(b, 36),
    reftableOffset: u64(b, 48),
    reftableClusters: u32(b, 56),
    snapshotsOffset: u64(b, 64),
    nbSnapshots: u32(b, 60),
    snapshotEntries: [],
    l2Offsets: [],
    refblockOffsets: [],
    extensions: [],
    backingNameOffset: u64(b, 8),
    backingNameSize: u32(b, 16),
    regions: [{ kind: 'header', offset: 0, length: headerLength }],
  };
  const extEnd = L.backingNameOffset || cs;
  for (let o = headerLength; o + 8 <= extEnd; ) {
    const type = u32(b, o);
    const len = u32(b, o + 4);
    if (type === 0) break;
    L.extensions.push({ offset: o, type, length: len });
    L.regions.push({ kind: 'ext', offset: o, length: 8 + len });
    o += 8 + Math.ceil(len / 8) * 8;
  }
  if (L.backingNameOffset) L.regions.push({ kind: 'backing-name', offset: L.backingNameOffset, length: L.backingNameSize });
  const addL1 = (off: number, size: number, kind: 'l1' | 'sn-l1') => {
    if (size === 0) return;
    L.regions.push({ kind, offset: off, length: size * 8 });
    for (let i = 0; i < size; i++) {
      const l2 = entryOff(b, off + i * 8);
      if (l2 && !L.l2Offsets.includes(l2)) {
        L.l2Offsets.push(l2);
        L.regions.push({ kind: 'l2', offset: l2, length: cs });
      }
    }
  };
  addL1(L.l1Offset, L.l1Size, 'l1');
  L.regions.push({ kind: 'reftable', offset: L.reftableOffset, length: L.reftableClusters * cs });
  for (let i = 0; i < (L.reftableClusters * cs) / 8; i++) {
    const rb = entryOff(b, L.reftableOffset + i * 8);
    if (rb) {
      L.refblockOffsets.push(rb);
      L.regions.push({ kind: 'refblock', offset: rb, length: cs });
    }
  }
  let so = L.snapshotsOffset;
  for (let i = 0; i < L.nbSnapshots; i++) {
    L.snapshotEntries.push(so);
    const extra = u32(b, so + 36);
    const len = 40 + extra + u16(b, so + 12) + u16(b, so + 14);
    addL1(u64(b, so), u32(b, so + 8), 'sn-l1');
    so += Math.ceil(len / 8) * 8;
  }
  if (L.nbSnapshots) L.regions.push({ kind: 'sntable', offset: L.snapshotsOffset, length: so - L.snapshotsOffset });
  L.regions.push({ kind: 'data', offset: 0, length: b.length });
  return L;
}

// ---------------------------------------------------------------- mutations

const TWO53 = 2n ** 53n;
const U32_BOUNDS = [0, 1, 2, 0x7fffffff, 0x80000000, 0xffffffff, 0xfffffffe, 0x10000, 65536, 65537, 0x400000, 0x3fffff];

function u64Bounds(rng: Rng, fileSize: number, cs: number): bigint {
  const choices: bigint[] = [
    0n,
    1n,
    0x7fffffffn,
    0xffffffffn,
    0x100000000n,
    TWO53,
    TWO53 - 1n,
    TWO53 - BigInt(cs),
    2n ** 56n - BigInt(cs),
    2n ** 62n,
    2n ** 63n,
    2n ** 64n - 1n,
    BigInt(fileSize),
    BigInt(Math.max(0, fileSize - cs)),
    BigInt(Math.floor(fileSize / cs) * cs + cs * 16),
    BigInt(cs),
    BigInt(rng.int(Math.max(1, fileSize))),
    BigInt(rng.int(Math.max(1, Math.ceil(fileSize / cs))) * cs),
  ];
  return rng.pick(choices);
}

/** Header fields: [offset, width] (8 = u64). */
const HEADER_FIELDS: Array<[string, number, number]> = [
  ['version', 4, 4],
  ['backing_file_offset', 8, 8],
  ['backing_file_size', 16, 4],
  ['cluster_bits', 20, 4],
  ['size', 24, 8],
  ['crypt_method', 32, 4],
  ['l1_size', 36, 4],
  ['l1_table_offset', 40, 8],
  ['refcount_table_offset', 48, 8],
  ['refcount_table_clusters', 56, 4],
  ['nb_snapshots', 60, 4],
  ['snapshots_offset', 64, 8],
  ['incompatible_features', 72, 8],
  ['compatible_features', 80, 8],
  ['autoclear_features', 88, 8],
  ['refcount_order', 96, 4],
  ['header_length', 100, 4],
];

export interface Case {
  bytes: Uint8Array;
  /** What was done, for the report and for reproducing. */
  steps: string[];
}

function hex(n: number): string {
  return '0x' + n.toString(16);
}

/**
 * Builds case `index` of a run: picks a seed image and applies 1..3 mutations.
 * `selfName` is the file name the case will be written under (for backing-loop mutations).
 */
export function makeCase(seeds: ReadonlyArray<{ name: string; bytes: Uint8Array; layout: Layout }>, runSeed: number, index: number, selfName: string): Case & { seed: string } {
  const rng = new Rng(caseSeed(runSeed, index));
  const seed = rng.pick(seeds);
  const bytes = seed.bytes.slice();
  const steps: string[] = [];
  const n = 1 + (rng.chance(0.6) ? 0 : rng.int(3));
  let buf: Uint8Array = bytes;
  for (let k = 0; k < n; k++) buf = mutateOnce(rng, buf, seed.layout, selfName, steps);
  return { bytes: buf, steps, seed: seed.name };
}

function mutateOnce(rng: Rng, b: Uint8Array, L: Layout, selfName: string, steps: string[]): Uint8Array {
  const cs = L.clusterSize;
  const r = rng.float();
  // Weights: targeted field overwrites and structural loops find the most; raw flips cover the rest.
  if (r < 0.22) {
    const [name, off, width] = rng.pick(HEADER_FIELDS);
    if (width === 4) {
      const v = rng.chance(0.8) ? rng.pick(U32_BOUNDS) : rng.int(0x100000000);
      putU32(b, off, v);
      steps.push(`header ${name} = ${hex(v)}`);
    } else {
      const v = u64Bounds(rng, b.length, cs);
      putU64(b, off, v);
      steps.push(`header ${name} = 0x${v.toString(16)}`);
    }
    return b;
  }
  if (r < 0.3) return structural(rng, b, L, selfName, steps);
  if (r < 0.36) {
    const at = rng.chance(0.5) ? rng.int(b.length) : rng.pick(L.regions).offset + rng.int(cs);
    const cut = Math.max(0, Math.min(b.length, at));
    steps.push(`truncate at ${hex(cut)}`);
    return b.slice(0, cut);
  }
  if (r < 0.44) return snapshotField(rng, b, L, steps);
  // Generic mutation inside a region picked by kind.
  const regions = L.regions.filter((x) => x.length > 0 && x.offset < b.length);
  const reg = rng.pick(regions);
  const kind = rng.int(5);
  const pos = reg.offset + rng.int(reg.length);
  if (kind === 0) {
    const flips = 1 + rng.int(4);
    for (let i = 0; i < flips; i++) {
      const p = reg.offset + rng.int(reg.length);
      if (p < b.length) b[p] = b[p]! ^ (1 << rng.int(8));
    }
    steps.push(`${reg.kind}@${hex(reg.offset)}: ${flips} bit flips`);
  } else if (kind === 1) {
    const v = rng.pick([0, 0xff, 0x80, 0x7f, 1, rng.int(256)]);
    if (pos < b.length) b[pos] = v;
    steps.push(`${reg.kind}@${hex(reg.offset)}: byte ${hex(pos)} = ${hex(v)}`);
  } else if (kind === 2) {
    const p = pos & ~3;
    const v = rng.pick(U32_BOUNDS);
    putU32(b, p, v);
    steps.push(`${reg.kind}@${hex(reg.offset)}: u32 ${hex(p)} = ${hex(v)}`);
  } else {
    // A whole 64-bit table entry: offsets with flags, bound values, or entries of other tables.
    const p = reg.offset + (rng.int(Math.max(1, reg.length / 8)) * 8);
    let v: bigint;
    const c = rng.int(6);
    if (c === 0) v = u64Bounds(rng, b.length, cs);
    else if (c === 1) v = BigInt(rng.pick(L.regions).offset) | (rng.chance(0.5) ? 1n << 63n : 0n);
    else if (c === 2) v = (1n << 62n) | BigInt(rng.int(0x7fffffff)) * BigInt(rng.int(0x7fffffff)); // compressed descriptor
    else if (c === 3) v = BigInt(rng.int(Math.max(1, Math.ceil(b.length / cs)) + 4) * cs) | (1n << 63n);
    else if (c === 4) v = (BigInt(rng.int(0x100000000)) << 32n) | BigInt(rng.int(0x100000000));
    else v = BigInt(rng.int(Math.max(1, b.length))) | 1n; // unaligned
    putU64(b, p, v);
    steps.push(`${reg.kind}@${hex(reg.offset)}: u64 ${hex(p)} = 0x${v.toString(16)}`);
  }
  return b;
}

function snapshotField(rng: Rng, b: Uint8Array, L: Layout, steps: string[]): Uint8Array {
  if (L.snapshotEntries.length === 0) {
    // No table: claim one, somewhere.
    const n = rng.pick([1, 2, 1000, 65536, 65537, 0xffffffff]);
    putU32(b, 60, n);
    const off = rng.pick([0, L.l1Offset, L.reftableOffset, Math.ceil(b.length / L.clusterSize) * L.clusterSize, Math.max(0, b.length - L.clusterSize)]);
    putU64(b, 64, BigInt(off));
    steps.push(`nb_snapshots = ${n} at ${hex(off)}`);
    return b;
  }
  const e = rng.pick(L.snapshotEntries);
  const field = rng.pick([
    ['l1_table_offset', 0, 8],
    ['l1_size', 8, 4],
    ['id_str_size', 12, 2],
    ['name_size', 14, 2],
    ['date_sec', 16, 4],
    ['vm_clock', 24, 8],
    ['vm_state_size', 32, 4],
    ['extra_data_size', 36, 4],
    ['extra vm_state_size_large', 40, 8],
    ['extra disk_size', 48, 8],
    ['extra icount', 56, 8],
  ] as Array<[string, number, number]>);
  const [name, off, width] = field;
  if (width === 2) {
    const v = rng.pick([0, 1, 0xffff, 0x8000, 255, 256]);
    putU16(b, e + off, v);
    steps.push(`snapshot@${hex(e)} ${name} = ${hex(v)}`);
  } else if (width === 4) {
    const v = rng.pick([...U32_BOUNDS, 1024, 1025, 24, 8, 16]);
    putU32(b, e + off, v);
    steps.push(`snapshot@${hex(e)} ${name} = ${hex(v)}`);
  } else {
    const v = rng.chance(0.5) ? u64Bounds(rng, b.length, L.clusterSize) : BigInt(rng.pick([L.l1Offset, L.reftableOffset, 0, ...L.l2Offsets.slice(0, 3)]));
    putU64(b, e + off, v);
    steps.push(`snapshot@${hex(e)} ${name} = 0x${v.toString(16)}`);
  }
  return b;
}

/** Loops and overlaps: tables pointing at themselves, at each other, at the header. */
function structural(rng: Rng, b: Uint8Array, L: Layout, selfName: string, steps: string[]): Uint8Array {
  const cs = L.clusterSize;
  const copied = 1n << 63n;
  const c = rng.int(12);
  switch (c) {
    case 0: // L1 entry -> the L1 itself
      putU64(b, L.l1Offset + rng.int(Math.max(1, L.l1Size)) * 8, BigInt(L.l1Offset) | copied);
      steps.push('L1 entry points at the L1 table');
      break;
    case 1: { // L2 entry -> L1 / L2 itself / header / reftable
      if (!L.l2Offsets.length) break;
      const l2 = rng.pick(L.l2Offsets);
      const target = rng.pick([L.l1Offset, l2, 0 + cs * 0, L.reftableOffset, ...L.refblockOffsets.slice(0, 1)]);
      putU64(b, l2 + rng.int(cs / 8) * 8, BigInt(target) | copied);
      steps.push(`L2 ${hex(l2)} entry points at ${hex(target)}`);
      break;
    }
    case 2: // refcount table at the header
      putU64(b, 48, 0n);
      steps.push('refcount_table_offset = 0 (the header)');
      break;
    case 3: { // refcount table entry -> header / L1 / the reftable
      const t = rng.pick([0, L.l1Offset, L.reftableOffset]);
      putU64(b, L.reftableOffset + rng.int(Math.max(1, Math.min(8, (L.reftableClusters * cs) / 8))) * 8, BigInt(t));
      steps.push(`reftable entry points at ${hex(t)}`);
      break;
    }
    case 4: { // snapshot table overlapping the L1 / the reftable / the header
      const t = rng.pick([L.l1Offset, L.reftableOffset, 0]);
      putU64(b, 64, BigInt(t));
      if (L.nbSnapshots === 0) putU32(b, 60, 1 + rng.int(3));
      steps.push(`snapshot table at ${hex(t)}`);
      break;
    }
    case 5: { // snapshot L1 = active L1 / the snapshot table itself
      if (!L.snapshotEntries.length) break;
      const e = rng.pick(L.snapshotEntries);
      const t = rng.pick([L.l1Offset, L.snapshotsOffset, 0]);
      putU64(b, e, BigInt(t));
      steps.push(`snapshot@${hex(e)} L1 at ${hex(t)}`);
      break;
    }
    case 6:
    case 7: { // backing name: the image itself, a directory escape, a device, a protocol
      const name = rng.pick([selfName, selfName, './' + selfName, '../' + selfName, '/dev/zero', '/etc/passwd', 'json:{"file":{"driver":"null-co"}}', 'nbd://127.0.0.1:1', '', 'x'.repeat(1023), 'base.qcow2', 'missing.qcow2']);
      const enc = new TextEncoder().encode(name);
      let off = L.backingNameOffset;
      if (!off) {
        const last = L.extensions[L.extensions.length - 1];
        off = last ? last.offset + 8 + Math.ceil(last.length / 8) * 8 + 8 : (L.version >= 3 ? 112 : 72) + 8;
      }
      if (off + enc.length > cs || off + enc.length > b.length) {
        steps.push(`backing name '${name.slice(0, 20)}' does not fit`);
        putU64(b, 8, BigInt(off));
        putU32(b, 16, enc.length);
        break;
      }
      b.set(enc, off);
      putU64(b, 8, BigInt(off));
      putU32(b, 16, enc.length);
      steps.push(`backing name = '${name.length > 40 ? name.slice(0, 20) + '...' : name}'`);
      break;
    }
    case 8: { // huge counts with the table where it is
      const f = rng.pick([
        [36, 0x400000],
        [36, 0x400001],
        [56, 0xffffffff],
        [56, (8 * 1024 * 1024) / cs],
        [60, 65536],
        [60, 65537],
      ] as Array<[number, number]>);
      putU32(b, f[0], f[1]);
      steps.push(`header u32 ${hex(f[0])} = ${hex(f[1])}`);
      break;
    }
    case 9: { // L1 entry -> an L2 of another tree / past EOF
      const t = rng.pick([...L.l2Offsets, Math.ceil(b.length / cs) * cs + cs * 1000, 2 ** 52]);
      putU64(b, L.l1Offset + rng.int(Math.max(1, L.l1Size)) * 8, BigInt(t) | copied);
      steps.push(`L1 entry -> ${hex(t)}`);
      break;
    }
    case 10: { // a refblock claims everything is free / everything is used
      if (!L.refblockOffsets.length) break;
      const rb = rng.pick(L.refblockOffsets);
      b.fill(rng.chance(0.5) ? 0 : 0xff, rb, Math.min(b.length, rb + cs));
      steps.push(`refblock ${hex(rb)} filled`);
      break;
    }
    default: { // extension with a huge / odd length
      if (!L.extensions.length) break;
      const e = rng.pick(L.extensions);
      const v = rng.pick([0, 1, 7, 0xffff, 0xffffffff, cs, e.length + 8]);
      putU32(b, e.offset + 4, v);
      steps.push(`extension ${hex(e.type)} length = ${hex(v)}`);
    }
  }
  return b;
}
