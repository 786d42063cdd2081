// Buffers that bulk reads land in: allocated on a page boundary, because the kernel's copy into a
// misaligned one is several times slower.
//
// Measured on this project's 2-vCPU machines (Linux 6.18, x86-64, Node 20): 2 MiB preads of a
// 745 MB file from the page cache cost 0.11 s of system time into a buffer at a 32-byte (or page)
// boundary and 0.47-0.58 s into one 8 or 16 bytes past it. Node's ArrayBuffers come from calloc(),
// which puts a large block 16 bytes into a fresh mapping, so a plain `new Uint8Array(2 MiB)` is
// the slow case (qemu-img reads into page-aligned memory). Writes from either are equally fast.
//
// A WebAssembly memory is mapped by V8 itself, page-aligned, and typed arrays over it are as fast
// as over any ArrayBuffer. (A resizable ArrayBuffer is page-aligned too, but V8 11's optimized
// code reads typed arrays over one 4-7x slower.) Each one reserves a large range of address space,
// so this is for the few long-lived buffers an operation reuses, not for per-table allocations.

const WASM_PAGE = 65536;

/** `n` zero bytes starting on a page boundary (plain memory where a WebAssembly one cannot be had). */
export function ioBuffer(n: number): Uint8Array<ArrayBuffer> {
  try {
    const mem = new WebAssembly.Memory({ initial: Math.ceil(n / WASM_PAGE) });
    return new Uint8Array(mem.buffer, 0, n);
  } catch {
    return new Uint8Array(n);
  }
}

/** ioBuffer() as a Buffer (for its compare/equals methods). */
export function ioBufferB(n: number): Buffer {
  return Buffer.from(ioBuffer(n).buffer, 0, n);
}
