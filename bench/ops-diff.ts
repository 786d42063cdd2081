// Differential fuzz of the write commands (test/fuzz/ops.ts) over many cases: random sequences of
// guest writes and qimg commands (snapshot -c/-a/-d, resize, convert, commit, rebase) against
// qemu-img running the same commands on a twin image; every step must agree and leave qimg's
// image clean under `qemu-img check`.
//
//   node dist/bench/ops-diff.js [--seed N] [--count N] [--from N] [--steps N] [--out DIR]
//
// A disagreement prints its step log (replay it by hand, or rerun the case alone with
// --seed SEED --from INDEX --count 1) and is appended to DIR/ops-diff-SEED.txt. It reports; the
// exit code is 1 when any case disagreed.

import { appendFileSync, mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { tmpdir } from 'node:os';
import { runOpsCase } from '../test/fuzz/ops.js';

function opt(name: string, fallback: number): number {
  const i = process.argv.indexOf(name);
  return i >= 0 ? Number(process.argv[i + 1]) : fallback;
}

const seed = opt('--seed', Date.now() % 1_000_000_007);
const from = opt('--from', 0);
const count = opt('--count', 50);
const steps = opt('--steps', 25);
const oi = process.argv.indexOf('--out');
const out = oi >= 0 ? process.argv[oi + 1]! : join(tmpdir(), 'qimg-ops-diff');
mkdirSync(out, { recursive: true });
console.log(`ops-diff: seed ${seed}, cases ${from}..${from + count - 1}, ${steps} steps each, findings in ${out}`);
let found = 0;
const known = new Map<string, number>();
const kinds = new Map<string, number>();
const t0 = Date.now();
for (let i = from; i < from + count; i++) {
  const f = runOpsCase(join(out, `case-${process.pid}`), seed, i, steps, (op) => {
    const kind = op.replace(/\(.*?\)/g, '').replace(/[0-9]+/g, 'N').split(' ').slice(0, 3).join(' ');
    kinds.set(kind, (kinds.get(kind) ?? 0) + 1);
  });
  if (f?.known) {
    known.set(f.known, (known.get(f.known) ?? 0) + 1);
  } else if (f) {
    found++;
    const text = `seed ${f.seed} case ${f.index} step ${f.step}: ${f.op}\n${f.what}\nsteps:\n${f.log.map((l, k) => `  ${k}. ${l}`).join('\n')}\n\n`;
    process.stdout.write(text);
    appendFileSync(join(out, `ops-diff-${seed}.txt`), text);
  }
  if ((i - from + 1) % 10 === 0) console.log(`  ${i - from + 1}/${count} cases, ${found} disagreeing, ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}
console.log(`ops-diff: ${count} cases, ${found} disagreeing${known.size ? `; ended early on a deliberate difference: ${[...known].map(([k, n]) => `${k} ${n}`).join(', ')}` : ''}`);
console.log(`steps by kind: ${[...kinds].sort((x, y) => y[1] - x[1]).map(([k, n]) => `${k}: ${n}`).join('; ')}`);
process.exitCode = found ? 1 : 0;
