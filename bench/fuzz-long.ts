// The long fuzz run: a random (or given) seed, many cases, every finding's image saved.
//
//   node dist/bench/fuzz-long.js [--seed N] [--count N] [--workers N] [--out DIR] [--no-writes] [--from N]
//
// Findings print as they arrive; each image is saved as DIR/finding-SEED-INDEX.qcow2 and a
// summary goes to DIR/findings-SEED.txt. A finding reruns alone with --seed SEED --from INDEX --count 1.

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { formatFinding, makeSeeds, runFuzz, type Finding } from '../test/fuzz/harness.js';

function opt(argv: string[], name: string): string | undefined {
  const i = argv.indexOf(name);
  return i >= 0 ? argv[i + 1] : undefined;
}

async function main(argv: string[]): Promise<void> {
  const runSeed = Number(opt(argv, '--seed') ?? Math.floor(Math.random() * 0xffffffff));
  const count = Number(opt(argv, '--count') ?? 20000);
  const from = Number(opt(argv, '--from') ?? 0);
  const workers = Number(opt(argv, '--workers') ?? 2);
  const out = opt(argv, '--out') ?? join(process.cwd(), 'fuzz-findings');
  mkdirSync(out, { recursive: true });
  const seedDir = mkdtempSync(join(tmpdir(), 'qimg-fuzz-long-'));
  try {
    const seeds = makeSeeds(seedDir);
    process.stdout.write(`fuzz-long: seed ${runSeed}, cases ${from}..${from + count - 1}, ${workers} workers, findings in ${out}\n`);
    const findings: Finding[] = [];
    const res = await runFuzz({
      seedDir,
      seeds,
      runSeed,
      count: from + count,
      start: from,
      workers,
      writes: !argv.includes('--no-writes'),
      saveDir: out,
      onFinding: (f) => {
        findings.push(f);
        process.stdout.write(formatFinding(f) + '\n');
      },
    });
    const summary = `seed ${runSeed}: ${res.cases} cases in ${(res.ms / 1000).toFixed(1)} s, ${findings.length} findings, peak RSS ${Math.round(res.maxRSSKiB / 1024)} MiB, ${res.restarts} runner restarts\n`;
    writeFileSync(join(out, `findings-${runSeed}.txt`), summary + findings.map(formatFinding).join('\n') + '\n');
    process.stdout.write(summary);
    if (findings.length) process.exitCode = 1;
  } finally {
    rmSync(seedDir, { recursive: true, force: true });
  }
}

main(process.argv.slice(2)).catch((err) => {
  console.error(err);
  process.exitCode = 2;
});
