// The CLI as one script with V8's code cache (bin/bundle-loader.js, src/build/bundle.ts): built by
// `npm run build` (which `npm test` runs first), used by bin/qimg.js when current, and printing
// exactly what the module tree prints; a stale bundle or cache is never used.
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { createRequire } from 'node:module';
import { copyFileSync, mkdirSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { FIXTURES, QIMG_BIN, REPO, run, tmpDir } from '../helpers.js';

const require = createRequire(import.meta.url);
const LOADER = join(REPO, 'bin', 'bundle-loader.js');
const DEMO = join(FIXTURES, 'demo.qcow2');

interface Loaded {
  exports: { main(argv: string[]): Promise<void> };
  script: { cachedDataRejected?: boolean };
}
type LoadBundle = (o?: { useCache?: boolean }) => Loaded | null;

test('npm run build left a current bundle whose code cache V8 accepts', () => {
  const { loadBundle } = require(LOADER) as { loadBundle: LoadBundle };
  const b = loadBundle();
  assert.ok(b, 'bin/qimg.js would fall back to the module tree');
  assert.is(b!.script.cachedDataRejected, false, 'the code cache was rejected (or missing)');
  assert.type(b!.exports.main, 'function');
});

/** The same command through the module tree, bypassing the bundle. */
function viaTree(args: string[], cwd: string): { status: number; stdout: string; stderr: string } {
  const runner = join(cwd, 'tree.mjs');
  const main = join(REPO, 'dist', 'src', 'cli', 'main.js');
  writeFileSync(runner, `import(${JSON.stringify(main)}).then((m) => m.main(process.argv.slice(2)));\n`);
  return run(process.execPath, [runner, ...args], {}, cwd);
}

test('the bundled CLI prints and exits as the module tree does', () => {
  const dir = tmpDir();
  copyFileSync(DEMO, join(dir, 'demo.qcow2'));
  const cases = [
    ['info', 'demo.qcow2'],
    ['info', '--output=json', 'demo.qcow2'],
    ['snapshot', '-l', 'demo.qcow2'],
    ['check', '--output=json', 'demo.qcow2'],
    ['map', 'demo.qcow2'],
    ['compare', 'demo.qcow2', join(FIXTURES, 'v2.qcow2')],
    ['info', 'missing.qcow2'],
    ['--help'], // from the module tree in both: yargs is loaded through the loader's import()
    ['convert', '--help'],
    ['nonsense'],
  ];
  for (const args of cases) {
    const bundled = run(process.execPath, [QIMG_BIN, ...args], {}, dir);
    const tree = viaTree(args, dir);
    assert.is(bundled.stdout, tree.stdout, args.join(' '));
    assert.is(bundled.stderr, tree.stderr, args.join(' '));
    assert.is(bundled.status, tree.status, args.join(' '));
  }
  // zstd compression: the codec is an import() the bundle hands to the loader.
  const z = run(process.execPath, [QIMG_BIN, 'convert', '-c', '-O', 'qcow2', '-o', 'compression_type=zstd', 'demo.qcow2', 'z.qcow2'], {}, dir);
  assert.is(z.status, 0, z.stderr);
  assert.is(run(process.execPath, [QIMG_BIN, 'compare', 'demo.qcow2', 'z.qcow2'], {}, dir).stdout, 'Images are identical.\n');
});

test('a bundle older than the module tree, or a cache older than its bundle, is not used', () => {
  // A copy of the layout bin/ and dist/ make, so the real ones are not touched.
  const root = tmpDir();
  mkdirSync(join(root, 'bin'));
  mkdirSync(join(root, 'dist', 'src', 'cli'), { recursive: true });
  copyFileSync(LOADER, join(root, 'bin', 'bundle-loader.js'));
  copyFileSync(join(REPO, 'bin', 'package.json'), join(root, 'bin', 'package.json'));
  writeFileSync(join(root, 'dist', 'qimg.cjs'), '(function (exports, require, module) { module.exports.main = async () => 42; })');
  writeFileSync(join(root, 'dist', 'qimg.cjs.cache'), 'not a code cache');
  writeFileSync(join(root, 'dist', 'src', 'cli', 'main.js'), '');
  const at = (path: string, seconds: number) => utimesSync(join(root, path), seconds, seconds);
  const { loadBundle } = require(join(root, 'bin', 'bundle-loader.js')) as { loadBundle: LoadBundle };

  at('dist/src/cli/main.js', 1000);
  at('dist/qimg.cjs', 2000);
  at('dist/qimg.cjs.cache', 1500); // written before the bundle: left out
  const b = loadBundle();
  assert.ok(b);
  assert.is(b!.script.cachedDataRejected, undefined, 'no cache was offered');
  // After the bundle: offered, and V8 rejects this one. (A new source text: V8 would answer the
  // same one from its in-process compilation cache without looking at the offered cache.)
  writeFileSync(join(root, 'dist', 'qimg.cjs'), '(function (exports, require, module) { module.exports.main = async () => 43; })');
  at('dist/qimg.cjs', 2000);
  at('dist/qimg.cjs.cache', 3000);
  assert.is(loadBundle()!.script.cachedDataRejected, true);
  at('dist/src/cli/main.js', 4000); // tsc ran after the bundle was built
  assert.is(loadBundle(), null);
  // A damaged bundle (cut short) is not used either: the module tree still runs the command.
  writeFileSync(join(root, 'dist', 'qimg.cjs'), '(function (exports, require, module) { module.exports.main = ');
  at('dist/qimg.cjs', 5000);
  assert.is(loadBundle(), null);
});

test.run();
