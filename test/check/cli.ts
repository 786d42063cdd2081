// Running `qimg check` in tests: the real command module, as users run it.
import { qimg, type RunResult } from '../helpers.js';

/** The check command as users run it; in-process until main.ts registers `check`. */
let viaBinary: boolean | null = null;
export async function qimgCheck(args: string[]): Promise<RunResult> {
  if (viaBinary === null) viaBinary = qimg(['check', '--help']).status === 0;
  if (viaBinary) return qimg(['check', ...args]);
  const mod = await import('../../src/cli/commands/check.js');
  let stdout = '';
  let stderr = '';
  const ow = process.stdout.write.bind(process.stdout);
  const ew = process.stderr.write.bind(process.stderr);
  process.stdout.write = ((c: string) => ((stdout += c), true)) as typeof process.stdout.write;
  process.stderr.write = ((c: string) => ((stderr += c), true)) as typeof process.stderr.write;
  let status: number;
  try {
    status = await mod.run(args);
  } catch (err) {
    const { reportError } = await import('../../src/cli/main.js');
    status = reportError(err);
  } finally {
    process.stdout.write = ow;
    process.stderr.write = ew;
  }
  return { status, stdout, stderr };
}

/** qemu-img's output as qimg prints it: the program name is the only difference. */
export function asQimg(r: RunResult, from?: string, to?: string): RunResult {
  const fix = (s: string) => {
    let t = s.replace(/qemu-img/g, 'qimg');
    if (from && to) t = t.split(from).join(to);
    return t;
  };
  return { status: r.status, stdout: fix(r.stdout), stderr: fix(r.stderr) };
}

