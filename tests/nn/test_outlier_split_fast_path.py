"""OutlierSplitLinear's fast path (no gather of the main channels: a derived full-width weight with
zero outlier columns and ``smooth = inf`` there) against the two-QuantLinear form it replaces."""

import pytest
import torch

import mmkernels
from mmkernels.nn import OutlierSplitLinear, QuantLinear
from mmkernels.quant import quantize_weight


def _split(symmetric=True, perm=False, smooth=True, seed=0, k=96, n=40, idx=(3, 17, 40)):
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    idx = torch.tensor(idx)
    keep = torch.ones(k, dtype=torch.bool)
    keep[idx] = False
    sm = torch.rand(k - len(idx)) + 0.5 if smooth else None
    wm = w[:, keep] * sm if smooth else w[:, keep]
    input_perm = torch.randperm(k - len(idx)) if perm else None
    if perm:
        wm = wm[:, input_perm]
        sm = sm[input_perm] if smooth else None
    main = QuantLinear.from_quantized(
        quantize_weight(wm, 8, symmetric=symmetric), torch.randn(n), act_bits=8, smooth=sm, input_perm=input_perm
    )
    outl = QuantLinear.from_quantized(quantize_weight(w[:, idx], 8, symmetric=symmetric), act_bits=8)
    return OutlierSplitLinear(main, outl, idx)


def _two_gemms(m, x):
    return m.main(x.index_select(-1, m.main_index)) + m.outliers(x.index_select(-1, m.outlier_index))


def _inputs(m, shape=(5, 7)):
    x = torch.randn(*shape, m.in_features)
    x[..., m.outlier_index] *= 30
    return x


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("perm", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
def test_fast_path_matches_two_gemms(symmetric, perm, smooth):
    m = _split(symmetric, perm, smooth)
    x = _inputs(m)
    with torch.no_grad():
        want = _two_gemms(m, x)
        got = m(x)
        assert m.__dict__.get("_fused_entry") is not None, "the fast path did not run"
        # the main part is bit-identical (zero columns, x / inf = 0)
        full_qw, full_smooth = m._fused(x)[:2]
        main_full = mmkernels.qmatmul(x, full_qw, m.main.bias, 8, smooth=full_smooth)
        assert torch.equal(main_full, m.main(x.index_select(-1, m.main_index)))
    assert got.shape == want.shape == (5, 7, m.out_features)
    # the outlier part is added by one float32 addmm_: a few ulps of the output
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fast_path_sees_weight_changes():
    m = _split(perm=True)
    x = _inputs(m)
    with torch.no_grad():
        m(x)
        m.main.quantized.scales.mul_(0.5)  # in place: version counter
        m.outliers.quantized.scales.mul_(2.0)
        want = _two_gemms(m, x)
        assert torch.allclose(m(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        m.main.quantized.qweight.numpy()[:] = 1  # bypasses the version counter ...
        mmkernels.clear_caches()  # ... so the user clears the caches
        want = _two_gemms(m, x)
        assert torch.allclose(m(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
        sd = {k: v.clone() for k, v in _split(perm=True, seed=1).state_dict().items()}
        m.load_state_dict(sd)
        want = _two_gemms(m, x)
        assert torch.allclose(m(x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_fast_path_nan_rows_follow_the_two_gemms():
    m = _split()
    x = _inputs(m, (6,))
    x[0, 3] = float("nan")  # an outlier channel
    x[1, 3] = float("inf")
    x[2, 5] = float("inf")  # a main channel
    x[3, 5] = float("nan")
    with torch.no_grad():
        want, got = _two_gemms(m, x), m(x)
    assert torch.equal(torch.isnan(got).all(-1), torch.isnan(want).all(-1))
    assert torch.isnan(got[:4]).all() and not torch.isnan(got[4:]).any()


def test_slow_path_under_autograd_and_for_bfloat16():
    m = _split()
    x = _inputs(m).requires_grad_(True)
    with torch.no_grad():
        want = _two_gemms(m, x)
    got = m(x)  # grad mode with a leaf that wants grad
    assert "_fused_entry" not in m.__dict__
    assert torch.equal(got, want)
    xb = x.detach().to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(m(xb), _two_gemms(m, xb))
    assert "_fused_entry" not in m.__dict__


def test_derived_tensors_stay_out_of_state_dict_and_pickles():
    import pickle

    m = _split()
    with torch.no_grad():
        m(_inputs(m))
    assert "_fused_entry" in m.__dict__
    assert set(m.state_dict()) == set(_split().state_dict())
    assert "_fused_entry" not in pickle.loads(pickle.dumps(m)).__dict__
