"""Triton kernels of cvt_fast, installed as `cvt_fast.kernels`.

Importing this package does not import Triton; each kernel module does, so the rest of
cvt_fast works where Triton is missing. On CPU tensors the kernels run only under
Triton's interpreter (TRITON_INTERPRET=1, set before the first import of a kernel
module).
"""
