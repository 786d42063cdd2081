// `qimg info` / `qimg snapshot -l` against qemu-img 7.2 on the same file at the same time: every
// fixture and every generated kind, human and JSON, with and without --backing-chain, in two zones.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { mkdirSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { FIXTURES, qemuImg, type RunResult } from '../helpers.js';
import { fixtureKinds, generatedKinds, pool, qimgA, settle, type Kind } from '../oracle.js';

const ZONES = ['UTC', 'America/New_York'];

interface Case {
  args: string[];
  tz: string;
}

interface Plan {
  k: Kind;
  cases: Case[];
  want: RunResult[];
  got: RunResult[];
  snapshotsJson: unknown[];
  qimgJson: RunResult | null;
}

function hasBacking(k: Kind): boolean {
  const j = JSON.parse(qemuImg(['info', '-U', '--output=json', k.path]).stdout || '{}') as { 'backing-filename'?: string };
  return j['backing-filename'] !== undefined;
}

/**
 * What to compare for one image. Node's start-up makes every qimg run cost ~0.15 s of CPU, so
 * the zone only varies where it can show (snapshot dates); every fixture gets every form, the
 * generated kinds get the chain forms where there is a chain and snapshot -l where there are
 * snapshots (plus one image without either).
 */
function cases(k: Kind, always: boolean): Case[] {
  const out: Case[] = [];
  const chain = always || hasBacking(k);
  const snaps = k.snapshots.length > 0;
  for (const tz of snaps ? ZONES : ['UTC']) {
    out.push({ args: ['info'], tz });
    if (chain) out.push({ args: ['info', '--backing-chain'], tz });
    if ((snaps || always) && !k.encrypted) out.push({ args: ['snapshot', '-l'], tz });
  }
  out.push({ args: ['info', '--output=json'], tz: 'UTC' });
  if (chain) out.push({ args: ['info', '--backing-chain', '--output=json'], tz: 'UTC' });
  return out;
}

function show(r: RunResult): string {
  return `exit ${r.status}\n--- stdout\n${r.stdout}--- stderr\n${r.stderr}`;
}

/** qemu-img with -U, so it can run while qimg holds its whole-file read lock. */
function oracle(args: string[], env: Record<string, string>, cwd: string): RunResult {
  return qemuImg([args[0]!, ...(args[0] === 'snapshot' ? ['-l', '-U'] : ['-U']), ...args.slice(args[0] === 'snapshot' ? 2 : 1)], env, cwd);
}

settle(FIXTURES);
const SMALL_SET = new Set(['demo.qcow2', 'raw.img', 'backing-base.qcow2', 'luks.qcow2', 'cs512.qcow2']);
const plans: Plan[] = [...fixtureKinds(), ...generatedKinds()].map((k) => {
  const file = basename(k.path);
  const cwd = dirname(k.path);
  const cs = cases(k, SMALL_SET.has(file) || k.dir === FIXTURES);
  const want = cs.map((c) => oracle([...c.args, file], { TZ: c.tz }, cwd));
  const j = oracle(['info', '--output=json', file], {}, cwd);
  const snapshotsJson = j.status === 0 ? ((JSON.parse(j.stdout) as { snapshots?: unknown[] }).snapshots ?? []) : [];
  return { k, cases: cs, want, got: [], snapshotsJson, qimgJson: null };
});

test('info: run every qimg command (4 at a time)', async () => {
  const tasks: (() => Promise<void>)[] = [];
  for (const p of plans) {
    const file = basename(p.k.path);
    const cwd = dirname(p.k.path);
    p.cases.forEach((c, i) => tasks.push(async () => void (p.got[i] = await qimgA([...c.args, file], { env: { TZ: c.tz }, cwd }))));
    if (!p.k.encrypted && (p.k.snapshots.length || SMALL_SET.has(file) || p.k.dir === FIXTURES)) {
      tasks.push(async () => void (p.qimgJson = await qimgA(['snapshot', '-l', '--output=json', file], { cwd })));
    }
  }
  await pool(tasks, 4);
});

