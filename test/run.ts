// Runs every *.test.js under dist/test with uvu and ends with the line CI reads: `N passed, M failed`.
import { readdirSync, statSync } from 'node:fs';
import { join, relative, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(fileURLToPath(import.meta.url));

function findTests(dir: string, out: string[]): string[] {
  for (const name of readdirSync(dir).sort()) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) findTests(p, out);
    else if (name.endsWith('.test.js')) out.push(p);
  }
  return out;
}

async function main(): Promise<void> {
  const filter = process.argv.slice(2);
  let files = findTests(root, []);
  if (filter.length) files = files.filter((f) => filter.some((x) => f.includes(x)));

  // Count what uvu reports instead of re-implementing its runner.
  let total = 0;
  let passed = 0;
  const write = process.stdout.write.bind(process.stdout);
  process.stdout.write = ((chunk: string | Uint8Array, ...rest: unknown[]) => {
    const s = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString();
    const plain = s.replace(/\x1b\[[0-9;]*m/g, '');
    const t = /Total:\s+(\d+)/.exec(plain);
    if (t) total = Number(t[1]);
    const p = /Passed:\s+(\d+)/.exec(plain);
    if (p) passed = Number(p[1]);
    return (write as (...a: unknown[]) => boolean)(chunk, ...rest);
  }) as typeof process.stdout.write;

  (globalThis as Record<string, unknown>).UVU_DEFER = 1;
  const uvu = await import('uvu');
  const queue = (globalThis as unknown as { UVU_QUEUE: unknown[][] }).UVU_QUEUE;
  let idx = 0;
  let importFailures = 0;
  for (const f of files) {
    (globalThis as Record<string, unknown>).UVU_INDEX = idx++;
    queue.push([relative(root, f)]);
    try {
      await import(f);
    } catch (err) {
      importFailures++;
      console.error(`could not load ${relative(root, f)}:`, err);
    }
  }
  await uvu.exec(false);
  process.stdout.write = write;
  const failed = total - passed + importFailures;
  if (failed > 0) process.exitCode = 1;
  console.log(`${passed} passed, ${failed} failed`);
}

main().catch((err) => {
  console.error(err);
  console.log('0 passed, 1 failed');
  process.exitCode = 1;
});
