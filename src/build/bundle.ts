// Build step after tsc (`npm run build`, `prepare`): dist/qimg.cjs, the CLI's compiled modules as
// one script, and dist/qimg.cjs.cache, V8's code for it after a warm-up run of the commands.
// bin/bundle-loader.js loads them; it says why, and falls back to dist/src when they are absent.
//
// esbuild (a devDependency) does the bundling: joining ES modules into one script is a bundler's
// whole job, and esbuild's is small, fast and widely used. It bundles tsc's OUTPUT, so the code
// that runs is the code tsc checked and the tests import.

import { spawnSync } from 'node:child_process';
import { copyFileSync, mkdtempSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join, relative, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { build, type Plugin } from 'esbuild';

const DIST = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const REPO = dirname(DIST);
const BUNDLE = join(DIST, 'qimg.cjs');
const CODE_CACHE = `${BUNDLE}.cache`;
/** Loaded through Node's own loader at run time, not bundled: --help needs yargs, which is ESM only. */
const KEEP_OUT = [join(DIST, 'src', 'cli', 'help.js')];

/**
 * Each module's `import.meta.url` becomes its own file's URL in dist/src, computed at run time
 * from where the bundle is: modules find package.json, the native helper and node_modules by it.
 */
const distModules: Plugin = {
  name: 'qimg-dist-modules',
  setup(b) {
    b.onResolve({ filter: /^\.\.?\// }, (args) => {
      const path = resolve(args.resolveDir, args.path);
      if (!KEEP_OUT.includes(path)) return undefined;
      return { path: `./${relative(DIST, path)}`, external: true };
    });
    b.onLoad({ filter: /\.js$/ }, (args) => {
      const rel = relative(DIST, args.path);
      const source = readFileSync(args.path, 'utf8');
      return { contents: source.replaceAll('import.meta.url', `__qimgModuleUrl(${JSON.stringify(rel)})`), loader: 'js' };
    });
  },
};

/** Written beside and renamed over: a qimg starting meanwhile reads the old file or the new, never half of one. */
function writeAtomically(path: string, data: string | Uint8Array): void {
  const tmp = `${path}.${process.pid}.tmp`;
  writeFileSync(tmp, data);
  renameSync(tmp, path);
}

async function bundle(): Promise<void> {
  const result = await build({
    entryPoints: [join(DIST, 'src', 'cli', 'main.js')],
    bundle: true,
    platform: 'node',
    format: 'cjs',
    target: 'node20',
    packages: 'external', // fs-ext, fzstd, the zstd codec, yargs: from node_modules at run time
    plugins: [distModules],
    write: false,
    logLevel: 'error',
    banner: {
      js: "const __qimgModuleUrl = (rel) => require('node:url').pathToFileURL(require('node:path').join(__dirname, rel)).href;",
    },
  });
  // What esbuild left as import() loads a module it did not bundle (yargs's --help, the zstd
  // codec, node:zlib). A script's own import() would need vm's experimental main-context loader
  // (a warning on every run, and refused for code from the cache): the loader's import() does it.
  let code = result.outputFiles[0]!.text;
  const calls = code.match(/\bimport\(/g)?.length ?? 0;
  code = code.replace(/\bimport\(("[^"\n]+")\)/g, '__qimgImport($1)');
  if (/\bimport\(/.test(code)) throw new Error(`an import() of ${calls} is not a plain string: the bundle would not load it`);
  // ASCII only: one non-ASCII character (a dash in a comment) made V8 hold the whole script as a
  // two-byte string, twice the memory, and its UTF-8 decode slower at every start. A \u escape means
  // the same character in a string, a regular expression or an identifier, and nothing in a comment.
  code = code.replace(/[^\x00-\x7f]/g, (ch) => `\\u${ch.charCodeAt(0).toString(16).padStart(4, '0')}`);
  // The loader calls the script's value with CommonJS's five arguments and its import().
  writeAtomically(BUNDLE, `(function (exports, require, module, __filename, __dirname, __qimgImport) {\n${code}\n})`);
}

/**
 * Runs the commands users run most, in one process, on copies of the fixtures, then saves the
 * code V8 compiled meanwhile: the functions they need start compiled.
 */
function warmUp(): void {
  const dir = mkdtempSync(join(tmpdir(), 'qimg-warm-'));
  try {
    copyFileSync(join(REPO, 'fixtures', 'demo.qcow2'), join(dir, 'demo.qcow2'));
    const runs = [
      ['info', 'demo.qcow2'],
      ['info', '--output=json', '--backing-chain', 'demo.qcow2'],
      ['snapshot', '-l', 'demo.qcow2'],
      ['check', 'demo.qcow2'],
      ['check', '--output=json', 'demo.qcow2'],
      ['map', 'demo.qcow2'],
      ['map', '--output=json', 'demo.qcow2'],
      ['create', '-q', '-f', 'qcow2', 'new.qcow2', '64M'],
      ['convert', '-O', 'qcow2', 'demo.qcow2', 'copy.qcow2'],
      ['convert', '-O', 'raw', 'demo.qcow2', 'copy.raw'],
      ['compare', 'demo.qcow2', 'copy.qcow2'],
      ['snapshot', '-c', 'warm', 'copy.qcow2'],
      ['snapshot', '-a', 'warm', 'copy.qcow2'],
      ['snapshot', '-d', 'warm', 'copy.qcow2'],
      ['create', '-q', '-f', 'qcow2', '-b', 'copy.qcow2', '-F', 'qcow2', 'top.qcow2'],
      ['commit', 'top.qcow2'],
      ['rebase', '-b', '', 'top.qcow2'],
      ['resize', 'new.qcow2', '+1M'],
      ['check', '-r', 'all', 'new.qcow2'],
    ];
    const script = `
      const { renameSync, writeFileSync } = require('node:fs');
      const { loadBundle, CODE_CACHE } = require(${JSON.stringify(join(REPO, 'bin', 'bundle-loader.js'))});
      (async () => {
        const b = loadBundle({ useCache: false });
        if (!b) throw new Error('no bundle to warm up');
        for (const argv of ${JSON.stringify(runs)}) await b.exports.main(argv);
        // convert held TurboFan back (src/cli/tiering.ts). V8 stamps a cache with a hash of the
        // flags at the time, and a run that loads it has the defaults: back to them first.
        require('node:v8').setFlagsFromString('--turbofan');
        writeFileSync(CODE_CACHE + '.tmp', b.script.createCachedData());
        renameSync(CODE_CACHE + '.tmp', CODE_CACHE);
        process.exitCode = 0;
      })();
    `;
    const r = spawnSync(process.execPath, ['-e', script], { cwd: dir, encoding: 'utf8', stdio: ['ignore', 'ignore', 'pipe'] });
    // Failing commands only print (the fixtures change nothing); a crashed warm-up leaves no cache.
    if (r.status !== 0) throw new Error(`warm-up failed (${r.status ?? r.signal}): ${r.stderr.split('\n').slice(-5).join('\n')}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

rmSync(CODE_CACHE, { force: true }); // never a cache older than the bundle it would be used with
await bundle();
try {
  warmUp();
} catch (err) {
  // The bundle works without its cache, only slower to start.
  rmSync(CODE_CACHE, { force: true });
  console.error(`qimg build: no code cache: ${(err as Error).message}`);
}
