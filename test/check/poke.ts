// Build-then-poke plumbing for the checker tests: good images made by qemu-img/qemu-io, parsed
// enough to find every structure's offset, and a catalogue of damage kinds.
import { readFileSync, writeFileSync } from 'node:fs';
import { getRefcount, setRefcount } from '../../src/qcow2/format/refblock.js';
import { mustQemuImg, mustQemuIo } from '../helpers.js';

export interface BaseSpec {
  name: string;
  /** qemu-img create -o options. */
  opts: string;
  /** Whether qemu-io can write compressed clusters (not with refcount_bits=1... fine elsewhere). */
  compressed?: boolean;
  snapshot?: boolean;
}

/** 64 MiB image: data at 0 (256k), compressed at 4M, data at 32M, a snapshot, then COW at 64k and new data at 48M. */
export function makeBase(path: string, spec: BaseSpec): void {
  mustQemuImg(['create', '-q', '-f', 'qcow2', '-o', spec.opts, path, '64M']);
  const w = ['-c', 'write -P 1 0 256k', '-c', 'write -P 5 32M 64k'];
  if (spec.compressed !== false) w.push('-c', 'write -c -P 2 4M 128k');
  mustQemuIo([...w, path]);
  if (spec.snapshot !== false) mustQemuImg(['snapshot', '-c', 's1', path]);
  mustQemuIo(['-c', 'write -P 3 64k 64k', '-c', 'write -P 7 48M 64k', path]);
}

const TWO32 = 2 ** 32;

export class Poker {
  b: Uint8Array;
  dv: DataView;
  cb: number;
  cs: number;
  l1off: number;
  rtoff: number;
  snoff: number;
  order: number;
  ew: number;

  constructor(bytes: Uint8Array) {
    this.b = bytes;
    this.dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.cb = this.dv.getUint32(20);
    this.cs = 2 ** this.cb;
    this.l1off = this.q(40);
    this.rtoff = this.q(48);
    this.snoff = this.q(64);
    this.order = this.dv.getUint32(96);
    const incompat = this.dv.getUint32(76);
    this.ew = incompat & 16 ? 16 : 8;
  }

  static load(path: string): Poker {
    return new Poker(new Uint8Array(readFileSync(path)));
  }

  save(path: string): void {
    writeFileSync(path, this.b);
  }

  q(off: number): number {
    return this.dv.getUint32(off) * TWO32 + this.dv.getUint32(off + 4);
  }
  setq(off: number, v: number): void {
    this.dv.setUint32(off, Math.floor(v / TWO32));
    this.dv.setUint32(off + 4, v % TWO32);
  }
  /** Toggles/sets bits in the high word (bit 63 = 0x80000000). */
  orHi(off: number, bits: number): void {
    this.dv.setUint32(off, (this.dv.getUint32(off) | bits) >>> 0);
  }
  andHi(off: number, keep: number): void {
    this.dv.setUint32(off, (this.dv.getUint32(off) & keep) >>> 0);
  }
  l2off(l1i: number): number {
    const v = this.q(this.l1off + 8 * l1i);
    return (Math.floor(v / TWO32) & 0xffffff) * TWO32 + (((v % TWO32) & 0xfffffe00) >>> 0);
  }
  l2e(l1i: number, j: number): number {
    return this.l2off(l1i) + this.ew * j;
  }
  /** Address of the L2 entry that maps guest offset g (through the active L1). */
  ge(g: number): number {
    const per = this.cs / this.ew;
    const gc = Math.floor(g / this.cs);
    return this.l2e(Math.floor(gc / per), gc % per);
  }
  /** Host cluster index an L2 entry points at. */
  dataCluster(addr: number): number {
    const hi = this.dv.getUint32(addr) & 0xffffff;
    const lo = this.dv.getUint32(addr + 4) & 0xfffffe00;
    return Math.floor((hi * TWO32 + (lo >>> 0)) / this.cs);
  }
  refblock(t: number): number {
    return this.q(this.rtoff + 8 * t) - (this.q(this.rtoff + 8 * t) % 512);
  }
  private rb(ci: number): [Uint8Array, number] {
    const per = 2 ** (this.cb + 3 - this.order);
    const off = this.refblock(Math.floor(ci / per));
    return [this.b.subarray(off, off + this.cs), ci % per];
  }
  getrc(ci: number): number {
    const [blk, i] = this.rb(ci);
    return getRefcount(blk, i, this.order);
  }
  setrc(ci: number, v: number): void {
    const [blk, i] = this.rb(ci);
    setRefcount(blk, i, this.order, v);
  }
  /** Appends `n` zero clusters. */
  grow(n: number): void {
    const nb = new Uint8Array(this.b.length + n * this.cs);
    nb.set(this.b);
    this.b = nb;
    this.dv = new DataView(nb.buffer);
  }
  get clusters(): number {
    return Math.ceil(this.b.length / this.cs);
  }
}

