// The runtime tuning of the copying commands (src/cli/tuning.ts), in child processes: TurboFan
// held back for a while and then back, and libuv's pool sized unless the user sized it.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { REPO } from '../helpers.js';

const TUNING = join(REPO, 'dist', 'src', 'cli', 'tuning.js');
/** V8's optimisation status bit "optimised" (%GetOptimizationStatus). */
const OPTIMIZED = 1 << 4;

function node(args: string[], script: string, env: Record<string, string | undefined> = {}): string {
  const r = spawnSync(process.execPath, [...args, '--input-type=module', '-e', script], { encoding: 'utf8', env: { ...process.env, ...env } });
  assert.is(r.status, 0, r.stderr);
  return r.stdout.trim();
}

test('holdBackOptimizer: a hot function stays unoptimised meanwhile, and is optimised after', () => {
  const out = node(
    ['--allow-natives-syntax'],
    `
    import { holdBackOptimizer } from ${JSON.stringify(TUNING)};
    const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
    function control(n) { let s = 0; for (let i = 0; i < n; i++) s += i % 7; return s; }
    function held(n) { let s = 0; for (let i = 0; i < n; i++) s += i % 7; return s; }
    const heat = async (f) => { for (let round = 0; round < 4; round++) { for (let k = 0; k < 3000; k++) f(1000); await sleep(20); } };
    await heat(control);
    const before = %GetOptimizationStatus(control);
    holdBackOptimizer(300);
    await heat(held);
    const during = %GetOptimizationStatus(held);
    await sleep(400);
    await heat(held);
    console.log(JSON.stringify([before, during, %GetOptimizationStatus(held)]));
    `,
  );
  const [before, during, after] = JSON.parse(out) as number[];
  assert.ok(before! & OPTIMIZED, `the control was not optimised (status ${before!.toString(2)}): the test proves nothing here`);
  assert.not.ok(during! & OPTIMIZED, `optimised while held back (status ${during!.toString(2)})`);
  assert.ok(after! & OPTIMIZED, `not optimised after the hold-back (status ${after!.toString(2)})`);
});

test('sizeThreadPool: 2-4 threads by CPU count, and a UV_THREADPOOL_SIZE already set is kept', () => {
  const script = `
    import { availableParallelism } from 'node:os';
    import { sizeThreadPool } from ${JSON.stringify(TUNING)};
    sizeThreadPool();
    console.log(process.env.UV_THREADPOOL_SIZE + ' ' + availableParallelism());
  `;
  const [size, cpus] = node([], script, { UV_THREADPOOL_SIZE: undefined }).split(' ').map(Number);
  assert.is(size, Math.min(4, Math.max(2, cpus!)));
  assert.is(node([], script, { UV_THREADPOOL_SIZE: '9' }).split(' ')[0], '9');
});

test.run();