for (const p of plans) {
  test(`info: ${p.k.name}`, () => {
    const { k } = p;
    p.cases.forEach((c, i) => {
      const label = `${k.name}: ${c.args.join(' ')} (TZ=${c.tz})`;
      const w = p.want[i]!;
      const g = p.got[i]!;
      assert.ok(g, `${label}: not run`);
      assert.is(g.status, w.status, `${label}: exit code\nqimg: ${show(g)}\nqemu-img: ${show(w)}`);
      assert.fixture(g.stdout, w.stdout, `${label}: stdout`);
      if (w.status !== 0) assert.ok(g.stderr.startsWith('qimg: '), `${label}: stderr ${g.stderr}`);
    });
    if (p.qimgJson) {
      assert.is(p.qimgJson.status, 0, `${k.name}: snapshot -l --output=json: ${show(p.qimgJson)}`);
      // qimg adds one key of its own, "freed-bytes" (bytes a delete would free), last in each
      // object; everything else equals qemu-img's "snapshots", key order included.
      const mine = JSON.parse(p.qimgJson.stdout) as Record<string, unknown>[];
      assert.ok(Array.isArray(mine), `${k.name}: snapshot -l --output=json is an array`);
      for (const o of mine) {
        if ('freed-bytes' in o) {
          assert.ok(Number.isInteger(o['freed-bytes']) && (o['freed-bytes'] as number) >= 0, `${k.name}: freed-bytes ${o['freed-bytes']}`);
          delete o['freed-bytes'];
        }
      }
      assert.equal(mine.map((o) => Object.keys(o)), (p.snapshotsJson as Record<string, unknown>[]).map((o) => Object.keys(o)), `${k.name}: key order`);
      assert.equal(mine, p.snapshotsJson, `${k.name}: snapshot -l --output=json`);
    }
  });
}

test('info: -f raw on a qcow2 image', async () => {
  const args = ['info', '-f', 'raw', 'demo.qcow2'];
  const argsJ = ['info', '-f', 'raw', '--output=json', 'demo.qcow2'];
  const w = qemuImg(args, {}, FIXTURES);
  const wj = qemuImg(argsJ, {}, FIXTURES);
  const [g, gj] = await pool([() => qimgA(args, { cwd: FIXTURES }), () => qimgA(argsJ, { cwd: FIXTURES })]);
  assert.is(g!.status, w.status);
  assert.fixture(g!.stdout, w.stdout);
  assert.fixture(gj!.stdout, wj.stdout);
});

test('info: backing names resolved from another directory (actual path)', async () => {
  const k = generatedKinds().find((x) => x.name === 'chain depth 3')!;
  const sub = join(k.dir, 'sub');
  mkdirSync(sub, { recursive: true });
  const rel = join('..', basename(k.path));
  const runs = [
    { args: ['info', '--backing-chain', rel], cwd: sub },
    { args: ['info', '--backing-chain', '--output=json', rel], cwd: sub },
    { args: ['info', k.path], cwd: '/' },
  ];
  const want = runs.map((r) => qemuImg(r.args, {}, r.cwd));
  const got = await pool(runs.map((r) => () => qimgA(r.args, { cwd: r.cwd })));
  runs.forEach((r, i) => {
    assert.is(got[i]!.status, want[i]!.status, `${r.args.join(' ')}: ${got[i]!.stderr}`);
    assert.fixture(got[i]!.stdout, want[i]!.stdout, r.args.join(' '));
  });
});

test('info: snapshot -l of a raw image and an image without snapshots prints nothing', async () => {
  const [a, b] = await pool([() => qimgA(['snapshot', '-l', 'raw.img'], { cwd: FIXTURES }), () => qimgA(['snapshot', '-l', 'refcount1.qcow2'], { cwd: FIXTURES })]);
  for (const r of [a!, b!]) {
    assert.is(r.status, 0, r.stderr);
    assert.is(r.stdout, '');
  }
});

test.run();