export interface Damage {
  name: string;
  /** Only for images with compressed clusters / snapshots. */
  needs?: ('compressed' | 'snapshot')[];
  /** The damage touches refcounts only: a repair must give back every layer's data. */
  refcountOnly?: boolean;
  poke(p: Poker): void;
}

const COPIED = 0x80000000;

/** Index of the first compressed entry in active L2 table 0 (the 4M write: entry 4M/cs). */
function compEntry(p: Poker): number {
  return p.ge(4 * MiB);
}
const MiB = 1024 * 1024;

export const DAMAGES: Damage[] = [
  { name: 'clean', refcountOnly: true, poke: () => {} },
  { name: 'leak (appended cluster with refcount 1)', refcountOnly: true, poke: (p) => (p.grow(1), p.setrc(p.clusters - 1, 1)) },
  { name: 'leak (refcount too high)', refcountOnly: true, poke: (p) => p.setrc(p.dataCluster(p.ge(p.cs)), p.getrc(p.dataCluster(p.ge(p.cs))) + 1) },
  { name: 'refcount too low (shared cluster)', needs: ['snapshot'], refcountOnly: true, poke: (p) => p.setrc(p.dataCluster(p.ge(0)), 1) },
  { name: 'refcount zero on data cluster', refcountOnly: true, poke: (p) => p.setrc(p.dataCluster(p.ge(2 * p.cs)), 0) },
  { name: 'refcount zero on L2 table', refcountOnly: true, poke: (p) => p.setrc(p.l2off(0) / p.cs, 0) },
  { name: 'refcount zero on header', refcountOnly: true, poke: (p) => p.setrc(0, 0) },
  { name: 'refcount zero on refcount block', refcountOnly: true, poke: (p) => p.setrc(p.refblock(0) / p.cs, 0) },
  { name: 'refcount zero on snapshot table', needs: ['snapshot'], refcountOnly: true, poke: (p) => p.setrc(p.snoff / p.cs, 0) },
  { name: 'leak past EOF', refcountOnly: true, poke: (p) => p.setrc(p.clusters + 2, 1) },
  {
    name: 'several (leak, zero, OFLAG_COPIED)',
    refcountOnly: true,
    poke: (p) => {
      p.grow(2);
      p.setrc(p.clusters - 1, 1);
      p.setrc(p.dataCluster(p.ge(2 * p.cs)), 0);
    },
  },
  { name: 'L2 entry unaligned', poke: (p) => p.setq(p.ge(2 * p.cs), p.q(p.ge(2 * p.cs)) + 0x200) },
  { name: 'L2 entry past EOF', poke: (p) => p.setq(p.ge(2 * p.cs), COPIED * TWO32 + 2 ** 40) },
  { name: 'L2 entry reserved bits', poke: (p) => p.setq(p.ge(2 * p.cs), p.q(p.ge(2 * p.cs)) + 2) },
  { name: 'L1 entry unaligned', poke: (p) => p.setq(p.l1off, p.q(p.l1off) + 0x200) },
  { name: 'L1 entry past EOF', poke: (p) => p.setq(p.l1off, COPIED * TWO32 + 2 ** 40) },
  { name: 'L1 entry reserved bits', poke: (p) => p.setq(p.l1off, p.q(p.l1off) + 1) },
  { name: 'OFLAG_COPIED missing on data', refcountOnly: true, poke: (p) => p.andHi(p.ge(48 * MiB), 0x7fffffff) },
  { name: 'OFLAG_COPIED set on shared data', needs: ['snapshot'], refcountOnly: true, poke: (p) => p.orHi(p.ge(0), COPIED) },
  { name: 'OFLAG_COPIED wrong on L1 entry', refcountOnly: true, poke: (p) => p.dv.setUint32(p.l1off, (p.dv.getUint32(p.l1off) ^ COPIED) >>> 0) },
  { name: 'data overlaps header', poke: (p) => p.setq(p.ge(32 * MiB), COPIED * TWO32) },
  { name: 'data overlaps refcount block', poke: (p) => p.setq(p.ge(32 * MiB), COPIED * TWO32 + p.refblock(0)) },
  { name: 'data overlaps L1 table', poke: (p) => p.setq(p.ge(32 * MiB), COPIED * TWO32 + p.l1off) },
  { name: 'data overlaps refcount table', poke: (p) => p.setq(p.ge(32 * MiB), COPIED * TWO32 + p.rtoff) },
  { name: 'data overlaps snapshot table', needs: ['snapshot'], poke: (p) => p.setq(p.ge(32 * MiB), COPIED * TWO32 + p.snoff) },
  { name: 'two L1 entries share an L2 table', poke: (p) => p.setq(p.l1off + 8, COPIED * TWO32 + p.l2off(0)) },
  {
    name: 'compressed descriptor past EOF',
    needs: ['compressed'],
    poke: (p) => {
      const a = compEntry(p);
      const hiBits = 62 - (p.cb - 8) - 32;
      p.dv.setUint32(a, ((p.dv.getUint32(a) & ~((1 << hiBits) - 1)) | 0x100) >>> 0);
    },
  },
  { name: 'compressed with OFLAG_COPIED', needs: ['compressed'], poke: (p) => p.orHi(compEntry(p), COPIED) },
  { name: 'snapshot L1 offset unaligned', needs: ['snapshot'], poke: (p) => p.setq(p.snoff, p.q(p.snoff) + 0x200) },
  { name: 'snapshot L1 size too large', needs: ['snapshot'], poke: (p) => p.dv.setUint32(p.snoff + 8, 0x500000) },
  { name: 'snapshot count too large', needs: ['snapshot'], poke: (p) => p.dv.setUint32(60, 70000) },
  { name: 'snapshot extra data too large', needs: ['snapshot'], poke: (p) => p.dv.setUint32(p.snoff + 36, 2000) },
  { name: 'refcount table entry unaligned', poke: (p) => p.setq(p.rtoff, p.q(p.rtoff) + 0x200) },
  { name: 'refcount table entry reserved bits', poke: (p) => p.setq(p.rtoff, p.q(p.rtoff) + 1) },
  { name: 'refcount block past EOF', poke: (p) => p.setq(p.rtoff + 8, p.b.length + 3 * p.cs) },
  { name: 'refcount block overlaps L2 table', poke: (p) => p.setq(p.rtoff + 8, p.l2off(0)) },
  { name: 'refcount table clusters 0', poke: (p) => p.dv.setUint32(56, 0) },
  { name: 'dirty bit', refcountOnly: true, poke: (p) => (p.b[79] = p.b[79]! | 1) },
  { name: 'corrupt bit', refcountOnly: true, poke: (p) => (p.b[79] = p.b[79]! | 2) },
];
