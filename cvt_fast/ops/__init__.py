"""The two fused operations of CvT, behind one contract and several backends.

Every op of the package is declared in `cvt_fast/ops/library.py` (schemas, fake
implementations, autograd); this module holds the public Python entry points.

attention(q, k, v, scale, backend=None) -> out
    q: (B, Nq, H, d); k, v: (B, Nkv, H, d). Any strides as long as the last dim is
    contiguous (stride 1), so the Linear outputs `proj_q(x).view(B, N, H, d)` are read
    in place. Nq and Nkv are arbitrary (Nkv < Nq in CvT). d in {32, 64, 128} for the
    fused kernels (the reference takes any d). dtype bf16, fp16, fp32 or fp64, the
    same for q, k, v. `scale` multiplies the scores (CvT uses dim_out ** -0.5).
    Returns out: (B, Nq, H * d), contiguous, dtype of q:
        out[b, i, h*d:(h+1)*d] = softmax_j(scale * q[b,i,h] . k[b,j,h]) @ v[b,:,h]
    Forward also produces lse (B, H, Nq) float32, the natural-log log-sum-exp of the
    scaled scores of each row, saved for the backward; the backward recomputes the
    scores tile by tile (no Nq x Nkv matrix in memory in either direction).
    Backends: reference, triton, cuda, sdpa, xformers.

conv_proj(x, weight_q, weight_k, weight_v, height, width, has_cls,
          stride_q=1, stride_kv=2, padding_q=1, padding_kv=1,
          bias_q=None, bias_k=None, bias_v=None, backend=None) -> (q, k, v)
    x: (B, T, C) tokens, channels last, T = has_cls + height * width; C contiguous.
    weight_*: (C, 1, k, k) depthwise Conv2d weights (kernel size k taken from them);
    bias_*: optional (C,) added to the convolved tokens (used for BatchNorm folded
    into the convolution at eval time). Zero padding.
    Returns q: (B, has_cls + Hq*Wq, C), k and v: (B, has_cls + Hk*Wk, C), contiguous,
    dtype of x, where Hq = (height + 2*padding_q - k) // stride_q + 1 (same for W and
    for k/v with stride_kv, padding_kv). Row 0 of each output is x[:, 0] passed through
    unconvolved (and without bias) when has_cls; the other rows are the depthwise
    convolution of the (height, width) grid of x[:, has_cls:], in row-major (h, w)
    token order. The input is read once for all three convolutions.
    Backends: reference, triton, cuda.

BatchNorm is NOT part of conv_proj: the model applies it (training: batch statistics
over the spatial rows, exactly nn.BatchNorm2d semantics; eval: folded into
weight/bias of conv_proj). See cvt_fast/model.py.

Backend choice: argument `backend` here, else the model's, else the global one
(`cvt_fast.set_backend`), else the environment variable CVT_FAST_BACKEND, else
"auto". See cvt_fast/ops/backend.py.
"""
