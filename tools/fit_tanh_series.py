"""Fit the float32 series of the kernels' tanh (fa_exp.h, FA_TANHF_COEF) and check it.

tanh(a) = a + a * a^2 * p(a^2) for 0 <= a < 0.6, p of degree 4: a minimax fit of the
relative error of tanh (Lawson's iteratively reweighted least squares), its coefficients
rounded to float32, then evaluated in float32 arithmetic with FMAs as the kernels do, on
2,000,001 points of [0, 0.6]. Run: python tools/fit_tanh_series.py
"""
import re

import numpy as np

T = 0.6  # the threshold in fa_tanhf
A = np.linspace(1e-4, T, 40_000)
U = A * A
G = (np.tanh(A) / A - 1) / U             # p(u) should equal this
W = A * U / np.tanh(A)                   # error in p -> relative error in tanh
V = np.vander(U, 5)
weights = np.ones_like(U)
for _ in range(300):
    s = W * np.sqrt(weights)
    coef = np.linalg.lstsq(V * s[:, None], G * s, rcond=None)[0]
    err = np.abs((V @ coef - G) * W)
    weights = weights * err
    weights /= weights.sum()
coef32 = [np.float32(c) for c in coef]

a = np.linspace(0, T, 2_000_001).astype(np.float32)
a2 = a * a
p = np.full_like(a, coef32[0])
for c in coef32[1:]:
    p = (p.astype(np.float64) * a2 + c).astype(np.float32)       # one rounding: an FMA
t = (a.astype(np.float64) + a.astype(np.float64) * (a2 * p)).astype(np.float32)
exact = np.tanh(a.astype(np.float64))
nz = a > 0
ulps = np.abs(t[nz] - exact[nz]) / np.spacing(exact[nz].astype(np.float32))
print("#define FA_TANHF_COEF " + ", ".join(re.sub("0+p", "p", float(c).hex()) + "f" for c in coef32))
print(f"max error on [0, {T}]: {ulps.max():.3f} ulp")
