// The seeded, bounded fuzz run: a fixed seed, a few thousand mutated images through every
// command in runner children (time limit, heap cap, RSS check), plus a sample through the real
// CLI. Any finding fails the test and prints how to rerun it alone (bench/fuzz-long.ts).
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { tmpDir } from '../helpers.js';
import { formatFinding, makeSeeds, runCliSample, runFuzz } from './harness.js';

const RUN_SEED = 20240601;
/** Sized for < 2 minutes on 2 cores with other tests running (about 40 read-only cases/s alone, far fewer under load). */
const CASES = 1600;
const WRITE_EVERY = 10;
const CLI_SAMPLE = 15;

const seedDir = tmpDir('qimg-fuzz-');
const seeds = makeSeeds(seedDir);

test(`fuzz: ${CASES} cases of seed ${RUN_SEED} (write commands on every ${WRITE_EVERY}th) find nothing`, async () => {
  const res = await runFuzz({ seedDir, seeds, runSeed: RUN_SEED, count: CASES, workers: 2, writes: true, writeEvery: WRITE_EVERY });
  console.log(`    fuzz: ${res.cases} cases in ${(res.ms / 1000).toFixed(1)} s, peak RSS ${Math.round(res.maxRSSKiB / 1024)} MiB, ${res.findings.length} findings, ${res.restarts} runner restarts`);
  for (const f of res.findings) console.log('    ' + formatFinding(f));
  assert.is(res.cases, CASES);
  assert.is(res.findings.length, 0, `rerun one with: node dist/bench/fuzz-long.js --seed ${RUN_SEED} --from N --count 1`);
});

test(`fuzz: ${CLI_SAMPLE} cases through real qimg processes keep exit codes and stderr in shape`, () => {
  const t0 = Date.now();
  const indices = Array.from({ length: CLI_SAMPLE }, (_, k) => k * 37 + 5);
  const res = runCliSample({ seedDir, seeds, runSeed: RUN_SEED }, indices);
  console.log(`    cli sample: ${res.runs} runs in ${((Date.now() - t0) / 1000).toFixed(1)} s, ${res.findings.length} findings`);
  for (const f of res.findings) console.log('    ' + formatFinding(f));
  assert.is(res.findings.length, 0);
});

test.run();
