"""`tl.dot` with pyinf's precision modes (a @triton.jit helper shared by the kernels).

MODE (constexpr):
  0: fp32 operands, `tl.dot(..., input_precision=PRECISION)` ("ieee", "tf32x3", "tf32").
  1: `a` fp32, `b` holds exact bf16 values: a = a_hi + a_lo (both bf16),
     acc += a_hi·b + a_lo·b with two bf16 MMAs (relative error ~2^-16).
  2: `a` and `b` both hold exact bf16 values: one bf16 MMA, exact products,
     fp32 accumulation (Gram / GFIM of bf16 gradients).
  3: `a` and `b` both hold exact fp16 values: one fp16 MMA, likewise exact (a
     product of two fp16 values has 22 significant bits and fits fp32 in range)
     with fp32 accumulation (Gram / GFIM of fp16 gradients).
NATIVE_BF16 (constexpr): feed bf16 to `tl.dot` (GPU). Off under the interpreter,
which multiplies bf16 wrongly: there the bf16 parts are upcast to fp32 first,
so the split is still exercised by the CPU tests. MODE 3 ignores it: the
interpreter multiplies fp16 correctly (fp32 products and sums), so the CPU
tests run the GPU's code.
"""
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, MODE: tl.constexpr, NATIVE_BF16: tl.constexpr):
    if MODE == 0:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    elif MODE == 1:
        a_hi = a.to(tl.bfloat16)
        a_lo = (a - a_hi.to(tl.float32)).to(tl.bfloat16)
        if NATIVE_BF16:
            b16 = b.to(tl.bfloat16)
            acc = tl.dot(a_hi, b16, acc)
            acc = tl.dot(a_lo, b16, acc)
        else:
            acc = tl.dot(a_hi.to(tl.float32), b, acc, input_precision="ieee")
            acc = tl.dot(a_lo.to(tl.float32), b, acc, input_precision="ieee")
    elif MODE == 3:
        acc = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    else:
        if NATIVE_BF16:
            acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc
