// Loads the CLI from dist/qimg.cjs (one script, built by src/build/bundle.ts) with V8's code cache
// for it, instead of importing the ~35 ES modules of dist/src one by one.
//
// Why: on Node 20 (no module compile cache before Node 22) every command spent as long resolving,
// reading and compiling its modules as Node spends starting at all: `snapshot -l` took 96 ms, 55 ms
// this way. Nothing else changes: the bundle is the same compiled code, and whenever it is missing
// or older than the tree tsc last wrote (a build that skipped `npm run build`), loadBundle()
// returns null and the caller imports dist/src as before. The cache is used only when written after
// the bundle (V8 itself checks little more than its length); V8 rejects one from another Node.

'use strict';
// CommonJS, as all of bin/ (bin/package.json): this runs before anything else on every command.

const { readFileSync, statSync } = require('node:fs');
const { createRequire } = require('node:module');
const { dirname, join } = require('node:path');
const { pathToFileURL } = require('node:url');
const { Script } = require('node:vm');

const BUNDLE = join(__dirname, '..', 'dist', 'qimg.cjs');
const CODE_CACHE = `${BUNDLE}.cache`;
const TREE_MAIN = join(__dirname, '..', 'dist', 'src', 'cli', 'main.js');

function mtime(path) {
  try {
    return statSync(path).mtimeMs;
  } catch {
    return -1;
  }
}

/**
 * The bundle's exports ({ main, reportError }) and its Script (for createCachedData), or null
 * when there is no usable bundle. `useCache: false` compiles without the cache (to make one).
 */
function loadBundle({ useCache = true } = {}) {
  const built = mtime(BUNDLE);
  if (built < 0 || built < mtime(TREE_MAIN)) return null;
  let cachedData;
  if (useCache && mtime(CODE_CACHE) >= built) {
    try {
      cachedData = readFileSync(CODE_CACHE);
    } catch {
      cachedData = undefined;
    }
  }
  // The bundle's import() calls (yargs for --help, the zstd codec: modules it does not contain)
  // come here: a path relative to dist/, or a package found from this directory.
  const importer = (specifier) => import(specifier.startsWith('./') ? pathToFileURL(join(dirname(BUNDLE), specifier)).href : specifier);
  try {
    const script = new Script(readFileSync(BUNDLE, 'utf8'), { filename: BUNDLE, cachedData });
    const module = { exports: {} };
    script.runInThisContext()(module.exports, createRequire(BUNDLE), module, BUNDLE, dirname(BUNDLE), importer);
    if (typeof module.exports.main !== 'function') return null;
    return { exports: module.exports, script };
  } catch {
    return null; // a damaged bundle: the module tree still works
  }
}

module.exports = { BUNDLE, CODE_CACHE, loadBundle };
