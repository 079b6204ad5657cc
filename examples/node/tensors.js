'use strict';
// Decoding gemma-serve's tensor bytes, and the checksum forward.js prints.
//
// Every dtype is decoded to float32, exactly: float16 and bfloat16 values
// are all representable as float32.

const ITEM_BYTES = { DTYPE_FLOAT32: 4, DTYPE_BFLOAT16: 2, DTYPE_FLOAT16: 2 };

// IEEE 754 binary16: 1 sign bit, 5 exponent bits (bias 15), 10 fraction bits.
function halfToFloat(bits) {
  const sign = bits & 0x8000 ? -1 : 1;
  const exponent = (bits >> 10) & 0x1f;
  const fraction = bits & 0x3ff;
  if (exponent === 0) return sign * fraction * 2 ** -24;  // zero, subnormals
  if (exponent === 0x1f) return fraction ? NaN : sign * Infinity;
  return sign * (1 + fraction / 1024) * 2 ** (exponent - 15);
}

// All 65536 halves, decoded once.
const HALVES = Float32Array.from({ length: 1 << 16 }, (_, bits) => halfToFloat(bits));

// Decodes `data` (a Buffer of little-endian values of `dtype`) into the
// Float32Array `out`, starting at element `at`.
function decodeInto(dtype, data, out, at) {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const count = data.byteLength / ITEM_BYTES[dtype];
  if (dtype === 'DTYPE_FLOAT32') {
    for (let i = 0; i < count; i++) out[at + i] = view.getFloat32(4 * i, true);
  } else if (dtype === 'DTYPE_BFLOAT16') {
    // bfloat16 is the upper 16 bits of a float32: shift them into place.
    const words = new Uint32Array(out.buffer, out.byteOffset, out.length);
    for (let i = 0; i < count; i++) words[at + i] = view.getUint16(2 * i, true) << 16;
  } else if (dtype === 'DTYPE_FLOAT16') {
    for (let i = 0; i < count; i++) out[at + i] = HALVES[view.getUint16(2 * i, true)];
  } else {
    throw new Error(`unknown dtype ${dtype}`);
  }
}

// The checksum of a tensor, reproducible in any language: take its values in
// row-major order, each float32 widened exactly to float64, and add them one
// after another, left to right, into a float64 that starts at 0 (`sum`);
// `abs_sum` likewise with absolute values; `first` is the first 4 values.
// In Python: a = x.astype(np.float64).ravel(); np.cumsum(a)[-1],
// np.cumsum(np.abs(a))[-1], a[:4].tolist(), bit for bit.
function checksum(values) {
  let sum = 0;
  let absSum = 0;
  for (const value of values) {
    sum += value;
    absSum += Math.abs(value);
  }
  return { sum, abs_sum: absSum, first: Array.from(values.subarray(0, 4)) };
}

module.exports = { ITEM_BYTES, halfToFloat, decodeInto, checksum };
